//! Benchmark tooling for Meridian.
//!
//! - [`bare_call`]: the bank-account component called without Meridian's runtime, the
//!   reference points of the WASM-vs-native benchmark.
//! - [`load`]: a closed-loop HTTP load generator for any service exposing the command
//!   endpoint `POST /v1/aggregates/{type}/{id}`, so the same client and measurements can
//!   be pointed at Meridian and at comparison implementations alike.
//! - [`workload`]: what to send (the bank-account command mix and its account setup).
//! - [`stats`]: latency histograms, per-level results, the printed table and JSON.
//! - [`cli`]: argument parsing shared by the binaries.
//! - [`peer`]: what the comparison services share (flags, Meridian's HTTP shape).

pub mod bare_call;
pub mod cli;
pub mod load;
pub mod peer;
pub mod stats;
pub mod workload;

/// DDL for a scratch copy of Meridian's `events` table under another name: the same
/// columns, constraints and indexes as in `migrations/0001_event_store.sql`, so each
/// row a benchmark writes costs what an appended event costs.
pub fn events_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    position        BIGSERIAL   NOT NULL,
    tx_id           XID8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version > 0),
    event_type      TEXT        NOT NULL,
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT {table}_pkey PRIMARY KEY (position),
    CONSTRAINT {table}_version_key UNIQUE (aggregate_type, aggregate_id, version),
    CONSTRAINT {table}_event_id_key UNIQUE (event_id)
);
CREATE INDEX IF NOT EXISTS {table}_global_order ON {table} (tx_id, position);"
    )
}
