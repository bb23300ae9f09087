//! The capability-free WASI world plugins run in.
//!
//! A `wasm32-wasip2` build imports `wasi:io`, `wasi:cli`, `wasi:clocks`, `wasi:random`
//! and `wasi:filesystem` even when the code uses none of them; a Python component built
//! by componentize-py also imports every `wasi:sockets` interface (CPython's `socket`
//! module is linked in), and a JavaScript one built by componentize-js the same set as
//! Rust. We satisfy those imports with wasmtime-wasi, configured so that nothing outside
//! the sandbox is reachable: no preopened directories, no environment, no arguments,
//! stdio discarded, and every socket operation refused (creating a TCP or UDP socket
//! and resolving a name fail with `access-denied`, and no address passes the
//! address check). Clocks and randomness are deterministic, because a plugin that reads
//! the time or draws a random number must decide the same events when a command is
//! retried and evolve the same state when events are replayed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Import namespaces a plugin may use: the WASI 0.2 interfaces that `wasm32-wasip2`,
/// componentize-py and componentize-js builds pull in, each served without capabilities
/// (see the module docs), and the contract's own types interface (it holds only type
/// definitions). Anything else — `wasi:http`, `wasi:keyvalue`, or a custom interface —
/// is refused at upload.
pub const ALLOWED_IMPORT_PREFIXES: &[&str] = &[
    "meridian:aggregate/types@0.1.",
    "meridian:aggregate/types@0.2.",
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    // Linked so that interpreters which carry a socket module can be instantiated;
    // every operation fails (`allow_tcp(false)`, `allow_udp(false)`,
    // `allow_ip_name_lookup(false)`, and no socket address is ever allowed).
    "wasi:sockets/",
];

/// The seconds since the Unix epoch every plugin's wall clock reads: 2025-01-01T00:00:00Z.
///
/// A fixed, plausible date rather than zero, so date libraries that reject 1970 work.
pub const FIXED_WALL_CLOCK_SECS: u64 = 1_735_689_600;

/// Most random bytes a plugin may draw in one `get-random-bytes` call. wasmtime-wasi
/// builds the answer in host memory, a byte at a time and outside the CPU deadline,
/// before the guest's memory cap can refuse it; its own default lets one call ask for
/// 64 MiB. Seeding a hash map takes 16 bytes, an interpreter's start-up a few dozen.
pub const MAX_RANDOM_BYTES_PER_CALL: u64 = 1024 * 1024;

/// Most host resources (streams, pollables, ...) one instance may hold at once. They
/// live in host memory (about 100 bytes each), which the memory cap does not count, and
/// an instance is reused from call to call: a guest that makes them and never drops
/// them (a pollable a loop iteration) would otherwise grow the host by wasmtime's
/// default of a million entries, per pooled instance. A plugin uses a handful, an
/// interpreter a few dozen; ten times an instance's calls leaves room for one that
/// leaks one a call.
pub const MAX_RESOURCES_PER_INSTANCE: usize = 10 * super::INSTANCE_MAX_CALLS as usize;

/// The store data of one plugin instance.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    /// The tail of what the guest wrote to stderr during the current call (a Rust
    /// plugin's panic message lands here).
    pub(crate) stderr: TailPipe,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    /// Reset before every call so each call draws the same "random" bytes.
    pub(crate) rng_state: Arc<AtomicU64>,
    /// Epoch ticks the current call may still run (see `runtime::arm_deadline`).
    pub(crate) ticks_left: u64,
}

impl GuestState {
    pub(crate) fn new(memory_bytes: u64) -> Self {
        let rng_state = Arc::new(AtomicU64::new(RNG_SEED));
        let stderr = TailPipe::default();
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FixedWallClock)
            .monotonic_clock(FixedMonotonicClock)
            .secure_random(SeededRng(rng_state.clone()))
            .insecure_random(SeededRng(rng_state.clone()))
            .insecure_random_seed(0)
            .max_random_size(MAX_RANDOM_BYTES_PER_CALL)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            // The default already refuses every address; say so rather than rely on it.
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        Self {
            wasi,
            stderr,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES_PER_INSTANCE);
                table
            },
            limiter: MemoryLimiter::new(memory_bytes),
            rng_state,
            ticks_left: 0,
        }
    }

    /// Puts the deterministic sources back to their starting point before a call.
    pub(crate) fn reset_for_call(&mut self) {
        self.rng_state.store(RNG_SEED, Ordering::Relaxed);
        self.limiter.exceeded.store(false, Ordering::Relaxed);
        self.stderr.clear();
    }
}

/// Bytes of guest stderr kept per call.
const STDERR_TAIL_BYTES: usize = 2048;

/// A stderr that never fails and keeps only the last [`STDERR_TAIL_BYTES`].
///
/// Never failing matters: Rust's `eprintln!` panics when a write fails, so a pipe
/// that filled up would turn a plugin's debug output into a trap.
#[derive(Clone, Default)]
pub(crate) struct TailPipe(Arc<std::sync::Mutex<Vec<u8>>>);

impl TailPipe {
    fn push(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().expect("stderr pipe poisoned");
        buf.extend_from_slice(bytes);
        if buf.len() > STDERR_TAIL_BYTES {
            let cut = buf.len() - STDERR_TAIL_BYTES;
            buf.drain(..cut);
        }
    }

    fn clear(&self) {
        self.0.lock().expect("stderr pipe poisoned").clear();
    }

    /// What the guest said last: a Rust panic's location and message when there is
    /// one, else the last non-empty line. Rust's "run with RUST_BACKTRACE" hint is
    /// dropped; it means nothing to a caller of the API.
    pub(crate) fn last_message(&self) -> Option<String> {
        let buf = self.0.lock().expect("stderr pipe poisoned");
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        if let Some(at) = lines.iter().rposition(|l| l.contains("panicked at")) {
            let message = lines.get(at + 1).copied().unwrap_or_default();
            return Some(format!("{} {message}", lines[at]).trim().to_string());
        }
        lines.last().map(|l| l.to_string())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::OutputStream for TailPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for TailPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for TailPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for TailPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for TailPipe {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
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
///
/// The cap is the instance's, across all its memories: a component holds one per core
/// module that has one, and a module may declare several (multi-memory), and wasmtime
/// asks about each memory on its own. Capping each alone would let a plugin with a
/// hundred memories take a hundred times the cap.
pub(crate) struct MemoryLimiter {
    max_bytes: u64,
    /// Bytes of every memory of the instance together.
    used_bytes: u64,
    /// Elements of every table of the instance together.
    used_elements: u64,
    pub(crate) exceeded: Arc<AtomicBool>,
}

/// Most linear memories of one instance (all its core modules together).
pub(crate) const MAX_MEMORIES: usize = 4;

/// Most table elements (function references) of one instance, all tables together; a
/// million is far beyond any real plugin.
const MAX_TABLE_ELEMENTS: u64 = 1_000_000;

impl MemoryLimiter {
    /// Whether the instance's memories hold more than half its cap. Memory never
    /// shrinks, so an instance that keeps more after every call (its allocator leaks,
    /// or it keeps things in `static`s) is dropped once past this, rather than kept
    /// until a command runs out.
    pub(crate) fn past_half(&self) -> bool {
        self.used_bytes > self.max_bytes / 2
    }

    fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            used_bytes: 0,
            used_elements: 0,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // wasmtime asks before it checks a growth against the memory's own maximum: a
        // growth past it fails (`memory.grow` gives -1) and must not be counted, or
        // each such attempt would use up the cap with memory never allocated.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        // Saturating: `desired` can be near `usize::MAX`; a wrapped sum would pass as
        // small and reset what the instance is counted to hold.
        let total = self
            .used_bytes
            .saturating_sub(current as u64)
            .saturating_add(desired as u64);
        if total > self.max_bytes {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(wasmtime::format_err!(
                "linear memory would grow to {total} bytes, over the {} byte cap",
                self.max_bytes
            ));
        }
        self.used_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        let total = self
            .used_elements
            .saturating_sub(current as u64)
            .saturating_add(desired as u64);
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.used_elements = total;
        Ok(true)
    }

    // Far more than any component needs (a Rust one has three core instances, one
    // memory and two tables; componentize-py's fourteen core instances still share one
    // memory), far fewer than wasmtime's default of 10,000 each.
    fn instances(&self) -> usize {
        100
    }

    // Each memory, even of zero pages, reserves 4 GiB of address space and a kernel
    // mapping for as long as its instance lives (idle instances included): a hundred
    // per instance would let a few hundred concurrent instances of one plugin use up
    // the host's address space or its mapping count, and fail every allocation of the
    // host after it. Four leave room for multi-memory toolchains.
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        100
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

/// `wasi:clocks/monotonic-clock` as the sandbox serves it: time never passes.
///
/// `now` is always 0 (as [`FixedMonotonicClock`] tells the rest of WASI), and every
/// timer a plugin subscribes to has already fired, so `std::thread::sleep` and a poll
/// with a timeout return at once. The epoch deadline only stops running code, and a
/// plugin sleeping for real runs none, so it could hold its aggregate for as long as it
/// liked. With this clock nothing a plugin can import waits on the world outside, so
/// the deadline bounds every call; and a retried or replayed call sees the same clock.
pub(crate) struct Timeless<'a> {
    table: &'a mut ResourceTable,
}

impl HasData for Timeless<'static> {
    type Data<'a> = Timeless<'a>;
}

impl monotonic_clock::Host for Timeless<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(FixedMonotonicClock.now())
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(FixedMonotonicClock.resolution())
    }

    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.fired()
    }

    fn subscribe_duration(
        &mut self,
        _duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.fired()
    }
}

impl Timeless<'_> {
    /// A pollable that is ready at once.
    fn fired(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let fired = self.table.push(Fired)?;
        subscribe(self.table, fired)
    }
}

/// Replaces wasmtime-wasi's `wasi:clocks/monotonic-clock` in `linker` with [`Timeless`].
pub(crate) fn link_timeless_clock(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked =
        monotonic_clock::add_to_linker::<GuestState, Timeless<'static>>(linker, |state| Timeless {
            table: &mut state.table,
        });
    linker.allow_shadowing(false);
    linked
}

/// A timer that has already fired.
struct Fired;

impl Pollable for Fired {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(std::future::ready(()))
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
/// The first import of an interface the sandbox serves, but in a version it does not:
/// a component built for a newer contract, or for WASI 0.3. Judged before
/// [`forbidden_import`], whose answer ("not provided") would send its author looking in
/// the wrong place. Gives what to tell the author.
pub(crate) fn unsupported_version<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    for name in names {
        let Some((interface, version)) = name.rsplit_once('@') else {
            continue;
        };
        if interface.starts_with("meridian:aggregate/")
            && !(version.starts_with("0.1.") || version.starts_with("0.2."))
        {
            return Some(format!(
                "component imports `{name}`: it was built for meridian:aggregate@{version}, \
                 and this host runs {} and 0.1.0; build it against one of those (the guest \
                 SDK's version, or the WIT you bind), or upgrade the hosts",
                super::WIT_PACKAGE
            ));
        }
        if interface.starts_with("wasi:") && !version.starts_with("0.2.") {
            return Some(format!(
                "component imports `{name}`, of WASI {version}; plugins run on WASI 0.2: \
                 build for the `wasm32-wasip2` target (componentize-py and componentize-js \
                 build for it)"
            ));
        }
    }
    None
}

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
    fn other_versions_of_served_interfaces_are_named() {
        let current = [
            "meridian:aggregate/types@0.2.0",
            "meridian:aggregate/types@0.1.0",
            "wasi:io/streams@0.2.9",
        ];
        assert_eq!(unsupported_version(current.into_iter()), None);
        let newer_contract = ["wasi:io/streams@0.2.3", "meridian:aggregate/types@0.3.0"];
        let message = unsupported_version(newer_contract.into_iter()).unwrap();
        assert!(
            message.contains("meridian:aggregate@0.3.0") && message.contains("0.2.0"),
            "{message}"
        );
        let wasi_p3 = ["wasi:clocks/monotonic-clock@0.3.0-rc-2025-09-16"];
        let message = unsupported_version(wasi_p3.into_iter()).unwrap();
        assert!(message.contains("wasm32-wasip2"), "{message}");
        // Not a served interface: left to `forbidden_import`.
        assert_eq!(
            unsupported_version(["evil:escape/network@1.0.0"].into_iter()),
            None
        );
    }

    #[test]
    fn only_wasi_imports_pass() {
        let ok = [
            "wasi:io/streams@0.2.3",
            "wasi:cli/environment@0.2.3",
            "wasi:sockets/tcp@0.2.9",
        ];
        assert_eq!(forbidden_import(ok.into_iter()), None);
        let bad = ["wasi:io/streams@0.2.3", "wasi:http/outgoing-handler@0.2.3"];
        assert_eq!(
            forbidden_import(bad.into_iter()),
            Some("wasi:http/outgoing-handler@0.2.3")
        );
        assert_eq!(
            forbidden_import(["evil:escape/network@0.1.0"].into_iter()),
            Some("evil:escape/network@0.1.0")
        );
    }

    #[test]
    fn a_growth_past_a_memory_s_own_maximum_fails_without_using_the_cap() {
        const MIB: usize = 1024 * 1024;
        let mut limiter = MemoryLimiter::new(64 * MIB as u64);
        assert!(limiter.memory_growing(0, MIB, Some(16 * MIB)).unwrap());
        // A memory declared at most 16 MiB asks for 40 MiB, again and again: each
        // fails (the guest sees -1), none counts.
        for _ in 0..3 {
            assert!(
                !limiter
                    .memory_growing(MIB, 40 * MIB, Some(16 * MIB))
                    .unwrap()
            );
        }
        assert!(!limiter.exceeded.load(Ordering::Relaxed));
        assert!(!limiter.past_half());
        // What it may have is still there.
        assert!(
            limiter
                .memory_growing(MIB, 16 * MIB, Some(16 * MIB))
                .unwrap()
        );
        assert!(!limiter.table_growing(0, 20, Some(10)).unwrap());
        assert!(limiter.table_growing(0, 10, Some(10)).unwrap());
    }

    #[test]
    fn the_memory_cap_holds_for_all_memories_of_an_instance_together() {
        const MIB: usize = 1024 * 1024;
        let mut limiter = MemoryLimiter::new(64 * MIB as u64);
        // Two memories of 30 MiB fit; a third does not, nor does growing one of them.
        assert!(limiter.memory_growing(0, 30 * MIB, None).unwrap());
        assert!(limiter.memory_growing(0, 30 * MIB, None).unwrap());
        assert!(!limiter.exceeded.load(Ordering::Relaxed));
        assert!(limiter.memory_growing(0, 30 * MIB, None).is_err());
        assert!(limiter.memory_growing(30 * MIB, 40 * MIB, None).is_err());
        assert!(limiter.exceeded.load(Ordering::Relaxed));
        // What is left can still be used.
        assert!(limiter.memory_growing(30 * MIB, 34 * MIB, None).unwrap());

        let mut tables = MemoryLimiter::new(64 * MIB as u64);
        assert!(tables.table_growing(0, 600_000, None).unwrap());
        assert!(!tables.table_growing(0, 600_000, None).unwrap());
    }

    /// wasmtime asks the limiter before it checks a growth against the memory's own
    /// maximum, so a guest can ask for nearly `usize::MAX` bytes and see the growth
    /// fail with -1, not a trap. That request must not wrap the count back to zero,
    /// or the guest could repeat it between real growths and hold any amount.
    #[test]
    fn a_growth_past_the_address_space_neither_wraps_nor_resets_the_count() {
        const MIB: usize = 1024 * 1024;
        let mut limiter = MemoryLimiter::new(64 * MIB as u64);
        assert!(limiter.memory_growing(0, 60 * MIB, None).unwrap());
        assert!(
            limiter
                .memory_growing(60 * MIB, usize::MAX - 65535, None)
                .is_err()
        );
        // The 60 MiB are still counted: a second memory of 60 MiB is over the cap.
        assert!(limiter.memory_growing(0, 60 * MIB, None).is_err());

        let mut tables = MemoryLimiter::new(64 * MIB as u64);
        assert!(tables.table_growing(0, 600_000, None).unwrap());
        assert!(!tables.table_growing(600_000, usize::MAX, None).unwrap());
        assert!(!tables.table_growing(0, 600_000, None).unwrap());
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
