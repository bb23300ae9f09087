//! Hostile test plugin `panicker`: `handle` panics, which traps the component; the host
//! must fail the call and stay up.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Panics in `handle`; accepts any command.
pub struct Panicker;

/// Never produced: `handle` panics first.
#[derive(Serialize, Deserialize)]
pub enum Event {}

impl Aggregate for Panicker {
    const TYPE: &'static str = "panicker";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        panic!("boom: plugin panicked on purpose");
    }

    fn apply(_state: (), event: Event) {
        match event {}
    }
}

meridian_guest::export_aggregate!(Panicker);
