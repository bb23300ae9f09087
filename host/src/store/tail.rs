//! One reader of the region's commit order per host, shared by every live stream.
//!
//! A live stream (SSE, a group member's stream, the status page) used to poll
//! PostgreSQL on its own every 100 ms: two queries and two pooled-connection checks
//! each time, whether or not anything had committed. A few hundred idle subscribers
//! then cost the database thousands of queries a second and took the connections the
//! command path reads through. Instead, one task per host ([`Tail`]) reads the order
//! and broadcasts each page it reads; a [`Subscription`] catches up from the database
//! on its own, then takes the shared pages, filtering them itself. It reads the
//! database again only to bridge a gap: when it fell behind the broadcast, or when its
//! own catch-up ended before the page it received begins.
//!
//! Pages chain: each says which key it was read after and holds every event up to its
//! last key (the events up to a key the tail has read belong to finished transactions,
//! see [`read::read_after`]). So a subscriber whose key lies inside or at the start of
//! a page takes the rest of the page and is exactly where the tail is; one whose key is
//! before the page reads the events in between from the database, bounded by the
//! page's start, and then takes the page.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, broadcast};

use super::StoreError;
use super::changes::Changes;
use super::read::{self, EventFilter, OrderKey, StoredEvent};

/// How long the tail waits after a failed read (the database away) before it tries
/// again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// How the shared tail reads and fans out.
#[derive(Debug, Clone)]
pub struct TailConfig {
    /// Events per read, for the tail and for subscribers catching up.
    pub page: i64,
    /// Bytes of events (payload and metadata) per read: a read stops after the event
    /// that reaches them. The broadcast keeps `capacity` pages, so this bounds what
    /// slow subscribers can hold in memory however large events are.
    pub page_bytes: usize,
    /// Pages the broadcast keeps for slow subscribers; one that falls further behind
    /// reads the gap from the database.
    pub capacity: usize,
    /// How long the tail waits after a read that found nothing new, unless a host of
    /// the region announces a commit first (see [`Changes`]); the poll finds commits
    /// whose announcement was lost.
    pub poll: Duration,
    /// How long it waits after a read that found events: while the region is busy
    /// the other hosts' commits are found this soon, and an idle region costs one read
    /// per `poll`.
    pub busy_poll: Duration,
    /// Shortest time between two reads when commits wake the tail, so a busy host
    /// reads in batches rather than once per commit.
    pub min_interval: Duration,
}

impl Default for TailConfig {
    fn default() -> Self {
        Self {
            page: 500,
            page_bytes: 4 * 1024 * 1024,
            capacity: 64,
            poll: Duration::from_millis(100),
            busy_poll: Duration::from_millis(10),
            min_interval: Duration::from_millis(5),
        }
    }
}

/// A page the tail read: every event after `after` up to the last one's key.
#[derive(Debug)]
pub struct Page {
    /// The key the page was read after.
    pub after: OrderKey,
    /// The events, in commit order (never empty).
    pub events: Vec<(OrderKey, StoredEvent)>,
}

impl Page {
    fn last(&self) -> OrderKey {
        self.events.last().map_or(self.after, |(key, _)| *key)
    }
}

/// The host's shared reader of the commit order. Cheap to clone; the reading task runs
/// while anything subscribes and stops reading when nothing does.
#[derive(Clone)]
pub struct Tail {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: TailConfig,
    sender: broadcast::Sender<Arc<Page>>,
    /// Woken when a subscriber arrives at an idle tail. (Its own `Arc`: the parked task
    /// holds it without keeping the rest alive.)
    subscribed: Arc<Notify>,
}

impl Tail {
    /// Starts the tail's task on the current tokio runtime. It reads right after
    /// `changes` tells of a commit in the region (at most every
    /// [`min_interval`](TailConfig::min_interval)), and otherwise on its poll.
    pub fn start(pool: PgPool, config: TailConfig, changes: Changes) -> Tail {
        let (sender, _) = broadcast::channel(config.capacity.max(1));
        let inner = Arc::new(Inner {
            pool,
            config,
            sender,
            subscribed: Arc::new(Notify::new()),
        });
        tokio::spawn(run(
            Arc::downgrade(&inner),
            inner.subscribed.clone(),
            changes,
        ));
        Tail { inner }
    }

    /// Live streams open now.
    pub fn open_streams(&self) -> usize {
        self.inner.sender.receiver_count()
    }

    /// A live stream of the events after `after` that pass `filter`.
    pub fn subscribe(&self, after: OrderKey, filter: EventFilter) -> Subscription {
        // Receive before the first read, so no page published after it is missed.
        let pages = self.inner.sender.subscribe();
        self.inner.subscribed.notify_one();
        metrics::gauge!("meridian_event_streams_open").increment(1.0);
        Subscription {
            pool: self.inner.pool.clone(),
            page: self.inner.config.page,
            page_bytes: self.inner.config.page_bytes,
            poll: self.inner.config.poll,
            filter,
            key: after,
            pages,
            caught_up: false,
            bridging: None,
            buffer: VecDeque::new(),
        }
    }
}

/// The tail's task: reads while anyone listens, from the head the first listener
/// found, and ends when the [`Tail`] is dropped.
async fn run(inner: std::sync::Weak<Inner>, subscribed: Arc<Notify>, changes: Changes) {
    let mut cursor: Option<OrderKey> = None;
    // Since when a commit has been announced that no read has found yet.
    let mut announced: Option<tokio::time::Instant> = None;
    loop {
        let Some(tail) = inner.upgrade() else { return };
        if tail.sender.receiver_count() == 0 {
            // Nobody listens: stop reading, and start from the head again later rather
            // than read what nobody will take.
            cursor = None;
            let notified = subscribed.notified();
            drop(tail);
            // A Tail dropped while nobody listens leaves this task parked, holding only
            // the `Notify`: a few bytes until the process exits.
            notified.await;
            continue;
        }
        let after = match cursor {
            Some(key) => key,
            None => match read::head_key(&tail.pool).await {
                Ok(key) => key,
                Err(error) => {
                    tracing::warn!(%error, "event tail: reading the head failed; retrying");
                    tokio::time::sleep(READ_RETRY).await;
                    continue;
                }
            },
        };
        cursor = Some(after);
        // Listen for the next commit before reading, so one that lands during the read
        // still wakes the wait after it.
        let committed = changes.events();
        let started = tokio::time::Instant::now();
        match read::read_after(
            &tail.pool,
            after,
            None,
            tail.config.page,
            tail.config.page_bytes,
            &EventFilter::default(),
        )
        .await
        {
            Ok(read) if !read.events.is_empty() => {
                let full = read.more(tail.config.page);
                let page = Page {
                    after,
                    events: read.events,
                };
                cursor = Some(page.last());
                // No receiver left is fine: the next turn parks.
                let _ = tail.sender.send(Arc::new(page));
                announced = None;
                if !full && wait(&tail.config, tail.config.busy_poll, started, committed).await {
                    announced = Some(tokio::time::Instant::now());
                }
            }
            Ok(_) => {
                // A commit was announced but nothing new can be read: it is behind a
                // transaction still running (the read stops below the oldest one, which
                // may be any short transaction on the server), so look again soon
                // rather than at the idle poll — until `poll` has passed, in case the
                // announced commit had been read already.
                let poll = match announced {
                    Some(since) if since.elapsed() < tail.config.poll => tail.config.busy_poll,
                    _ => {
                        announced = None;
                        tail.config.poll
                    }
                };
                if wait(&tail.config, poll, started, committed).await && announced.is_none() {
                    announced = Some(tokio::time::Instant::now());
                }
            }
            Err(error) => {
                tracing::warn!(%error, "event tail: read failed; retrying");
                tokio::time::sleep(READ_RETRY).await;
            }
        }
    }
}

/// Waits `poll` or, sooner, for a commit in the region, but never less than
/// `min_interval` after the read that `started`. True when a commit ended the wait.
async fn wait(
    config: &TailConfig,
    poll: Duration,
    started: tokio::time::Instant,
    committed: Notified<'_>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(poll) => return false,
        _ = committed => {}
    }
    tokio::time::sleep_until(started + config.min_interval).await;
    true
}

/// One live stream: the events after its starting key that pass its filter, in commit
/// order, each once. Catches up from the database, then follows the shared [`Tail`].
pub struct Subscription {
    pool: PgPool,
    page: i64,
    page_bytes: usize,
    poll: Duration,
    filter: EventFilter,
    /// Everything up to this key has been delivered or was filtered out.
    key: OrderKey,
    pages: broadcast::Receiver<Arc<Page>>,
    /// Still reading the database page by page (at the start, or after the tail ended).
    caught_up: bool,
    /// A page that begins after `key`: the events in between are read first.
    bridging: Option<Arc<Page>>,
    buffer: VecDeque<StoredEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!("meridian_event_streams_open").decrement(1.0);
    }
}

impl Subscription {
    /// The next event, waiting for one to commit if need be. After an error (the
    /// database was unreachable) the subscription is unchanged and may be called again.
    pub async fn next(&mut self) -> Result<StoredEvent, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Ok(event);
            }
            if let Some(page) = self.bridging.clone() {
                let gap = read::read_after(
                    &self.pool,
                    self.key,
                    Some(page.after),
                    self.page,
                    self.page_bytes,
                    &self.filter,
                )
                .await?;
                // A gap read cut at its byte budget is not the whole gap.
                let done = !gap.more(self.page);
                if let Some((key, _)) = gap.events.last() {
                    self.key = *key;
                }
                self.buffer
                    .extend(gap.events.into_iter().map(|(_, event)| event));
                if done {
                    // Everything up to the page's start is in: the page follows on.
                    self.key = page.after;
                    self.bridging = None;
                    self.take(&page);
                }
                continue;
            }
            if !self.caught_up {
                let events = read::read_after(
                    &self.pool,
                    self.key,
                    None,
                    self.page,
                    self.page_bytes,
                    &self.filter,
                )
                .await?
                .events;
                match events.last() {
                    Some((key, _)) => self.key = *key,
                    None => self.caught_up = true,
                }
                self.buffer
                    .extend(events.into_iter().map(|(_, event)| event));
                continue;
            }
            match self.pages.recv().await {
                Ok(page) if page.last() <= self.key => {}
                Ok(page) if page.after <= self.key => self.take(&page),
                Ok(page) => self.bridging = Some(page),
                // The pages missed are a gap before the next page, bridged then.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "event stream fell behind the tail");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The tail is gone (the host is stopping): read on our own.
                    self.caught_up = false;
                    tokio::time::sleep(self.poll).await;
                }
            }
        }
    }

    /// Takes a page that starts at or before `key`: its events after `key` that pass
    /// the filter.
    fn take(&mut self, page: &Page) {
        let key = self.key;
        self.buffer.extend(
            page.events
                .iter()
                .filter(|(k, event)| *k > key && self.filter.matches(event))
                .map(|(_, event)| event.clone()),
        );
        self.key = page.last();
    }
}
