//! What the comparison services (`bench-lock-peer`, `bench-cqrs-peer`) share: their
//! flags, Meridian's request and response shapes, errors rendered like Meridian's, and
//! the HTTP server around one command handler.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// Flags every peer takes.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// Postgres to store events in (the peer's own tables, created if missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub http_addr: SocketAddr,
    /// Drop and recreate the tables at startup.
    #[arg(long)]
    pub reset: bool,
    /// Database connections (Meridian's host default is 16).
    #[arg(long, default_value_t = 16)]
    pub db_connections: u32,
}

impl PeerArgs {
    /// Connects the pool.
    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(self.db_connections)
            .connect(&self.database_url)
            .await
            .with_context(|| format!("connecting to {}", self.database_url))
    }
}

/// Meridian's command request body.
#[derive(Debug, Deserialize)]
pub struct CommandBody {
    /// The command JSON.
    pub command: Value,
    /// Idempotency key (recorded in metadata; peers do not deduplicate).
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

/// One event of a command's result.
#[derive(Debug, Serialize)]
pub struct ResultEvent {
    /// Event id, when the store has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    /// Per-aggregate version.
    pub version: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Payload JSON.
    pub payload: Box<RawValue>,
}

/// Meridian's command response body.
#[derive(Debug, Serialize)]
pub struct CommandResult {
    /// Aggregate type.
    pub aggregate_type: &'static str,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Version after the command.
    pub version: i64,
    /// Events appended.
    pub events: Vec<ResultEvent>,
}

/// An error rendered as Meridian renders them: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub &'static str, pub String);

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

/// 500 with code `internal`.
pub fn internal(message: impl ToString) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        message.to_string(),
    )
}

/// 422 with code `rejected`, as Meridian answers a rejected command.
pub fn rejected(message: impl ToString) -> ApiError {
    ApiError(
        StatusCode::UNPROCESSABLE_ENTITY,
        "rejected",
        message.to_string(),
    )
}

/// Serves `POST /v1/aggregates/{aggregate_type}/{id}` with `handler`, and `/readyz`.
pub async fn serve<S, H, T>(
    name: &str,
    aggregate_type: &str,
    addr: SocketAddr,
    handler: H,
    state: S,
) -> anyhow::Result<()>
where
    S: Clone + Send + Sync + 'static,
    H: axum::handler::Handler<T, S>,
    T: 'static,
{
    let app = Router::new()
        .route(
            &format!("/v1/aggregates/{aggregate_type}/{{id}}"),
            post(handler),
        )
        .route("/readyz", get(|| async { StatusCode::OK }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("{name} listening on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
