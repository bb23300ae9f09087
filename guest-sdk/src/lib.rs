//! Write Meridian aggregates in Rust and ship them as sandboxed WebAssembly components.
//!
//! An aggregate is a pure decision function: given its current state and a command it
//! decides events (`handle`), and it folds events into state (`apply`). You implement
//! [`Aggregate`] with plain serde types, call [`export_aggregate!`] once, and the same
//! crate then:
//!
//! - builds into a WebAssembly component implementing the `meridian:aggregate` world
//!   (`wit/aggregate.wit` beside this crate's `Cargo.toml`), which the Meridian host runs;
//! - builds natively, so [`testing::AggregateTest`] can exercise it with `cargo test`
//!   through exactly the JSON encoding the component uses.
//!
//! # Example
//!
//! ```
//! use meridian_guest::{Aggregate, Rejection};
//! use serde::{Deserialize, Serialize};
//!
//! /// A counter that refuses to go above a limit.
//! pub struct Counter;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct State {
//!     value: u32,
//! }
//!
//! // Commands arrive as JSON such as `{"type":"Add","by":2}`.
//! #[derive(Serialize, Deserialize)]
//! #[serde(tag = "type")]
//! pub enum Command {
//!     Add { by: u32 },
//!     Reset,
//! }
//!
//! // Stored as event type `Added` with payload `{"by":2}`, and `Reset` with `null`.
//! #[derive(Serialize, Deserialize)]
//! pub enum Event {
//!     Added { by: u32 },
//!     Reset,
//! }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     type State = State;
//!     type Command = Command;
//!     type Event = Event;
//!
//!     fn handle(state: &State, command: Command) -> Result<Vec<Event>, Rejection> {
//!         match command {
//!             // `saturating_add`: a `+` that overflows panics in `cargo test` and
//!             // wraps in a release build, where this check would then pass.
//!             Command::Add { by } if state.value.saturating_add(by) > 10 => {
//!                 Err(Rejection::new(format!("limit is 10, value is {}", state.value)))
//!             }
//!             Command::Add { by } => Ok(vec![Event::Added { by }]),
//!             Command::Reset => Ok(vec![Event::Reset]),
//!         }
//!     }
//!
//!     fn apply(mut state: State, event: Event) -> State {
//!         match event {
//!             Event::Added { by } => state.value += by,
//!             Event::Reset => state.value = 0,
//!         }
//!         state
//!     }
//! }
//!
//! meridian_guest::export_aggregate!(Counter);
//!
//! // Usually in `#[cfg(test)] mod tests`:
//! use meridian_guest::testing::AggregateTest;
//!
//! AggregateTest::<Counter>::given(vec![Event::Added { by: 4 }])
//!     .when(Command::Add { by: 2 })
//!     .then_expect_events(vec![Event::Added { by: 2 }]);
//!
//! AggregateTest::<Counter>::given(vec![Event::Added { by: 9 }])
//!     .when(Command::Add { by: 2 })
//!     .then_expect_rejection("limit is 10");
//!
//! AggregateTest::<Counter>::given(vec![Event::Added { by: 9 }])
//!     .when_json(r#"{"type":"Add","by":4294967295}"#)
//!     .then_expect_rejection("limit is 10");
//! ```
//!
//! # Building
//!
//! The plugin crate needs `crate-type = ["cdylib"]` (the component; `cargo test` still
//! builds and runs the crate's own tests natively) and depends on `meridian-guest` and
//! `serde` (with `derive`). Then:
//!
//! ```text
//! rustup target add wasm32-wasip2        # once
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! produces `target/wasm32-wasip2/release/<crate_name>.wasm`, already a component: the
//! `wasm32-wasip2` target links components itself, so no other tool is needed.
//!
//! Keep the crate type `cdylib` alone: cargo silently skips LTO for a library that is
//! also built as an `rlib`. If another crate must link the aggregate natively (a
//! benchmark, a shared test suite), add `"rlib"` and build the component with
//! `cargo rustc --release --target wasm32-wasip2 --crate-type cdylib` instead.
//!
//! # Event encoding
//!
//! See [`Aggregate`]: an event's serde variant name is its event type and the variant's
//! content is its JSON payload. [`codec`] implements this byte-level contract.

pub mod codec;
pub mod testing;

#[cfg(any(test, all(target_arch = "wasm32", feature = "arena")))]
#[allow(unsafe_code)]
mod arena;
#[cfg(target_arch = "wasm32")]
mod export;

/// Every allocation of the component goes through the arena (see `arena.rs`). Turn the
/// `arena` feature off (`default-features = false`) to use your own allocator.
#[cfg(all(target_arch = "wasm32", feature = "arena"))]
#[global_allocator]
static ARENA: arena::Arena = arena::Arena::new();

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// An aggregate implemented in Rust: the state, the commands it accepts and the events
/// it decides, all as serde types, plus the two pure functions over them.
///
/// # Encoding
///
/// - **State** is JSON (`serde_json`). The host keeps it as opaque bytes; an aggregate
///   with no events yet starts from `State::default()`.
/// - **Commands** are the JSON the caller sends, deserialised into `Command`. An
///   internally tagged enum (`#[serde(tag = "type")]`) gives commands such as
///   `{"type":"Deposit","amount":10}`. JSON that does not deserialise is rejected with
///   serde's message (`invalid command: ...`); `handle` never sees it.
/// - **Events** use serde's default, *externally tagged* enum representation. The
///   variant name is the event type and the variant's content is the payload:
///   `Opened { owner: "alice" }` serialises to `{"Opened":{"owner":"alice"}}`, stored as
///   event type `Opened` with payload `{"owner":"alice"}`; a unit variant `Closed`
///   serialises to `"Closed"`, stored as event type `Closed` with payload `null`.
///   `apply` receives the event rebuilt from that pair. Renaming a variant therefore
///   renames the event type of new events and breaks replay of stored ones: keep old
///   names (e.g. with `#[serde(alias = "...")]`) or bump [`Aggregate::SCHEMA_VERSION`].
///
/// # Determinism
///
/// `handle` and `apply` must be pure: the host may call them again for the same input,
/// and replays events through `apply` to rebuild state. Inside the sandbox there are no
/// files, network or environment, clocks and randomness are fixed, and nothing kept
/// between calls may be relied upon.
pub trait Aggregate {
    /// The aggregate type, e.g. `bank-account`; must match the name it is uploaded under.
    const TYPE: &'static str;

    /// The version of the state and event schema, for the author's own migrations.
    /// The host stores it as a signed 32-bit number and refuses an upload whose version
    /// is above 2^31 - 1.
    const SCHEMA_VERSION: u32 = 1;

    /// The state folded from events, stored as JSON; `Default` is the state before any
    /// event.
    type State: Default + Serialize + DeserializeOwned;

    /// The commands `handle` decides on, deserialised from the caller's JSON.
    type Command: DeserializeOwned;

    /// The events `handle` decides and `apply` folds; an externally tagged serde enum.
    type Event: Serialize + DeserializeOwned;

    /// Decides the events for `command` given `state`, or refuses it.
    ///
    /// Returning no events is allowed (the command changes nothing).
    fn handle(state: &Self::State, command: Self::Command) -> Result<Vec<Self::Event>, Rejection>;

    /// Folds one event into the state.
    ///
    /// Cannot fail: events are facts that `handle` already decided, so `apply` must
    /// accept any event it could have produced.
    fn apply(state: Self::State, event: Self::Event) -> Self::State;
}

/// A command refused by [`Aggregate::handle`]; the message is shown to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    message: String,
    fault: bool,
}

impl Rejection {
    /// A rejection with this message, e.g. `Rejection::new("amount must be positive")`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fault: false,
        }
    }

    /// Not a refusal of the command but a bug in the aggregate: an event it decided or
    /// the state it left cannot be stored and read back. The component traps on it
    /// (the contract's rule), so the host reports a plugin fault, not a rejection.
    pub(crate) fn fault(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fault: true,
        }
    }

    /// Whether this is the aggregate's own bug rather than a refusal of the command
    /// (see [`codec::execute`]): the component traps instead of returning it.
    pub fn is_fault(&self) -> bool {
        self.fault
    }

    /// The message shown to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message, without copying it.
    pub fn into_message(self) -> String {
        self.message
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

impl From<&str> for Rejection {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<String> for Rejection {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

/// Exports an [`Aggregate`] as the component's `meridian:aggregate` world.
///
/// Invoke it once per plugin crate, at the crate root or in any module:
///
/// ```
/// # use meridian_guest::{Aggregate, Rejection};
/// # use serde::{Deserialize, Serialize};
/// # pub struct BankAccount;
/// # #[derive(Default, Serialize, Deserialize)]
/// # pub struct State { balance: i64 }
/// # #[derive(Serialize, Deserialize)]
/// # #[serde(tag = "type")]
/// # pub enum Command { Deposit { amount: i64 } }
/// # #[derive(Serialize, Deserialize)]
/// # pub enum Event { Opened { owner: String }, Deposited { amount: i64 } }
/// # impl Aggregate for BankAccount {
/// #     const TYPE: &'static str = "bank-account";
/// #     type State = State;
/// #     type Command = Command;
/// #     type Event = Event;
/// #     fn handle(_: &State, Command::Deposit { amount }: Command) -> Result<Vec<Event>, Rejection> {
/// #         if amount <= 0 { return Err(format!("amount must be positive, got {amount}").into()) }
/// #         Ok(vec![Event::Deposited { amount }])
/// #     }
/// #     fn apply(mut state: State, event: Event) -> State {
/// #         if let Event::Deposited { amount } = event { state.balance += amount }
/// #         state
/// #     }
/// # }
/// meridian_guest::export_aggregate!(BankAccount);
/// ```
///
/// On `wasm32` targets it generates the component exports (`describe`, `handle`,
/// `apply`), which go through [`codec`]. On other targets it expands to nothing, so the
/// same crate builds natively for tests and for use as a library.
#[macro_export]
macro_rules! export_aggregate {
    ($aggregate:ty) => {
        // The generated exports are `extern "C"` functions with `#[unsafe(export_name)]`;
        // the allow keeps crates that deny `unsafe_code` building.
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            type MeridianAggregateExport = $crate::__private::Export<$aggregate>;
            $crate::__private::export_world!(
                MeridianAggregateExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// What [`export_aggregate!`] and hand-written bindings need, re-exported so a plugin
/// crate depends on `meridian-guest` alone. Not a stable API.
#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::export::{Export, bindings, export_world};
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;
}
