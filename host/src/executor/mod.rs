//! The command path: load an aggregate, decide events with its plugin, append them.
//!
//! Commands for one aggregate run one at a time: each cached aggregate has an async
//! mutex that a command holds from reading the state to storing the events, so the
//! state it decided on is still the state when its events land. Commands for different
//! aggregates run concurrently, and their appends meet in the group committer.
//!
//! States are cached (bounded, least recently used first out). The cache is a
//! performance device, never the truth: every append still names the version it was
//! decided on, and a conflict (someone else wrote) drops the cached state and decides
//! again on a fresh load, up to [`MAX_CONFLICT_RETRIES`] times.

mod cache;
pub mod history;
pub mod plugins;

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use uuid::Uuid;

use crate::runtime::{Plugin, PluginError};
use crate::store::{
    self, AggregateKey, AppendOutcome, AppendRequest, Committer, Fence, NewEvent, StoreError,
};
use cache::{AggregateCache, Loaded};
pub use plugins::{PluginRegistry, RegistryError};

/// How often a conflicting command is decided again before giving up.
pub const MAX_CONFLICT_RETRIES: usize = 3;

/// Default number of aggregate states kept in memory per host.
pub const DEFAULT_CACHE_CAPACITY: usize = 100_000;

/// Default bytes of aggregate states kept in memory per host.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// Default number of events between snapshots of an aggregate.
pub const DEFAULT_SNAPSHOT_EVERY: i64 = 100;

/// Events read per page when loading a long history.
const LOAD_PAGE: i64 = 10_000;

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Aggregate states kept in memory.
    pub cache_capacity: usize,
    /// Bytes of aggregate states kept in memory.
    pub cache_bytes: usize,
    /// Snapshot an aggregate every this many events.
    pub snapshot_every: i64,
    /// This host's region, recorded in event metadata.
    pub region: String,
    /// This host's node id, recorded in event metadata.
    pub node_id: String,
    /// Largest event (payload and type) the region's relay can carry, when the region
    /// relays to others (see [`crate::region::relay::max_event_bytes`]).
    pub max_event_bytes: Option<usize>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            cache_bytes: DEFAULT_CACHE_BYTES,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            region: "local".into(),
            node_id: "node".into(),
            max_event_bytes: None,
        }
    }
}

/// A command to execute.
#[derive(Debug, Clone)]
pub struct Command {
    /// Which aggregate.
    pub key: AggregateKey,
    /// The command JSON, passed to the plugin as is.
    pub body: Box<RawValue>,
    /// Idempotency key: the same id again returns the first result and writes nothing.
    pub command_id: Option<Uuid>,
    /// Refuse unless the aggregate is at this version.
    pub expected_version: Option<i64>,
    /// Correlation id recorded in event metadata (e.g. the caller's trace id).
    pub correlation_id: Option<String>,
    /// The partition epoch this node executes under, when clustered.
    pub fence: Option<Fence>,
}

/// One event in a command's result.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ResultEvent {
    /// Event id (UUID v7).
    pub event_id: Uuid,
    /// Per-aggregate version.
    pub version: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Payload as decided by the plugin.
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<RawValue>,
}

/// A command's result: the aggregate's version after it and the events it appended.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CommandResult {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The aggregate's version after the command.
    pub version: i64,
    /// Events the command appended (empty if it decided none).
    pub events: Vec<ResultEvent>,
    /// True when this is the stored result of an earlier run of the same command id.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// The node that executed the command; for a `duplicate`, the node that answered
    /// with the stored result (which of the region's hosts first ran it is in each
    /// event's metadata, `node_id`).
    pub executed_by: String,
}

/// Why a command did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The plugin rejected the command; its message.
    #[error("{0}")]
    Rejected(String),
    /// `expected_version` did not match.
    #[error("expected version {expected}, but {aggregate} is at version {actual}")]
    WrongVersion {
        /// `type/id`.
        aggregate: String,
        /// What the caller expected.
        expected: i64,
        /// The actual version.
        actual: i64,
    },
    /// Kept conflicting with concurrent writers.
    #[error(transparent)]
    Conflict(StoreError),
    /// The node lost the aggregate's partition.
    #[error(transparent)]
    Fenced(StoreError),
    /// The command id was used for another aggregate.
    #[error(transparent)]
    CommandIdReused(StoreError),
    /// Unknown type or plugin load failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The plugin failed (trap, deadline, memory, bad output).
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
    /// An event the plugin decided cannot travel to the other regions in one NATS
    /// message, so it is not stored (stored, it would stop the region's relay).
    #[error(
        "the command decided a `{event_type}` event of {bytes} bytes (as read back from the database, which prints a number such as 1e300 with every digit); an event must fit in one NATS message to reach the other regions, at most {max} bytes with this NATS server's max_payload (send less data, or raise max_payload in nats-server's configuration)"
    )]
    EventTooLarge {
        /// The event's type.
        event_type: String,
        /// Its payload, as PostgreSQL prints it back, and type, in bytes.
        bytes: usize,
        /// The most this region relays.
        max: usize,
    },
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { .. } => CommandError::Conflict(error),
            StoreError::Fenced { .. } => CommandError::Fenced(error),
            StoreError::CommandIdReused { .. } => CommandError::CommandIdReused(error),
            other => CommandError::Store(other),
        }
    }
}

/// An aggregate's current state.
#[derive(Debug, Clone)]
pub struct AggregateState {
    /// Its version (0: no events).
    pub version: i64,
    /// The state bytes (JSON) as the plugin produced them.
    pub state: Vec<u8>,
    /// The plugin version that produced them.
    pub plugin_version: i32,
}

/// Runs the command through the plugin: decides, then applies the decided events.
///
/// The guest runs on a fiber inside this task (wasmtime's async API): no thread hop per
/// command, and WASI calls that wait (a plugin writing to stderr) are awaited rather
/// than blocking a thread. A long call gives the thread back at every epoch tick.
async fn decide(
    plugin: &Plugin,
    state: Vec<u8>,
    command: Box<RawValue>,
) -> Result<(Result<Vec<crate::runtime::DecidedEvent>, String>, Vec<u8>), PluginError> {
    match plugin
        .session()
        .execute(&state, command.get().as_bytes())
        .await?
    {
        Ok(executed) => Ok((Ok(executed.events), executed.state)),
        Err(rejection) => Ok((Err(rejection), state)),
    }
}

/// Folds stored events into a state (see [`decide`]).
async fn replay(
    plugin: &Plugin,
    state: Vec<u8>,
    events: Vec<store::StoredEvent>,
) -> Result<Vec<u8>, PluginError> {
    let mut session = plugin.session();
    let mut state = state;
    // Meridian's own events (a home move) are not the plugin's business.
    for event in events
        .iter()
        .filter(|e| !store::regions::is_system_event(&e.event_type))
    {
        state = session
            .apply(&state, &event.event_type, event.payload.get().as_bytes())
            .await?;
    }
    Ok(state)
}

/// The metadata stored with every event a command appends.
///
/// A struct rather than a `json!` map: it is built for every command, and a map costs
/// an allocation per key. The fields are in alphabetical order, the order the map
/// wrote them in, so the stored text is unchanged.
#[derive(Serialize)]
struct EventMetadata<'a> {
    causation_id: Option<Uuid>,
    command_id: Option<Uuid>,
    correlation_id: Option<&'a str>,
    node_id: &'a str,
    origin_region: &'a str,
    partition: Option<i32>,
    partition_epoch: Option<i64>,
    plugin_version: i32,
}

/// Executes commands. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    committer: Committer,
    plugins: PluginRegistry,
    cache: AggregateCache,
    config: ExecutorConfig,
    /// Snapshot writes that may be on their way at once (see [`SNAPSHOT_WRITES`]).
    snapshot_writes: Arc<tokio::sync::Semaphore>,
}

/// Most snapshot writes on their way at once. Each holds a copy of a state and, while
/// it waits, a place in the queue for the connections commands read through; with a
/// slow database, unbounded, they would pile up by the hundred (one per
/// `snapshot_every` events of any aggregate), outside the cache's byte budget. A
/// snapshot past the limit is skipped: the next multiple writes one.
pub const SNAPSHOT_WRITES: usize = 4;

impl Executor {
    /// Builds an executor over the store, committer and plugins.
    pub fn new(
        pool: PgPool,
        committer: Committer,
        plugins: PluginRegistry,
        config: ExecutorConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                committer,
                plugins,
                cache: AggregateCache::new(config.cache_capacity, config.cache_bytes),
                config,
                snapshot_writes: Arc::new(tokio::sync::Semaphore::new(SNAPSHOT_WRITES)),
            }),
        }
    }

    /// The plugin registry.
    pub fn plugins(&self) -> &PluginRegistry {
        &self.inner.plugins
    }

    /// Number of aggregate states cached.
    pub fn cached_aggregates(&self) -> usize {
        self.inner.cache.len()
    }

    /// Bytes of the aggregate states cached.
    pub fn cached_bytes(&self) -> usize {
        self.inner.cache.bytes()
    }

    /// Drops cached states of aggregates matching `predicate` (e.g. of a partition this
    /// node no longer owns).
    pub fn evict(&self, predicate: impl Fn(&AggregateKey) -> bool) {
        self.inner.cache.retain(|key| !predicate(key));
    }

    /// Executes one command.
    pub async fn execute(&self, command: Command) -> Result<CommandResult, CommandError> {
        // Known type or not, before a cache slot is made for it.
        let executed = match self.inner.plugins.get(&command.key.aggregate_type).await {
            Ok(_) => {
                let slot = self.inner.cache.slot(&command.key);
                let mut guard = waiting_for(slot.lock()).await;
                self.execute_locked(&command, &mut guard).await
            }
            Err(error) => Err(error.into()),
        };
        match executed {
            // A retry is run again on today's state and plugin version, which can fail
            // where its first run did not (a version uploaded since that cannot replay
            // the aggregate, a deadline missed on a larger state, an event too large):
            // a command id that already ran gets its first result, not that failure.
            Err(
                error @ (CommandError::Plugin(_)
                | CommandError::Registry(_)
                | CommandError::EventTooLarge { .. }),
            ) => match self.first_result(&command).await {
                Ok(Some(result)) => Ok(result),
                _ => Err(error),
            },
            other => other,
        }
    }

    /// [`Self::execute`] with the aggregate's slot locked.
    async fn execute_locked(
        &self,
        command: &Command,
        guard: &mut Option<Loaded>,
    ) -> Result<CommandResult, CommandError> {
        let mut attempt = 0;
        loop {
            // Taken with the aggregate in hand (and again on every retry), not on
            // arrival: a command that waited behind others while a new version was
            // uploaded must not decide with the one before, after the new one wrote.
            let plugin = self.inner.plugins.get(&command.key.aggregate_type).await?;
            let (loaded, cached) = match guard.take() {
                Some(loaded) if loaded.plugin_version == plugin.version() => {
                    metrics::counter!("meridian_cache_hits_total").increment(1);
                    (loaded, true)
                }
                _ => (self.load(&plugin, &command.key).await?, false),
            };
            match self.decide_and_append(&plugin, command, &loaded).await {
                Ok((result, next)) => {
                    // A retry answered with its first run's result: that run may have
                    // committed without passing through this cache (its answer lost and
                    // the batch resent, or the caller gone before it was answered), so a
                    // state older than the result is read again next time.
                    *guard = match next {
                        Some(next) => Some(next),
                        None if result.duplicate && result.version > loaded.version => None,
                        None => Some(loaded),
                    };
                    return Ok(result);
                }
                // Someone else wrote: the cached state is stale. Decide again on fresh
                // state, unless the caller pinned a version.
                Err(CommandError::Conflict(_))
                    if command.expected_version.is_none() && attempt < MAX_CONFLICT_RETRIES =>
                {
                    attempt += 1;
                    metrics::counter!("meridian_append_conflicts_total").increment(1);
                    tracing::debug!(aggregate = %command.key, attempt, "version conflict; reloading");
                }
                Err(CommandError::Conflict(error)) => {
                    return Err(match error {
                        StoreError::Conflict {
                            aggregate,
                            expected,
                            actual,
                        } if command.expected_version.is_some() => CommandError::WrongVersion {
                            aggregate,
                            expected,
                            actual,
                        },
                        other => CommandError::Conflict(other),
                    });
                }
                Err(other) => {
                    // A refusal leaves the state as it was. After any other failure
                    // (e.g. the database failed mid-append) it is unknown whether the
                    // events landed, so the state is loaded afresh next time.
                    if matches!(
                        other,
                        CommandError::Rejected(_) | CommandError::WrongVersion { .. }
                    ) {
                        // An append would have caught a stale cached state; a refusal
                        // appends nothing. Events written around the cache (relayed
                        // from another region while the aggregate's home was there)
                        // would make it refuse on a state that is not the aggregate's.
                        if cached
                            && attempt < MAX_CONFLICT_RETRIES
                            && store::read::stream_version(&self.inner.pool, &command.key).await?
                                != loaded.version
                        {
                            attempt += 1;
                            tracing::debug!(aggregate = %command.key, "refused on a stale cached state; reloading");
                            continue;
                        }
                        *guard = Some(loaded);
                    }
                    return Err(other);
                }
            }
        }
    }

    /// Decides and appends. On success returns the result and the new cached state
    /// (`None`: unchanged).
    async fn decide_and_append(
        &self,
        plugin: &Plugin,
        command: &Command,
        loaded: &Loaded,
    ) -> Result<(CommandResult, Option<Loaded>), CommandError> {
        if let Some(expected) = command.expected_version
            && expected != loaded.version
        {
            // A retry of a command that already ran gets its first result, not a
            // conflict caused by itself.
            if let Some(result) = self.first_result(command).await? {
                return Ok((result, None));
            }
            return Err(CommandError::WrongVersion {
                aggregate: command.key.to_string(),
                expected,
                actual: loaded.version,
            });
        }

        let started = std::time::Instant::now();
        let (decided, state) = decide(plugin, loaded.state.clone(), command.body.clone()).await?;
        let decided = match decided {
            Ok(decided) => decided,
            Err(rejection) => {
                // A retry is decided against the state its own first run produced, which
                // often refuses it ("already open", "insufficient funds"): a command id
                // that already ran gets its first result, not that refusal.
                if let Some(result) = self.first_result(command).await? {
                    return Ok((result, None));
                }
                return Err(CommandError::Rejected(rejection));
            }
        };
        if let Some(event) = decided
            .iter()
            .find(|e| store::regions::is_system_event(&e.event_type))
        {
            return Err(PluginError::InvalidOutput {
                plugin: format!("{}@v{}", command.key.aggregate_type, plugin.version()),
                call: "handle",
                message: format!(
                    "event type `{}` starts with `$`, which is reserved for Meridian's own events",
                    event.event_type
                ),
            }
            .into());
        }
        if let Some(max) = self.inner.config.max_event_bytes
            && let Some((event, bytes)) = decided
                .iter()
                .map(|e| (e, e.printed_len()))
                .find(|&(_, bytes)| bytes > max)
        {
            return Err(CommandError::EventTooLarge {
                event_type: event.event_type.clone(),
                bytes,
                max,
            });
        }
        metrics::histogram!("meridian_plugin_seconds", "aggregate_type" => command.key.aggregate_type.clone())
            .record(started.elapsed().as_secs_f64());

        let metadata = EventMetadata {
            causation_id: command.command_id,
            command_id: command.command_id,
            correlation_id: command.correlation_id.as_deref(),
            node_id: &self.inner.config.node_id,
            origin_region: &self.inner.config.region,
            partition: command.fence.map(|f| f.partition),
            partition_epoch: command.fence.map(|f| f.epoch),
            plugin_version: plugin.version(),
        };
        let metadata = serde_json::value::to_raw_value(&metadata).expect("metadata serialises");
        let events: Vec<NewEvent> = decided
            .into_iter()
            .map(|e| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: e.event_type,
                payload: e.payload,
                metadata: metadata.clone(),
            })
            .collect();
        let request = AppendRequest {
            aggregate_type: command.key.aggregate_type.clone(),
            aggregate_id: command.key.aggregate_id.clone(),
            expected_version: loaded.version,
            events,
            command_id: command.command_id,
            fence: command.fence,
        };
        let event_meta: Vec<(Uuid, String, Box<RawValue>)> = request
            .events
            .iter()
            .map(|e| (e.event_id, e.event_type.clone(), e.payload.clone()))
            .collect();
        match self.inner.committer.append(request).await? {
            AppendOutcome::Appended {
                first_version,
                last_version,
            } => {
                let next = Loaded {
                    version: last_version,
                    state,
                    plugin_version: plugin.version(),
                };
                self.maybe_snapshot(&command.key, loaded.version, &next);
                let events = event_meta
                    .into_iter()
                    .zip(first_version..)
                    .map(|((event_id, event_type, payload), version)| ResultEvent {
                        event_id,
                        version,
                        event_type,
                        payload,
                    })
                    .collect();
                Ok((
                    CommandResult {
                        aggregate_type: command.key.aggregate_type.clone(),
                        aggregate_id: command.key.aggregate_id.clone(),
                        version: last_version,
                        events,
                        duplicate: false,
                        executed_by: self.inner.config.node_id.clone(),
                    },
                    Some(next),
                ))
            }
            AppendOutcome::Duplicate {
                first_version,
                last_version,
            } => {
                let result = self
                    .result_from_store(&command.key, first_version, last_version)
                    .await?;
                Ok((result, None))
            }
        }
    }

    /// The stored result of this command's id, when it already ran (a retry); `None`
    /// for a command without an id or one that has not run.
    async fn first_result(&self, command: &Command) -> Result<Option<CommandResult>, CommandError> {
        let Some(command_id) = command.command_id else {
            return Ok(None);
        };
        let key = &command.key;
        match store::read::command_result(&self.inner.pool, command_id).await? {
            Some((stored_key, first, last)) if &stored_key == key => {
                Ok(Some(self.result_from_store(key, first, last).await?))
            }
            Some((stored_key, ..)) => {
                Err(CommandError::CommandIdReused(StoreError::CommandIdReused {
                    command_id,
                    used_for: stored_key.to_string(),
                }))
            }
            None => Ok(None),
        }
    }

    async fn result_from_store(
        &self,
        key: &AggregateKey,
        first: i64,
        last: i64,
    ) -> Result<CommandResult, CommandError> {
        let stored = store::read::aggregate_events(&self.inner.pool, key, first, last).await?;
        Ok(CommandResult {
            aggregate_type: key.aggregate_type.clone(),
            aggregate_id: key.aggregate_id.clone(),
            version: last.max(first - 1),
            events: stored
                .into_iter()
                .map(|e| ResultEvent {
                    event_id: e.event_id,
                    version: e.version,
                    event_type: e.event_type,
                    payload: e.payload,
                })
                .collect(),
            duplicate: true,
            executed_by: self.inner.config.node_id.clone(),
        })
    }

    /// Writes a snapshot in the background when the append crossed a multiple of
    /// `snapshot_every`; a lost snapshot only costs a longer replay later.
    fn maybe_snapshot(&self, key: &AggregateKey, before: i64, after: &Loaded) {
        let every = self.inner.config.snapshot_every;
        if every <= 0 || before / every == after.version / every {
            return;
        }
        let Ok(permit) = self.inner.snapshot_writes.clone().try_acquire_owned() else {
            metrics::counter!("meridian_snapshots_skipped_total").increment(1);
            tracing::debug!(aggregate = %key, version = after.version, "snapshot skipped: others are still being written");
            return;
        };
        let pool = self.inner.pool.clone();
        let key = key.clone();
        let snapshot = store::read::Snapshot {
            version: after.version,
            plugin_version: after.plugin_version,
            state: after.state.clone(),
        };
        tokio::spawn(async move {
            if let Err(error) = store::read::save_snapshot(&pool, &key, &snapshot).await {
                tracing::warn!(aggregate = %key, %error, "snapshot not saved");
            }
            drop(permit);
        });
    }

    /// Loads an aggregate from its newest usable snapshot and the events after it.
    async fn load(&self, plugin: &Plugin, key: &AggregateKey) -> Result<Loaded, CommandError> {
        let pool = &self.inner.pool;
        let snapshot = store::read::snapshot(pool, key, plugin.version()).await?;
        let (mut version, mut state) = match snapshot {
            Some(s) => (s.version, s.state),
            None => (0, Vec::new()),
        };
        let started = std::time::Instant::now();
        let mut replayed = 0u64;
        loop {
            let read = store::read::aggregate_page(
                pool,
                key,
                version + 1,
                version + LOAD_PAGE,
                store::read::PAGE_BYTES,
            )
            .await?;
            // Cut at its byte budget, a page of large events ends before the range does.
            let done = !read.more(LOAD_PAGE);
            let page = read.events;
            replayed += page.len() as u64;
            if let Some(last) = page.last() {
                version = last.version;
            }
            state = replay(plugin, state, page).await?;
            if !done {
                tracing::info!(aggregate = %key, replayed, version, "replaying a long history");
            }
            if done {
                break;
            }
        }
        if replayed >= LOAD_PAGE as u64 {
            tracing::info!(
                aggregate = %key,
                replayed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replay finished"
            );
        }
        metrics::counter!("meridian_aggregate_loads_total").increment(1);
        Ok(Loaded {
            version,
            state,
            plugin_version: plugin.version(),
        })
    }

    /// The aggregate's current state read from the store, bypassing the cache: for
    /// hosts that do not own the aggregate, so they never cache what they do not own.
    pub async fn read_state(&self, key: &AggregateKey) -> Result<AggregateState, CommandError> {
        let plugin = self.inner.plugins.get(&key.aggregate_type).await?;
        let loaded = self.load(&plugin, key).await?;
        Ok(AggregateState {
            version: loaded.version,
            state: loaded.state,
            plugin_version: loaded.plugin_version,
        })
    }

    /// The aggregate's current state, from the cache when it holds the version the
    /// store holds (`stored`), else loaded again. Events reach the store around this
    /// cache: in a region that receives events from other regions, the relay stores what
    /// the aggregate's home wrote and a home move writes its event directly; and a host
    /// back from a pause may still take itself for the owner while another host writes
    /// on. Commands notice (their append conflicts and they decide again); reads must
    /// check.
    pub async fn state_as_stored(
        &self,
        key: &AggregateKey,
        stored: i64,
    ) -> Result<AggregateState, CommandError> {
        // An unknown type is refused before waiting for the aggregate ...
        self.inner.plugins.get(&key.aggregate_type).await?;
        let slot = self.inner.cache.slot(key);
        let mut guard = waiting_for(slot.lock()).await;
        // ... and the version is taken once it is this read's turn, as a command takes
        // it: a read that waited behind commands while a version was uploaded would
        // otherwise load their events with the version before, and cache that.
        let plugin = self.inner.plugins.get(&key.aggregate_type).await?;
        let loaded = match guard.take() {
            Some(loaded)
                if loaded.plugin_version == plugin.version() && loaded.version == stored =>
            {
                metrics::counter!("meridian_cache_hits_total").increment(1);
                loaded
            }
            _ => self.load(&plugin, key).await?,
        };
        let state = AggregateState {
            version: loaded.version,
            state: loaded.state.clone(),
            plugin_version: loaded.plugin_version,
        };
        *guard = Some(loaded);
        Ok(state)
    }
}

/// Waits for `lock`, counted meanwhile in the `meridian_aggregate_waiters` gauge: requests
/// queued behind another on one aggregate (a hot aggregate, or a slow handler) show there,
/// where the in-flight count alone cannot tell them from load.
async fn waiting_for<T>(lock: impl std::future::Future<Output = T>) -> T {
    /// Counts down when the wait ends, also when the request is dropped while waiting.
    struct Waiter;
    impl Drop for Waiter {
        fn drop(&mut self) {
            metrics::gauge!("meridian_aggregate_waiters").decrement(1.0);
        }
    }
    metrics::gauge!("meridian_aggregate_waiters").increment(1.0);
    let _waiter = Waiter;
    lock.await
}
