//! `bench-lock-peer`: the lock-per-command event store, the design most people write
//! first, as a benchmark peer for Meridian.
//!
//! It serves the same endpoint as Meridian (`POST /v1/aggregates/bank-account/{id}`
//! with `{"command": {..}, "command_id": ".."}`; 200 with
//! `{"aggregate_type","aggregate_id","version","events"}`, 422 with
//! `{"error":{"code":"rejected","message":..}}` on rejection), so `meridian-load` drives
//! both with the same workload. Per command, in ONE transaction:
//!
//! 1. `pg_advisory_xact_lock(hashtextextended('bank-account/' || id, 0))`: serialises
//!    commands on one aggregate (held until commit);
//! 2. loads all of the aggregate's events (`ORDER BY version`) and folds them with the
//!    bank-account logic compiled natively (`bank_account::BankAccount` through
//!    `meridian_guest::Aggregate`: no WASM);
//! 3. decides, and inserts the new event rows with one multi-row INSERT;
//! 4. commits.
//!
//! It is meant to be an honest peer: a pool of 16 connections (Meridian's host default),
//! durable commits (the server's `synchronous_commit`, untouched), no artificial sleeps.
//! Its events table (`lockpeer_events`) has the same columns, constraints and indexes
//! as Meridian's `events`. It does LESS work than Meridian per command in two respects,
//! which favours it: it keeps no command-id table (no idempotency; the id is only
//! recorded in the event metadata) and no `streams` row. It does more in one: no
//! snapshots or state cache, so every command replays the aggregate's whole history.
//!
//! ```text
//! bench-lock-peer --database-url postgres://postgres@127.0.0.1:5432/scratch \
//!     --http-addr 127.0.0.1:8090 --reset
//! ```

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as AxumState};
use bank_account::{BankAccount, Command, State};
use clap::Parser;
use meridian_bench::peer::{
    ApiError, CommandBody, CommandResult, PeerArgs, ResultEvent, internal, rejected, serve,
};
use meridian_guest::Aggregate;
use meridian_guest::codec::{decode_event, encode_event};
use serde_json::json;
use serde_json::value::RawValue;
use sqlx::PgPool;
use uuid::Uuid;

/// The peer's own events table; never Meridian's `events`.
const TABLE: &str = "lockpeer_events";

const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))";

const LOAD: &str = "SELECT version, event_type, payload::text FROM lockpeer_events \
     WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY version";

const INSERT: &str = r#"
INSERT INTO lockpeer_events
    (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata)
SELECT e.id, $2, $3, e.version, e.type, e.payload, $1::jsonb
  FROM UNNEST($4::uuid[], $5::int8[], $6::text[], $7::jsonb[]) AS e(id, version, type, payload)
"#;

/// A lock-per-command bank-account service with Meridian's HTTP shape.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    peer: PeerArgs,
}

async fn execute(
    AxumState(pool): AxumState<Arc<PgPool>>,
    Path(id): Path<String>,
    Json(body): Json<CommandBody>,
) -> Result<Json<CommandResult>, ApiError> {
    let command: Command = serde_json::from_value(body.command)
        .map_err(|e| rejected(format!("invalid command: {e}")))?;

    let mut tx = pool.begin().await?;
    sqlx::query(LOCK)
        .bind(BankAccount::TYPE)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(LOAD)
        .bind(BankAccount::TYPE)
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?;
    let mut version = 0;
    let mut state = State::default();
    for (v, event_type, payload) in rows {
        let event = decode_event(&event_type, payload.as_bytes()).map_err(internal)?;
        state = BankAccount::apply(state, event);
        version = v;
    }

    let decided = match BankAccount::handle(&state, command) {
        Ok(events) => events,
        Err(rejection) => {
            tx.rollback().await?;
            return Err(rejected(rejection.into_message()));
        }
    };

    let mut events = Vec::with_capacity(decided.len());
    for event in &decided {
        let (event_type, payload) = encode_event(event).map_err(internal)?;
        let payload = String::from_utf8(payload).map_err(internal)?;
        version += 1;
        events.push(ResultEvent {
            event_id: Some(Uuid::now_v7()),
            version,
            event_type,
            payload: RawValue::from_string(payload).map_err(internal)?,
        });
    }
    if !events.is_empty() {
        let metadata = json!({ "command_id": body.command_id, "causation_id": body.command_id });
        sqlx::query(INSERT)
            .bind(metadata.to_string())
            .bind(BankAccount::TYPE)
            .bind(&id)
            .bind(events.iter().filter_map(|e| e.event_id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.version).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| e.event_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .iter()
                    .map(|e| e.payload.get().to_owned())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;

    Ok(Json(CommandResult {
        aggregate_type: BankAccount::TYPE,
        aggregate_id: id,
        version,
        events,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().peer;
    let pool = args.connect().await?;
    if args.reset {
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {TABLE}"))
            .execute(&pool)
            .await?;
    }
    sqlx::raw_sql(&meridian_bench::events_table_ddl(TABLE))
        .execute(&pool)
        .await?;
    serve(
        "bench-lock-peer",
        BankAccount::TYPE,
        args.http_addr,
        execute,
        Arc::new(pool),
    )
    .await
}
