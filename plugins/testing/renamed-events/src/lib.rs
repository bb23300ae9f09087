//! Test plugin `renamed-events`: a new version of `bank-account` whose author renamed
//! the events (`Opened` → `AccountOpened`) without keeping the old names readable. It
//! cannot apply the events earlier versions stored, so the host must refuse it as a new
//! version unless forced.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// `bank-account`, with renamed events.
pub struct RenamedEvents;

/// `{"type":"Open","owner":"…"}`.
#[derive(Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// Open the account.
    Open {
        /// Whose it is.
        owner: String,
    },
}

/// The renamed events; stored `Opened`/`Deposited`/`Withdrawn` no longer parse.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// Was `Opened`.
    AccountOpened {
        /// Whose it is.
        owner: String,
    },
}

/// Just the owner.
#[derive(Default, Serialize, Deserialize)]
pub struct State {
    /// Whose it is, once opened.
    pub owner: Option<String>,
}

impl Aggregate for RenamedEvents {
    const TYPE: &'static str = "bank-account";
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(_state: &State, command: Command) -> Result<Vec<Event>, Rejection> {
        let Command::Open { owner } = command;
        Ok(vec![Event::AccountOpened { owner }])
    }

    fn apply(_state: State, event: Event) -> State {
        let Event::AccountOpened { owner } = event;
        State { owner: Some(owner) }
    }
}

meridian_guest::export_aggregate!(RenamedEvents);
