//! SQL for multi-region operation: home regions, home moves, events received from
//! other regions, and the relay's status.
//!
//! The rules live in `migrations/0003_regions.sql` (`meridian_append`'s home fence and
//! `meridian_store_remote`); this module only calls them and reads their results.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{AggregateKey, StoreError};

/// The event type of a home move. Recorded in the aggregate's own stream so every
/// region learns of the move in order with the aggregate's other events; the executor
/// never passes it to the plugin.
pub const HOME_MOVED: &str = "$meridian.HomeMoved";

/// True for events Meridian itself records in an aggregate's stream (plugins never
/// see them, and may not decide event types starting with `$`).
pub fn is_system_event(event_type: &str) -> bool {
    event_type.starts_with('$')
}

/// The payload of a [`HOME_MOVED`] event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HomeMoved {
    /// The home before the move.
    pub from: String,
    /// The home after it.
    pub to: String,
    /// True for a forced move away from an unreachable region.
    #[serde(default)]
    pub forced: bool,
}

/// The home an aggregate's stream names and the stream's version, if this region has
/// the stream.
pub async fn home_and_version(
    pool: &PgPool,
    key: &AggregateKey,
) -> Result<Option<(String, i64)>, StoreError> {
    super::bounded_read(pool, async |conn| {
        Ok(sqlx::query_as(
            "SELECT home_region, version FROM streams WHERE aggregate_type = $1 AND aggregate_id = $2",
        )
        .bind(&key.aggregate_type)
        .bind(&key.aggregate_id)
        .fetch_optional(conn)
        .await?)
    })
    .await
}

/// Why a home move was refused.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The aggregate has no events in this region.
    #[error("{0} has no events in this region")]
    NotFound(String),
    /// This region is not the aggregate's home (and the move was not forced).
    #[error("{aggregate} is homed in region {home}, not here; move it from there")]
    NotHome {
        /// `type/id`.
        aggregate: String,
        /// Its home.
        home: String,
    },
    /// The aggregate is already homed in the target region.
    #[error("{aggregate} is already homed in region {home}")]
    AlreadyThere {
        /// `type/id`.
        aggregate: String,
        /// Its home.
        home: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for MoveError {
    fn from(error: sqlx::Error) -> Self {
        MoveError::Store(StoreError::Database(error))
    }
}

/// Records a home move: appends a [`HOME_MOVED`] event and changes the stream's home in
/// one transaction. The stream row is locked, so an append in flight either commits
/// before (and the move follows it) or is refused by the home fence after.
///
/// Unforced, only the home region may move an aggregate. Forced (`force`), any region
/// may take the aggregate over with the events it has; events the old home committed
/// but never relayed are lost (see the README's data-loss window).
pub async fn move_home(
    pool: &PgPool,
    key: &AggregateKey,
    local_region: &str,
    to: &str,
    force: bool,
    metadata: &serde_json::Value,
) -> Result<(i64, String), MoveError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT version, home_region FROM streams \
         WHERE aggregate_type = $1 AND aggregate_id = $2 FOR UPDATE",
    )
    .bind(&key.aggregate_type)
    .bind(&key.aggregate_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(MoveError::NotFound(key.to_string()));
    };
    let version: i64 = row.try_get("version")?;
    let home: String = row.try_get("home_region")?;
    if home == to {
        return Err(MoveError::AlreadyThere {
            aggregate: key.to_string(),
            home,
        });
    }
    if home != local_region && !force {
        return Err(MoveError::NotHome {
            aggregate: key.to_string(),
            home,
        });
    }
    let payload = serde_json::to_string(&HomeMoved {
        from: home.clone(),
        to: to.to_string(),
        forced: force,
    })
    .expect("serialisable");
    let next = version + 1;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)",
    )
    .bind(Uuid::now_v7())
    .bind(&key.aggregate_type)
    .bind(&key.aggregate_id)
    .bind(next)
    .bind(HOME_MOVED)
    .bind(payload)
    .bind(metadata.to_string())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE streams SET version = $3, home_region = $4 \
         WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(&key.aggregate_type)
    .bind(&key.aggregate_id)
    .bind(next)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((next, home))
}

/// An event received from another region, as the relay publishes it.
///
/// The fields repeat [`super::StoredEvent`]'s plus `region` rather than flattening it:
/// serde's `flatten` buffers fields on the way in, and the `RawValue` payload and
/// metadata cannot be read back from that buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayedEvent {
    /// The region that committed it.
    pub region: String,
    /// Its position in that region (a resume token there, meaningless here).
    pub position: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Per-aggregate version.
    pub version: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event payload.
    pub payload: Box<RawValue>,
    /// Event metadata.
    pub metadata: Box<RawValue>,
    /// When it was committed in its region.
    pub recorded_at: DateTime<Utc>,
}

/// What [`store_remote`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOutcome {
    /// Events stored.
    pub stored: i32,
    /// Events already here (redelivery).
    pub duplicates: i32,
    /// Events skipped because this region's history of the aggregate differs (only
    /// after a forced home move).
    pub divergent: i32,
    /// The index of the first event not looked at because its aggregate's previous
    /// version is not here yet (it travels in another region's stream); `None` when
    /// the whole batch was taken. Send the rest again once the gap is filled.
    pub early: Option<usize>,
}

/// Stores a batch of another region's events in order, in one transaction, up to the
/// first event whose aggregate's previous version is not here yet
/// ([`RemoteOutcome::early`]): a region stores each aggregate's events in version
/// order, whichever region's stream brings them.
pub async fn store_remote<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    local_region: &str,
    events: &[RelayedEvent],
) -> Result<RemoteOutcome, StoreError> {
    let mut ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut agg_ids = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut event_types = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut metadata = Vec::with_capacity(events.len());
    let mut homes = Vec::with_capacity(events.len());
    let mut moves = Vec::with_capacity(events.len());
    let mut recorded = Vec::with_capacity(events.len());
    for e in events {
        let moved = (e.event_type == HOME_MOVED)
            .then(|| serde_json::from_str::<HomeMoved>(e.payload.get()).ok())
            .flatten();
        ids.push(e.event_id);
        types.push(e.aggregate_type.as_str());
        agg_ids.push(e.aggregate_id.as_str());
        versions.push(e.version);
        event_types.push(e.event_type.as_str());
        payloads.push(e.payload.get());
        metadata.push(e.metadata.get());
        moves.push(moved.is_some());
        homes.push(moved.map_or_else(|| e.region.clone(), |m| m.to));
        recorded.push(e.recorded_at);
    }
    let row = sqlx::query(
        "SELECT stored, duplicates, divergent, early FROM meridian_store_remote($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(local_region)
    .bind(&ids)
    .bind(&types)
    .bind(&agg_ids)
    .bind(&versions)
    .bind(&event_types)
    .bind(&payloads)
    .bind(&metadata)
    .bind(&homes)
    .bind(&moves)
    .bind(&recorded)
    .fetch_one(executor)
    .await?;
    Ok(RemoteOutcome {
        stored: row.try_get("stored")?,
        duplicates: row.try_get("duplicates")?,
        divergent: row.try_get("divergent")?,
        // 1-based in SQL, 0 for none.
        early: usize::try_from(row.try_get::<i32, _>("early")?)
            .ok()
            .and_then(|i| i.checked_sub(1)),
    })
}

/// The relay from one other region, as last recorded by this region's relay leader.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RelayStatus {
    /// The other region.
    pub region: String,
    /// Milliseconds from commit there to stored here, for the newest event stored.
    pub lag_ms: i64,
    /// Events JetStream holds for this region that are not stored here yet.
    pub pending: i64,
    /// Events received from that region since the relay leader started.
    pub events_received: i64,
    /// Commit time (there) of the newest event stored here.
    pub last_event_at: Option<DateTime<Utc>>,
    /// When the leader last wrote this row.
    pub updated_at: DateTime<Utc>,
}

/// Records the relay's position for one other region.
pub async fn set_relay_status(
    pool: &PgPool,
    region: &str,
    lag_ms: i64,
    pending: i64,
    received: i64,
    last_event_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    super::bounded_read(pool, async |conn| {
        sqlx::query(
            "INSERT INTO relay_status (region, lag_ms, pending, events_received, last_event_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (region) DO UPDATE SET lag_ms = EXCLUDED.lag_ms, pending = EXCLUDED.pending, \
                 events_received = EXCLUDED.events_received, \
                 last_event_at = coalesce(EXCLUDED.last_event_at, relay_status.last_event_at), \
                 updated_at = now()",
        )
        .bind(region)
        .bind(lag_ms)
        .bind(pending)
        .bind(received)
        .bind(last_event_at)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// Records where `region`'s inbound consumer resumes should it go missing: stream
/// sequence `sequence` of the inbound stream created at `stream_created`.
pub async fn save_inbound_resume(
    pool: &PgPool,
    region: &str,
    stream_created: DateTime<Utc>,
    sequence: i64,
) -> Result<(), StoreError> {
    super::bounded_read(pool, async |conn| {
        sqlx::query(
            "INSERT INTO relay_status (region, lag_ms, pending, inbound_resume_sequence, inbound_stream_created) \
             VALUES ($1, 0, 0, $2, $3) \
             ON CONFLICT (region) DO UPDATE SET inbound_resume_sequence = EXCLUDED.inbound_resume_sequence, \
                 inbound_stream_created = EXCLUDED.inbound_stream_created",
        )
        .bind(region)
        .bind(sequence)
        .bind(stream_created)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// Where `region`'s inbound consumer resumes should it go missing, if recorded for
/// the inbound stream created at `stream_created`.
pub async fn inbound_resume(
    pool: &PgPool,
    region: &str,
    stream_created: DateTime<Utc>,
) -> Result<Option<i64>, StoreError> {
    let saved: Option<(Option<i64>, Option<DateTime<Utc>>)> =
        super::bounded_read(pool, async |conn| {
            Ok(sqlx::query_as(
                "SELECT inbound_resume_sequence, inbound_stream_created FROM relay_status WHERE region = $1",
            )
            .bind(region)
            .fetch_optional(conn)
            .await?)
        })
        .await?;
    Ok(match saved {
        Some((Some(sequence), Some(created))) if created == stream_created => Some(sequence),
        _ => None,
    })
}

/// The relay status of every other region this region receives from.
pub async fn relay_status(pool: &PgPool) -> Result<Vec<RelayStatus>, StoreError> {
    let rows = super::bounded_read(pool, async |conn| {
        Ok(sqlx::query(
            "SELECT region, lag_ms, pending, events_received, last_event_at, updated_at \
             FROM relay_status ORDER BY region",
        )
        .fetch_all(conn)
        .await?)
    })
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RelayStatus {
                region: row.try_get("region")?,
                lag_ms: row.try_get("lag_ms")?,
                pending: row.try_get("pending")?,
                events_received: row.try_get("events_received")?,
                last_event_at: row.try_get("last_event_at")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .collect()
}
