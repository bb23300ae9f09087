//! Hostile test plugin `clock-reader`: `handle` reports the wall clock and a random
//! number in one `Observed` event, so a test can check both are fixed by the host and
//! the same on every call. Sent `{"random_bytes": n}` it instead asks the host for `n`
//! random bytes in one call and reports how many it got (`Drew`), so a test can check
//! how large a draw the host serves; sent `{"pollables": n}` it subscribes to the
//! monotonic clock `n` times and keeps every pollable, to see how many host resources
//! one instance may hold.

use meridian_guest::{Aggregate, Rejection};
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
    /// How many pollables it made and kept.
    Held {
        /// How many.
        pollables: u32,
    },
    /// What one `get-random-bytes` call returned.
    Drew {
        /// How many bytes.
        bytes: u64,
    },
}

/// Any JSON object; only `random_bytes` is read.
#[derive(Deserialize)]
pub struct Probe {
    /// Draw this many random bytes in one call instead of observing.
    #[serde(default)]
    random_bytes: Option<u64>,
    /// Create this many pollables and keep them, instead of observing.
    #[serde(default)]
    pollables: Option<u32>,
}

/// The raw WASI calls the probes make, declared by hand as getrandom declares its
/// imports (their types come with std's). Natively there is no host to call.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod host_calls {
    #[link(wasm_import_module = "wasi:random/random@0.2.0")]
    unsafe extern "C" {
        // The list comes back through a return area: a pointer and a length.
        #[link_name = "get-random-bytes"]
        fn get_random_bytes(len: i64, ret: *mut [usize; 2]);
    }

    #[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.0")]
    unsafe extern "C" {
        #[link_name = "subscribe-duration"]
        fn subscribe_duration(nanoseconds: i64) -> i32;
    }

    /// How many bytes one `get-random-bytes(count)` call gave.
    pub fn random_bytes(count: u64) -> u64 {
        let mut ret = [0usize; 2];
        // SAFETY: the host writes the list's pointer and length into `ret`; the list
        // was allocated with the component's allocator, whose bump arena takes it back
        // after the call.
        unsafe { get_random_bytes(count as i64, &mut ret) };
        ret[1] as u64
    }

    /// Makes `count` pollables and never drops them.
    pub fn hold_pollables(count: u32) {
        for _ in 0..count {
            // SAFETY: takes a plain integer and returns a handle the guest owns.
            unsafe { subscribe_duration(1_000_000_000) };
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod host_calls {
    pub fn random_bytes(_count: u64) -> u64 {
        0
    }

    pub fn hold_pollables(_count: u32) {}
}

impl Aggregate for ClockReader {
    const TYPE: &'static str = "clock-reader";
    type State = ();
    type Command = Probe;
    type Event = Event;

    fn handle(_state: &(), command: Probe) -> Result<Vec<Event>, Rejection> {
        if let Some(count) = command.pollables {
            host_calls::hold_pollables(count);
            return Ok(vec![Event::Held { pollables: count }]);
        }
        if let Some(count) = command.random_bytes {
            return Ok(vec![Event::Drew {
                bytes: host_calls::random_bytes(count),
            }]);
        }
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
