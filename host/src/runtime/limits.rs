//! Sandbox limits for one aggregate type.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default CPU deadline for one call into a plugin (`execute`, `handle` or `apply`).
///
/// Enforced with wasmtime's epoch interruption, so it measures wall-clock time spent
/// inside the guest with the resolution of [`EPOCH_TICK`]; time the host spends
/// copying arguments in and results out is not counted.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

/// Default cap on one instance's linear memory. Growing past it traps the call.
///
/// It bounds guest memory only; the host's copies of states and events are bounded by
/// [`DEFAULT_MAX_OUTPUT_BYTES`].
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// Default cap on the size of an uploaded component. Rust components are ~100 KiB;
/// interpreter-based ones (Python, JavaScript) are 10–20 MiB.
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 32 * 1024 * 1024;

/// Default cap on how many events one `execute` or `handle` call may return.
pub const DEFAULT_MAX_EVENTS_PER_CALL: u32 = 1_000;

/// Default cap on the bytes one call may return (all event payloads, or one state).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1024 * 1024;

/// Highest `max_events_per_call` an operator may set.
pub const MAX_EVENTS_PER_CALL: u32 = 100_000;

/// Highest `max_output_bytes` an operator may set: the host holds a call's output in
/// memory and writes each event as one `jsonb` value, so this also bounds a row.
pub const MAX_OUTPUT_BYTES: u64 = 64 * 1024 * 1024;

/// How often the epoch ticker advances: the resolution of every deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The limits a plugin runs under. Every field has a safe default; operators raise or
/// lower them per aggregate type (`PUT /v1/plugins/{type}/limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxLimits {
    /// CPU deadline per call, in milliseconds.
    #[schema(minimum = 1, maximum = 60_000)]
    pub deadline_ms: u64,
    /// Linear-memory cap per instance, in bytes.
    #[schema(minimum = 1_048_576, maximum = 4_294_967_296_u64)]
    pub memory_bytes: u64,
    /// Largest component accepted at upload, in bytes.
    #[schema(minimum = 1, maximum = 268_435_456)]
    pub max_component_bytes: u64,
    /// Most events one `execute` or `handle` call may return.
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_events_per_call: u32,
    /// Most bytes one call may return.
    #[schema(minimum = 1024, maximum = 67_108_864)]
    pub max_output_bytes: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            deadline_ms: DEFAULT_DEADLINE.as_millis() as u64,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            max_events_per_call: DEFAULT_MAX_EVENTS_PER_CALL,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

impl SandboxLimits {
    /// The per-call deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    /// Bytes that may cross from the plugin into host memory in one call (wasmtime's
    /// "hostcall fuel"): room for events and a state at the output cap, each event's
    /// record and type, and a message. The output caps are checked on what crossed, so
    /// without this a call could first make the host copy far more — wasmtime's own
    /// default is 128 MiB a call — than the caps would then refuse.
    pub(crate) fn hostcall_fuel(&self) -> usize {
        let bytes = self
            .max_output_bytes
            .saturating_mul(2)
            .saturating_add(u64::from(self.max_events_per_call).saturating_mul(512))
            .saturating_add(1024 * 1024);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// Epoch ticks that make up the deadline. One tick is added because the current
    /// tick may be about to end when the call starts.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_millis().max(1) as u64;
        self.deadline_ms.div_ceil(tick).max(1) + 1
    }

    /// Checks that the limits are usable, so a typo cannot disable a plugin.
    pub fn validate(&self) -> Result<(), String> {
        if self.deadline_ms == 0 || self.deadline_ms > 60_000 {
            return Err(format!(
                "deadline_ms must be between 1 and 60000, got {}",
                self.deadline_ms
            ));
        }
        if self.memory_bytes < 1024 * 1024 || self.memory_bytes > 4 * 1024 * 1024 * 1024 {
            return Err(format!(
                "memory_bytes must be between 1 MiB and 4 GiB, got {}",
                self.memory_bytes
            ));
        }
        if self.max_component_bytes == 0 || self.max_component_bytes > 256 * 1024 * 1024 {
            return Err(format!(
                "max_component_bytes must be between 1 and 256 MiB, got {}",
                self.max_component_bytes
            ));
        }
        if self.max_events_per_call == 0 || self.max_events_per_call > MAX_EVENTS_PER_CALL {
            return Err(format!(
                "max_events_per_call must be between 1 and {MAX_EVENTS_PER_CALL}, got {}",
                self.max_events_per_call
            ));
        }
        if !(1024..=MAX_OUTPUT_BYTES).contains(&self.max_output_bytes) {
            return Err(format!(
                "max_output_bytes must be between 1024 and 64 MiB, got {}",
                self.max_output_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plugin authors' `cargo test` refuses what these defaults refuse: the SDK's
    /// harness keeps its own copy of them, since plugins do not link the host.
    #[test]
    fn the_sdk_harness_holds_plugins_to_these_defaults() {
        use meridian_guest::testing;
        assert_eq!(
            testing::DEFAULT_MAX_EVENTS_PER_CALL,
            DEFAULT_MAX_EVENTS_PER_CALL as usize
        );
        assert_eq!(
            testing::DEFAULT_MAX_OUTPUT_BYTES,
            DEFAULT_MAX_OUTPUT_BYTES as usize
        );
    }
}
