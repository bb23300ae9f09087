//! The capability-free WASI world plugins run in.
//!
//! A `wasm32-wasip2` build imports `wasi:io`, `wasi:cli`, `wasi:clocks`, `wasi:random`
//! and `wasi:filesystem` even when the code uses none of them. We satisfy those imports
//! with wasmtime-wasi, configured so that nothing outside the sandbox is reachable:
//! no preopened directories, no environment, no arguments, no sockets, stdio discarded.
//! Clocks and randomness are deterministic, because a plugin that reads the time or
//! draws a random number must decide the same events when a command is retried and
//! evolve the same state when events are replayed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Import namespaces a plugin may use: the WASI interfaces a `wasm32-wasip2` build pulls
/// in. Each is served without capabilities (see the module docs). Anything else —
/// `wasi:sockets`, `wasi:http`, or a custom interface — is refused at upload.
pub const ALLOWED_IMPORT_PREFIXES: &[&str] = &[
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
];

/// The seconds since the Unix epoch every plugin's wall clock reads: 2025-01-01T00:00:00Z.
///
/// A fixed, plausible date rather than zero, so date libraries that reject 1970 work.
pub const FIXED_WALL_CLOCK_SECS: u64 = 1_735_689_600;

/// The store data of one plugin instance.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// Reset before every call so each call draws the same "random" bytes.
    pub(crate) rng_state: Arc<AtomicU64>,
}

impl GuestState {
    pub(crate) fn new(memory_bytes: u64) -> Self {
        let rng_state = Arc::new(AtomicU64::new(RNG_SEED));
        let wasi = WasiCtx::builder()
            .wall_clock(FixedWallClock)
            .monotonic_clock(FixedMonotonicClock)
            .secure_random(SeededRng(rng_state.clone()))
            .insecure_random(SeededRng(rng_state.clone()))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            rng_state,
        }
    }

    /// Puts the deterministic sources back to their starting point before a call.
    pub(crate) fn reset_for_call(&mut self) {
        self.rng_state.store(RNG_SEED, Ordering::Relaxed);
        self.limiter.exceeded.store(false, Ordering::Relaxed);
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that it did, so the error can say "out of memory"
/// instead of the `unreachable` trap the guest's allocator turns a failed grow into.
pub(crate) struct MemoryLimiter {
    max_bytes: u64,
    pub(crate) exceeded: Arc<AtomicBool>,
}

impl MemoryLimiter {
    fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_bytes {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(wasmtime::format_err!(
                "linear memory would grow to {desired} bytes, over the {} byte cap",
                self.max_bytes
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million is far beyond any real plugin.
        Ok(desired <= 1_000_000)
    }
}

struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(FIXED_WALL_CLOCK_SECS)
    }
}

struct FixedMonotonicClock;

impl HostMonotonicClock for FixedMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        0
    }
}

const RNG_SEED: u64 = 0x6d65_7269_6469_616e; // "meridian"

/// A splitmix64 stream whose state the host resets before every call.
///
/// Not secure, and not meant to be: a plugin must decide the same events for the same
/// input, so "random" values are a pure function of the call. Rust's std only needs
/// them to seed `HashMap`.
struct SeededRng(Arc<AtomicU64>);

impl SeededRng {
    fn next(&mut self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next() as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

// wasmtime-wasi asks for a CryptoRng for `secure_random`; see `SeededRng` for why a
// deterministic stream is the right answer here.
impl rand_core::TryCryptoRng for SeededRng {}

/// Returns the first import that is not allowed, if any.
pub(crate) fn forbidden_import<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names.find(|name| {
        !ALLOWED_IMPORT_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wasi_imports_pass() {
        let ok = ["wasi:io/streams@0.2.3", "wasi:cli/environment@0.2.3"];
        assert_eq!(forbidden_import(ok.into_iter()), None);
        let bad = ["wasi:io/streams@0.2.3", "wasi:sockets/tcp@0.2.3"];
        assert_eq!(forbidden_import(bad.into_iter()), Some("wasi:sockets/tcp@0.2.3"));
        assert_eq!(
            forbidden_import(["evil:escape/network@0.1.0"].into_iter()),
            Some("evil:escape/network@0.1.0")
        );
    }

    #[test]
    fn rng_restarts_after_reset() {
        use rand_core::Rng;
        let state = Arc::new(AtomicU64::new(RNG_SEED));
        let mut rng = SeededRng(state.clone());
        let first = rng.next_u64();
        assert_ne!(first, rng.next_u64());
        state.store(RNG_SEED, Ordering::Relaxed);
        assert_eq!(first, rng.next_u64());
    }
}
