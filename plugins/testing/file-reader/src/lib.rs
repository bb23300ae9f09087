//! Hostile test plugin `file-reader`: `handle` tries to read `/etc/passwd` and the
//! environment, and reports what it got in one `Probed` event, so a test can check the
//! sandbox gave it neither.

use meridian_guest::{Aggregate, Rejection};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Probes the file system and environment in `handle`; accepts any command.
pub struct FileReader;

/// What the probe saw.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// The result of the probe.
    Probed {
        /// `/etc/passwd`'s content, or `error: <reason>` when it could not be read.
        file: String,
        /// How many environment variables were visible.
        env_count: usize,
    },
}

impl Aggregate for FileReader {
    const TYPE: &'static str = "file-reader";
    type State = ();
    type Command = IgnoredAny;
    type Event = Event;

    fn handle(_state: &(), _command: IgnoredAny) -> Result<Vec<Event>, Rejection> {
        let file = std::fs::read_to_string("/etc/passwd")
            .unwrap_or_else(|error| format!("error: {error}"));
        let env_count = std::env::vars_os().count();
        Ok(vec![Event::Probed { file, env_count }])
    }

    fn apply(_state: (), _event: Event) {}
}

meridian_guest::export_aggregate!(FileReader);
