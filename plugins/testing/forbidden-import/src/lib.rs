//! Hostile test plugin `forbidden-import`: implements the aggregate world but also
//! imports `evil:escape/network@0.1.0` and calls it from `handle`. The host must refuse
//! the component at upload, before any of its code runs.
//!
//! It cannot use `export_aggregate!`, whose world has no such import, so it generates
//! bindings for its own world (`wit/world.wit`, which includes the SDK's WIT).

use serde::{Deserialize, Serialize};

/// The one event `handle` would decide if the import were ever satisfied.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// The forbidden import answered.
    Connected {
        /// What `connect` returned.
        handle: u32,
    },
}

#[cfg(target_arch = "wasm32")]
mod component {
    use super::Event;
    use meridian_guest::codec;

    #[allow(unsafe_code, missing_docs)]
    mod bindings {
        wit_bindgen::generate!({
            world: "meridian:forbidden-import/forbidden-import",
            // The SDK's directory first: this world's WIT depends on it.
            path: ["../../../guest-sdk/wit-0.1.0", "wit"],
            // Both interfaces live in other packages than the world's.
            generate_all,
        });
    }

    use bindings::evil::escape::network;
    use bindings::meridian::aggregate::types;

    struct ForbiddenImport;

    impl bindings::Guest for ForbiddenImport {
        fn describe() -> types::Description {
            types::Description {
                aggregate_type: "forbidden-import".to_owned(),
                schema_version: 1,
            }
        }

        fn handle(
            _state: Vec<u8>,
            _command: Vec<u8>,
        ) -> Result<Vec<types::Event>, types::Rejection> {
            let handle = network::connect("example.com");
            let (event_type, payload) = codec::encode_event(&Event::Connected { handle })
                .map_err(|message| types::Rejection { message })?;
            Ok(vec![types::Event {
                event_type,
                payload,
            }])
        }

        fn apply(state: Vec<u8>, _event: types::Event) -> Result<Vec<u8>, String> {
            Ok(state)
        }
    }

    #[allow(unsafe_code)]
    mod export {
        use super::{ForbiddenImport, bindings};
        bindings::export!(ForbiddenImport with_types_in bindings);
    }
}
