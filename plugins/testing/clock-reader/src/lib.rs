//! Hostile test plugin `clock-reader`: `handle` reports the wall clock and a random
//! number in one `Observed` event, so a test can check both are fixed by the host and
//! the same on every call.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Reads the clock and the random source in `handle`; accepts any command.
pub struct ClockReader;

/// What the probe saw.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// The values read during `handle`.
    Observed {
        /// Nanoseconds since the UNIX epoch by `SystemTime::now()`, 0 if before it.
        system_time_nanos: u64,
        /// A `u64` from `wasi:random/random` (via getrandom), 0 if that failed.
        random: u64,
    },
}

impl Aggregate for ClockReader {
    const TYPE: &'static str = "clock-reader";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        let system_time_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
            });
        // getrandom rather than a `RandomState` hash: std bumps `RandomState`'s keys on
        // every use, so a reused instance would report a new value from a fixed source.
        let random = getrandom::u64().unwrap_or(0);
        Ok(vec![Event::Observed {
            system_time_nanos,
            random,
        }])
    }

    fn apply(_state: (), _event: Event) {}
}

meridian_guest::export_aggregate!(ClockReader);
