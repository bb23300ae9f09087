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
const PAGE: usize = 4096;

impl Aggregate for MemoryBomb {
    const TYPE: &'static str = "memory-bomb";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            // Writing every page makes the memory really used, even on hosts that
            // commit linear memory lazily.
            for index in 0..CHUNK {
                chunk.push(if index % PAGE == 0 { 1 } else { 0 });
            }
            chunks.push(std::hint::black_box(chunk));
        }
    }

    fn apply(_state: (), event: Event) {
        match event {}
    }
}

meridian_guest::export_aggregate!(MemoryBomb);
