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

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bank_account::{BankAccount, Command, State};
use clap::Parser;
use meridian_guest::Aggregate;
use meridian_guest::codec::{decode_event, encode_event};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// The peer's own events table; never Meridian's `events`.
const TABLE: &str = "lockpeer_events";

/// Same columns, constraints and indexes as `events` in migrations/0001_event_store.sql.
const CREATE_TABLE: &str = r#"
CREATE TABLE IF NOT EXISTS lockpeer_events (
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
    CONSTRAINT lockpeer_events_pkey PRIMARY KEY (position),
    CONSTRAINT lockpeer_events_version_key UNIQUE (aggregate_type, aggregate_id, version),
    CONSTRAINT lockpeer_events_event_id_key UNIQUE (event_id)
);
CREATE INDEX IF NOT EXISTS lockpeer_events_global_order ON lockpeer_events (tx_id, position);
"#;

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
    /// Postgres to store events in (table `lockpeer_events`, created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,

    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    http_addr: SocketAddr,

    /// Drop and recreate the events table at startup.
    #[arg(long)]
    reset: bool,

    /// Database connections (Meridian's host default is 16).
    #[arg(long, default_value_t = 16)]
    db_connections: u32,
}

#[derive(Deserialize)]
struct CommandBody {
    command: Value,
    #[serde(default)]
    command_id: Option<Uuid>,
}

#[derive(Serialize)]
struct ResultEvent {
    event_id: Uuid,
    version: i64,
    #[serde(rename = "type")]
    event_type: String,
    payload: Box<RawValue>,
}

#[derive(Serialize)]
struct CommandResult {
    aggregate_type: &'static str,
    aggregate_id: String,
    version: i64,
    events: Vec<ResultEvent>,
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.1, "message": self.2 } });
        (self.0, Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "database",
            error.to_string(),
        )
    }
}

fn internal(message: String) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

async fn execute(
    AxumState(pool): AxumState<Arc<PgPool>>,
    Path(id): Path<String>,
    Json(body): Json<CommandBody>,
) -> Result<Json<CommandResult>, ApiError> {
    let command: Command = serde_json::from_value(body.command).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
            format!("invalid command: {e}"),
        )
    })?;

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
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rejected",
                rejection.into_message(),
            ));
        }
    };

    let mut events = Vec::with_capacity(decided.len());
    for event in &decided {
        let (event_type, payload) = encode_event(event).map_err(internal)?;
        let payload = String::from_utf8(payload).map_err(|e| internal(e.to_string()))?;
        version += 1;
        events.push(ResultEvent {
            event_id: Uuid::now_v7(),
            version,
            event_type,
            payload: RawValue::from_string(payload).map_err(|e| internal(e.to_string()))?,
        });
    }
    if !events.is_empty() {
        let metadata = json!({ "command_id": body.command_id, "causation_id": body.command_id });
        sqlx::query(INSERT)
            .bind(metadata.to_string())
            .bind(BankAccount::TYPE)
            .bind(&id)
            .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
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

async fn readyz() -> StatusCode {
    StatusCode::OK
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(args.db_connections)
        .connect(&args.database_url)
        .await
        .with_context(|| format!("connecting to {}", args.database_url))?;
    if args.reset {
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {TABLE}"))
            .execute(&pool)
            .await?;
    }
    sqlx::raw_sql(CREATE_TABLE).execute(&pool).await?;

    let app = Router::new()
        .route(
            &format!("/v1/aggregates/{}/{{id}}", BankAccount::TYPE),
            post(execute),
        )
        .route("/readyz", get(readyz))
        .with_state(Arc::new(pool));
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    eprintln!("bench-lock-peer listening on {}", args.http_addr);
    axum::serve(listener, app).await?;
    Ok(())
}
