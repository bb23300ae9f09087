//! The byte-level contract between an [`Aggregate`] and the host.
//!
//! These functions are what the component's exports run, and they are plain Rust: the
//! native test harness and the host's benchmark call them directly, so a native run
//! exercises exactly the encoding the component uses.
//!
//! - State is JSON; empty state bytes mean `State::default()`.
//! - A command is JSON; one that does not deserialise is a [`Rejection`] whose message
//!   starts with `invalid command: ` followed by serde's explanation.
//! - An event is an `(event type, payload)` pair: the serde variant name of
//!   [`Aggregate::Event`] and its content as JSON (`null` for a unit variant).

use crate::{Aggregate, Rejection};
use serde::Serialize;

/// An encoded event: its type (the serde variant name) and its JSON payload.
pub type EncodedEvent = (String, Vec<u8>);

/// What a component reports about itself through `describe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Description {
    /// [`Aggregate::TYPE`].
    pub aggregate_type: &'static str,
    /// [`Aggregate::SCHEMA_VERSION`].
    pub schema_version: u32,
}

/// The `describe` export: the aggregate's type and schema version.
pub fn describe<A: Aggregate>() -> Description {
    Description {
        aggregate_type: A::TYPE,
        schema_version: A::SCHEMA_VERSION,
    }
}

/// The `handle` export: decodes `state` and `command`, runs [`Aggregate::handle`] and
/// encodes the events it decides.
///
/// Undecodable input is a rejection rather than a panic, because a panic traps the
/// component and the caller would learn nothing about what was wrong with the command.
pub fn handle<A: Aggregate>(state: &[u8], command: &[u8]) -> Result<Vec<EncodedEvent>, Rejection> {
    decide::<A>(state, command).map(|(_, encoded)| encoded)
}

/// What [`handle`] and [`execute`] share: decodes the input, runs
/// [`Aggregate::handle`] and encodes the events; gives the decoded state and the
/// encoded events.
fn decide<A: Aggregate>(
    state: &[u8],
    command: &[u8],
) -> Result<(A::State, Vec<EncodedEvent>), Rejection> {
    let state = decode_state::<A>(state).map_err(Rejection::new)?;
    let command: A::Command = serde_json::from_slice(command)
        .map_err(|error| Rejection::new(format!("invalid command: {error}")))?;
    let events = A::handle(&state, command)?;
    let encoded = events
        .iter()
        .map(|event| {
            encode_event(event).map_err(|error| Rejection::fault(format!("aggregate bug: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((state, encoded))
}

/// What [`execute`] decided: the encoded events and the encoded state after them.
pub type Decision = (Vec<EncodedEvent>, Vec<u8>);

/// The `execute` export: [`handle`], then [`apply`] of each decided event, in one pass.
///
/// Gives the same events and state as those calls would, with less work: the state is
/// decoded and encoded once.
///
/// The events applied are decoded back from the JSON they are stored as, as a replay
/// will decode them; each after the first is applied to the state read back from its
/// JSON, as a replay passes it from one event to the next (so a `#[serde(skip)]` field
/// that `apply` reads gives the state a replay gives); and the new state must decode
/// back from its JSON, as the next command will decode it. A value that does not
/// survive the trip (a NaN, which JSON writes as `null`; uneven custom impls) would
/// otherwise be stored, and every later command and every replay of the aggregate would
/// fail on it: the command fails instead, with nothing written, as a fault of the
/// aggregate ([`Rejection::is_fault`]), on which the component traps.
pub fn execute<A: Aggregate>(state: &[u8], command: &[u8]) -> Result<Decision, Rejection> {
    let (mut state, encoded) = decide::<A>(state, command)?;
    for (n, (event_type, payload)) in encoded.iter().enumerate() {
        if n > 0 {
            state = encode_state(&state)
                .and_then(|json| decode_state::<A>(&json))
                .map_err(|error| {
                    Rejection::fault(format!(
                        "aggregate bug: the state after a decided event does not read back \
                         from its JSON, so the next event could not be replayed on it: {error}"
                    ))
                })?;
        }
        let event = decode_event::<A::Event>(event_type, payload).map_err(|error| {
            Rejection::fault(format!(
                "aggregate bug: a decided event does not read back from the JSON it is \
                 stored as, so it could not be replayed: {error}"
            ))
        })?;
        state = A::apply(state, event);
    }
    let state = encode_state(&state)
        .map_err(|error| Rejection::fault(format!("aggregate bug: {error}")))?;
    decode_state::<A>(&state).map_err(|error| {
        Rejection::fault(format!(
            "aggregate bug: the state after the events does not read back from its JSON, so \
             the next command could not use it: {error}"
        ))
    })?;
    Ok((encoded, state))
}

/// The `apply` export: decodes `state` and the event, runs [`Aggregate::apply`] and
/// encodes the new state.
///
/// # Errors
///
/// The state or payload is not valid JSON for the aggregate's types, or the event type
/// is not a variant of [`Aggregate::Event`].
pub fn apply<A: Aggregate>(
    state: &[u8],
    event_type: &str,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let state = decode_state::<A>(state)?;
    let event = decode_event::<A::Event>(event_type, payload)?;
    encode_state(&A::apply(state, event))
}

/// Decodes state bytes; empty bytes are the state before any event.
///
/// # Errors
///
/// The bytes are not JSON for `A::State`.
pub fn decode_state<A: Aggregate>(state: &[u8]) -> Result<A::State, String> {
    if state.is_empty() {
        return Ok(A::State::default());
    }
    serde_json::from_slice(state).map_err(|error| format!("invalid state: {error}"))
}

/// Encodes state as JSON bytes.
///
/// # Errors
///
/// The state's `Serialize` implementation fails (e.g. a map with non-string keys).
pub fn encode_state<S: Serialize>(state: &S) -> Result<Vec<u8>, String> {
    serde_json::to_vec(state).map_err(|error| format!("cannot encode state: {error}"))
}

/// Splits an externally tagged event into its type and JSON payload: `{"Opened":{..}}`
/// becomes `("Opened", b"{..}")` and `"Closed"` becomes `("Closed", b"null")`.
///
/// # Errors
///
/// The event does not serialise as an externally tagged enum variant.
pub fn encode_event<E: Serialize>(event: &E) -> Result<EncodedEvent, String> {
    // Serialising straight to bytes, rather than through `serde_json::Value`, keeps the
    // payload's fields in declaration order (`Value` maps sort their keys).
    let json =
        serde_json::to_vec(event).map_err(|error| format!("cannot encode event: {error}"))?;
    let not_a_variant = || {
        format!(
            "event must serialise as an externally tagged enum variant \
             (`{{\"Variant\":{{..}}}}` or `\"Variant\"`), got {}",
            String::from_utf8_lossy(&json)
        )
    };
    // The bytes alone cannot tell `{"type":"On"}` from an externally tagged `type`
    // variant: an internally tagged enum's unit variants would all be stored as events
    // of type `type`. What the value asks of the serialiser can.
    let Some(variant) = variant_name(event) else {
        return Err(format!(
            "{}; an `Event` enum takes no `#[serde(tag = ..)]` or `#[serde(untagged)]`",
            not_a_variant()
        ));
    };
    let (event_type, payload) = match json.first() {
        Some(b'"') => {
            let event_type: String = serde_json::from_slice(&json).map_err(|_| not_a_variant())?;
            (event_type, b"null".to_vec())
        }
        // The compact serialiser writes exactly `{"<variant>":<payload>}`.
        Some(b'{') => {
            let body = &json[1..json.len() - 1];
            let mut keys = serde_json::Deserializer::from_slice(body).into_iter::<String>();
            let Some(Ok(event_type)) = keys.next() else {
                return Err(not_a_variant());
            };
            let payload = body
                .get(keys.byte_offset()..)
                .and_then(|rest| rest.strip_prefix(b":"))
                .ok_or_else(not_a_variant)?;
            // A struct with several fields would leave `1,"b":2` here: not one value.
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map_err(|_| not_a_variant())?;
            (event_type, payload.to_vec())
        }
        _ => return Err(not_a_variant()),
    };
    if event_type != variant {
        return Err(not_a_variant());
    }
    Ok((event_type, payload))
}

/// The variant name `value` serialises as, when it serialises as an enum variant at
/// all (what serde's derive does for an externally tagged enum); the payload is not
/// serialised.
fn variant_name<T: Serialize + ?Sized>(value: &T) -> Option<&'static str> {
    match value.serialize(VariantProbe) {
        Ok(variant) | Err(Probed(Some(variant))) => Some(variant),
        Err(Probed(None)) => None,
    }
}

/// A serialiser that accepts only an enum variant, and stops at its name.
struct VariantProbe;

/// How a probe ended: with the variant's name (a tuple or struct variant, whose
/// serialiser the probe cannot give back), or without one.
#[derive(Debug)]
struct Probed(Option<&'static str>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not an enum variant")
    }
}

impl std::error::Error for Probed {}

impl serde::ser::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

/// The serialiser methods that are not a variant: each ends the probe without a name.
macro_rules! not_a_variant {
    ($($method:ident($($arg:ty),*) -> $out:ty;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<$out, Probed> {
            Err(Probed(None))
        })*
    };
}

impl serde::Serializer for VariantProbe {
    type Ok = &'static str;
    type Error = Probed;
    type SerializeSeq = serde::ser::Impossible<&'static str, Probed>;
    type SerializeTuple = serde::ser::Impossible<&'static str, Probed>;
    type SerializeTupleStruct = serde::ser::Impossible<&'static str, Probed>;
    type SerializeTupleVariant = serde::ser::Impossible<&'static str, Probed>;
    type SerializeMap = serde::ser::Impossible<&'static str, Probed>;
    type SerializeStruct = serde::ser::Impossible<&'static str, Probed>;
    type SerializeStructVariant = serde::ser::Impossible<&'static str, Probed>;

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<&'static str, Probed> {
        Ok(variant)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: &T,
    ) -> Result<&'static str, Probed> {
        Ok(variant)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Probed> {
        Err(Probed(Some(variant)))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Probed> {
        Err(Probed(Some(variant)))
    }

    // A wrapper (`Box`, `Arc`, a `#[serde(transparent)]` newtype) passes the probe on.
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<&'static str, Probed> {
        value.serialize(self)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<&'static str, Probed> {
        Err(Probed(None))
    }

    not_a_variant! {
        serialize_bool(bool) -> &'static str;
        serialize_i8(i8) -> &'static str;
        serialize_i16(i16) -> &'static str;
        serialize_i32(i32) -> &'static str;
        serialize_i64(i64) -> &'static str;
        serialize_u8(u8) -> &'static str;
        serialize_u16(u16) -> &'static str;
        serialize_u32(u32) -> &'static str;
        serialize_u64(u64) -> &'static str;
        serialize_f32(f32) -> &'static str;
        serialize_f64(f64) -> &'static str;
        serialize_char(char) -> &'static str;
        serialize_str(&str) -> &'static str;
        serialize_bytes(&[u8]) -> &'static str;
        serialize_none() -> &'static str;
        serialize_unit() -> &'static str;
        serialize_unit_struct(&'static str) -> &'static str;
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
    }
}

/// Rebuilds an event from its type and JSON payload; the inverse of [`encode_event`].
///
/// # Errors
///
/// The payload is not JSON, the type is not a variant of `E`, or the payload does not
/// fit the variant.
pub fn decode_event<E: serde::de::DeserializeOwned>(
    event_type: &str,
    payload: &[u8],
) -> Result<E, String> {
    // `{"Closed":null}` deserialises a unit variant as well as `"Closed"` does, so one
    // form covers unit, newtype, tuple and struct variants alike. Parsed from bytes
    // rather than built as a `Value`: this runs for every event of every replay.
    let mut tagged = Vec::with_capacity(event_type.len() + payload.len() + 8);
    tagged.push(b'{');
    serde_json::to_writer(&mut tagged, event_type).expect("a string always encodes");
    tagged.push(b':');
    tagged.extend_from_slice(payload);
    tagged.push(b'}');
    serde_json::from_slice(&tagged).map_err(|error| {
        match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            Err(error) => format!("invalid payload for event `{event_type}`: {error}"),
            Ok(_) => format!("invalid event `{event_type}`: {error}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Event {
        Opened { owner: String },
        Renamed(String),
        Closed,
    }

    #[test]
    fn struct_variant_payload_is_its_fields() {
        let (event_type, payload) = encode_event(&Event::Opened {
            owner: "alice".into(),
        })
        .unwrap();
        assert_eq!(event_type, "Opened");
        assert_eq!(payload, br#"{"owner":"alice"}"#);
        assert_eq!(
            decode_event::<Event>(&event_type, &payload).unwrap(),
            Event::Opened {
                owner: "alice".into()
            }
        );
    }

    #[test]
    fn unit_variant_payload_is_null() {
        let (event_type, payload) = encode_event(&Event::Closed).unwrap();
        assert_eq!(
            (event_type.as_str(), payload.as_slice()),
            ("Closed", &b"null"[..])
        );
        assert_eq!(
            decode_event::<Event>("Closed", b"null").unwrap(),
            Event::Closed
        );
    }

    /// An internally tagged enum's unit variant serialises as a one-key object, which
    /// the bytes alone would read as a variant named `type`: every event would be
    /// stored under that one type.
    #[test]
    fn an_event_enum_that_is_not_externally_tagged_is_refused() {
        #[derive(Serialize)]
        #[serde(tag = "type")]
        enum Internal {
            SwitchedOn,
        }
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Untagged {
            Named { type_: String },
        }
        #[derive(Serialize)]
        struct NotAnEnum {
            type_: String,
        }
        let errors = [
            encode_event(&Internal::SwitchedOn).unwrap_err(),
            encode_event(&Untagged::Named { type_: "x".into() }).unwrap_err(),
            encode_event(&NotAnEnum { type_: "x".into() }).unwrap_err(),
        ];
        for error in errors {
            assert!(error.contains("#[serde(tag = ..)]"), "{error}");
        }
        // Behind a pointer, a variant is still one.
        assert_eq!(encode_event(&Box::new(Event::Closed)).unwrap().0, "Closed");
        assert_eq!(
            encode_event(&Event::Renamed("x".into())).unwrap().0,
            "Renamed"
        );
    }

    #[test]
    fn newtype_variant_round_trips() {
        let (event_type, payload) = encode_event(&Event::Renamed("bob".into())).unwrap();
        assert_eq!(payload, br#""bob""#);
        assert_eq!(
            decode_event::<Event>(&event_type, &payload).unwrap(),
            Event::Renamed("bob".into())
        );
    }

    /// `execute` folds the decided events as values; a replay decodes them from JSON.
    /// The two must give the same state, floats included: a float parsed back one unit
    /// in the last place off would make a replayed state differ from the cached one.
    #[test]
    fn execute_and_replay_agree_on_every_float() {
        struct Meter;
        #[derive(Default, Serialize, Deserialize)]
        struct State {
            last: f64,
            sum: f64,
        }
        #[derive(Deserialize)]
        struct Read {
            bits: u64,
        }
        #[derive(Serialize, Deserialize)]
        enum Event {
            Read { value: f64 },
        }
        impl Aggregate for Meter {
            const TYPE: &'static str = "meter";
            type State = State;
            type Command = Read;
            type Event = Event;
            fn handle(_: &State, command: Read) -> Result<Vec<Event>, Rejection> {
                Ok(vec![Event::Read {
                    value: f64::from_bits(command.bits),
                }])
            }
            fn apply(state: State, Event::Read { value }: Event) -> State {
                State {
                    last: value,
                    sum: state.sum + value,
                }
            }
        }

        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if !f64::from_bits(seed).is_finite() {
                continue;
            }
            let command = format!(r#"{{"bits":{seed}}}"#);
            let (events, executed) = execute::<Meter>(b"", command.as_bytes()).unwrap();
            let (event_type, payload) = &events[0];
            let replayed = apply::<Meter>(b"", event_type, payload).unwrap();
            assert_eq!(
                String::from_utf8(executed).unwrap(),
                String::from_utf8(replayed).unwrap(),
                "{}",
                f64::from_bits(seed)
            );
        }
    }

    /// An event that does not read back from its JSON is refused by `execute`: stored,
    /// it would fail every replay of the aggregate. JSON writes a NaN as `null`, which
    /// an `f64` field does not accept back.
    #[test]
    fn execute_refuses_an_event_that_would_not_replay() {
        struct Stats;
        #[derive(Default, Serialize, Deserialize)]
        struct State {
            count: u64,
        }
        #[derive(Deserialize)]
        struct Record {
            value: f64,
        }
        #[derive(Serialize, Deserialize)]
        enum Event {
            Recorded { average: f64 },
        }
        impl Aggregate for Stats {
            const TYPE: &'static str = "stats";
            type State = State;
            type Command = Record;
            type Event = Event;
            fn handle(_: &State, command: Record) -> Result<Vec<Event>, Rejection> {
                Ok(vec![Event::Recorded {
                    average: command.value / (command.value - command.value),
                }])
            }
            fn apply(state: State, _: Event) -> State {
                State {
                    count: state.count + 1,
                }
            }
        }
        // 1 / 0 is infinite and 0 / 0 NaN: both are written as `null`.
        for value in ["1", "0"] {
            let command = format!(r#"{{"value":{value}}}"#);
            let error = execute::<Stats>(b"", command.as_bytes()).unwrap_err();
            // The aggregate's bug, not a refusal of the command: the component traps.
            assert!(error.is_fault(), "{error}");
            assert!(
                error
                    .message()
                    .starts_with("aggregate bug: a decided event does not read back")
                    && error.message().contains("invalid event `Recorded`"),
                "{}",
                error.message()
            );
        }
    }

    /// A state that does not read back from its JSON is refused by `execute`: the next
    /// command would fail to decode it.
    #[test]
    fn execute_refuses_a_state_that_would_not_read_back() {
        struct Ratio;
        #[derive(Default, Serialize, Deserialize)]
        struct State {
            ratio: f64,
        }
        #[derive(Deserialize)]
        struct Set {
            over: f64,
        }
        #[derive(Serialize, Deserialize)]
        enum Event {
            Set { over: f64 },
        }
        impl Aggregate for Ratio {
            const TYPE: &'static str = "ratio";
            type State = State;
            type Command = Set;
            type Event = Event;
            fn handle(_: &State, command: Set) -> Result<Vec<Event>, Rejection> {
                Ok(vec![Event::Set { over: command.over }])
            }
            fn apply(_: State, Event::Set { over }: Event) -> State {
                State { ratio: 1.0 / over }
            }
        }
        let (events, state) = execute::<Ratio>(b"", br#"{"over":4}"#).unwrap();
        assert_eq!(
            (events.len(), state.as_slice()),
            (1, &br#"{"ratio":0.25}"#[..])
        );
        let error = execute::<Ratio>(b"", br#"{"over":0}"#).unwrap_err();
        assert!(
            error
                .message()
                .starts_with("aggregate bug: the state after the events does not read back"),
            "{}",
            error.message()
        );
    }

    /// A command deciding several events leaves the state a replay of them leaves: a
    /// replay passes the state from one event to the next through its JSON, where a
    /// `#[serde(skip)]` field starts over, so `execute` does the same between events.
    /// Carried in memory instead, the state stored (and cached) was one no replay
    /// could give, and later decisions depended on whether a host had it cached.
    #[test]
    fn execute_leaves_the_state_a_replay_of_its_events_leaves() {
        struct Counter;
        #[derive(Default, Serialize, Deserialize)]
        struct State {
            count: u32,
            #[serde(skip)]
            seen: u32,
        }
        #[derive(Deserialize)]
        struct Tick {
            times: usize,
        }
        #[derive(Serialize, Deserialize)]
        enum Event {
            Ticked,
        }
        impl Aggregate for Counter {
            const TYPE: &'static str = "counter";
            type State = State;
            type Command = Tick;
            type Event = Event;
            fn handle(_: &State, command: Tick) -> Result<Vec<Event>, Rejection> {
                Ok((0..command.times).map(|_| Event::Ticked).collect())
            }
            fn apply(state: State, Event::Ticked: Event) -> State {
                State {
                    count: state.seen + 1,
                    seen: state.seen + 1,
                }
            }
        }
        let (events, executed) = execute::<Counter>(b"", br#"{"times":3}"#).unwrap();
        let replayed = events
            .iter()
            .try_fold(Vec::new(), |state, (event_type, payload)| {
                apply::<Counter>(&state, event_type, payload)
            })
            .unwrap();
        assert_eq!(
            String::from_utf8(executed).unwrap(),
            String::from_utf8(replayed).unwrap()
        );
    }

    /// A payload that is not one JSON value is named as such, not as a wrong event.
    #[test]
    fn a_payload_that_is_not_json_is_named() {
        let error = decode_event::<Event>("Opened", br#"{"owner":"a"},"x":1"#).unwrap_err();
        assert!(
            error.starts_with("invalid payload for event `Opened`"),
            "{error}"
        );
        let error = decode_event::<Event>("Opened", br#"{"owner":1}"#).unwrap_err();
        assert!(error.starts_with("invalid event `Opened`"), "{error}");
    }

    #[test]
    fn payload_keeps_field_order() {
        #[derive(Serialize)]
        enum Event {
            Moved { to: String, at: u64, by: String },
        }
        let event = Event::Moved {
            to: "b\"\\:x".into(),
            at: 7,
            by: "{\"c\":1}".into(),
        };
        let (event_type, payload) = encode_event(&event).unwrap();
        assert_eq!(event_type, "Moved");
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            r#"{"to":"b\"\\:x","at":7,"by":"{\"c\":1}"}"#
        );
    }

    #[test]
    fn unknown_event_type_names_the_variants() {
        let error = decode_event::<Event>("Frozen", b"null").unwrap_err();
        assert!(
            error.starts_with("invalid event `Frozen`: unknown variant `Frozen`"),
            "{error}"
        );
    }

    #[test]
    fn non_enum_event_is_refused() {
        #[derive(Serialize)]
        struct NotAnEnum {
            a: u8,
            b: u8,
        }
        let error = encode_event(&NotAnEnum { a: 1, b: 2 }).unwrap_err();
        assert!(error.contains("externally tagged"), "{error}");
        let error = encode_event(&42).unwrap_err();
        assert!(error.contains("got 42;"), "{error}");
        let error = encode_event(&std::collections::BTreeMap::<String, u8>::new()).unwrap_err();
        assert!(error.contains("got {};"), "{error}");
    }
}
