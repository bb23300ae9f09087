//! The component side of [`export_aggregate!`](crate::export_aggregate): the
//! `meridian:aggregate` bindings and a generic [`Guest`](bindings::Guest) implementation
//! that forwards to [`codec`](crate::codec).

use crate::{Aggregate, codec};
use std::marker::PhantomData;

/// Bindings for `wit/aggregate.wit`, generated here once so that plugin crates need
/// neither the WIT file nor a direct wit-bindgen dependency.
#[allow(unsafe_code, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "aggregate",
        path: "wit",
        // The export macro expands in the plugin crate, where this crate's bindings
        // are only reachable through the public re-export.
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "::meridian_guest::__private::bindings",
    });
}

pub use bindings::export_world;
use bindings::meridian::aggregate::types;

/// Implements the world's exports for any [`Aggregate`]; plugins name it only through
/// [`export_aggregate!`](crate::export_aggregate).
pub struct Export<A>(PhantomData<A>);

impl<A: Aggregate> bindings::Guest for Export<A> {
    fn describe() -> types::Description {
        let description = codec::describe::<A>();
        types::Description {
            aggregate_type: description.aggregate_type.to_owned(),
            schema_version: description.schema_version,
        }
    }

    fn handle(state: Vec<u8>, command: Vec<u8>) -> Result<Vec<types::Event>, types::Rejection> {
        match codec::handle::<A>(&state, &command) {
            Ok(events) => Ok(events
                .into_iter()
                .map(|(event_type, payload)| types::Event {
                    event_type,
                    payload,
                })
                .collect()),
            Err(rejection) => Err(refusal(rejection)),
        }
    }

    fn apply(state: Vec<u8>, event: types::Event) -> Result<Vec<u8>, String> {
        codec::apply::<A>(&state, &event.event_type, &event.payload)
    }

    fn execute(state: Vec<u8>, command: Vec<u8>) -> Result<types::Decision, types::Rejection> {
        match codec::execute::<A>(&state, &command) {
            Ok((events, state)) => Ok(types::Decision {
                events: events
                    .into_iter()
                    .map(|(event_type, payload)| types::Event {
                        event_type,
                        payload,
                    })
                    .collect(),
                state,
            }),
            Err(rejection) => Err(refusal(rejection)),
        }
    }
}

/// A rejection as the contract returns it. A fault of the aggregate is not one: the
/// contract says the component traps, so that the host reports a plugin fault (the
/// panic's message reaches it through stderr) and the caller is not told the command
/// was refused on its merits.
fn refusal(rejection: crate::Rejection) -> types::Rejection {
    if rejection.is_fault() {
        panic!("{rejection}");
    }
    types::Rejection {
        message: rejection.into_message(),
    }
}
