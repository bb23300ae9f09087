//! Reading events: one aggregate's history, and the region's global order.
//!
//! The global order is commit order, walked as `(tx_id, position)`. `position` comes
//! from a sequence, so a transaction can commit after a later-numbered one; reading by
//! position alone would then skip the late event forever. A reader therefore only reads
//! events whose transaction id is below the [`horizon`] — every transaction of the
//! database below it has finished — and orders by transaction id first.
//! A position still names one event, and "after position P" means "after the event at
//! P in this order", so positions are resume tokens: they increase within a
//! transaction but may interleave between transactions.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{StoreError, bounded_read};

/// An aggregate's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateKey {
    /// Aggregate type (the plugin's name).
    pub aggregate_type: String,
    /// Aggregate id, chosen by the caller.
    pub aggregate_id: String,
}

impl std::fmt::Display for AggregateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// An event as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Regional position: a resume token for global reads when a global read
    /// delivered it. Read from one aggregate's events it may belong to a transaction
    /// that committed ahead of an older, still running one, and resuming after it
    /// would skip that one's events.
    pub position: i64,
    /// Event id (UUID v7).
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Per-aggregate version, from 1.
    pub version: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event payload.
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<RawValue>,
    /// Command id, plugin version, origin region, causation and correlation ids.
    #[schema(value_type = Object)]
    pub metadata: Box<RawValue>,
    /// When it was stored.
    pub recorded_at: DateTime<Utc>,
}

const EVENT_COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, version, event_type, \
     payload::text AS payload, metadata::text AS metadata, recorded_at";

fn raw(text: String) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(text).map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

/// Most bytes of events (payload and metadata) one page of `GET /v1/events` or of an
/// aggregate's events holds, however many events `limit` allows: 10,000 events of a
/// megabyte each would otherwise be read into memory, and sent, as one answer. A page
/// holds at least one event; `next` goes on from where it stops.
pub const PAGE_BYTES: usize = 16 * 1024 * 1024;

impl StoredEvent {
    /// What the event weighs in a page: its payload and metadata as stored.
    pub fn bytes(&self) -> usize {
        self.payload.get().len() + self.metadata.get().len()
    }

    fn from_row(row: &PgRow) -> Result<Self, StoreError> {
        Ok(Self {
            position: row.try_get("position")?,
            event_id: row.try_get("event_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            version: row.try_get("version")?,
            event_type: row.try_get("event_type")?,
            payload: raw(row.try_get("payload")?)?,
            metadata: raw(row.try_get("metadata")?)?,
            recorded_at: row.try_get("recorded_at")?,
        })
    }
}

/// A stored snapshot of an aggregate's state bytes.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The version the state reflects.
    pub version: i64,
    /// The plugin version that produced it.
    pub plugin_version: i32,
    /// The state bytes.
    pub state: Vec<u8>,
}

/// Loads the newest snapshot usable by `plugin_version`, if any.
pub async fn snapshot(
    pool: &PgPool,
    key: &AggregateKey,
    plugin_version: i32,
) -> Result<Option<Snapshot>, StoreError> {
    bounded_read(pool, async |conn| {
        let row = sqlx::query(
            "SELECT version, plugin_version, state FROM snapshots \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND plugin_version = $3",
        )
        .bind(&key.aggregate_type)
        .bind(&key.aggregate_id)
        .bind(plugin_version)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|row| {
            Ok(Snapshot {
                version: row.try_get("version")?,
                plugin_version: row.try_get("plugin_version")?,
                state: row.try_get("state")?,
            })
        })
        .transpose()
    })
    .await
}

/// Stores a snapshot unless a newer one is already there: one of a newer plugin version
/// (versions only grow: a rollback is a new version), or of the same version at a later
/// aggregate version. A host still on the previous version during a rollout, or a save
/// delayed past an upload, must not replace the snapshot the running version loads.
pub async fn save_snapshot(
    pool: &PgPool,
    key: &AggregateKey,
    snapshot: &Snapshot,
) -> Result<(), StoreError> {
    bounded_read(pool, async |conn| {
        sqlx::query(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, version, plugin_version, state) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET version = EXCLUDED.version, plugin_version = EXCLUDED.plugin_version, \
                 state = EXCLUDED.state, created_at = now() \
             WHERE snapshots.plugin_version < EXCLUDED.plugin_version \
                OR (snapshots.plugin_version = EXCLUDED.plugin_version AND snapshots.version < EXCLUDED.version)",
        )
        .bind(&key.aggregate_type)
        .bind(&key.aggregate_id)
        .bind(snapshot.version)
        .bind(snapshot.plugin_version)
        .bind(&snapshot.state)
        .execute(&mut *conn)
        .await?;
        Ok(())
    })
    .await
}

/// One aggregate's events with `first <= version <= last`, in version order, all of
/// them: for short ranges (one command's events). Longer reads page with
/// [`aggregate_page`].
pub async fn aggregate_events(
    pool: &PgPool,
    key: &AggregateKey,
    first: i64,
    last: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    Ok(aggregate_page(pool, key, first, last, usize::MAX)
        .await?
        .events)
}

/// [`aggregate_events`], stopping after the event that reaches `max_bytes` (see
/// [`PAGE_BYTES`]).
pub async fn aggregate_page(
    pool: &PgPool,
    key: &AggregateKey,
    first: i64,
    last: i64,
    max_bytes: usize,
) -> Result<Chunk<StoredEvent>, StoreError> {
    bounded_read(pool, async |conn| {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version BETWEEN $3 AND $4 \
             ORDER BY version"
        );
        let rows = sqlx::query(&sql)
            .bind(&key.aggregate_type)
            .bind(&key.aggregate_id)
            .bind(first)
            .bind(last)
            .fetch(&mut *conn);
        within(rows, max_bytes, |row| {
            let event = StoredEvent::from_row(row)?;
            let bytes = event.bytes();
            Ok((event, bytes))
        })
        .await
    })
    .await
}

/// The events one read returned.
#[derive(Debug)]
pub struct Chunk<T> {
    /// The events, in order.
    pub events: Vec<T>,
    /// The read stopped at its byte budget: more may follow the last event even though
    /// fewer than the read's limit came back, so "fewer than asked for" does not mean
    /// "the end".
    pub cut: bool,
}

impl<T> Chunk<T> {
    /// Whether the read may have left events behind its last one: it was cut at its
    /// byte budget or returned all `limit` events it could.
    pub fn more(&self, limit: i64) -> bool {
        self.cut || self.events.len() as i64 >= limit
    }
}

/// The rows' events, in order, up to and with the one that reaches `max_bytes`; the
/// rest of the rows are not read.
async fn within<T>(
    mut rows: futures::stream::BoxStream<'_, Result<PgRow, sqlx::Error>>,
    max_bytes: usize,
    event: impl Fn(&PgRow) -> Result<(T, usize), StoreError>,
) -> Result<Chunk<T>, StoreError> {
    use futures::TryStreamExt;
    let mut events = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.try_next().await? {
        let (item, size) = event(&row)?;
        bytes = bytes.saturating_add(size);
        events.push(item);
        if bytes >= max_bytes {
            return Ok(Chunk { events, cut: true });
        }
    }
    Ok(Chunk { events, cut: false })
}

/// The ids of up to `each_end` of the oldest and of the newest aggregates of a type
/// that have events, oldest first. Scans the type's `streams` rows (no index orders
/// them by age), which suits what it serves: a check run when a plugin is uploaded.
pub async fn oldest_and_newest(
    pool: &PgPool,
    aggregate_type: &str,
    each_end: i64,
) -> Result<Vec<String>, StoreError> {
    // Scans the type's rows: as long as that takes.
    super::bounded(pool, None, async |conn| {
        let ids = sqlx::query_scalar(
            "SELECT aggregate_id FROM ( \
                 (SELECT aggregate_id, created_at FROM streams \
                  WHERE aggregate_type = $1 AND version > 0 \
                  ORDER BY created_at, aggregate_id LIMIT $2) \
                 UNION \
                 (SELECT aggregate_id, created_at FROM streams \
                  WHERE aggregate_type = $1 AND version > 0 \
                  ORDER BY created_at DESC, aggregate_id DESC LIMIT $2) \
             ) sample ORDER BY created_at, aggregate_id",
        )
        .bind(aggregate_type)
        .bind(each_end)
        .fetch_all(&mut *conn)
        .await?;
        Ok(ids)
    })
    .await
}

/// Which events a global read returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id (with `aggregate_type`, one aggregate).
    pub aggregate_id: Option<String>,
    /// Only events committed in this region (not received from another one).
    pub origin_region: Option<String>,
}

impl EventFilter {
    /// How long a read with this filter may wait for the database: the read timeout
    /// when unfiltered (the order index hands over the rows at once), no limit when
    /// filtered, since the rows that pass may lie far apart in that index: such a read
    /// can rightly scan for longer than any limit meant for a silent connection, and
    /// cut off it would fail again each time it is retried.
    pub fn scan_limit(&self) -> Option<std::time::Duration> {
        let filtered = self.aggregate_type.is_some()
            || self.aggregate_id.is_some()
            || self.origin_region.is_some();
        (!filtered).then(super::read_timeout)
    }

    /// Whether `event` passes this filter: the same test `read_all` makes in SQL, for
    /// events that arrive some other way (a live stream's shared pages).
    pub fn matches(&self, event: &StoredEvent) -> bool {
        if self
            .aggregate_type
            .as_deref()
            .is_some_and(|t| t != event.aggregate_type)
            || self
                .aggregate_id
                .as_deref()
                .is_some_and(|id| id != event.aggregate_id)
        {
            return false;
        }
        let Some(region) = self.origin_region.as_deref() else {
            return true;
        };
        #[derive(serde::Deserialize)]
        struct Origin<'a> {
            #[serde(borrow)]
            origin_region: Option<std::borrow::Cow<'a, str>>,
        }
        serde_json::from_str::<Origin>(event.metadata.get())
            .is_ok_and(|m| m.origin_region.as_deref() == Some(region))
    }
}

/// A place in the region's commit order: the writing transaction's id, then the
/// position. Global reads walk these keys; clients only ever see positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey {
    /// The writing transaction's `xid8`.
    pub tx: i64,
    /// The event's position.
    pub position: i64,
}

impl OrderKey {
    /// Before every event.
    pub const START: OrderKey = OrderKey { tx: 0, position: 0 };
}

/// The key of the event at `position` (0 or less: the start), or
/// [`StoreError::UnknownPosition`] when no event has that position.
pub async fn order_key(pool: &PgPool, position: i64) -> Result<OrderKey, StoreError> {
    order_key_of(pool, position, None).await
}

/// [`order_key`], and when the reader names the event it received at `position`
/// (`event_id`), [`StoreError::OtherEventAt`] if the store holds another one there.
/// Positions are numbers of one region's store: the same number in another region (an
/// address that now reaches it) or in a store restored from a backup (which numbers
/// new events from its own past) is most likely another event, and resuming after it
/// would skip or repeat events without a word.
pub async fn order_key_of(
    pool: &PgPool,
    position: i64,
    event_id: Option<Uuid>,
) -> Result<OrderKey, StoreError> {
    if position <= 0 {
        // No event is ever numbered 0 or below, so an event "received there" is a
        // broken resume point; starting over would repeat the whole history silently.
        return match event_id {
            None => Ok(OrderKey::START),
            Some(_) => Err(StoreError::UnknownPosition(position)),
        };
    }
    let found: Option<(i64, Uuid)> = bounded_read(pool, async |conn| {
        Ok(
            sqlx::query_as("SELECT tx_id::text::bigint, event_id FROM events WHERE position = $1")
                .bind(position)
                .fetch_optional(&mut *conn)
                .await?,
        )
    })
    .await?;
    match found {
        None => Err(StoreError::UnknownPosition(position)),
        Some((_, found)) if event_id.is_some_and(|e| e != found) => Err(StoreError::OtherEventAt {
            position,
            event_id: event_id.expect("checked"),
        }),
        Some((tx, _)) => {
            // A position the feed has not passed yet (read from an aggregate's history,
            // which waits for nothing): an older transaction may still commit before it,
            // and a read after it would never deliver that event. Such a transaction
            // usually ends within milliseconds; one that does not is the reader's to
            // wait out.
            let deadline = tokio::time::Instant::now() + UNDELIVERED_WAIT;
            loop {
                let horizon = bounded_read(pool, async |conn| horizon(conn).await).await?;
                if tx < horizon {
                    return Ok(OrderKey { tx, position });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(StoreError::NotDelivered(position));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// How long a resume point the feed has not reached yet is waited for before it is
/// refused ([`StoreError::NotDelivered`]).
const UNDELIVERED_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Events after `after` (a position received earlier, or 0 for the beginning) in the
/// region's commit order, never past a transaction that may still commit.
pub async fn read_all(
    pool: &PgPool,
    after: i64,
    limit: i64,
    filter: &EventFilter,
) -> Result<Vec<StoredEvent>, StoreError> {
    read_all_after(pool, order_key(pool, after).await?, limit, filter).await
}

/// [`read_all`] from a resume point already resolved (see [`order_key_of`]).
pub async fn read_all_after(
    pool: &PgPool,
    after: OrderKey,
    limit: i64,
    filter: &EventFilter,
) -> Result<Vec<StoredEvent>, StoreError> {
    Ok(read_after(pool, after, None, limit, PAGE_BYTES, filter)
        .await?
        .events
        .into_iter()
        .map(|(_, event)| event)
        .collect())
}

/// Up to `limit` events after `after` in the region's commit order, with their keys,
/// never past a transaction that may still commit, and with `until` none past that key;
/// stopping after the event that reaches `max_bytes` (see [`PAGE_BYTES`]).
///
/// A read bounded by `until` is complete and final once `until` was itself read: the
/// events up to it belong to transactions that had finished by then.
pub async fn read_after(
    pool: &PgPool,
    after: OrderKey,
    until: Option<OrderKey>,
    limit: i64,
    max_bytes: usize,
    filter: &EventFilter,
) -> Result<Chunk<(OrderKey, StoredEvent)>, StoreError> {
    super::bounded(pool, filter.scan_limit(), async |conn| {
        let horizon = horizon(conn).await?;
        let bound = if until.is_some() {
            "AND (tx_id, position) <= ($8::text::xid8, $9) "
        } else {
            ""
        };
        let sql = format!(
            "SELECT tx_id::text::bigint AS tx, {EVENT_COLUMNS} FROM events \
             WHERE (tx_id, position) > ($1::text::xid8, $2) \
               AND tx_id < $7::text::xid8 \
               AND ($3::text IS NULL OR aggregate_type = $3) \
               AND ($4::text IS NULL OR aggregate_id = $4) \
               AND ($6::text IS NULL OR metadata->>'origin_region' = $6) \
               {bound}\
             ORDER BY tx_id, position LIMIT $5"
        );
        let mut query = sqlx::query(&sql)
            .bind(after.tx.to_string())
            .bind(after.position.max(0))
            .bind(filter.aggregate_type.as_deref())
            .bind(filter.aggregate_id.as_deref())
            .bind(limit)
            .bind(filter.origin_region.as_deref())
            .bind(horizon.to_string());
        if let Some(until) = until {
            query = query.bind(until.tx.to_string()).bind(until.position);
        }
        within(query.fetch(&mut *conn), max_bytes, |row| {
            let event = StoredEvent::from_row(row)?;
            let key = OrderKey {
                tx: row.try_get("tx")?,
                position: event.position,
            };
            let bytes = event.bytes();
            Ok(((key, event), bytes))
        })
        .await
    })
    .await
}

/// The aggregate's current version in the store (0 if it has no events).
pub async fn stream_version(pool: &PgPool, key: &AggregateKey) -> Result<i64, StoreError> {
    bounded_read(pool, async |conn| {
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM streams WHERE aggregate_type = $1 AND aggregate_id = $2",
        )
        .bind(&key.aggregate_type)
        .bind(&key.aggregate_id)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(version.unwrap_or(0))
    })
    .await
}

/// The versions a command id produced, if it ran: `(type, id, first, last)`.
pub async fn command_result(
    pool: &PgPool,
    command_id: Uuid,
) -> Result<Option<(AggregateKey, i64, i64)>, StoreError> {
    bounded_read(pool, async |conn| {
        let row = sqlx::query(
            "SELECT aggregate_type, aggregate_id, first_version, last_version FROM commands WHERE command_id = $1",
        )
        .bind(command_id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|row| {
            Ok((
                AggregateKey {
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                },
                row.try_get("first_version")?,
                row.try_get("last_version")?,
            ))
        })
        .transpose()
    })
    .await
}

/// The transaction id below which every transaction of this database has finished:
/// the region's events below it are all committed (or never will be), so readers may
/// walk up to it and never see one commit behind them later.
///
/// `pg_snapshot_xmin` would be the oldest transaction running on the whole server, in
/// any database: one long write elsewhere on a shared server (a migration, a batch
/// job) held every stream, the relay and the groups of the region still for as long as
/// it ran. So the horizon is the next transaction id as of this statement's snapshot,
/// or the oldest transaction of this database still running (or prepared) when the
/// statement then looks, whichever is smaller. A transaction below the snapshot's
/// limit that is not seen running had finished before the look, so the caller's next
/// statement, whose snapshot is taken after it, sees its outcome — which is why this
/// must run on its own, before the read it bounds, and not inside it.
pub async fn horizon(conn: &mut sqlx::PgConnection) -> Result<i64, StoreError> {
    // `backend_xid` is a 32-bit xid: it is widened to the xid8 nearest the snapshot's
    // limit, which a running transaction is always within 2^31 of. The running
    // backends are looked at before the prepared transactions, on purpose: a PREPARE
    // lists its transaction as prepared before it clears it from its backend, so in this
    // order one being prepared meanwhile is seen at least once.
    Ok(sqlx::query_scalar(
        "WITH next AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n), \
              running AS ( \
                SELECT backend_xid::text::bigint AS x FROM pg_stat_activity \
                 WHERE datname = current_database() AND backend_xid IS NOT NULL \
                UNION ALL \
                SELECT transaction::text::bigint FROM pg_prepared_xacts \
                 WHERE database = current_database()) \
         SELECT least(n, min(n + ((x - (n & 4294967295) + 2147483648) % 4294967296 \
                                  + 4294967296) % 4294967296 - 2147483648)) \
           FROM next LEFT JOIN running ON true GROUP BY n",
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// The newest event the tail has delivered in the region's commit order (0 when there
/// is none yet): reading after it gives exactly the events that commit from now on,
/// with no gap, because every transaction before it in that order has finished.
pub async fn head(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(head_key(pool).await?.position)
}

/// [`head`] with its key ([`OrderKey::START`] when there is no event yet).
pub async fn head_key(pool: &PgPool) -> Result<OrderKey, StoreError> {
    bounded_read(pool, async |conn| {
        let horizon = horizon(conn).await?;
        let key: Option<(i64, i64)> = sqlx::query_as(
            "SELECT tx_id::text::bigint, position FROM events \
             WHERE tx_id < $1::text::xid8 \
             ORDER BY tx_id DESC, position DESC LIMIT 1",
        )
        .bind(horizon.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(key.map_or(OrderKey::START, |(tx, position)| OrderKey { tx, position }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(aggregate_type: &str, aggregate_id: &str, metadata: &str) -> StoredEvent {
        StoredEvent {
            position: 1,
            event_id: Uuid::nil(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            version: 1,
            event_type: "E".into(),
            payload: RawValue::from_string("{}".into()).unwrap(),
            metadata: RawValue::from_string(metadata.into()).unwrap(),
            recorded_at: Utc::now(),
        }
    }

    /// The filter a live stream applies to shared pages keeps what the SQL of
    /// `read_all` keeps.
    #[test]
    fn filter_matches_like_the_sql() {
        let east = event(
            "account",
            "a-1",
            r#"{"origin_region":"east","node_id":"n"}"#,
        );
        let west = event(
            "account",
            "a-2",
            r#"{"node_id":"n","origin_region":"west"}"#,
        );
        let none = event("order", "a-1", "{}");
        let all = EventFilter::default();
        assert!(all.matches(&east) && all.matches(&west) && all.matches(&none));
        let accounts = EventFilter {
            aggregate_type: Some("account".into()),
            ..EventFilter::default()
        };
        assert!(accounts.matches(&east) && !accounts.matches(&none));
        let one = EventFilter {
            aggregate_type: Some("account".into()),
            aggregate_id: Some("a-1".into()),
            ..EventFilter::default()
        };
        assert!(one.matches(&east) && !one.matches(&west) && !one.matches(&none));
        let from_east = EventFilter {
            origin_region: Some("east".into()),
            ..EventFilter::default()
        };
        assert!(from_east.matches(&east) && !from_east.matches(&west) && !from_east.matches(&none));
    }
}
