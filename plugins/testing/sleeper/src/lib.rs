//! Hostile test plugin `sleeper`: sleeps inside `handle`.
//!
//! `{"type":"Nap"}` sleeps for an hour once, then decides `Woke`. `{"type":"Go"}` sleeps
//! a second at a time, forever. Sleeping is waiting on a WASI timer, not running code,
//! so the epoch deadline alone would never stop a plugin that sleeps for real; the
//! sandbox's clock never moves instead, so the nap ends at once and the endless naps
//! are a busy loop that the deadline stops.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Sleeps in `handle`.
pub struct Sleeper;

/// What to sleep.
#[derive(Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// One hour, then decide `Woke`.
    Nap,
    /// A second at a time, forever.
    Go,
}

/// Decided after the nap, if it ended.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// The sleep ended.
    Woke,
}

impl Aggregate for Sleeper {
    const TYPE: &'static str = "sleeper";
    type State = ();
    type Command = Command;
    type Event = Event;

    fn handle(_state: &(), command: Command) -> Result<Vec<Event>, Rejection> {
        match command {
            Command::Nap => std::thread::sleep(Duration::from_secs(3600)),
            Command::Go => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
        }
        Ok(vec![Event::Woke])
    }

    fn apply(_state: (), _event: Event) {}
}

meridian_guest::export_aggregate!(Sleeper);
