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

/// Most events replayed of one aggregate (its oldest, whose shapes are likeliest to
/// have drifted), so one long history cannot use up the whole budget.
pub const MAX_EVENTS_PER_AGGREGATE: i64 = 10_000;

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

/// Orders aggregates (oldest first) so the ends alternate: oldest, newest, second
/// oldest, second newest… Should the event budget run out, both ends were checked.
fn alternate_ends<T>(by_age: Vec<T>) -> Vec<T> {
    let mut ends = std::collections::VecDeque::from(by_age);
    let mut out = Vec::with_capacity(ends.len());
    while let Some(oldest) = ends.pop_front() {
        out.push(oldest);
        if let Some(newest) = ends.pop_back() {
            out.push(newest);
        }
    }
    out
}

/// Replays the oldest and newest aggregates of `aggregate_type` through `plugin`,
/// from empty state (snapshots belong to the versions that wrote them).
pub async fn check(
    pool: &PgPool,
    plugin: &Plugin,
    aggregate_type: &str,
) -> Result<HistoryCheck, HistoryError> {
    let started = std::time::Instant::now();
    let ids = alternate_ends(
        store::read::oldest_and_newest(pool, aggregate_type, SAMPLE_EACH_END).await?,
    );
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
            let last = (version + PAGE).min(MAX_EVENTS_PER_AGGREGATE);
            let read =
                store::read::aggregate_page(pool, &key, version + 1, last, store::read::PAGE_BYTES)
                    .await?;
            let mut done = !read.more(last - version);
            let page = read.events;
            let reached = page.last().map_or(version, |e| e.version);
            if !done && reached >= MAX_EVENTS_PER_AGGREGATE {
                // Longer than the per-aggregate budget: its oldest events were checked.
                checked.complete = false;
                done = true;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_alternates_between_the_oldest_and_the_newest() {
        assert_eq!(alternate_ends(vec![1, 2, 3, 4, 5]), vec![1, 5, 2, 4, 3]);
        assert_eq!(alternate_ends(vec![1, 2]), vec![1, 2]);
        assert!(alternate_ends(Vec::<i32>::new()).is_empty());
    }
}
