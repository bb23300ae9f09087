//! Hostile test plugin `spin-loop`: `handle` never returns, so the host's CPU deadline
//! (epoch interruption or fuel) must stop it.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Spins in `handle` forever; accepts any command.
pub struct SpinLoop;

/// Never produced: `handle` does not return.
#[derive(Serialize, Deserialize)]
pub enum Event {}

impl Aggregate for SpinLoop {
    const TYPE: &'static str = "spin-loop";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        let mut counter = 0_u64;
        loop {
            // `black_box` keeps the optimiser from proving the loop pointless and deleting it.
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }

    fn apply(_state: (), event: Event) {
        match event {}
    }
}

meridian_guest::export_aggregate!(SpinLoop);
