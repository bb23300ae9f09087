//! Test plugin `bad-output`: on request, decides events the host cannot store or carry,
//! from commands that hold nothing of the kind: a payload with U+0000 in a string
//! (PostgreSQL's `jsonb` refuses it), an event type with a line break (it would end
//! a NATS header block), or a small payload that PostgreSQL prints back hundreds of
//! times larger (numbers such as 1e300, which it prints with every digit). The host
//! must fail that command alone, naming the cause, and keep every other command going.
//! It also decides, on request, as many notes as the caps allow, for an answer larger
//! than one NATS message, and leaks memory from call to call (as a plugin keeping
//! things in a `static` would), in `handle` or in `apply` (so on every replay), which
//! the host must not let fail a later command.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// Writes notes; counts them.
pub struct BadOutput;

/// `{"type":"Write","text":"…","nul":false}`, `{"type":"BreakLine"}`,
/// `{"type":"Huge","count":3}`, `{"type":"Repeat","text":"…","count":3}`,
/// `{"type":"NotANumber"}`, `{"type":"Leak","megabytes":8}` or
/// `{"type":"LeakOnApply","megabytes":8}`.
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
    /// Decide an event holding `count` numbers 1e300: a few bytes each as written, 301
    /// as PostgreSQL prints them.
    Huge {
        /// How many.
        count: u32,
    },
    /// Write `text` as `count` notes.
    Repeat {
        /// The note.
        text: String,
        /// How many times.
        count: u32,
    },
    /// Decide a measurement of NaN, which JSON writes as `null`: an event that does
    /// not read back, the aggregate's own bug.
    NotANumber,
    /// Keep `megabytes` of memory for good, and write a note.
    Leak {
        /// How much.
        megabytes: usize,
    },
    /// Decide an event whose `apply` keeps `megabytes` of memory for good, each time
    /// it is applied.
    LeakOnApply {
        /// How much.
        megabytes: usize,
    },
}

/// What was written.
#[derive(Clone, Serialize, Deserialize)]
pub enum Event {
    /// A note.
    Written {
        /// The note as decided.
        text: String,
    },
    /// An event whose type is `Line` and `Break` on two lines.
    #[serde(rename = "Line\nBreak")]
    LineBreak,
    /// Large numbers.
    Measured {
        /// Each 1e300.
        values: Vec<f64>,
    },
    /// Applied, keeps `megabytes` of memory for good.
    Leaking {
        /// How much.
        megabytes: usize,
    },
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
        Ok(match command {
            Command::Write { mut text, nul } => {
                if nul {
                    text.push('\0');
                }
                vec![Event::Written { text }]
            }
            Command::BreakLine => vec![Event::LineBreak],
            Command::Huge { count } => vec![Event::Measured {
                values: vec![1e300; count as usize],
            }],
            Command::NotANumber => vec![Event::Measured {
                values: vec![f64::NAN],
            }],
            Command::Repeat { text, count } => vec![Event::Written { text }; count as usize],
            Command::LeakOnApply { megabytes } => vec![Event::Leaking { megabytes }],
            Command::Leak { megabytes } => {
                std::mem::forget(std::hint::black_box(vec![1_u8; megabytes << 20]));
                vec![Event::Written {
                    text: "leaked".into(),
                }]
            }
        })
    }

    fn apply(state: State, event: Event) -> State {
        if let Event::Leaking { megabytes } = event {
            std::mem::forget(std::hint::black_box(vec![1_u8; megabytes << 20]));
        }
        State {
            notes: state.notes + 1,
        }
    }
}

meridian_guest::export_aggregate!(BadOutput);
