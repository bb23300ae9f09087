//! Checking a new plugin version against stored histories before it runs.
//!
//! Every command runs the newest version of its aggregate type, and an aggregate whose
//! cached state came from an older version is rebuilt by replaying its events through
//! the new one. A new version that cannot `apply` an old event (a renamed variant, a
//! field made required) would fail every command on every aggregate holding one, from
//! the moment it is uploaded. So an upload replays a sample of the type's stored
//! aggregates first and is refused, naming the aggregate and the event, when any of
//! them does not replay.
//!
//! The sample is the oldest and the newest aggregates of the type: old ones hold the
//! event shapes most likely to have drifted, new ones what the current version writes.
//! It is a sample, not a proof: an event shape found only in the middle of the history
//! can still slip through, which the README says.

use serde::Serialize;
use sqlx::PgPool;

use crate::runtime::{Plugin, PluginError};
use crate::store::{self, AggregateKey, StoreError};

/// How many of the oldest, and how many of the newest, aggregates an upload replays.
pub const SAMPLE_EACH_END: i64 = 50;

/// Most events one check replays in all; past it the check stops and says so.
pub const MAX_EVENTS: u64 = 100_000;

/// Events read per round trip.
const PAGE: i64 = 5_000;

/// What a history check replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HistoryCheck {
    /// Aggregates whose whole history (or as much as the budget allowed) replayed.
    pub aggregates: u64,
    /// Events applied.
    pub events: u64,
    /// False when the event budget ran out before the sample did.
    pub complete: bool,
}

/// Why a history check failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The new version could not apply a stored event.
    #[error("{aggregate} does not replay: event {version} (`{event_type}`): {cause}")]
    Incompatible {
        /// `type/id`.
        aggregate: String,
        /// The event's version in its aggregate.
        version: i64,
        /// The event's type.
        event_type: String,
        /// What the plugin said (or how it failed).
        cause: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replays the oldest and newest aggregates of `aggregate_type` through `plugin`,
/// from empty state (snapshots belong to the versions that wrote them).
pub async fn check(
    pool: &PgPool,
    plugin: &Plugin,
    aggregate_type: &str,
) -> Result<HistoryCheck, HistoryError> {
    let started = std::time::Instant::now();
    let ids = store::read::oldest_and_newest(pool, aggregate_type, SAMPLE_EACH_END).await?;
    let mut checked = HistoryCheck {
        aggregates: 0,
        events: 0,
        complete: true,
    };
    'aggregates: for aggregate_id in ids {
        let key = AggregateKey {
            aggregate_type: aggregate_type.to_string(),
            aggregate_id,
        };
        let mut session = plugin.session();
        let mut state = Vec::new();
        let mut version = 0;
        loop {
            let page =
                store::read::aggregate_events(pool, &key, version + 1, version + PAGE).await?;
            let done = (page.len() as i64) < PAGE;
            for event in &page {
                version = event.version;
                if checked.events >= MAX_EVENTS {
                    checked.complete = false;
                    break 'aggregates;
                }
                checked.events += 1;
                // Meridian's own events (a home move) are not the plugin's business.
                if store::regions::is_system_event(&event.event_type) {
                    continue;
                }
                state = session
                    .apply(&state, &event.event_type, event.payload.get().as_bytes())
                    .await
                    .map_err(|error| HistoryError::Incompatible {
                        aggregate: key.to_string(),
                        version: event.version,
                        event_type: event.event_type.clone(),
                        cause: match error {
                            // The plugin's own words; the rest names a throwaway
                            // instance the caller never sees.
                            PluginError::ApplyFailed { message, .. } => message,
                            other => other.to_string(),
                        },
                    })?;
            }
            if done {
                break;
            }
            tracing::info!(aggregate = %key, version, events = checked.events, "checking a long history");
        }
        checked.aggregates += 1;
    }
    tracing::info!(
        aggregate_type,
        aggregates = checked.aggregates,
        events = checked.events,
        complete = checked.complete,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "new plugin version replays the stored histories it was checked against"
    );
    Ok(checked)
}
