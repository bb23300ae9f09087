//! Group commit: many commands' appends in one round trip.
//!
//! Commands for one aggregate already run one at a time (see `crate::executor`), so a
//! batch never holds two appends for the same aggregate from this node. A batch is one
//! call of the `meridian_append` SQL function, which judges every request on its own;
//! one command's conflict never fails another's. If the whole call fails (which only a
//! broken invariant, such as a duplicate event id, can cause), each request is retried
//! alone so the failure lands on the request that caused it.
//!
//! Several workers share the queue: while some wait for their commit (an fsync), others
//! gather the next batch. When no batch is in flight a request is committed at once, so
//! under light load there is no waiting for a batch to fill. While others are in flight,
//! a worker that finds only a few requests queued lingers briefly for more: requests
//! arrive in bursts (every reply of a commit frees a client), and without lingering the
//! idle workers would pick them off one at a time, each paying a whole commit.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::value::RawValue;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::StoreError;
use super::changes::Changes;

/// Committer settings.
#[derive(Debug, Clone)]
pub struct CommitterConfig {
    /// Concurrent batches in flight.
    pub workers: usize,
    /// Most requests in one batch.
    pub max_batch: usize,
    /// While another batch is in flight, a batch smaller than this waits up to
    /// [`linger`](Self::linger) for more requests before it commits.
    pub min_batch: usize,
    /// How long a small batch may wait for more while another batch is in flight.
    pub linger: std::time::Duration,
    /// This region, recorded as the home of aggregates created here.
    pub region: String,
    /// This node, checked against partition leases when a request carries a [`Fence`].
    pub node_id: String,
    /// How long one batch may take before its connection is given up for dead.
    pub batch_timeout: std::time::Duration,
}

/// Default [`CommitterConfig::batch_timeout`]. A batch takes milliseconds; one that
/// waits half a minute waits on a database host that went silent (a failover, a
/// network that drops packets): with no answer and no reset, the kernel gives up on
/// the connection only after about fifteen minutes, and every command of the batch,
/// and its aggregate, would wait that long.
pub const DEFAULT_BATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for CommitterConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            max_batch: 512,
            min_batch: 16,
            linger: std::time::Duration::from_millis(2),
            region: "local".into(),
            node_id: "node".into(),
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
        }
    }
}

/// The partition epoch an append is made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// Virtual partition of the aggregate.
    pub partition: i32,
    /// The epoch at which this node acquired it.
    pub epoch: i64,
}

/// One event to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUID v7, assigned by the host.
    pub event_id: Uuid,
    /// The event type.
    pub event_type: String,
    /// JSON payload as decided by the plugin.
    pub payload: Box<RawValue>,
    /// JSON metadata (command id, plugin version, origin region, ...).
    pub metadata: Box<RawValue>,
}

/// One command's append.
#[derive(Debug)]
pub struct AppendRequest {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The version the events were decided against (0: a new aggregate).
    pub expected_version: i64,
    /// The events, in order; may be empty (the command id is still recorded).
    pub events: Vec<NewEvent>,
    /// Idempotency key.
    pub command_id: Option<Uuid>,
    /// Ownership this append depends on, if the region is clustered.
    pub fence: Option<Fence>,
}

/// What became of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored; the events got versions `first_version..=last_version`.
    Appended {
        /// Version of the first event (expected + 1).
        first_version: i64,
        /// Version of the last event (the aggregate's new version).
        last_version: i64,
    },
    /// The command id had run before; nothing was written. These are its versions.
    Duplicate {
        /// Version of its first event.
        first_version: i64,
        /// Version of its last event.
        last_version: i64,
    },
}

struct Pending {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// Handle to the group committer. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts the workers. They stop when every `Committer` handle is dropped. After
    /// each batch they tell `changes`, so live streams here read at once and the other
    /// hosts hear of it.
    pub fn start(pool: PgPool, config: CommitterConfig, changes: Changes) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>(config.max_batch * config.workers * 2);
        let rx = Arc::new(Mutex::new(rx));
        let config = Arc::new(config);
        let in_flight = Arc::new(AtomicUsize::new(0));
        for worker in 0..config.workers.max(1) {
            let changes = changes.clone();
            let rx = rx.clone();
            let pool = pool.clone();
            let config = config.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let mut carry: Vec<Pending> = Vec::new();
                let mut link = Link::new(pool);
                loop {
                    let Some(batch) = next_batch(&rx, &mut carry, &config, &in_flight).await else {
                        tracing::debug!(worker, "committer worker stopping");
                        return;
                    };
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    commit(&mut link, &config, batch, &in_flight).await;
                    changes.events_committed();
                }
            });
        }
        Self { tx }
    }

    /// Appends one command's events; resolves when they are durable (or refused).
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { request, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Waits for at least one request, then takes what else is queued, up to `max_batch`;
/// while another batch is in flight, lingers for up to `min_batch` (see the module
/// docs). A request whose command id is already in the batch waits for the next one,
/// so the SQL never sees the same id twice in a statement.
async fn next_batch(
    rx: &Mutex<mpsc::Receiver<Pending>>,
    carry: &mut Vec<Pending>,
    config: &CommitterConfig,
    in_flight: &AtomicUsize,
) -> Option<Vec<Pending>> {
    let max = config.max_batch;
    let mut batch = std::mem::take(carry);
    let mut rx = if batch.is_empty() {
        let mut rx = rx.lock().await;
        batch.push(rx.recv().await?);
        rx
    } else {
        match rx.try_lock() {
            Ok(rx) => rx,
            // An idle worker holds the queue while it waits for a request; the carried
            // ones (and the aggregates they hold) would wait with it until one came.
            Err(_) => return Some(without_repeats(batch, carry)),
        }
    };
    let drain = |rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>| {
        while batch.len() < max {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
    };
    drain(&mut rx, &mut batch);
    if batch.len() < config.min_batch && in_flight.load(Ordering::SeqCst) > 0 {
        let deadline = tokio::time::Instant::now() + config.linger;
        while batch.len() < config.min_batch && in_flight.load(Ordering::SeqCst) > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(pending)) => {
                    batch.push(pending);
                    drain(&mut rx, &mut batch);
                }
                // Closed: commit what there is; the next call returns `None`.
                Ok(None) | Err(_) => break,
            }
        }
        metrics::counter!("meridian_append_lingered_total").increment(1);
    }
    drop(rx);
    Some(without_repeats(batch, carry))
}

/// The most event bytes one batch carries (its first request goes whatever its size).
/// A batch is one statement, and PostgreSQL refuses a message over 1 GB by closing the
/// connection: with output caps raised, a few dozen large commands at once would make
/// every batch fail, be sent again, and fail again.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// The batch without a second request for a command id or an aggregate already in it,
/// and without what goes past [`MAX_BATCH_BYTES`]; those go to `carry`, for the next
/// batch.
fn without_repeats(batch: Vec<Pending>, carry: &mut Vec<Pending>) -> Vec<Pending> {
    let mut seen_commands = HashSet::new();
    let mut seen_aggregates = HashSet::new();
    let mut keep = Vec::with_capacity(batch.len());
    let mut bytes = 0usize;
    for pending in batch {
        let r = &pending.request;
        let size: usize = r
            .events
            .iter()
            .map(|e| e.payload.get().len() + e.metadata.get().len() + e.event_type.len())
            .sum();
        if !keep.is_empty() && bytes.saturating_add(size) > MAX_BATCH_BYTES {
            carry.push(pending);
            continue;
        }
        let fresh_command = r.command_id.is_none_or(|id| seen_commands.insert(id));
        let fresh_aggregate =
            seen_aggregates.insert((r.aggregate_type.clone(), r.aggregate_id.clone()));
        if fresh_command && fresh_aggregate {
            bytes = bytes.saturating_add(size);
            keep.push(pending);
        } else {
            carry.push(pending);
        }
    }
    keep
}

/// Commits one batch and answers its requests. `in_flight` drops before the answers go
/// out: a caller that sends its next request at once must not see this batch as still
/// in flight and linger for nothing.
async fn commit(
    link: &mut Link,
    config: &CommitterConfig,
    batch: Vec<Pending>,
    in_flight: &AtomicUsize,
) {
    metrics::histogram!("meridian_append_batch_size").record(batch.len() as f64);
    let requests: Vec<&AppendRequest> = batch.iter().map(|p| &p.request).collect();
    let outcome = link.append(config, &requests).await;
    drop(requests);
    in_flight.fetch_sub(1, Ordering::SeqCst);
    match outcome {
        Ok(results) => {
            for (pending, result) in batch.into_iter().zip(results) {
                let _ = pending.reply.send(result);
            }
        }
        // Alone in its batch, a request gets the error itself: a refusal of its data
        // stays a refusal (422), not an outage to retry.
        Err(error) if batch.len() == 1 => {
            if let Some(pending) = batch.into_iter().next() {
                let _ = pending.reply.send(Err(error));
            }
        }
        Err(error) if !error.is_unavailable() || one_request_at_fault(&error) => {
            tracing::warn!(%error, size = batch.len(), "batch append failed; retrying its requests one by one");
            for pending in batch {
                let result = match link.append(config, &[&pending.request]).await {
                    Ok(mut results) => results.pop().expect("one result per request"),
                    Err(error) => Err(error),
                };
                let _ = pending.reply.send(result);
            }
        }
        Err(error) => {
            let message = error.to_string();
            for pending in batch {
                let _ = pending
                    .reply
                    .send(Err(StoreError::Database(sqlx::Error::Protocol(
                        message.clone(),
                    ))));
            }
        }
    }
}

/// A committer worker's own database connection, kept from batch to batch.
///
/// Taking a connection from the pool for every batch costs two extra round trips: sqlx
/// tests a connection when it is taken out and again when it goes back. A worker that
/// keeps its connection pays neither. The price is noticing a dead connection (the
/// server restarted, or an operator terminated the session) only when a batch fails on
/// it; then the batch is sent again once, on a connection the pool has just tested.
///
/// A batch that times out is not over on the server: the session goes on waiting (on a
/// row lock, say) and keeps every lock the batch took, and the aggregates' next
/// commands, sent again on a new connection, would queue behind it and leave sessions
/// of their own. So the worker knows its session's process id and ends it then.
struct Link {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
    /// The server process of `conn`, when it could be asked.
    pid: Option<i32>,
}

impl Link {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            conn: None,
            pid: None,
        }
    }

    /// Takes a fresh connection from the pool and learns its server process.
    async fn connect(&mut self) -> Result<&mut PoolConnection<Postgres>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .ok();
        Ok(self.conn.insert(conn))
    }

    /// One `meridian_append` call (see [`append_batch`]), sent again on a fresh
    /// connection if the kept one turns out to be dead.
    ///
    /// Sending again is safe even when the first attempt committed and only its answer
    /// was lost: every request the API makes carries a command id, so the second
    /// attempt finds the ids claimed and answers each as a duplicate of the first.
    async fn append(
        &mut self,
        config: &CommitterConfig,
        requests: &[&AppendRequest],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        let reused = self.conn.is_some();
        let conn = match self.conn {
            Some(ref mut conn) => conn,
            None => self.connect().await?,
        };
        let outcome = match timed(config, append_batch(&mut **conn, config, requests)).await {
            Err(StoreError::Database(error)) if reused && connection_lost(&error) => {
                tracing::warn!(%error, "the committer's database connection was lost; sending the batch again on a new one");
                metrics::counter!("meridian_append_reconnects_total").increment(1);
                self.drop_connection(&error);
                let conn = self.connect().await?;
                timed(config, append_batch(&mut **conn, config, requests)).await
            }
            outcome => outcome,
        };
        if let Err(StoreError::Database(error)) = &outcome
            && connection_lost(error)
        {
            self.drop_connection(error);
        }
        outcome.map_err(refused_data)
    }

    /// Lets go of the kept connection after `error`. A broken one goes back to the
    /// pool, which tests it before anyone uses it again; a silent one is closed, since
    /// that test would wait on it too, and its session ended on the server.
    fn drop_connection(&mut self, error: &sqlx::Error) {
        let pid = self.pid.take();
        if let Some(conn) = self.conn.take()
            && matches!(error, sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
        {
            drop(conn.detach());
            if let Some(pid) = pid {
                tokio::spawn(terminate(self.pool.clone(), pid));
            }
        }
    }
}

/// Ends the server session `pid`, whose batch timed out: closing the socket alone does
/// not, since a session waiting on a lock does not notice, and it keeps its locks. A
/// database that went silent will not answer this either; the pool's acquire timeout
/// bounds the try.
async fn terminate(pool: PgPool, pid: i32) {
    let ended: Result<bool, sqlx::Error> = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await;
    match ended {
        Ok(ended) => tracing::warn!(
            pid,
            ended,
            "ended the database session of a batch that timed out"
        ),
        Err(error) => {
            tracing::warn!(pid, %error, "cannot end the database session of a batch that timed out")
        }
    }
}

/// `append` within the batch timeout; past it, a [`std::io::ErrorKind::TimedOut`] error,
/// which [`connection_lost`] takes for a lost connection. The batch's outcome is then
/// unknown, like that of any batch whose connection broke mid-call, and sending it
/// again is just as safe.
async fn timed<T>(
    config: &CommitterConfig,
    append: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(config.batch_timeout, append)
        .await
        .unwrap_or_else(|_| {
            tracing::warn!(
                timeout_ms = config.batch_timeout.as_millis() as u64,
                "an append batch got no answer from the database in time; giving its connection up"
            );
            Err(super::unanswered(config.batch_timeout))
        })
}

/// Tells a statement refused for its data from a database that failed: SQLSTATE class
/// 22 (data exceptions, such as JSON `jsonb` cannot hold) and class 54 (limits a value
/// went past: JSON nested past the parser's stack, a `jsonb` over its size cap). The
/// first is no outage: the batch is then retried request by request, so the request
/// at fault fails alone.
fn refused_data(error: StoreError) -> StoreError {
    match error {
        StoreError::Database(sqlx::Error::Database(db))
            if db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")) =>
        {
            StoreError::Unstorable(db.message().to_string())
        }
        other => other,
    }
}

/// Whether a batch's failure, though the database reported it, may be one request's
/// doing rather than the database's: an integrity violation (SQLSTATE class 23: an
/// event id stored already) or a transaction rolled back (class 40: a deadlock with
/// another batch that claimed two of the same command ids in the other order). Sent
/// one by one, the others commit and only the culprit fails.
fn one_request_at_fault(error: &StoreError) -> bool {
    matches!(error, StoreError::Database(sqlx::Error::Database(db))
        if db.code().is_some_and(|code| code.starts_with("23") || code.starts_with("40")))
}

/// Whether an error means the connection itself is gone (rather than the statement
/// failing on a working connection).
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exceptions; 57P01-57P03: the server is shutting down,
        // was restarted or terminated this session.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// Runs one `meridian_append` call; one result per request, in order.
///
/// Outside a transaction the call is its own transaction; inside one (tests do this to
/// delay commits) it commits with it.
pub async fn append_batch<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    config: &CommitterConfig,
    requests: &[&AppendRequest],
) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
    let n = requests.len();
    let mut partition = Vec::with_capacity(n);
    let mut epoch = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut count = Vec::with_capacity(n);
    let mut command = Vec::with_capacity(n);
    let mut e_req = Vec::new();
    let mut e_id = Vec::new();
    let mut e_version = Vec::new();
    let mut e_type = Vec::new();
    let mut e_payload = Vec::new();
    let mut e_metadata = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        partition.push(r.fence.map(|f| f.partition));
        epoch.push(r.fence.map(|f| f.epoch));
        types.push(r.aggregate_type.as_str());
        ids.push(r.aggregate_id.as_str());
        expected.push(r.expected_version);
        count.push(r.events.len() as i32);
        command.push(r.command_id);
        for (k, e) in r.events.iter().enumerate() {
            e_req.push(i as i32 + 1);
            e_id.push(e.event_id);
            e_version.push(r.expected_version + 1 + k as i64);
            e_type.push(e.event_type.as_str());
            e_payload.push(e.payload.get());
            e_metadata.push(e.metadata.get());
        }
    }
    let rows = sqlx::query(
        "SELECT req, outcome, first_version, last_version, agg_type, agg_id \
         FROM meridian_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(&config.node_id)
    .bind(&config.region)
    .bind(&partition)
    .bind(&epoch)
    .bind(&types)
    .bind(&ids)
    .bind(&expected)
    .bind(&count)
    .bind(&command)
    .bind(&e_req)
    .bind(&e_id)
    .bind(&e_version)
    .bind(&e_type)
    .bind(&e_payload)
    .bind(&e_metadata)
    .fetch_all(executor)
    .await?;

    let mut results: Vec<Option<Result<AppendOutcome, StoreError>>> =
        (0..n).map(|_| None).collect();
    for row in rows {
        let req: i32 = row.try_get("req")?;
        let outcome: String = row.try_get("outcome")?;
        let first: Option<i64> = row.try_get("first_version")?;
        let last: Option<i64> = row.try_get("last_version")?;
        let r = requests[req as usize - 1];
        let result = match outcome.as_str() {
            "ok" => Ok(AppendOutcome::Appended {
                first_version: first.unwrap_or_default(),
                last_version: last.unwrap_or_default(),
            }),
            "duplicate" => {
                let agg_type: String = row.try_get("agg_type")?;
                let agg_id: String = row.try_get("agg_id")?;
                if agg_type != r.aggregate_type || agg_id != r.aggregate_id {
                    Err(StoreError::CommandIdReused {
                        command_id: r.command_id.unwrap_or_default(),
                        used_for: format!("{agg_type}/{agg_id}"),
                    })
                } else {
                    Ok(AppendOutcome::Duplicate {
                        first_version: first.unwrap_or_default(),
                        last_version: last.unwrap_or_default(),
                    })
                }
            }
            "fenced" => {
                let fence = r
                    .fence
                    .expect("only fenced requests can be refused as fenced");
                Err(StoreError::Fenced {
                    partition: fence.partition,
                    epoch: fence.epoch,
                })
            }
            // The compare-and-set also checks the home under the row's lock: a
            // "conflict" with the stream still at the expected version was given away
            // by a relayed move that committed after the fence read it. A conflict
            // "expected 3, found 3" would blame a pinned version that was right.
            outcome
                if outcome == "not_home"
                    || (r.expected_version > 0 && last == Some(r.expected_version)) =>
            {
                Err(StoreError::NotHome {
                    aggregate: format!("{}/{}", r.aggregate_type, r.aggregate_id),
                })
            }
            _ => Err(StoreError::Conflict {
                aggregate: format!("{}/{}", r.aggregate_type, r.aggregate_id),
                expected: r.expected_version,
                actual: last.unwrap_or_default(),
            }),
        };
        results[req as usize - 1] = Some(result);
    }
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(StoreError::Database(sqlx::Error::Protocol(
                    "append returned no result for a request".into(),
                )))
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str, payload_bytes: usize) -> Pending {
        let payload = format!("\"{}\"", "x".repeat(payload_bytes));
        Pending {
            request: AppendRequest {
                aggregate_type: "t".into(),
                aggregate_id: id.into(),
                expected_version: 0,
                events: vec![NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "E".into(),
                    payload: serde_json::value::RawValue::from_string(payload).unwrap(),
                    metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                }],
                command_id: Some(Uuid::now_v7()),
                fence: None,
            },
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_stops_at_its_byte_cap_and_carries_the_rest() {
        let mb = 1 << 20;
        let batch: Vec<Pending> = (0..40).map(|i| pending(&format!("a{i}"), 5 * mb)).collect();
        let mut carry = Vec::new();
        let kept = without_repeats(batch, &mut carry);
        let ids = |p: &[Pending]| {
            p.iter()
                .map(|p| p.request.aggregate_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kept.len(),
            MAX_BATCH_BYTES / (5 * mb + 10),
            "{:?}",
            ids(&kept)
        );
        assert_eq!(kept.len() + carry.len(), 40, "nothing dropped");
        assert_eq!(
            ids(&carry)[0],
            format!("a{}", kept.len()),
            "the rest keeps its order"
        );
        // One request over the cap still goes, alone.
        let mut carry = Vec::new();
        let kept = without_repeats(
            vec![pending("big", 80 * mb), pending("small", 1)],
            &mut carry,
        );
        assert_eq!(
            (ids(&kept), ids(&carry)),
            (vec!["big".to_string()], vec!["small".to_string()])
        );
    }
}
