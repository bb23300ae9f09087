//! Test plugin `far-schema-version`: its `describe` reports schema version 2^31, which
//! the WIT contract's `u32` allows but the host's catalogue (a PostgreSQL `INT`) does
//! not hold, so the host must refuse the upload rather than store a wrapped number.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Decides nothing; only its schema version matters.
pub struct FarSchemaVersion;

/// Never produced.
#[derive(Serialize, Deserialize)]
pub enum Event {}

impl Aggregate for FarSchemaVersion {
    const TYPE: &'static str = "far-schema-version";
    const SCHEMA_VERSION: u32 = 1 << 31;
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        Ok(Vec::new())
    }

    fn apply(_state: (), event: Event) {
        match event {}
    }
}

meridian_guest::export_aggregate!(FarSchemaVersion);
