//! Hostile test plugin `sleeper`: `handle` sleeps for a minute. Sleeping is waiting on a
//! WASI clock, not running code, so the epoch deadline alone would never stop it; the
//! host must bound the whole call.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Sleeps in `handle`, then decides one event.
pub struct Sleeper;

/// Decided after the sleep, if the host let it finish.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// The sleep ended.
    Woke,
}

impl Aggregate for Sleeper {
    const TYPE: &'static str = "sleeper";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        std::thread::sleep(std::time::Duration::from_secs(60));
        Ok(vec![Event::Woke])
    }

    fn apply(_state: (), _event: Event) {}
}

meridian_guest::export_aggregate!(Sleeper);
