//! Telling the region's other hosts, through PostgreSQL `LISTEN`/`NOTIFY`, that this
//! host has stored events or a plugin change.
//!
//! Without it a host learns of the other hosts' writes only by polling: a live stream
//! on one host saw a commit made on another up to 100 ms late (the tail's idle poll),
//! and a plugin uploaded through one host ran on the others only after their next
//! refresh (2 s). Polling stays, now as the fallback: a notification is a hint that
//! says "read again now", never the data, so one that is lost (a dropped listener
//! connection, a host that restarted) only costs the time until the next poll.
//!
//! The notifications are sent outside the writing transactions, on a connection of
//! their own, after those transactions committed. PostgreSQL serialises the commits of
//! transactions that `NOTIFY` (a lock held until the commit is flushed), so a `NOTIFY`
//! inside each group-commit batch would make the batches' fsyncs wait for one another.
//! One announcement covers every write since the previous one, and a host sends at most
//! one per [`ANNOUNCE_INTERVAL`], so a busy host costs the database little.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_util::sync::CancellationToken;

/// The `LISTEN`/`NOTIFY` channel; the payload is `<kind> <node id>`.
pub const CHANNEL: &str = "meridian_changes";

/// The shortest time between two announcements of one host: writes in between are
/// covered by the next one. A write after a quiet spell is announced at once; while a
/// host commits often, the other hosts' tails find its commits by their own busy reads
/// (10 ms apart) anyway, and one announcement per 5 ms from each host cost a three-host
/// region ≈ 9% of its throughput on two cores (BENCHMARKS.md, "Live streams").
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(50);

const EVENTS: &str = "events";
const PLUGINS: &str = "plugins";

/// This host's view of what changed in the region's database: writes made here (which
/// it announces) and writes announced by the other hosts. Cheap to clone. One that was
/// never [`spread`](Changes::spread) only tells this host of its own writes.
#[derive(Clone, Default)]
pub struct Changes {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    node_id: String,
    events_here: AtomicBool,
    plugins_here: AtomicBool,
    /// Wakes the announcer; `notify_one` keeps a permit, so a write made while it sends
    /// is announced next.
    announce: Notify,
    /// Events committed on any host of the region (this one included).
    events: Notify,
    /// Plugins changed through any host of the region (this one included).
    plugins: Notify,
}

impl Changes {
    /// Changes for the host `node_id` (which its own announcements carry, so it can
    /// tell them from the other hosts').
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id: node_id.into(),
                ..Inner::default()
            }),
        }
    }

    /// The host these changes are announced for.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Call after a transaction that stored events has committed.
    pub fn events_committed(&self) {
        self.inner.events_here.store(true, Ordering::Release);
        self.inner.announce.notify_one();
        self.inner.events.notify_waiters();
    }

    /// Call after a plugin version or an aggregate type's limits were stored.
    pub fn plugins_changed(&self) {
        self.inner.plugins_here.store(true, Ordering::Release);
        self.inner.announce.notify_one();
        self.inner.plugins.notify_waiters();
    }

    /// Resolves when events are committed on any host of the region. Like every
    /// [`Notified`], it counts from its creation, even before it is first polled: create
    /// it before reading, so a commit during the read is not missed.
    pub fn events(&self) -> Notified<'_> {
        self.inner.events.notified()
    }

    /// Resolves when a plugin change is stored by any host of the region (this one
    /// included).
    pub fn plugins(&self) -> Notified<'_> {
        self.inner.plugins.notified()
    }

    /// Announces this host's writes to the region and listens for the other hosts',
    /// until `stop`. Both use connections of their own (outside `pool`, whose
    /// connections serve requests), made with `pool`'s options.
    pub fn spread(&self, pool: &PgPool, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let options = (*pool.connect_options()).clone();
        // One connection, not tested before each use: a failed send is retried on a
        // fresh one by the pool, and a lost announcement is only a late one.
        let announcer = PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // The announcement follows a durable commit; its own transaction
                    // holds nothing that must survive a crash.
                    sqlx::query("SET synchronous_commit = off")
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            })
            .connect_lazy_with(options.clone());
        let listener = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        let changes = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = changes.announce(announcer) => {}
                _ = changes.listen(listener) => {}
            }
        })
    }

    async fn announce(&self, pool: PgPool) {
        let inner = &self.inner;
        loop {
            inner.announce.notified().await;
            for (flag, kind) in [(&inner.events_here, EVENTS), (&inner.plugins_here, PLUGINS)] {
                if !flag.swap(false, Ordering::AcqRel) {
                    continue;
                }
                let payload = format!("{kind} {}", inner.node_id);
                if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&payload)
                    .execute(&pool)
                    .await
                {
                    // The other hosts find the write by polling instead.
                    tracing::debug!(%error, kind, "announcing a change failed");
                    metrics::counter!("meridian_change_announcements_failed_total").increment(1);
                }
            }
            tokio::time::sleep(ANNOUNCE_INTERVAL).await;
        }
    }

    async fn listen(&self, pool: PgPool) {
        let inner = &self.inner;
        let mut backoff = Duration::from_millis(100);
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = match listening.await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "cannot listen for the other hosts' changes; polling only");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Whatever was announced before this point was missed: read again now.
            inner.events.notify_waiters();
            inner.plugins.notify_waiters();
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        let (kind, node) = notification
                            .payload()
                            .split_once(' ')
                            .unwrap_or((notification.payload(), ""));
                        if node == inner.node_id {
                            continue;
                        }
                        match kind {
                            EVENTS => inner.events.notify_waiters(),
                            PLUGINS => inner.plugins.notify_waiters(),
                            _ => {}
                        }
                    }
                    // The connection was lost and made again; notifications in between
                    // are gone.
                    Ok(None) => {
                        tracing::debug!("listener reconnected; reading again");
                        inner.events.notify_waiters();
                        inner.plugins.notify_waiters();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "listening for the other hosts' changes failed; polling only until it is back");
                        tokio::time::sleep(backoff).await;
                        break;
                    }
                }
            }
        }
    }
}
