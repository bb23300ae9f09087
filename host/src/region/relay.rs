//! The relay between regions, run by one host per region (the relay leader).
//!
//! **Out.** The leader tails this region's own events in the gap-free commit order and
//! publishes each to the region's JetStream stream ([`super::events_stream`]) with
//! `Nats-Msg-Id` = event id, so a republish after a failure is dropped by JetStream.
//! The position to resume from is read back from the stream's newest message the relay
//! published (see [`checkpoint`]), not kept anywhere else: the stream itself is the
//! checkpoint, so a new leader neither skips nor repeats. Publishing is off the command path: commands commit whether or not
//! NATS is reachable, and the relay catches up when it is.
//!
//! **In.** For every peer region, a stream in this region's domain sources the peer's
//! events stream across the leafnode link ([`super::inbound_stream`]); JetStream keeps
//! copying after the link comes back. The leader reads it with a durable consumer and
//! stores the events with `meridian_store_remote`, idempotent on event id and in the
//! peer's commit order, acknowledging after the commit. An aggregate that moved home
//! arrives through two streams; an event whose previous version is still in the other
//! one waits for it ([`store_in_order`]), so every region stores each aggregate's
//! events in version order. A wait of more than [`GAP_FETCH_AFTER`] asks the peer for
//! the missing versions ([`serve_history`]): the peer wrote the waiting event on top
//! of them, so it holds them, and after a forced move the region they came from may
//! be gone for good.
//!
//! **Leader.** Whoever holds a session-level PostgreSQL advisory lock on a dedicated
//! connection. If that host dies, its connection closes, the lock is released, and
//! another host takes over within [`LEADER_RETRY`]. A leader that stops without its
//! connection closing (a frozen VM, SIGSTOP, a network cut) stops pinging it, and the
//! server ends that session after [`LEADER_SILENCE`] (`idle_session_timeout`), which
//! releases the lock: without it the server would hold the lock until TCP keepalive
//! gives up, two hours by default. Two leaders overlapping for a moment (the old one
//! still running until its next ping fails) is safe: publishes are conditional on the
//! stream's last message and storing an event already stored does nothing.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{consumer, stream};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use super::{Regions, event_subject, events_stream, inbound_stream};
use crate::store::regions::{RelayedEvent, RemoteOutcome};
use crate::store::{self, EventFilter, StoredEvent};

/// How often a host that is not the leader tries to become it.
pub const LEADER_RETRY: Duration = Duration::from_secs(1);

/// How long the leader's lock connection may go without a ping before the server ends
/// it (and with it the lock); also how long a ping may take before the leader gives
/// up its leadership. Several pings ([`LEADER_RETRY`] apart) fit in it.
pub const LEADER_SILENCE: Duration = Duration::from_secs(5);

/// How long published events are remembered by JetStream for de-duplication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Events per publish round (all in flight at once, then their acks awaited).
const PUBLISH_BATCH: i64 = 500;

/// Events per store transaction on the receiving side.
const STORE_BATCH: usize = 500;
/// Payload bytes past which a batch of received events is stored in the next
/// statement: one event may be as large as a peer's `max_payload` allows, so a count
/// alone would let a burst of large events make one statement past PostgreSQL's 1 GB
/// message limit (refused every time it is offered again) and hold it all in memory.
const STORE_BYTES: usize = 32 << 20;
/// Bytes the inbound consumer's pulls may hold on their way to this host: above NATS's
/// largest possible message (64 MiB), so that no message is too large ever to be
/// delivered, and far below what 200 such messages would take.
const PULL_BYTES: usize = 72 << 20;

/// Longest wait between reads of the event tail when caught up; a commit announced in
/// the region (see [`store::Changes`]) ends it sooner.
const TAIL_IDLE: Duration = Duration::from_millis(10);

/// Shortest time between two reads of the event tail when announced commits wake it.
const TAIL_MIN_INTERVAL: Duration = Duration::from_millis(5);

/// The durable consumer name on inbound streams.
const INBOUND_CONSUMER: &str = "meridian-inbound";

const LOCK_KEY: &str = "meridian-relay";

/// Runs the relay whenever this host is the region's relay leader, until `stop`.
pub async fn run(regions: Regions, pool: PgPool, stop: CancellationToken) {
    if !regions.enabled() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            led = lead(&regions, &pool, &stop) => match led {
                Ok(true) => tracing::info!("relay leadership ended"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "relay leadership lost"),
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LEADER_RETRY) => {}
        }
    }
}

/// Tries to take the leader lock; while held, runs every relay task. Returns
/// `Ok(false)` when another host leads.
async fn lead(regions: &Regions, pool: &PgPool, stop: &CancellationToken) -> anyhow::Result<bool> {
    let mut conn = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        let _ = conn.close().await;
        return Ok(false);
    }
    // Ends this session, releasing the lock, if this host goes silent while it leads.
    sqlx::query(&format!(
        "SET idle_session_timeout = {}",
        LEADER_SILENCE.as_millis()
    ))
    .execute(&mut conn)
    .await?;
    tracing::info!(
        region = regions.local(),
        "this host is the region's relay leader"
    );
    let tasks = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    set.spawn(supervise("publish", tasks.clone(), {
        let (regions, pool) = (regions.clone(), pool.clone());
        move |stop| publish(regions.clone(), pool.clone(), stop)
    }));
    for peer in regions.config().peers.clone() {
        set.spawn(supervise("receive", tasks.clone(), {
            let (regions, pool, peer) = (regions.clone(), pool.clone(), peer.clone());
            move |stop| receive(regions.clone(), pool.clone(), peer.clone(), stop)
        }));
        set.spawn(supervise("watch-source", tasks.clone(), {
            let regions = regions.clone();
            move |stop| watch_source(regions.clone(), peer.clone(), stop)
        }));
    }
    set.spawn(supervise("plugins", tasks.clone(), {
        let (regions, pool) = (regions.clone(), pool.clone());
        move |stop| super::plugins::sync(regions.clone(), pool.clone(), stop)
    }));
    // Leadership lasts as long as the locking connection.
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(true),
            _ = tokio::time::sleep(LEADER_RETRY) => {
                // A ping that hangs (the database cut off) must end the leadership as
                // surely as one that fails: by then the server may have let the lock go.
                match tokio::time::timeout(LEADER_SILENCE, conn.ping()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => break Err(error.into()),
                    Err(_) => break Err(anyhow::anyhow!("the lock connection did not answer a ping within {LEADER_SILENCE:?}")),
                }
            }
        }
    };
    tasks.cancel();
    while set.join_next().await.is_some() {}
    let _ = tokio::time::timeout(LEADER_SILENCE, conn.close()).await;
    result
}

/// Restarts a relay task after a failure (NATS or the database away), with backoff.
async fn supervise<F, Fut>(name: &'static str, stop: CancellationToken, task: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    const FIRST: Duration = Duration::from_millis(200);
    let mut backoff = FIRST;
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            result = task(stop.clone()) => match result {
                Ok(()) => return,
                Err(error) => {
                    // A task that ran a good while before failing met a new fault,
                    // not the one it kept failing on: retry it soon.
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = FIRST;
                    }
                    tracing::warn!(task = name, error = format!("{error:#}"), retry_in_ms = backoff.as_millis() as u64, "relay task failed; retrying");
                }
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Publishes this region's events to its JetStream stream.
async fn publish(regions: Regions, pool: PgPool, stop: CancellationToken) -> anyhow::Result<()> {
    let js = regions.local_js().expect("enabled");
    let region = regions.local().to_string();
    let mut stream = js
        .get_or_create_stream(events_stream_config(&region, regions.config().replicas))
        .await?;
    let state = stream.info().await?.state.clone();
    let mut after = Published::Sequence(state.last_sequence);
    let cursor = checkpoint(&stream, &pool, &region, &state).await?;
    tracing::info!(
        stream = events_stream(&region),
        after = cursor,
        "publishing events"
    );
    let mut published = 0u64;
    // Only events committed here are published: received ones are in their own
    // region's stream. They are told apart here rather than in SQL, so that the cursor
    // moves past received events too: filtered in SQL, a read found nothing to move it
    // on, and a region that mostly receives read every event received since its last
    // own one again on every poll, a hundred times a second.
    let own = EventFilter {
        origin_region: Some(region.clone()),
        ..EventFilter::default()
    };
    // The checkpoint's place in the commit order, looked up once: polling every 10 ms
    // by position would look it up again on every read.
    let mut cursor = store::read::order_key(&pool, cursor).await?;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        // Created before the read, so a commit during it ends the wait below.
        let committed = regions.changes().events();
        let started = tokio::time::Instant::now();
        let read = store::read::read_after(
            &pool,
            cursor,
            None,
            PUBLISH_BATCH,
            store::read::PAGE_BYTES,
            &EventFilter::default(),
        )
        .await?;
        let more = read.more(PUBLISH_BATCH);
        let page = read.events;
        let Some(&(last_key, _)) = page.last() else {
            tokio::select! {
                _ = committed => {
                    // A host committing batch after batch would otherwise make this
                    // read once per batch.
                    tokio::time::sleep_until(started + TAIL_MIN_INTERVAL).await;
                }
                _ = tokio::time::sleep(TAIL_IDLE) => {}
            }
            continue;
        };
        let mine: Vec<&StoredEvent> = page
            .iter()
            .map(|(_, e)| e)
            .filter(|e| own.matches(e))
            .collect();
        if !mine.is_empty() {
            after = publish_page(&js, &region, after, mine.iter().copied()).await?;
        }
        metrics::counter!("meridian_relay_published_total").increment(mine.len() as u64);
        published += mine.len() as u64;
        if more {
            tracing::info!(published, position = last_key.position, "relay catching up");
        }
        cursor = last_key;
    }
}

/// The position of the last event the relay published to the stream: that of the
/// newest message carrying one, looking back from the stream's end.
///
/// Anyone allowed to publish on the stream's subjects can put a message there; it has
/// no position, and the relay steps over it (publishing goes on after it: the
/// condition on each message is the stream's true end, whatever that message is). A
/// message deleted from the stream is stepped over too. With none of the relay's
/// messages left (the stream purged) it publishes again from the first event; other
/// regions store each event once, however often it arrives.
///
/// A message counts only if its `Nats-Msg-Id` is the id of this region's own event at
/// the position it names: a copy of an old message published again with its headers
/// (replay tooling does that) would otherwise send the cursor back, and every event
/// since would be published again, past JetStream's duplicate window.
async fn checkpoint(
    stream: &stream::Stream,
    pool: &PgPool,
    region: &str,
    state: &stream::State,
) -> anyhow::Result<i64> {
    for sequence in (state.first_sequence.max(1)..=state.last_sequence).rev() {
        match stream.get_raw_message(sequence).await {
            Ok(message) => {
                let position = message
                    .headers
                    .get("Meridian-Region")
                    .filter(|r| r.as_str() == region)
                    .and(message.headers.get("Meridian-Position"))
                    .and_then(|v| v.as_str().parse::<i64>().ok());
                if let Some(position) = position {
                    let id: Option<uuid::Uuid> = sqlx::query_scalar(
                        "SELECT event_id FROM events WHERE position = $1 AND received_at IS NULL",
                    )
                    .bind(position)
                    .fetch_optional(pool)
                    .await?;
                    let claimed = message.headers.get("Nats-Msg-Id").map(|v| v.as_str());
                    if id.is_some_and(|id| Some(id.to_string().as_str()) == claimed) {
                        return Ok(position);
                    }
                    tracing::warn!(
                        stream = events_stream(region),
                        sequence,
                        position,
                        "a message in the events stream names an event it does not carry (a copy published again?); stepping over it"
                    );
                    continue;
                }
                tracing::warn!(
                    stream = events_stream(region),
                    sequence,
                    subject = %message.subject,
                    "a message the relay did not publish is in the events stream; stepping over it"
                );
            }
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(error) => return Err(error.into()),
        }
    }
    if state.last_sequence > 0 {
        tracing::warn!(
            stream = events_stream(region),
            "none of the relay's messages are left in the events stream (purged?); publishing every event again"
        );
    }
    Ok(0)
}

/// Room kept in a NATS message for what the relay adds to an event's payload and type:
/// headers, the envelope's other fields and the metadata (a few hundred bytes).
const ENVELOPE_BYTES: usize = 16 * 1024;

/// The largest event (payload and type, as PostgreSQL prints them back and the relay
/// sends them: [`crate::runtime::DecidedEvent::printed_len`]) the relay carries on a
/// NATS server whose largest message is `max_payload` bytes. One event is one
/// message; an event too large for it would stop the relay at that event for good, so
/// the executor refuses to store it.
pub fn max_event_bytes(max_payload: usize) -> usize {
    max_payload.saturating_sub(ENVELOPE_BYTES)
}

/// A JSON text without the whitespace between its tokens. PostgreSQL prints `jsonb`
/// with a space after every `:` and `,`, which makes the text read back larger than
/// what the plugin returned (`[1,2,3]` → `[1, 2, 3]`: up to half again); the relay
/// sends it compact, so what fits under [`max_event_bytes`] fits in the message.
fn compact(json: &RawValue) -> Box<RawValue> {
    let text = json.get();
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\n' | '\r' | '\t') {
            continue;
        }
        out.push(c);
    }
    RawValue::from_string(out).unwrap_or_else(|_| json.to_owned())
}

/// Where the region's events stream ends, for the next publish to continue it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The stream's last sequence (0: empty), as read when the relay starts.
    Sequence(u64),
    /// The last event published.
    Event(uuid::Uuid),
}

/// Publishes events to the region's events stream, all in flight at once, each
/// conditional on the stream ending with the one before it (`after` for the first);
/// returns where the stream then ends.
///
/// The condition is what keeps a hole out of the stream. A connection lost mid-page
/// can drop some messages while later ones, still in the client's buffer, go out on
/// the new connection; the relay resumes after the stream's last message, so the
/// dropped events would never be published. Chained, the stream refuses every message
/// after a missing one, the page fails, and the next attempt starts at the gap.
pub async fn publish_page<'a>(
    js: &async_nats::jetstream::Context,
    region: &str,
    mut after: Published,
    events: impl Iterator<Item = &'a StoredEvent>,
) -> Result<Published, PublishError> {
    let mut acks = Vec::new();
    for event in events {
        let (mut headers, payload) = message(region, event);
        match after {
            Published::Sequence(sequence) => {
                headers.insert("Nats-Expected-Last-Sequence", sequence.to_string().as_str())
            }
            Published::Event(id) => {
                headers.insert("Nats-Expected-Last-Msg-Id", id.to_string().as_str())
            }
        }
        let subject = event_subject(region, &event.aggregate_type, &event.aggregate_id);
        acks.push(js.publish_with_headers(subject, headers, payload).await?);
        after = Published::Event(event.event_id);
    }
    for ack in acks {
        ack.await?;
    }
    Ok(after)
}

/// Why a page of events was not published. Any message of it may have been stored;
/// publishing again from where the stream ends is always safe.
#[derive(Debug, thiserror::Error)]
#[error("publishing to the events stream: {0}")]
pub struct PublishError(#[from] async_nats::jetstream::context::PublishError);

impl PublishError {
    /// What went wrong: `WrongLastSequence` or `WrongLastMessageId` when the stream
    /// does not end where the page was to continue it.
    pub fn kind(&self) -> async_nats::jetstream::context::PublishErrorKind {
        self.0.kind()
    }
}

/// The message for one event: headers for routing and filtering without parsing, and
/// the event as JSON (the documented NATS interface).
fn message(region: &str, event: &StoredEvent) -> (async_nats::HeaderMap, bytes::Bytes) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    headers.insert("Meridian-Region", region);
    headers.insert("Meridian-Position", event.position.to_string().as_str());
    headers.insert("Meridian-Aggregate-Type", event.aggregate_type.as_str());
    headers.insert("Meridian-Aggregate-Id", event.aggregate_id.as_str());
    headers.insert("Meridian-Version", event.version.to_string().as_str());
    // Plugins choose event types; the runtime refuses line breaks in them, but one
    // stored before that rule would make the header panic and stop the relay. The
    // type is in the body as well, so such a header is left out instead.
    if let Ok(event_type) = event.event_type.parse::<async_nats::HeaderValue>() {
        headers.insert("Meridian-Event-Type", event_type);
    }
    let body = serde_json::to_vec(&relayed(region, event)).expect("an event serialises");
    (headers, body.into())
}

/// An event as it travels between regions, committed in `region`.
fn relayed(region: &str, event: &StoredEvent) -> RelayedEvent {
    RelayedEvent {
        region: region.to_string(),
        position: event.position,
        event_id: event.event_id,
        aggregate_type: event.aggregate_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        version: event.version,
        event_type: event.event_type.clone(),
        payload: compact(&event.payload),
        metadata: compact(&event.metadata),
        recorded_at: event.recorded_at,
    }
}

/// Waits until the peer region's events stream answers through this region's NATS
/// (false: stopped first).
///
/// A stream sourcing one that does not exist yet, or behind a leafnode link still
/// connecting, is left to nats-server's own retry, which waits 10–30 s between
/// attempts; regions started together would relay nothing for that long. So the
/// inbound stream is created once its source can be found.
async fn peer_stream_reachable(regions: &Regions, peer: &str, stop: &CancellationToken) -> bool {
    let peer_js = regions.js_of(peer).expect("enabled");
    let started = std::time::Instant::now();
    let mut logged = false;
    loop {
        match peer_js.get_stream(events_stream(peer)).await {
            Ok(_) => {
                if logged {
                    tracing::info!(
                        from = peer,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the region's events stream is reachable"
                    );
                }
                return true;
            }
            Err(error) if !logged && started.elapsed() > PEER_WAIT_LOG_AFTER => {
                tracing::info!(from = peer, %error, "waiting for the region's events stream");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(PEER_WAIT_POLL) => {}
        }
    }
}

/// How often a relay waiting for a peer's events stream asks again.
const PEER_WAIT_POLL: Duration = Duration::from_millis(250);
/// How long a relay waits for a peer's events stream before it says so in the log.
const PEER_WAIT_LOG_AFTER: Duration = Duration::from_secs(2);

/// Stores a batch of a peer's events (`carriers[i]` is the message of `events[i]`).
///
/// An aggregate that moved home reaches this region through two streams, the old
/// home's and the new one's, and the new home's events can arrive first. They wait
/// (the store takes events only in version order) until the other stream's relay has
/// stored the ones before: this stream pauses behind them, acknowledging what is
/// stored. No two streams can wait on each other, since a region writes an aggregate
/// only after receiving its earlier events. `None` when stopped while waiting.
async fn store_in_order(
    pool: &PgPool,
    regions: &Regions,
    peer: &str,
    events: &[RelayedEvent],
    carriers: &[&async_nats::jetstream::Message],
    stop: &CancellationToken,
) -> anyhow::Result<Option<RemoteOutcome>> {
    let mut total = RemoteOutcome::default();
    let mut from = 0;
    let started = std::time::Instant::now();
    let mut said = Duration::ZERO;
    let mut fetched = Duration::ZERO;
    loop {
        let outcome = store::regions::store_remote(pool, regions.local(), &events[from..]).await?;
        if outcome.stored > 0 {
            regions.changes().events_committed();
        }
        total.stored += outcome.stored;
        total.duplicates += outcome.duplicates;
        total.divergent += outcome.divergent;
        let Some(early) = outcome.early else {
            return Ok(Some(total));
        };
        if early > 0 {
            carriers[from + early - 1]
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
        from += early;
        let waiting = &events[from];
        if started.elapsed() >= fetched + GAP_FETCH_AFTER {
            fetched = started.elapsed();
            match fetch_missing(pool, regions, peer, waiting).await {
                Ok(0) => {}
                Ok(stored) => {
                    tracing::info!(
                        from = peer,
                        aggregate_type = waiting.aggregate_type,
                        aggregate_id = waiting.aggregate_id,
                        stored,
                        "stored an aggregate's missing versions from the region that wrote the next one"
                    );
                    metrics::counter!("meridian_relay_fetched_total", "region" => peer.to_string())
                        .increment(stored as u64);
                    regions.changes().events_committed();
                    continue;
                }
                Err(error) => tracing::debug!(
                    from = peer,
                    %error,
                    "cannot fetch an aggregate's missing versions; waiting for its stream"
                ),
            }
        }
        if started.elapsed() >= said + GAP_REPORT_EVERY {
            said = started.elapsed();
            tracing::warn!(
                from = peer,
                aggregate_type = waiting.aggregate_type,
                aggregate_id = waiting.aggregate_id,
                version = waiting.version,
                waited_ms = said.as_millis() as u64,
                "holding an event until the aggregate's previous version arrives from another region"
            );
        }
        metrics::counter!("meridian_relay_gap_waits_total", "region" => peer.to_string())
            .increment(1);
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(GAP_RETRY) => {}
        }
    }
}

/// How often a relay holding an event for its predecessor tries again.
const GAP_RETRY: Duration = Duration::from_millis(20);
/// How often a relay still holding an event says so in the log.
const GAP_REPORT_EVERY: Duration = Duration::from_secs(5);
/// How long a relay holds an event before asking the peer for the versions before it,
/// and then how often it asks again. In a move between live regions the other stream
/// brings them within milliseconds; this is for a region that stays away.
const GAP_FETCH_AFTER: Duration = Duration::from_secs(1);
/// Most events one history answer carries (fewer when they would not fit one message).
const HISTORY_PAGE: i64 = 100;
/// How long a history request may take.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(3);

/// The subject a region's hosts answer history requests on.
pub fn history_subject(region: &str) -> String {
    format!("meridian.history.{region}")
}

/// Asks a region for some of an aggregate's events (`first..=last`).
#[derive(Debug, Serialize, Deserialize)]
struct HistoryRequest {
    aggregate_type: String,
    aggregate_id: String,
    first: i64,
    last: i64,
}

/// Asks `peer` for the versions of `waiting`'s aggregate between this region's newest
/// and `waiting`, and stores what it sends. Returns how many events were stored.
async fn fetch_missing(
    pool: &PgPool,
    regions: &Regions,
    peer: &str,
    waiting: &RelayedEvent,
) -> anyhow::Result<i32> {
    let nats = regions
        .nats()
        .ok_or_else(|| anyhow::anyhow!("NATS is not configured"))?;
    let key = store::AggregateKey {
        aggregate_type: waiting.aggregate_type.clone(),
        aggregate_id: waiting.aggregate_id.clone(),
    };
    let mut stored = 0;
    loop {
        let have = store::read::stream_version(pool, &key).await?;
        if have + 1 >= waiting.version {
            return Ok(stored);
        }
        let request = HistoryRequest {
            aggregate_type: key.aggregate_type.clone(),
            aggregate_id: key.aggregate_id.clone(),
            first: have + 1,
            last: waiting.version - 1,
        };
        let answer = tokio::time::timeout(
            HISTORY_TIMEOUT,
            nats.request(history_subject(peer), serde_json::to_vec(&request)?.into()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("region {peer} did not answer within {HISTORY_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("asking region {peer}: {e}"))?;
        let events: Result<Vec<RelayedEvent>, String> = serde_json::from_slice(&answer.payload)?;
        let events = events.map_err(|e| anyhow::anyhow!("region {peer}: {e}"))?;
        // Only a run that starts where this region's history ends can be stored.
        if events.first().is_none_or(|e| e.version != have + 1) {
            return Ok(stored);
        }
        let outcome = store::regions::store_remote(pool, regions.local(), &events).await?;
        if outcome.stored == 0 {
            return Ok(stored);
        }
        stored += outcome.stored;
    }
}

/// Answers other regions' requests for an aggregate's events, from this region's store,
/// until `stop`: how a region holding an event for versions it lacks gets them from the
/// region that wrote that event on top of them ([`store_in_order`]). Anyone who can
/// reach this region's NATS can read its events stream, so this shows no more.
pub fn serve_history(
    regions: &Regions,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let nats = regions.nats()?.clone();
    let pool = regions.inner.pool.clone();
    let max = nats.server_info().max_payload;
    Some(super::serve_queue(
        nats,
        history_subject(regions.local()),
        stop,
        move |message| {
            let pool = pool.clone();
            async move {
                let answer = match serde_json::from_slice::<HistoryRequest>(&message.payload) {
                    Ok(r) => history(&pool, r, max).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("bad history request: {e}")),
                };
                let body = serde_json::to_vec(&answer).expect("serialisable");
                (async_nats::HeaderMap::new(), body.into())
            }
        },
    ))
}

/// The events a history request asks for, as many from the first as fit one message of
/// `max` bytes (at least one), each named by the region that committed it.
async fn history(
    pool: &PgPool,
    request: HistoryRequest,
    max: usize,
) -> anyhow::Result<Vec<RelayedEvent>> {
    let key = store::AggregateKey {
        aggregate_type: request.aggregate_type,
        aggregate_id: request.aggregate_id,
    };
    let last = request
        .last
        .min(request.first.saturating_add(HISTORY_PAGE - 1));
    // Read no more than fits the answer: the range may hold large events.
    let stored = store::read::aggregate_page(pool, &key, request.first, last, max)
        .await?
        .events;
    let mut events = Vec::with_capacity(stored.len());
    let mut bytes = 0;
    for event in &stored {
        #[derive(Deserialize)]
        struct Origin {
            origin_region: String,
        }
        let origin = serde_json::from_str::<Origin>(event.metadata.get())?.origin_region;
        let event = relayed(&origin, event);
        bytes += serde_json::to_vec(&event)?.len() + 1;
        if bytes > max.saturating_sub(ENVELOPE_BYTES) && !events.is_empty() {
            break;
        }
        events.push(event);
    }
    Ok(events)
}

/// Stores a peer region's events, read from the local stream that sources them.
async fn receive(
    regions: Regions,
    pool: PgPool,
    peer: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = regions.local_js().expect("enabled");
    if js.get_stream(inbound_stream(&peer)).await.is_err()
        && !peer_stream_reachable(&regions, &peer, &stop).await
    {
        return Ok(());
    }
    let stream = js
        .get_or_create_stream(stream::Config {
            name: inbound_stream(&peer),
            sources: Some(vec![peer_source(&peer)]),
            storage: stream::StorageType::File,
            num_replicas: regions.config().replicas,
            ..Default::default()
        })
        .await?;
    let consumer = inbound_consumer(&stream, &pool, &peer).await?;
    tracing::info!(
        from = peer,
        stream = inbound_stream(&peer),
        "receiving events"
    );
    let mut messages = consumer
        .stream()
        .max_bytes_per_batch(PULL_BYTES)
        .heartbeat(Duration::from_secs(15))
        .messages()
        .await?;
    let mut carried = None;
    let mut received = 0i64;
    // The consumer is new (see `inbound_consumer`), so its deliveries are numbered from 1.
    let mut deliveries = Deliveries::default();
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            batch = next_batch(&mut messages, &mut carried, STORE_BATCH, STORE_BYTES, |m| {
                m.as_ref().map_or(0, |m| m.payload.len())
            }) => match batch {
                Some(batch) => batch,
                None => anyhow::bail!("inbound message stream ended"),
            },
        };
        let batch = batch.into_iter().collect::<Result<Vec<_>, _>>()?;
        for message in &batch {
            deliveries.check(message)?;
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut carriers = Vec::with_capacity(batch.len());
        for message in &batch {
            match serde_json::from_slice::<RelayedEvent>(&message.payload) {
                Ok(event) => {
                    events.push(event);
                    carriers.push(message);
                }
                Err(error) => {
                    tracing::error!(%error, subject = %message.subject, "skipping a message that is not a relayed event");
                }
            }
        }
        let Some(last) = batch.last() else { continue };
        let Some(outcome) =
            store_in_order(&pool, &regions, &peer, &events, &carriers, &stop).await?
        else {
            return Ok(());
        };
        last.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        let pending = last.info().map(|i| i.pending).unwrap_or(0) as i64;
        received += outcome.stored as i64;
        if outcome.divergent > 0 {
            tracing::error!(
                from = peer,
                divergent = outcome.divergent,
                "events skipped: this region's history of their aggregates differs (after a forced home move)"
            );
            metrics::counter!("meridian_relay_divergent_events_total", "region" => peer.clone())
                .increment(outcome.divergent as u64);
        }
        let newest = events.iter().map(|e| e.recorded_at).max();
        let lag_ms = newest
            .map(|t| (Utc::now() - t).num_milliseconds().max(0))
            .unwrap_or(0);
        metrics::counter!("meridian_relay_received_total", "region" => peer.clone())
            .increment(outcome.stored as u64);
        metrics::gauge!("meridian_relay_lag_seconds", "region" => peer.clone())
            .set(lag_ms as f64 / 1000.0);
        metrics::gauge!("meridian_relay_pending", "region" => peer.clone()).set(pending as f64);
        if pending > 0 && events.len() == STORE_BATCH {
            tracing::info!(from = peer, received, pending, "relay catching up");
        }
        store::regions::set_relay_status(&pool, &peer, lag_ms, pending, received, newest).await?;
    }
}

/// The numbering of the inbound consumer's deliveries, checked without a gap.
///
/// Acknowledgements are cumulative, so one delivery that never arrived (sent by the
/// server as the connection to it dropped; the client pulls again on reconnecting
/// without a word to the relay) would be acknowledged away with the next batch and its
/// events never stored here. A gap fails the task instead, and the restarted task's new
/// consumer delivers again from the last acknowledged event.
#[derive(Debug)]
struct Deliveries {
    next: u64,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl Deliveries {
    fn check(&mut self, message: &async_nats::jetstream::Message) -> anyhow::Result<()> {
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading a delivery's sequence numbers: {e}"))?;
        self.follow(info.consumer_sequence)
    }

    fn follow(&mut self, delivery: u64) -> anyhow::Result<()> {
        if delivery != self.next {
            anyhow::bail!(
                "the inbound consumer's delivery {} never arrived (the next to arrive was {delivery}); \
                 receiving again from the last acknowledged event",
                self.next
            );
        }
        self.next += 1;
        Ok(())
    }
}

/// The next batch of `stream`'s items: the first (waited for), then those ready at
/// once, up to `max_count` items and `max_bytes` by `size` (an item alone may be
/// larger). The item that would pass the budget is kept in `carried` for the next
/// batch. `None` once the stream ends.
async fn next_batch<S, T>(
    stream: &mut S,
    carried: &mut Option<T>,
    max_count: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Option<Vec<T>>
where
    S: futures::Stream<Item = T> + Unpin,
{
    use futures::FutureExt;
    let first = match carried.take() {
        Some(item) => item,
        None => stream.next().await?,
    };
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < max_count {
        // A stream's `next` loses nothing when dropped unfinished.
        let Some(Some(item)) = stream.next().now_or_never() else {
            break;
        };
        let item_bytes = size(&item);
        if bytes + item_bytes > max_bytes {
            *carried = Some(item);
            break;
        }
        bytes += item_bytes;
        batch.push(item);
    }
    Some(batch)
}

/// The durable consumer a peer's events are stored from, made afresh at every start of
/// [`receive`] so that it delivers first what was delivered and never acknowledged.
///
/// Acknowledgements are cumulative (`AckPolicy::All`), and JetStream resends an
/// unacknowledged message only when its ack wait runs out. A batch whose store failed
/// (the database away) would otherwise be passed over by the restarted task, which is
/// handed the messages after it, and the first of those it acknowledged would cover
/// the failed batch unstored: events lost for this region. Starting again from the
/// acknowledgement floor resends it, in order; storing is idempotent on event id, so
/// what was stored without being acknowledged is counted as a duplicate.
///
/// The floor is written to PostgreSQL before the delete: a failure between the delete
/// and the create would otherwise leave nothing to resume from, and every event of the
/// peer's stream would be delivered again.
async fn inbound_consumer(
    stream: &stream::Stream,
    pool: &PgPool,
    peer: &str,
) -> anyhow::Result<consumer::PullConsumer> {
    // Which stream a saved floor belongs to, to PostgreSQL's microsecond.
    let created = stream.cached_info().created;
    let created = chrono::DateTime::<Utc>::from_timestamp(
        created.unix_timestamp(),
        created.nanosecond() / 1_000 * 1_000,
    )
    .unwrap_or_default();
    // An operator's pause (`$JS.API.CONSUMER.PAUSE`) outlives the replacement.
    let mut pause_until = None;
    let deliver_policy = match stream.consumer_info(INBOUND_CONSUMER).await {
        Ok(info) => {
            pause_until = info.config.pause_until;
            let start_sequence = info.ack_floor.stream_sequence + 1;
            if info.num_ack_pending > 0 {
                tracing::info!(
                    from = peer,
                    unacknowledged = info.num_ack_pending,
                    start_sequence,
                    "resuming after the last acknowledged event"
                );
            }
            store::regions::save_inbound_resume(pool, peer, created, start_sequence as i64).await?;
            stream
                .delete_consumer(INBOUND_CONSUMER)
                .await
                .map_err(|e| anyhow::anyhow!("replacing the inbound consumer: {e}"))?;
            consumer::DeliverPolicy::ByStartSequence { start_sequence }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            match store::regions::inbound_resume(pool, peer, created).await? {
                Some(start_sequence) => {
                    tracing::warn!(
                        from = peer,
                        start_sequence,
                        "the inbound consumer is missing; resuming where the last one was replaced"
                    );
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start_sequence as u64,
                    }
                }
                None => consumer::DeliverPolicy::All,
            }
        }
        Err(e) => anyhow::bail!("reading the inbound consumer: {e}"),
    };
    Ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(INBOUND_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 20_000,
            deliver_policy,
            pause_until,
            ..Default::default()
        })
        .await?)
}

/// The source of a peer's inbound stream: the peer's events stream, across the leafnode
/// link into the peer's JetStream domain.
fn peer_source(peer: &str) -> stream::Source {
    stream::Source {
        name: events_stream(peer),
        external: Some(stream::External {
            api_prefix: format!("$JS.{peer}.API"),
            delivery_prefix: None,
        }),
        ..Default::default()
    }
}

/// Keeps the inbound stream of `peer` copying: restarts its source when nats-server
/// leaves it stalled while the peer's stream answers.
///
/// A healthy source hears from the peer at least every second (the source consumer's
/// heartbeat). nats-server checks its sources every 10 s and sets up again only one
/// silent for more than 10 s, so after the peer region's NATS restarts the source stays
/// silent for 10–20 s (and a request for a new source consumer that is lost on a link
/// still down waits 30 s for its answer). Removing the
/// source and adding the same source back makes nats-server set it up at once, from
/// the last message it sourced (it finds it by the source header every sourced message
/// carries), so nothing is skipped or copied twice. A request nats-server sent before
/// the restart of the source can still, when its 30 s run out, replace the new source consumer with
/// one starting further back: what that one delivers again is dropped as a duplicate
/// (`Nats-Msg-Id` is the event id, within the stream's two-minute window), and if it
/// falls silent too, the next check restarts it.
async fn watch_source(
    regions: Regions,
    peer: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = regions.local_js().expect("enabled");
    let peer_js = regions.js_of(&peer).expect("enabled");
    let name = inbound_stream(&peer);
    let mut last_restart: Option<std::time::Instant> = None;
    // A source nats-server has not heard from yet (just created, or this region's NATS
    // just restarted and is setting it up) counts as silent from when it was seen so.
    let mut unheard_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SOURCE_CHECK_EVERY) => {}
        }
        // Not created yet (`receive` creates it once the peer's stream answers), or this
        // region's NATS is away (nothing to restart then).
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let info = stream.cached_info().clone();
        let configured = info.config.sources.as_ref().is_some_and(|s| !s.is_empty());
        let silent = match info.sources.first().and_then(|s| s.active) {
            Some(active) => {
                unheard_since = None;
                active
            }
            None => unheard_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed(),
        };
        // The lag gauge moves only when events arrive, so it shows nothing of an outage;
        // this one grows while the peer is not heard from (what to alert on).
        metrics::gauge!("meridian_relay_source_silent_seconds", "region" => peer.clone())
            .set(silent.as_secs_f64());
        let stalled = !configured || silent > SOURCE_STALLED_AFTER;
        let recently = last_restart.is_some_and(|at| at.elapsed() < SOURCE_RESTART_SPACING);
        if !stalled || (configured && recently) {
            continue;
        }
        // A silent source while the peer is unreachable is the outage itself; nothing
        // to restart until the link is back.
        if configured && peer_js.get_stream(events_stream(&peer)).await.is_err() {
            continue;
        }
        let mut config = info.config;
        if configured {
            config.sources = None;
            js.update_stream(&config).await?;
        }
        config.sources = Some(vec![peer_source(&peer)]);
        js.update_stream(&config).await?;
        last_restart = Some(std::time::Instant::now());
        metrics::counter!("meridian_relay_source_restarts_total", "region" => peer.clone())
            .increment(1);
        tracing::warn!(
            from = peer,
            stream = name,
            silent_ms = silent.as_millis() as u64,
            "restarted the stream's source: the region's stream answers but nothing arrived from it"
        );
    }
}

/// How often the relay leader checks that each inbound stream is copying.
const SOURCE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Silence after which a source counts as stalled (heartbeats come every second).
const SOURCE_STALLED_AFTER: Duration = Duration::from_secs(3);
/// Least time between two restarts of one source: a new source consumer needs a moment
/// before it is heard from.
const SOURCE_RESTART_SPACING: Duration = Duration::from_secs(5);

/// The stream with this region's own events, as the relay creates it.
pub fn events_stream_config(region: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: events_stream(region),
        subjects: vec![format!("meridian.events.{region}.>")],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str) -> StoredEvent {
        StoredEvent {
            position: 7,
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: "t".into(),
            aggregate_id: "a.b".into(),
            version: 1,
            event_type: event_type.into(),
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            recorded_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_delivery_missing_from_the_inbound_numbering_fails_the_receiver() {
        let mut deliveries = Deliveries::default();
        deliveries.follow(1).unwrap();
        deliveries.follow(2).unwrap();
        let error = deliveries.follow(4).unwrap_err().to_string();
        assert!(error.contains("delivery 3 never arrived"), "{error}");
        // A new consumer numbers its first delivery 1: a first one numbered 2 means 1 was lost.
        assert!(Deliveries::default().follow(2).is_err());
    }

    #[test]
    fn an_event_type_no_header_can_carry_is_relayed_in_the_body_only() {
        let (headers, body) = message("east", &event("Line\r\nBreak"));
        assert!(headers.get("Meridian-Event-Type").is_none());
        let relayed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(relayed["type"], "Line\r\nBreak");

        let (headers, _) = message("east", &event("Deposited"));
        assert_eq!(
            headers.get("Meridian-Event-Type").map(|v| v.as_str()),
            Some("Deposited")
        );
    }

    #[test]
    fn events_travel_compact_with_their_strings_untouched() {
        let stored = r#"{"a": [1, 2, {"b": null}], "text": "a, b: \"c, d\" \\", "n": -1.5e3}"#;
        let sent = compact(&RawValue::from_string(stored.into()).unwrap());
        assert_eq!(
            sent.get(),
            r#"{"a":[1,2,{"b":null}],"text":"a, b: \"c, d\" \\","n":-1.5e3}"#
        );
        let before: serde_json::Value = serde_json::from_str(stored).unwrap();
        let after: serde_json::Value = serde_json::from_str(sent.get()).unwrap();
        assert_eq!(before, after);
    }

    /// Large events come in batches their bytes bound, not only their count: a burst
    /// of them made one statement past what PostgreSQL takes.
    #[tokio::test]
    async fn a_batch_stops_at_its_bytes_and_keeps_the_rest_for_the_next() {
        let sizes = [40usize, 40, 40, 150, 10, 10];
        let mut stream = futures::stream::iter(sizes);
        let mut carried = None;
        let mut batches = Vec::new();
        while let Some(batch) = next_batch(&mut stream, &mut carried, 500, 100, |n| *n).await {
            batches.push(batch);
        }
        // In order, none lost; one larger than the budget goes alone.
        assert_eq!(batches, [vec![40, 40], vec![40], vec![150], vec![10, 10]]);
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_count() {
        let mut stream = futures::stream::iter(1..=5usize);
        let mut carried = None;
        let mut batches = Vec::new();
        while let Some(batch) = next_batch(&mut stream, &mut carried, 2, usize::MAX, |_| 1).await {
            batches.push(batch);
        }
        assert_eq!(batches, [vec![1, 2], vec![3, 4], vec![5]]);
    }
}
