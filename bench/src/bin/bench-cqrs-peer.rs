//! `bench-cqrs-peer`: the bank account on cqrs-es + postgres-es, as a benchmark peer
//! for Meridian.
//!
//! It serves the same endpoint as Meridian (`POST /v1/aggregates/bank-account/{id}`
//! with `{"command": {..}, "command_id": ".."}`; 200 with
//! `{"aggregate_type","aggregate_id","version","events"}`, 422 with
//! `{"error":{"code":"rejected","message":..}}` on rejection), so `meridian-load` drives
//! it with the same workload. The aggregate is a thin cqrs-es `Aggregate` around the same
//! bank-account logic (`bank_account::BankAccount`, compiled natively). Per command it
//! does what `CqrsFramework::execute_with_metadata` does (load the aggregate's events
//! through `PersistedEventStore`, handle, commit) but keeps the committed events for the
//! response; postgres-es commits with optimistic concurrency (the primary key on
//! `(aggregate_type, aggregate_id, sequence)`), so a conflicting commit is retried from
//! a fresh load, as a cqrs-es user would. No snapshots (cqrs-es's default event store),
//! 16 connections (Meridian's host default), durable commits, no sleeps. Its tables are
//! `cqrspeer_events` / `cqrspeer_snapshots` with postgres-es's documented schema
//! (`db/init.sql` of the crate). Events in the response carry no `event_id`: cqrs-es has
//! none.
//!
//! ```text
//! bench-cqrs-peer --database-url postgres://postgres@127.0.0.1:5432/scratch \
//!     --http-addr 127.0.0.1:8091 --reset
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use bank_account::BankAccount;
use clap::Parser;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateContext, AggregateError, DomainEvent, EventStore};
use meridian_bench::peer::{
    ApiError, CommandBody, CommandResult, PeerArgs, ResultEvent, internal, rejected, serve,
};
use meridian_guest::Aggregate as _;
use meridian_guest::codec::encode_event;
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

const CREATE_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS cqrspeer_events (
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE IF NOT EXISTS cqrspeer_snapshots (
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
"#;

/// How often a conflicting commit is retried before the command fails with 409.
const MAX_ATTEMPTS: usize = 20;

/// The bank account as a cqrs-es aggregate: its state, wrapping the plugin's.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
struct Account(bank_account::State);

/// The plugin's event, wrapped to implement cqrs-es's `DomainEvent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct AccountEvent(bank_account::Event);

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        match &self.0 {
            bank_account::Event::Opened { .. } => "Opened",
            bank_account::Event::Deposited { .. } => "Deposited",
            bank_account::Event::Withdrawn { .. } => "Withdrawn",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// A rejection, as cqrs-es's user error.
#[derive(Debug)]
struct Rejected(String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

impl cqrs_es::Aggregate for Account {
    const TYPE: &'static str = BankAccount::TYPE;
    type Command = bank_account::Command;
    type Event = AccountEvent;
    type Error = Rejected;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _service: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let events =
            BankAccount::handle(&self.0, command).map_err(|r| Rejected(r.into_message()))?;
        for event in events {
            sink.write(AccountEvent(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.0 = BankAccount::apply(std::mem::take(&mut self.0), event.0);
    }
}

type Store = PersistedEventStore<PostgresEventRepository, Account>;

/// A cqrs-es + postgres-es bank-account service with Meridian's HTTP shape.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    peer: PeerArgs,
}

async fn execute(
    AxumState(store): AxumState<Arc<Store>>,
    Path(id): Path<String>,
    Json(body): Json<CommandBody>,
) -> Result<Json<CommandResult>, ApiError> {
    let command: bank_account::Command = serde_json::from_value(body.command)
        .map_err(|e| rejected(format!("invalid command: {e}")))?;
    let mut metadata = HashMap::new();
    if let Some(command_id) = body.command_id {
        metadata.insert("command_id".to_owned(), command_id.to_string());
    }

    for _ in 0..MAX_ATTEMPTS {
        let mut context = store.load_aggregate(&id).await.map_err(internal)?;
        let before = context.current_sequence;
        let sink = EventSink::default();
        let handled =
            cqrs_es::Aggregate::handle(context.aggregate(), command.clone(), &(), &sink).await;
        if let Err(rejection) = handled {
            return Err(rejected(rejection.0));
        }
        let decided = sink.collect().await;
        match store.commit(decided, context, metadata.clone()).await {
            Ok(committed) => {
                let mut events = Vec::with_capacity(committed.len());
                let mut version = before as i64;
                for envelope in committed {
                    let (event_type, payload) =
                        encode_event(&envelope.payload.0).map_err(internal)?;
                    let payload = String::from_utf8(payload).map_err(internal)?;
                    version = envelope.sequence as i64;
                    events.push(ResultEvent {
                        event_id: None,
                        version,
                        event_type,
                        payload: RawValue::from_string(payload).map_err(internal)?,
                    });
                }
                return Ok(Json(CommandResult {
                    aggregate_type: BankAccount::TYPE,
                    aggregate_id: id,
                    version,
                    events,
                }));
            }
            Err(AggregateError::AggregateConflict) => continue,
            Err(error) => return Err(internal(error)),
        }
    }
    Err(ApiError(
        StatusCode::CONFLICT,
        "version_conflict",
        format!("still conflicting after {MAX_ATTEMPTS} attempts"),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().peer;
    let pool = args.connect().await?;
    if args.reset {
        sqlx::raw_sql("DROP TABLE IF EXISTS cqrspeer_events, cqrspeer_snapshots")
            .execute(&pool)
            .await?;
    }
    sqlx::raw_sql(CREATE_TABLES).execute(&pool).await?;

    let repo =
        PostgresEventRepository::new(pool).with_tables("cqrspeer_events", "cqrspeer_snapshots");
    let store: Store = PersistedEventStore::new_event_store(repo);
    serve(
        "bench-cqrs-peer",
        BankAccount::TYPE,
        args.http_addr,
        execute,
        Arc::new(store),
    )
    .await
}
