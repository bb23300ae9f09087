//! Hostile test plugin `memory-bomb`: `handle` allocates and touches memory until the
//! host's memory limit makes the allocation fail (and the instance trap).

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Grows its heap in `handle` forever; accepts any command.
pub struct MemoryBomb;

/// Never produced: `handle` does not return.
#[derive(Serialize, Deserialize)]
pub enum Event {}

const CHUNK: usize = 1 << 20;

impl Aggregate for MemoryBomb {
    const TYPE: &'static str = "memory-bomb";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        loop {
            // A non-zero fill writes every byte, so the memory is really used even on
            // hosts that commit linear memory lazily (a zeroed chunk might not be).
            chunks.push(std::hint::black_box(vec![1_u8; CHUNK]));
        }
    }

    fn apply(_state: (), event: Event) {
        match event {}
    }
}

meridian_guest::export_aggregate!(MemoryBomb);
