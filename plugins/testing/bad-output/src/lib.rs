//! Test plugin `bad-output`: on request, decides events the host cannot store or carry,
//! from commands that hold nothing of the kind: a payload with U+0000 in a string
//! (PostgreSQL's `jsonb` refuses it) or an event type with a line break (it would end
//! a NATS header block). The host must fail that command alone, naming the cause, and
//! keep every other command going.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// Writes notes; counts them.
pub struct BadOutput;

/// `{"type":"Write","text":"…","nul":false}` or `{"type":"BreakLine"}`.
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
    /// Decide an event whose type holds a line break.
    BreakLine,
}

/// What was written.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// A note.
    Written {
        /// The note as decided.
        text: String,
    },
    /// An event whose type is `Line` and `Break` on two lines.
    #[serde(rename = "Line\nBreak")]
    LineBreak,
}

/// How many notes were written.
#[derive(Default, Serialize, Deserialize)]
pub struct State {
    /// Notes written.
    pub notes: u64,
}

impl Aggregate for BadOutput {
    const TYPE: &'static str = "bad-output";
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(_state: &State, command: Command) -> Result<Vec<Event>, Rejection> {
        Ok(vec![match command {
            Command::Write { mut text, nul } => {
                if nul {
                    text.push('\0');
                }
                Event::Written { text }
            }
            Command::BreakLine => Event::LineBreak,
        }])
    }

    fn apply(state: State, _event: Event) -> State {
        State {
            notes: state.notes + 1,
        }
    }
}

meridian_guest::export_aggregate!(BadOutput);
