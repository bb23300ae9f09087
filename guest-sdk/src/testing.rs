//! A native given/when/then harness for aggregates.
//!
//! ```
//! use meridian_guest::testing::AggregateTest;
//! # use meridian_guest::{Aggregate, Rejection};
//! # use serde::{Deserialize, Serialize};
//! # pub struct BankAccount;
//! # #[derive(Default, Serialize, Deserialize)]
//! # pub struct State { balance: i64 }
//! # #[derive(Serialize, Deserialize)]
//! # #[serde(tag = "type")]
//! # pub enum Command { Deposit { amount: i64 } }
//! # #[derive(Serialize, Deserialize)]
//! # pub enum Event { Opened { owner: String }, Deposited { amount: i64 } }
//! # impl Aggregate for BankAccount {
//! #     const TYPE: &'static str = "bank-account";
//! #     type State = State;
//! #     type Command = Command;
//! #     type Event = Event;
//! #     fn handle(_: &State, Command::Deposit { amount }: Command) -> Result<Vec<Event>, Rejection> {
//! #         if amount <= 0 { return Err(format!("amount must be positive, got {amount}").into()) }
//! #         Ok(vec![Event::Deposited { amount }])
//! #     }
//! #     fn apply(mut state: State, event: Event) -> State {
//! #         if let Event::Deposited { amount } = event { state.balance += amount }
//! #         state
//! #     }
//! # }
//!
//! let state = AggregateTest::<BankAccount>::given(vec![Event::Opened { owner: "alice".into() }])
//!     .when(Command::Deposit { amount: 10 })
//!     .then_expect_events(vec![Event::Deposited { amount: 10 }]);
//! assert_eq!(state.balance, 10);
//!
//! AggregateTest::<BankAccount>::new()
//!     .when_json(r#"{"type":"Deposit","amount":0}"#)
//!     .then_expect_rejection("amount must be positive");
//! ```
//!
//! Everything goes through [`codec`], as in the component: the given events
//! are encoded and applied to JSON state, the command is serialised to JSON and decoded
//! again, and the decided events are encoded, compared as JSON and applied. A serde
//! attribute that breaks the round trip therefore fails `cargo test` rather than a
//! deployed plugin.
//!
//! Failures panic with the expected and actual values as JSON, so the harness suits
//! `#[test]` functions directly.

use crate::codec::{self, EncodedEvent};
use crate::{Aggregate, Rejection};
use serde::Serialize;
use serde_json::Value;
use std::marker::PhantomData;

/// An aggregate with some history, about to receive a command.
pub struct AggregateTest<A: Aggregate> {
    history: Vec<Value>,
    state: Vec<u8>,
    aggregate: PhantomData<A>,
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate with no events yet (empty state bytes).
    pub fn new() -> Self {
        Self {
            history: Vec::new(),
            state: Vec::new(),
            aggregate: PhantomData,
        }
    }

    /// An aggregate that has already recorded `events`, applied in order.
    ///
    /// # Panics
    ///
    /// An event does not survive the encode/apply round trip.
    #[track_caller]
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut test = Self::new();
        for event in events {
            let encoded = or_panic(codec::encode_event(&event), "given event cannot be encoded");
            // Decided events are checked as the command decides them (`when_json`).
            let tagged_event = tagged(&encoded.0, &encoded.1);
            if let Err(why) = storable(&encoded.0, &tagged_event) {
                panic!("given event {tagged_event} would be refused by the host: {why}");
            }
            test.record(encoded, "given");
        }
        test
    }

    /// Sends `command`, serialised to JSON as a caller would send it.
    ///
    /// # Panics
    ///
    /// The command cannot be serialised.
    #[track_caller]
    pub fn when(self, command: A::Command) -> Outcome<A>
    where
        A::Command: Serialize,
    {
        let json = or_panic(
            serde_json::to_string(&command).map_err(|error| error.to_string()),
            "command cannot be serialised",
        );
        self.when_json(&json)
    }

    /// Sends the command JSON as is, e.g. to test how malformed input is rejected.
    pub fn when_json(self, command: &str) -> Outcome<A> {
        let result = codec::handle::<A>(&self.state, command.as_bytes());
        self.check_execute_agrees(command, &result);
        if let Err(fault) = &result
            && fault.is_fault()
        {
            panic!(
                "the component would trap on {command} (a plugin fault, `plugin_trapped`), \
                 with nothing written: {}\n{}",
                fault.message(),
                self.context(command)
            );
        }
        if let Ok(events) = &result {
            let refused = within_output_caps(events).and_then(|()| {
                events.iter().try_for_each(|(event_type, payload)| {
                    storable(event_type, &tagged(event_type, payload))
                })
            });
            if let Err(why) = refused {
                panic!(
                    "the host would refuse {command} as `plugin_invalid_output`, with \
                     nothing written: {why}\n{}",
                    self.context(command)
                );
            }
        }
        Outcome {
            test: self,
            command: command.to_owned(),
            result,
        }
    }

    /// The host runs [`codec::execute`]; it must give what `handle` and then `apply`
    /// give, or a test here would pass for code that behaves differently when hosted.
    #[track_caller]
    fn check_execute_agrees(&self, command: &str, handled: &Result<Vec<EncodedEvent>, Rejection>) {
        let executed = codec::execute::<A>(&self.state, command.as_bytes());
        match (handled, executed) {
            (Ok(events), Ok((executed_events, executed_state))) => {
                assert_eq!(
                    events, &executed_events,
                    "`execute` decided other events than `handle` for {command}"
                );
                let mut state = self.state.clone();
                for (event_type, payload) in events {
                    match codec::apply::<A>(&state, event_type, payload) {
                        Ok(next) => state = next,
                        // `record` reports this with the event and the state.
                        Err(_) => return,
                    }
                }
                // Compared as JSON values: a map's key order may differ between encodings.
                let value = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).ok();
                assert_eq!(
                    value(&state),
                    value(&executed_state),
                    "`execute` left another state than `handle` and `apply` for {command}"
                );
            }
            (Err(rejection), Err(executed)) => assert_eq!(
                rejection, &executed,
                "`execute` rejected {command} differently than `handle`"
            ),
            (Ok(_), Err(refused)) => panic!(
                "the component would trap on {command} (a plugin fault, `plugin_trapped`), \
                 with nothing written: {}",
                refused.message()
            ),
            (handled, executed) => panic!(
                "`handle` and `execute` disagree on {command}: {handled:?} vs {:?}",
                executed.map(|(events, _)| events)
            ),
        }
    }

    /// Applies one encoded event to the JSON state, as the host does after `handle`.
    #[track_caller]
    fn record(&mut self, (event_type, payload): EncodedEvent, stage: &str) {
        let event = tagged(&event_type, &payload);
        match codec::apply::<A>(&self.state, &event_type, &payload) {
            Ok(state) if state.len() > DEFAULT_MAX_OUTPUT_BYTES => panic!(
                "the state after {stage} event {event} would be refused by the host: {} \
                 bytes, over the default limit of {DEFAULT_MAX_OUTPUT_BYTES}",
                state.len()
            ),
            Ok(state) => self.state = state,
            Err(error) => panic!(
                "{stage} event {event} cannot be applied: {error}\n   state: {}",
                String::from_utf8_lossy(&self.state)
            ),
        }
        self.history.push(event);
    }
}

impl<A: Aggregate> Default for AggregateTest<A> {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of a command, to be checked with one of the `then_` methods.
#[must_use = "an outcome checks nothing until a `then_` method is called"]
pub struct Outcome<A: Aggregate> {
    test: AggregateTest<A>,
    command: String,
    result: Result<Vec<EncodedEvent>, Rejection>,
}

impl<A: Aggregate> Outcome<A> {
    /// Asserts that the command decided exactly `expected` (compared as encoded JSON),
    /// applies them, and returns the resulting state for further checks.
    ///
    /// # Panics
    ///
    /// The command was rejected, decided other events, or a decided event cannot be
    /// applied.
    #[track_caller]
    pub fn then_expect_events(self, expected: Vec<A::Event>) -> A::State {
        let mut expected_json = Vec::with_capacity(expected.len());
        for event in &expected {
            let (event_type, payload) = or_panic(
                codec::encode_event(event),
                "expected event cannot be encoded",
            );
            expected_json.push(tagged(&event_type, &payload));
        }
        let expected = expected_json;
        let events = match self.result {
            Ok(events) => events,
            Err(rejection) => panic!(
                "expected events {}\nbut the command was rejected: {rejection}\n{}",
                json_list(&expected),
                self.test.context(&self.command)
            ),
        };
        let actual: Vec<Value> = events
            .iter()
            .map(|(event_type, payload)| tagged(event_type, payload))
            .collect();
        if actual != expected {
            panic!(
                "events differ\nexpected: {}\n  actual: {}\n{}",
                json_list(&expected),
                json_list(&actual),
                self.test.context(&self.command)
            );
        }
        let mut test = self.test;
        for event in events {
            test.record(event, "decided");
        }
        or_panic(
            codec::decode_state::<A>(&test.state),
            "state cannot be decoded",
        )
    }

    /// Asserts that the command was rejected with a message containing `substring`.
    ///
    /// # Panics
    ///
    /// The command was accepted, or rejected with another message.
    #[track_caller]
    pub fn then_expect_rejection(self, substring: &str) -> Rejection {
        match self.result {
            Err(rejection) if rejection.message().contains(substring) => rejection,
            Err(rejection) => panic!(
                "expected a rejection containing {substring:?}\nbut it was rejected with: {:?}\n{}",
                rejection.message(),
                self.test.context(&self.command)
            ),
            Ok(events) => {
                let actual: Vec<Value> = events
                    .iter()
                    .map(|(event_type, payload)| tagged(event_type, payload))
                    .collect();
                panic!(
                    "expected a rejection containing {substring:?}\nbut the command decided: {}\n{}",
                    json_list(&actual),
                    self.test.context(&self.command)
                )
            }
        }
    }
}

impl<A: Aggregate> AggregateTest<A> {
    /// What a failure message needs to reproduce the case.
    fn context(&self, command: &str) -> String {
        format!(
            "   given: {}\n    when: {command}\n   state: {}",
            json_list(&self.history),
            String::from_utf8_lossy(&self.state)
        )
    }
}

/// An encoded event in serde's externally tagged form, the form authors write in Rust.
/// A payload that is not JSON is shown as a string so the failure still names it.
fn tagged(event_type: &str, payload: &[u8]) -> Value {
    let payload = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Null) => return Value::String(event_type.to_owned()),
        Ok(payload) => payload,
        Err(_) => Value::String(String::from_utf8_lossy(payload).into_owned()),
    };
    let mut map = serde_json::Map::with_capacity(1);
    map.insert(event_type.to_owned(), payload);
    Value::Object(map)
}

/// How many events one command may decide under the host's default limits (an
/// operator may set another `max_events_per_call` for a type).
pub const DEFAULT_MAX_EVENTS_PER_CALL: usize = 1_000;

/// How many bytes the events one command decides may take under the host's default
/// limits, event types and compact payloads together; one state is held to the same
/// (an operator may set another `max_output_bytes` for a type).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// The host's default caps on what one command decides. (The host also counts the
/// bytes as PostgreSQL prints them, which are more when numbers have exponents:
/// `1e300` comes back with every digit.)
fn within_output_caps(events: &[EncodedEvent]) -> Result<(), String> {
    if events.len() > DEFAULT_MAX_EVENTS_PER_CALL {
        return Err(format!(
            "{} events, over the default limit of {DEFAULT_MAX_EVENTS_PER_CALL} per command",
            events.len()
        ));
    }
    let bytes: usize = events
        .iter()
        .map(|(t, payload)| t.len() + payload.len())
        .sum();
    if bytes > DEFAULT_MAX_OUTPUT_BYTES {
        return Err(format!(
            "{bytes} bytes of events, over the default limit of {DEFAULT_MAX_OUTPUT_BYTES}"
        ));
    }
    Ok(())
}

/// What the host refuses in a decided event (it fails the call as
/// `plugin_invalid_output`): an event type that is empty, over 256 bytes, holds a
/// control character (it travels in NATS headers) or starts with `$` (reserved for
/// Meridian's own events), and U+0000 in a string of the payload (PostgreSQL's
/// `jsonb` cannot store it). Caught here, it fails `cargo test` rather than a command
/// in production.
fn storable(event_type: &str, event: &Value) -> Result<(), String> {
    if event_type.is_empty() || event_type.len() > 256 {
        return Err(format!(
            "an event type must be 1 to 256 bytes, this one is {}",
            event_type.len()
        ));
    }
    if event_type.starts_with('$') {
        return Err(format!(
            "the event type {event_type:?} starts with `$`, which is reserved for \
             Meridian's own events"
        ));
    }
    if event_type.chars().any(char::is_control) {
        return Err(format!(
            "the event type {event_type:?} holds a control character"
        ));
    }
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    if has_nul(event) {
        return Err("a string holds U+0000, which PostgreSQL cannot store".into());
    }
    Ok(())
}

/// Unwraps `result`, blaming the caller's test line rather than this module.
#[track_caller]
fn or_panic<T>(result: Result<T, String>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error}"),
    }
}

fn json_list(events: &[Value]) -> String {
    Value::Array(events.to_vec()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    struct Switch;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct State {
        on: bool,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type")]
    enum Command {
        Flip,
    }

    #[derive(Serialize, Deserialize)]
    enum Event {
        On,
        Off { reason: String },
    }

    impl Aggregate for Switch {
        const TYPE: &'static str = "switch";
        type State = State;
        type Command = Command;
        type Event = Event;

        fn handle(state: &State, Command::Flip: Command) -> Result<Vec<Event>, Rejection> {
            Ok(vec![if state.on {
                Event::Off {
                    reason: "flipped".into(),
                }
            } else {
                Event::On
            }])
        }

        fn apply(_state: State, event: Event) -> State {
            State {
                on: matches!(event, Event::On),
            }
        }
    }

    #[test]
    fn returns_the_state_after_the_decided_events() {
        let state = AggregateTest::<Switch>::new()
            .when(Command::Flip)
            .then_expect_events(vec![Event::On]);
        assert_eq!(state, State { on: true });
    }

    #[test]
    #[should_panic(
        expected = "events differ\nexpected: [\"On\"]\n  actual: [{\"Off\":{\"reason\":\"flipped\"}}]"
    )]
    fn shows_both_event_lists_as_json() {
        AggregateTest::<Switch>::given(vec![Event::On])
            .when(Command::Flip)
            .then_expect_events(vec![Event::On]);
    }

    #[test]
    #[should_panic(
        expected = "expected a rejection containing \"nope\"\nbut the command decided: [\"On\"]"
    )]
    fn shows_the_events_when_a_rejection_was_expected() {
        AggregateTest::<Switch>::new()
            .when(Command::Flip)
            .then_expect_rejection("nope");
    }

    #[test]
    #[should_panic(expected = "would be refused by the host: a string holds U+0000")]
    fn an_event_the_host_cannot_store_fails_the_test() {
        AggregateTest::<Switch>::given(vec![Event::Off {
            reason: "nul\0".into(),
        }]);
    }

    /// Decides `count` events, of a type the host reserves when `reserved`.
    struct Burst;

    #[derive(Deserialize, Serialize)]
    struct Emit {
        count: usize,
        reserved: bool,
        bytes: usize,
    }

    #[derive(Serialize, Deserialize)]
    enum BurstEvent {
        Noted(String),
        #[serde(rename = "$Audit")]
        Audit,
    }

    impl Aggregate for Burst {
        const TYPE: &'static str = "burst";
        type State = State;
        type Command = Emit;
        type Event = BurstEvent;

        fn handle(_: &State, emit: Emit) -> Result<Vec<BurstEvent>, Rejection> {
            Ok((0..emit.count)
                .map(|_| match emit.reserved {
                    true => BurstEvent::Audit,
                    false => BurstEvent::Noted("x".repeat(emit.bytes)),
                })
                .collect())
        }

        fn apply(state: State, _: BurstEvent) -> State {
            state
        }
    }

    fn emit(count: usize, reserved: bool, bytes: usize) {
        AggregateTest::<Burst>::new()
            .when(Emit {
                count,
                reserved,
                bytes,
            })
            .then_expect_rejection("never");
    }

    #[test]
    #[should_panic(expected = "starts with `$`, which is reserved")]
    fn a_reserved_event_type_fails_the_test() {
        emit(1, true, 0);
    }

    #[test]
    #[should_panic(expected = "1001 events, over the default limit of 1000 per command")]
    fn more_events_than_the_host_takes_from_one_command_fail_the_test() {
        emit(DEFAULT_MAX_EVENTS_PER_CALL + 1, false, 0);
    }

    #[test]
    #[should_panic(expected = "bytes of events, over the default limit of 1048576")]
    fn more_bytes_than_the_host_takes_from_one_command_fail_the_test() {
        emit(2, false, DEFAULT_MAX_OUTPUT_BYTES / 2);
    }

    /// Within the caps, the same command is judged on its events.
    #[test]
    #[should_panic(expected = "expected a rejection containing \"never\"")]
    fn a_command_within_the_caps_is_judged_on_its_events() {
        emit(DEFAULT_MAX_EVENTS_PER_CALL, false, 100);
    }

    #[test]
    fn event_types_that_cannot_travel_are_named() {
        let event = serde_json::json!("x");
        assert_eq!(storable("Deposited", &event), Ok(()));
        for bad in ["", "Line\nBreak", &"x".repeat(257)] {
            assert!(storable(bad, &event).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_command_is_a_rejection() {
        let rejection = AggregateTest::<Switch>::new()
            .when_json(r#"{"type":"Push"}"#)
            .then_expect_rejection("unknown variant `Push`");
        assert!(
            rejection.message().starts_with("invalid command: "),
            "{rejection}"
        );
    }

    #[test]
    #[should_panic(
        expected = "given: [\"On\"]\n    when: {\"type\":\"Push\"}\n   state: {\"on\":true}"
    )]
    fn failure_shows_how_to_reproduce() {
        AggregateTest::<Switch>::given(vec![Event::On])
            .when_json(r#"{"type":"Push"}"#)
            .then_expect_events(vec![]);
    }
}
