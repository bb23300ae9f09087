//! Test plugin `nul-writer`: decides events whose payload PostgreSQL's `jsonb` cannot
//! store (U+0000 in a string) when asked to, from a command that holds none. The host
//! must fail that command alone, naming the cause, and keep every other command going.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// Writes notes; counts them.
pub struct NulWriter;

/// `{"type":"Write","text":"…","nul":false}`.
#[derive(Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// Write `text`, with a U+0000 appended when `nul` is set.
    Write {
        /// The note.
        text: String,
        /// Append U+0000 (serialised as `\u0000`).
        #[serde(default)]
        nul: bool,
    },
}

/// What was written.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// A note.
    Written {
        /// The note as decided.
        text: String,
    },
}

/// How many notes were written.
#[derive(Default, Serialize, Deserialize)]
pub struct State {
    /// Notes written.
    pub notes: u64,
}

impl Aggregate for NulWriter {
    const TYPE: &'static str = "nul-writer";
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(_state: &State, command: Command) -> Result<Vec<Event>, Rejection> {
        let Command::Write { mut text, nul } = command;
        if nul {
            text.push('\0');
        }
        Ok(vec![Event::Written { text }])
    }

    fn apply(state: State, _event: Event) -> State {
        State {
            notes: state.notes + 1,
        }
    }
}

meridian_guest::export_aggregate!(NulWriter);
