//! The region's event store in PostgreSQL.
//!
//! Tables and the append function are defined in `migrations/`. This module is the only
//! code that speaks SQL:
//! - [`append`]: the group committer. Commands for different aggregates hand their
//!   events to it and it writes many of them in one round trip and one transaction,
//!   judging each on its own (expected version, command id, partition epoch).
//! - [`read`]: loading an aggregate (snapshot + newer events), reading its events, and
//!   tailing the region's events in commit order without skipping late commits.
//! - [`plugins`]: the plugin registry and per-type sandbox limits.
//! - [`cluster`]: membership heartbeats and partition leases (the fencing tokens).
//! - [`regions`]: home regions and moves, events received from other regions, relay
//!   status.
//! - [`groups`]: consumer groups' acknowledged positions.
//! - [`jsonb`]: the JSON that `jsonb` refuses, caught before it reaches an append.
//! - [`changes`]: `LISTEN`/`NOTIFY` between the region's hosts, so they hear of each
//!   other's commits and plugin uploads at once instead of at their next poll.
//! - [`tail`]: one reader of the commit order per host, whose pages every live stream
//!   shares (catch-up and gaps read on their own).

pub mod append;
pub mod changes;
pub mod cluster;
pub mod groups;
pub mod jsonb;
pub mod plugins;
pub mod read;
pub mod regions;
pub mod rekey;
pub mod tail;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use append::{
    AppendOutcome, AppendRequest, Committer, CommitterConfig, DEFAULT_BATCH_TIMEOUT, Fence,
    NewEvent,
};
pub use changes::Changes;
pub use read::{AggregateKey, EventFilter, OrderKey, StoredEvent};
pub use tail::{Subscription, Tail, TailConfig};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Errors at the store's seam.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The aggregate is not at the version the append expected.
    #[error("version conflict on {aggregate}: expected version {expected}, found {actual}")]
    Conflict {
        /// `type/id`.
        aggregate: String,
        /// The version the append was based on.
        expected: i64,
        /// The version in the store.
        actual: i64,
    },
    /// The appending node no longer holds the partition at the epoch it named.
    #[error("partition {partition} is no longer held at epoch {epoch} by this node")]
    Fenced {
        /// The partition.
        partition: i32,
        /// The stale epoch.
        epoch: i64,
    },
    /// A command id was reused for a different aggregate.
    #[error("command id {command_id} was already used for {used_for}")]
    CommandIdReused {
        /// The id.
        command_id: uuid::Uuid,
        /// `type/id` it ran on first.
        used_for: String,
    },
    /// A position given by a reader does not exist.
    #[error("no event at position {0} in this region; resume from a position you received")]
    UnknownPosition(i64),
    /// A resume point is an event the region's feed has not delivered yet: a
    /// transaction older than it is still running, and could commit an event before it.
    #[error(
        "the event at position {0} is not in the region's feed yet: an older transaction \
         is still running; send again shortly, or resume from a position the feed delivered"
    )]
    NotDelivered(i64),
    /// A resume point names the event a reader received at a position, and the store
    /// holds another one there.
    #[error(
        "the event at position {position} in this region is not {event_id}, the one received there: \
         the events were read from another region, or from a store since restored from a backup; \
         start again from GET /v1/events/head"
    )]
    OtherEventAt {
        /// The position sent.
        position: i64,
        /// The event the reader received at it.
        event_id: uuid::Uuid,
    },
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The aggregate's home is another region (it was created there or moved there).
    #[error("{aggregate} is homed in another region")]
    NotHome {
        /// `type/id`.
        aggregate: String,
    },
    /// The committer has shut down.
    #[error("the event store is shutting down")]
    Closed,
    /// Another process took over this host's node id (its member row).
    #[error(
        "another process now runs as node {node}; this one stops heartbeating (give each host its own MERIDIAN_NODE_ID)"
    )]
    NodeIdTaken {
        /// The node id.
        node: String,
    },
    /// Another version of the plugin was stored while an upload was being checked
    /// against the one before it: the upload's history check no longer holds.
    #[error(
        "version {stored} of `{aggregate_type}` was stored while this upload was being checked against {checked}; nothing was stored: upload again to check it against version {stored}"
    )]
    PluginChanged {
        /// The aggregate type.
        aggregate_type: String,
        /// What the upload was checked against (`version N`, or `no version`).
        checked: String,
        /// The version stored meanwhile.
        stored: i32,
    },
    /// The type's sandbox limits changed while an upload was checked under the ones
    /// before: the check says nothing about whether the version starts under them.
    #[error(
        "the sandbox limits of `{aggregate_type}` were changed while this upload was being checked under the previous ones; nothing was stored: upload again to check it under the limits in force"
    )]
    LimitsChanged {
        /// The aggregate type.
        aggregate_type: String,
    },
    /// A new version of the plugin was stored while new limits were being checked
    /// against the version before it.
    #[error(
        "version {stored} of `{aggregate_type}` was stored while these limits were being checked against {checked}; nothing was changed: set them again to check them against version {stored}"
    )]
    LimitsOutdated {
        /// The aggregate type.
        aggregate_type: String,
        /// What the limits were checked against (`version N`, or `no version`).
        checked: String,
        /// The version stored meanwhile.
        stored: i32,
    },
    /// PostgreSQL refused the request's data (SQLSTATE class 22 or 54, e.g. JSON `jsonb`
    /// cannot hold): sending it again cannot help, and it fails only its own request.
    #[error("PostgreSQL refused the events: {0}")]
    Unstorable(String),
}

impl StoreError {
    /// True when the database itself failed (as opposed to a refusal).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::Closed)
    }
}

/// Default [`set_read_timeout`]: as long as an append batch may take
/// ([`DEFAULT_BATCH_TIMEOUT`]); a read that waits longer waits on a database gone silent.
pub const DEFAULT_READ_TIMEOUT: Duration = DEFAULT_BATCH_TIMEOUT;

/// [`set_read_timeout`]'s value, in milliseconds.
static READ_TIMEOUT_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_READ_TIMEOUT.as_millis() as u64);

/// Sets how long the reads of [`read`] wait for the database's answer, for the whole
/// process: a host has one database, and the readers are everywhere (commands, the
/// tail, the relay, the API), so the setting is not threaded through each of them.
pub fn set_read_timeout(timeout: Duration) {
    READ_TIMEOUT_MS.store(
        timeout.as_millis().max(1) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The value [`set_read_timeout`] set.
pub fn read_timeout() -> Duration {
    Duration::from_millis(READ_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Runs `call` on a connection of `pool`, giving the database `limit` to answer (`None`:
/// as long as it takes, for work that may rightly take longer than any such limit).
///
/// A connection gone silent mid-call (a failover to another address, a firewall
/// dropping the flow: no answer and no reset) would otherwise hold the call until the
/// kernel gives up on it, about a quarter of an hour, and whatever waits on the call
/// with it (a command and its partition, a heartbeat). One that did not answer in time
/// is dropped, not handed back to the pool: the pool checks a returned connection with
/// a ping, which would wait as long, keeping the connection's place in the pool. The
/// limit starts once the connection is lent; lending it has the pool's own timeout.
pub async fn bounded<T>(
    pool: &PgPool,
    limit: Option<Duration>,
    call: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut conn = pool.acquire().await?;
    let Some(limit) = limit else {
        return call(&mut conn).await;
    };
    match tokio::time::timeout(limit, call(&mut conn)).await {
        Ok(result) => result,
        Err(_) => {
            drop(conn.detach());
            tracing::warn!(
                timeout_ms = limit.as_millis() as u64,
                "no answer from the database in time; dropped the connection"
            );
            Err(unanswered(limit))
        }
    }
}

/// [`bounded`] with the process's [`read_timeout`]: the limit of every call whose
/// work is small and known (a command's reads, the unfiltered reads of the region's
/// events, the registry's, the groups' and the relay's bookkeeping).
pub(crate) async fn bounded_read<T>(
    pool: &PgPool,
    call: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    bounded(pool, Some(read_timeout()), call).await
}

/// The error of a call that got no answer within `limit`: an I/O time-out, which callers
/// take for a lost connection (the call's outcome is unknown, as when a connection
/// breaks mid-call).
pub(crate) fn unanswered(limit: Duration) -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from the database within {} ms",
            limit.as_millis()
        ),
    )))
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `postgres://` URL.
    pub url: String,
    /// Pool size. Each committer worker keeps one connection; readers share the rest.
    pub max_connections: u32,
}

/// Opens a pool, failing fast with a clear error when the server is unreachable.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = config.url.parse()?;
    let options = options
        .application_name("meridian")
        // Per-statement logging at INFO would drown everything else.
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(1))
        // A host paused between two statements of a transaction (a VM freeze, SIGSTOP,
        // a long GC in a sidecar) keeps its row locks until it resumes. If it was taking
        // partitions, no one else can take them (the liveness check steps over a locked
        // member row, see `cluster::observe`, but a lease row has to be waited for). The
        // server ends such a session instead. Every transaction of the host runs its
        // statements back to back, so 10 s idle inside one means the host is stuck.
        .options([("idle_in_transaction_session_timeout", "10s")]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StoreError::Database(sqlx::Error::Migrate(Box::new(e))))
}

/// Records a region-wide setting on first start, or returns the value already recorded.
pub async fn region_setting(pool: &PgPool, key: &str, value: &str) -> Result<String, StoreError> {
    sqlx::query(
        "INSERT INTO region_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(value)
    .execute(pool)
    .await?;
    let stored: String = sqlx::query_scalar("SELECT value FROM region_settings WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await?;
    Ok(stored)
}
