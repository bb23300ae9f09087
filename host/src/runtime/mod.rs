//! The plugin runtime: runs aggregate components in a wasmtime sandbox.
//!
//! One [`Runtime`] per host holds the wasmtime `Engine` and `Linker`. Each uploaded
//! plugin version is compiled once (and cached on disk, keyed by its sha256 and the
//! engine's compatibility hash, so a restart does not recompile) into a [`Plugin`]
//! holding an `InstancePre`. Calls borrow an idle instance from the plugin's small pool
//! and return it afterwards, because instantiating costs ~30× more than a call; an
//! instance that trapped is dropped, never reused.
//!
//! Every call runs under the plugin's [`SandboxLimits`]: an epoch deadline, a
//! linear-memory cap, and caps on what it may return. A failing call fails only the
//! command that made it; the host and other aggregates carry on.
//!
//! Instances are reused, so a plugin *could* keep hidden state in globals between
//! calls. Nothing in the SDK does; the docs tell authors not to, and instances are
//! recycled every [`INSTANCE_MAX_CALLS`] calls so such state cannot live long. An
//! instance whose memory has grown past half its cap is not reused either: memory never
//! shrinks, and one that keeps more after every call (a leak) would otherwise fail
//! some later command for want of it. Both checks run after every call, so a session
//! making many (a replay) changes instances on the way too.

mod limits;
mod sandbox;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, types::ComponentItem};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};

pub use limits::*;
use sandbox::GuestState;
pub use sandbox::{ALLOWED_IMPORT_PREFIXES, FIXED_WALL_CLOCK_SECS};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "aggregate",
        exports: { default: async },
    });
}

/// Version 0.1.0 of the contract (no `execute`), which uploaded components may still
/// implement.
mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit-0.1.0",
        world: "aggregate",
        exports: { default: async },
    });
}

/// The WIT package plugins are built against.
pub const WIT_PACKAGE: &str = "meridian:aggregate@0.2.0";

/// Older contract versions the host still runs.
pub const WIT_PACKAGES_SUPPORTED: &[&str] =
    &["meridian:aggregate@0.2.0", "meridian:aggregate@0.1.0"];

/// Calls after which an instance is replaced by a fresh one.
pub const INSTANCE_MAX_CALLS: u32 = 10_000;

/// Idle instances kept per plugin version; more are created under load and dropped.
const MAX_IDLE_INSTANCES: usize = 64;

/// Errors from compiling, validating or calling a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a WebAssembly component (or not a valid one).
    #[error(
        "not a valid WebAssembly component: {0}; build it with `cargo build --release --target wasm32-wasip2`"
    )]
    NotAComponent(String),
    /// The component imports something the sandbox does not provide.
    #[error(
        "component imports `{0}`, which Meridian does not provide; plugins may import only WASI io, cli, clocks, random, filesystem and sockets, served without capabilities"
    )]
    ForbiddenImport(String),
    /// The component imports a version of WASI or of the contract this host does not
    /// serve; the message says which and what to build instead.
    #[error("{0}")]
    UnsupportedVersion(String),
    /// The component does not have the exports of the aggregate world.
    #[error("component does not implement the `aggregate` world of {WIT_PACKAGE} (or 0.1.0): {0}")]
    WrongWorld(String),
    /// The component is larger than the aggregate type allows.
    #[error("component is {size} bytes, over the {limit} byte limit for this aggregate type")]
    TooLarge {
        /// Size of the upload.
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// The call ran past its CPU deadline and was interrupted.
    #[error("plugin {plugin} exceeded its {deadline_ms} ms CPU deadline in `{call}`")]
    DeadlineExceeded {
        /// `type@vN`.
        plugin: String,
        /// Which export.
        call: &'static str,
        /// The deadline in force.
        deadline_ms: u64,
    },
    /// The call tried to grow memory past the cap.
    #[error("plugin {plugin} ran out of memory in `{call}` (cap {limit} bytes)")]
    OutOfMemory {
        /// `type@vN`.
        plugin: String,
        /// Which export.
        call: &'static str,
        /// The cap in force.
        limit: u64,
    },
    /// The guest trapped (a panic, `unreachable`, a bad memory access, ...).
    #[error("plugin {plugin} trapped in `{call}`: {message}")]
    Trap {
        /// `type@vN`.
        plugin: String,
        /// Which export.
        call: &'static str,
        /// The trap and its guest backtrace, if any.
        message: String,
    },
    /// The call returned more than the caps allow, or output the host cannot use.
    #[error("plugin {plugin} returned invalid output from `{call}`: {message}")]
    InvalidOutput {
        /// `type@vN`.
        plugin: String,
        /// Which export.
        call: &'static str,
        /// What was wrong.
        message: String,
    },
    /// `apply` refused an event.
    #[error("plugin {plugin} could not apply event `{event_type}`: {message}")]
    ApplyFailed {
        /// `type@vN`.
        plugin: String,
        /// The event's type.
        event_type: String,
        /// The plugin's message.
        message: String,
    },
    /// The runtime itself failed (e.g. could not create an instance).
    #[error("plugin runtime: {0}")]
    Internal(String),
}

/// Host-wide runtime settings.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Where compiled components are cached between restarts; `None` disables it.
    pub cache_dir: Option<PathBuf>,
}

/// The wasmtime engine, linker and compile cache shared by all plugins.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<GuestState>,
    cache_dir: Option<PathBuf>,
    /// Distinguishes cache entries of incompatible engine builds.
    engine_hash: String,
    /// The component compiled last, by sha256: an upload compiles to validate and the
    /// executor loads the same bytes right after, which must not compile twice (seconds
    /// for a Python or JavaScript component) when there is no disk cache.
    last_compiled: Mutex<Option<(String, Component)>>,
    /// One upload (or change of limits) checked at a time: each compiles its component
    /// on every core and replays histories through it, and several at once would take
    /// the CPU the commands' wall-clock deadlines are measured on.
    checks: Arc<tokio::sync::Semaphore>,
    checks_waiting: AtomicUsize,
}

/// Uploads (or changes of limits) a host checks at once.
const CONCURRENT_CHECKS: usize = 1;

/// The right to check an upload, from [`Runtime::check_permit`]; the next one waits
/// until this is dropped.
pub type CheckPermit = tokio::sync::OwnedSemaphorePermit;

/// What an uploaded component says about itself, after validation.
#[derive(Clone)]
pub struct Validated {
    /// Hex sha256 of the component bytes.
    pub sha256: String,
    /// The aggregate type from `describe`.
    pub aggregate_type: String,
    /// The schema version from `describe`.
    pub schema_version: u32,
    /// The contract version it implements (one of [`WIT_PACKAGES_SUPPORTED`]).
    pub contract: &'static str,
    /// The compiled component, ready to call (to check it against stored histories).
    pub plugin: Plugin,
}

/// What a command did: the events it decided and the state after them.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The decided events, in order.
    pub events: Vec<DecidedEvent>,
    /// The state after applying them.
    pub state: Vec<u8>,
}

/// One event returned by `handle`.
#[derive(Debug, Clone)]
pub struct DecidedEvent {
    /// The event type name.
    pub event_type: String,
    /// The JSON payload, already checked to be valid JSON.
    pub payload: Box<serde_json::value::RawValue>,
    /// At most how many bytes the payload takes when read back from PostgreSQL,
    /// printed compact: more than `payload` when it writes numbers with an exponent,
    /// which `jsonb` prints with every digit. What a reader of the feed, and the relay,
    /// carries.
    pub printed_bytes: usize,
}

impl DecidedEvent {
    /// At most how many bytes the event, payload and type, takes when read back from
    /// PostgreSQL: what the output cap and the relay's message size hold it to.
    pub fn printed_len(&self) -> usize {
        self.printed_bytes.saturating_add(self.event_type.len())
    }
}

impl Runtime {
    /// Creates the engine and starts the epoch ticker that enforces deadlines.
    pub fn new(config: RuntimeConfig) -> Result<Self, PluginError> {
        let mut wasm_config = Config::new();
        wasm_config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // No guest needs 64-bit memories (every toolchain targets wasm32), and
            // they would take the memory cap's arithmetic and the address space's
            // reservations past what the sandbox is sized for.
            .wasm_memory64(false)
            // A deep recursion in a guest must trap, not take the host thread's stack.
            .max_wasm_stack(1024 * 1024)
            // Replay must decide what the first run decided on every host, whatever
            // its CPU: the bits of a NaN and the rounding of a relaxed SIMD operation
            // are otherwise the processor's (x86 and ARM differ, and x86 with and
            // without FMA), and a plugin may branch on them or store them.
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true);
        // `perf` cannot name JIT-compiled guest code without a map file; profiling a
        // slow plugin needs it (`perf report` then shows the guest's own functions).
        if std::env::var_os("MERIDIAN_WASM_PERFMAP").is_some() {
            wasm_config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&wasm_config).map_err(|e| PluginError::Internal(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| sandbox::link_timeless_clock(&mut linker))
            .map_err(|e| PluginError::Internal(e.to_string()))?;

        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };

        // The ticker holds only a weak reference, so it ends when the engine is dropped.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("meridian-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Internal(format!("starting the epoch ticker: {e}")))?;

        if let Some(dir) = &config.cache_dir
            && let Err(error) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), %error, "cannot create the component cache; compiling on every start");
        }
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache_dir: config.cache_dir,
                engine_hash,
                last_compiled: Mutex::new(None),
                checks: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS)),
                checks_waiting: AtomicUsize::new(0),
            }),
        })
    }

    /// Waits for this host's turn to check an upload (compile it and replay histories
    /// through it); uploads beyond the one being checked queue here.
    pub async fn check_permit(&self) -> CheckPermit {
        /// Counts a waiting upload until it has its turn or gives up (its client went
        /// away, dropping this future).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let inner = &self.inner;
        inner.checks_waiting.fetch_add(1, Ordering::AcqRel);
        let waiting = Waiting(&inner.checks_waiting);
        let permit = match inner.checks.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::info!("waiting for another upload's check to end");
                inner
                    .checks
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        drop(waiting);
        permit
    }

    /// Uploads being checked, and waiting for their turn: what `/metrics` shows.
    pub fn checks(&self) -> (usize, usize) {
        (
            CONCURRENT_CHECKS - self.inner.checks.available_permits(),
            self.inner.checks_waiting.load(Ordering::Acquire),
        )
    }

    /// Checks an upload: size, that it is a component, its imports, its exports, and
    /// what `describe` says. Compiles it (and caches the result) on the way.
    ///
    /// Compiling takes from milliseconds to seconds (an interpreter inside the
    /// component), so it runs on a blocking thread.
    pub async fn validate(
        &self,
        bytes: bytes::Bytes,
        limits: &SandboxLimits,
    ) -> Result<Validated, PluginError> {
        if bytes.len() as u64 > limits.max_component_bytes {
            return Err(PluginError::TooLarge {
                size: bytes.len() as u64,
                limit: limits.max_component_bytes,
            });
        }
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let (runtime, sha, limits) = (self.clone(), sha256.clone(), *limits);
        let plugin =
            tokio::task::spawn_blocking(move || runtime.load("(upload)", 0, &sha, &bytes, limits))
                .await
                .map_err(|e| PluginError::Internal(format!("compile task failed: {e}")))??;
        let (aggregate_type, schema_version) = plugin.describe().await?;
        Ok(Validated {
            sha256,
            aggregate_type,
            schema_version,
            contract: plugin.contract(),
            plugin,
        })
    }

    /// Compiles (or loads from the cache) one plugin version, ready to call.
    pub fn load(
        &self,
        aggregate_type: &str,
        version: i32,
        sha256: &str,
        bytes: &[u8],
        limits: SandboxLimits,
    ) -> Result<Plugin, PluginError> {
        let started = std::time::Instant::now();
        let (component, from_cache) = self.compile_cached(sha256, bytes)?;

        let imports: Vec<String> = component
            .component_type()
            .imports(&self.inner.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        if let Some(message) = sandbox::unsupported_version(imports.iter().map(String::as_str)) {
            return Err(PluginError::UnsupportedVersion(message));
        }
        if let Some(name) = sandbox::forbidden_import(imports.iter().map(String::as_str)) {
            return Err(PluginError::ForbiddenImport(name.to_string()));
        }
        for required in ["describe", "handle", "apply"] {
            let found =
                component
                    .component_type()
                    .exports(&self.inner.engine)
                    .any(|(name, item)| {
                        name == required && matches!(item.ty, ComponentItem::ComponentFunc(_))
                    });
            if !found {
                return Err(PluginError::WrongWorld(format!(
                    "missing export `{required}`"
                )));
            }
        }
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?;
        let has_execute = component
            .component_type()
            .exports(&self.inner.engine)
            .any(|(name, _)| name == "execute");
        // A component that exports `execute` is held to 0.2.0; without it, to 0.1.0.
        let pre = if has_execute {
            Pre::Current(
                bindings::AggregatePre::new(instance_pre)
                    .map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?,
            )
        } else {
            Pre::V0_1(
                bindings_v0_1::AggregatePre::new(instance_pre)
                    .map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?,
            )
        };
        tracing::debug!(
            plugin = %format!("{aggregate_type}@v{version}"),
            sha256,
            from_cache,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin compiled"
        );
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: format!("{aggregate_type}@v{version}"),
                version,
                engine: self.inner.engine.clone(),
                pre,
                limits,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    fn compile_cached(&self, sha256: &str, bytes: &[u8]) -> Result<(Component, bool), PluginError> {
        let last = self.inner.last_compiled.lock().expect("poisoned").clone();
        if let Some((last_sha, component)) = last
            && last_sha == sha256
        {
            return Ok((component, true));
        }
        let (component, from_cache) = self.compile_or_load(sha256, bytes)?;
        *self.inner.last_compiled.lock().expect("poisoned") =
            Some((sha256.to_string(), component.clone()));
        Ok((component, from_cache))
    }

    /// Removes from the compile cache what no stored version will load: components
    /// whose sha256 is not in `keep` (dry runs, refused uploads) and files an older
    /// engine wrote (their names carry its compatibility hash), plus temporary files a
    /// crash left. Without it the directory only grows. Other files are left alone.
    /// Returns how many were removed.
    pub fn prune_cache(&self, keep: &std::collections::HashSet<String>) -> usize {
        let Some(dir) = &self.inner.cache_dir else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((sha, rest)) = name.split_once('-') else {
                continue;
            };
            if !hex(sha, 64) {
                continue;
            }
            let stale = match rest.strip_suffix(".cwasm") {
                Some(engine) if hex(engine, 16) => {
                    engine != self.inner.engine_hash || !keep.contains(sha)
                }
                Some(_) => false,
                // `<sha>-<engine>.tmp<pid>`: a write a crash cut short.
                None => rest.split_once(".tmp").is_some_and(|(engine, pid)| {
                    hex(engine, 16) && pid.bytes().all(|b| b.is_ascii_digit())
                }),
            };
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn compile_or_load(
        &self,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(Component, bool), PluginError> {
        let engine = &self.inner.engine;
        let cache_path = self
            .inner
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{sha256}-{}.cwasm", self.inner.engine_hash)));
        if let Some(path) = &cache_path
            && path.exists()
        {
            // SAFETY: `deserialize_file` trusts its input to be wasmtime's own output.
            // The cache directory is written only by this function, under a name
            // that includes the source's sha256 and the engine's compatibility hash,
            // and a file that fails to load is recompiled and overwritten.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(engine, path) };
            match loaded {
                Ok(component) => return Ok((component, true)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring unusable cached component")
                }
            }
        }
        let component = Component::from_binary(engine, bytes)
            .map_err(|e| PluginError::NotAComponent(first_line(&format!("{e:#}"))))?;
        if let Some(path) = &cache_path {
            match component.serialize() {
                Ok(compiled) => {
                    // Write then rename, so a crash never leaves a torn file behind.
                    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                    if std::fs::write(&tmp, compiled)
                        .and_then(|_| std::fs::rename(&tmp, path))
                        .is_err()
                    {
                        let _ = std::fs::remove_file(&tmp);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot serialise compiled component"),
            }
        }
        Ok((component, false))
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_string()
}

/// One compiled plugin version with its pool of instances. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    name: String,
    version: i32,
    engine: Engine,
    pre: Pre,
    limits: SandboxLimits,
    idle: Mutex<Vec<Instance>>,
}

struct Instance {
    store: Store<GuestState>,
    bindings: Bindings,
    calls: u32,
}

/// A compiled component, ready to instantiate, by contract version.
enum Pre {
    Current(bindings::AggregatePre<GuestState>),
    V0_1(bindings_v0_1::AggregatePre<GuestState>),
}

/// An instance's exports, by contract version. Events cross as `(type, payload)`.
enum Bindings {
    Current(bindings::Aggregate),
    V0_1(bindings_v0_1::Aggregate),
}

/// Runs the same code against either version's bindings, whose types differ by name
/// only; `$types` names that version's `types` interface module.
macro_rules! each_version {
    ($bindings:expr, $guest:ident => $body:expr) => {
        match $bindings {
            Bindings::Current($guest) => $body,
            Bindings::V0_1($guest) => $body,
        }
    };
    ($bindings:expr, $guest:ident, $types:ident => $body:expr) => {
        match $bindings {
            Bindings::Current($guest) => {
                use bindings::meridian::aggregate::types as $types;
                $body
            }
            Bindings::V0_1($guest) => {
                use bindings_v0_1::meridian::aggregate::types as $types;
                $body
            }
        }
    };
}

/// What `handle` returns, version-independent.
type Handled = Result<Vec<(String, Vec<u8>)>, String>;

impl Bindings {
    async fn describe(&self, store: &mut Store<GuestState>) -> wasmtime::Result<(String, u32)> {
        Ok(each_version!(self, guest => {
            let d = guest.call_describe(store).await?;
            (d.aggregate_type, d.schema_version)
        }))
    }

    async fn handle(
        &self,
        store: &mut Store<GuestState>,
        state: &[u8],
        command: &[u8],
    ) -> wasmtime::Result<Handled> {
        Ok(each_version!(self, guest => guest
            .call_handle(store, state, command)
            .await?
            .map(|events| events.into_iter().map(|e| (e.event_type, e.payload)).collect())
            .map_err(|r| r.message)))
    }

    async fn apply(
        &self,
        store: &mut Store<GuestState>,
        state: &[u8],
        event_type: &str,
        payload: &[u8],
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        each_version!(self, guest, types => {
            let event = types::Event {
                event_type: event_type.to_string(),
                payload: payload.to_vec(),
            };
            guest.call_apply(store, state, &event).await
        })
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Plugin {
    /// `type@vN`, for messages.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The plugin version number.
    pub fn version(&self) -> i32 {
        self.inner.version
    }

    /// The limits this plugin runs under.
    pub fn limits(&self) -> &SandboxLimits {
        &self.inner.limits
    }

    /// Calls `describe`: the aggregate type and schema version.
    pub async fn describe(&self) -> Result<(String, u32), PluginError> {
        self.session().describe_call().await
    }

    /// The contract version the component implements, e.g. `meridian:aggregate@0.2.0`.
    pub fn contract(&self) -> &'static str {
        match self.inner.pre {
            Pre::Current(_) => WIT_PACKAGES_SUPPORTED[0],
            Pre::V0_1(_) => WIT_PACKAGES_SUPPORTED[1],
        }
    }

    /// Calls `handle`. The outer error is a plugin fault; the inner one is the plugin's
    /// rejection message.
    pub async fn handle(
        &self,
        state: &[u8],
        command: &[u8],
    ) -> Result<Result<Vec<DecidedEvent>, String>, PluginError> {
        self.session().handle(state, command).await
    }

    /// Calls `apply` and returns the new state bytes.
    pub async fn apply(
        &self,
        state: &[u8],
        event_type: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, PluginError> {
        self.session().apply(state, event_type, payload).await
    }

    /// Enforces the output caps on what `handle` (or `execute`) returned.
    fn check_decided(
        &self,
        call: &'static str,
        events: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<DecidedEvent>, PluginError> {
        let limits = &self.inner.limits;
        if events.len() > limits.max_events_per_call as usize {
            return Err(self.invalid(
                call,
                format!(
                    "{} events, over the limit of {}",
                    events.len(),
                    limits.max_events_per_call
                ),
            ));
        }
        let total: usize = events
            .iter()
            .map(|(event_type, payload)| payload.len() + event_type.len())
            .sum();
        if total as u64 > limits.max_output_bytes {
            return Err(self.invalid(
                call,
                format!(
                    "{total} bytes of events, over the limit of {}",
                    limits.max_output_bytes
                ),
            ));
        }
        let events = events
            .into_iter()
            .map(|(event_type, payload)| {
                check_event_type(&event_type).map_err(|e| self.invalid(call, e))?;
                let payload = String::from_utf8(payload).map_err(|_| {
                    self.invalid(call, format!("event `{event_type}` payload is not UTF-8"))
                })?;
                let payload = serde_json::value::RawValue::from_string(payload).map_err(|e| {
                    self.invalid(
                        call,
                        format!("event `{event_type}` payload is not JSON: {e}"),
                    )
                })?;
                // Caught here, it fails this command alone; at the append it would fail
                // the batch it shares with other commands.
                let growth = crate::store::jsonb::check(payload.get()).map_err(|e| {
                    self.invalid(call, format!("event `{event_type}` payload: {e}"))
                })?;
                Ok(DecidedEvent {
                    printed_bytes: payload.get().len().saturating_add(growth),
                    event_type,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The cap bounds what a reader gets back too, which is larger than what the
        // plugin wrote when its numbers have exponents (`1e300` is read back as 301
        // digits): without this an event of a few kilobytes could come back as
        // gigabytes and stop every reader of the feed.
        let printed: usize = events
            .iter()
            .map(DecidedEvent::printed_len)
            .fold(0, usize::saturating_add);
        if printed as u64 > limits.max_output_bytes {
            return Err(self.invalid(
                call,
                format!(
                    "{printed} bytes of events as PostgreSQL prints them (it writes a number \
                     with an exponent, such as 1e300, with every digit), over the limit of {}",
                    limits.max_output_bytes
                ),
            ));
        }
        Ok(events)
    }

    /// Enforces the output caps on what `apply` returned.
    fn check_applied(
        &self,
        event_type: &str,
        result: Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, PluginError> {
        let state = result.map_err(|message| PluginError::ApplyFailed {
            plugin: self.inner.name.clone(),
            event_type: event_type.to_string(),
            message,
        })?;
        self.check_state("apply", state)
    }

    /// Enforces the output cap on a returned state.
    fn check_state(&self, call: &'static str, state: Vec<u8>) -> Result<Vec<u8>, PluginError> {
        if state.len() as u64 > self.inner.limits.max_output_bytes {
            return Err(self.invalid(
                call,
                format!(
                    "a state of {} bytes, over the limit of {}",
                    state.len(),
                    self.inner.limits.max_output_bytes
                ),
            ));
        }
        Ok(state)
    }

    fn invalid(&self, call: &'static str, message: String) -> PluginError {
        PluginError::InvalidOutput {
            plugin: self.inner.name.clone(),
            call,
            message,
        }
    }

    /// Borrows one instance for several calls (a command's `handle` and its `apply`s),
    /// which saves a pool round trip per call. The instance goes back to the pool when
    /// the session is dropped, unless a call trapped.
    pub fn session(&self) -> Session<'_> {
        let instance = self
            .inner
            .idle
            .lock()
            .expect("instance pool poisoned")
            .pop();
        Session {
            plugin: self,
            instance,
        }
    }

    fn classify(
        &self,
        call: &'static str,
        instance: &Instance,
        error: wasmtime::Error,
    ) -> PluginError {
        let plugin = self.inner.name.clone();
        if instance
            .store
            .data()
            .limiter
            .exceeded
            .load(Ordering::Relaxed)
        {
            return PluginError::OutOfMemory {
                plugin,
                call,
                limit: self.inner.limits.memory_bytes,
            };
        }
        if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return PluginError::DeadlineExceeded {
                plugin,
                call,
                deadline_ms: self.inner.limits.deadline_ms,
            };
        }
        // wasmtime's error for running out of hostcall fuel is a private type: known by
        // its words.
        if format!("{error:#}").contains("too much data is being copied between the host") {
            let limits = &self.inner.limits;
            return PluginError::InvalidOutput {
                plugin,
                call,
                message: format!(
                    "it passed the host more than {} bytes in one call; its caps are {} \
                     events and {} bytes of output a call",
                    limits.hostcall_fuel(),
                    limits.max_events_per_call,
                    limits.max_output_bytes
                ),
            };
        }
        // The guest's last stderr line (a panic message) says more than the trap.
        let trap = match error.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            // A host function's own error (a random draw too large, a full resource
            // table): its words are at the bottom of the chain, under wasmtime's
            // "error while executing at wasm backtrace".
            None => first_line(&error.root_cause().to_string()),
        };
        let message = match instance.store.data().stderr.last_message() {
            Some(line) => format!("{line} ({trap})"),
            None => trap,
        };
        PluginError::Trap {
            plugin,
            call,
            message,
        }
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
        let mut store = sandboxed_store(&self.inner.engine, &self.inner.limits);
        let instantiated = match &self.inner.pre {
            Pre::Current(pre) => pre
                .instantiate_async(&mut store)
                .await
                .map(Bindings::Current),
            Pre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(Bindings::V0_1),
        };
        let bindings = instantiated.map_err(|e| {
            if store.data().limiter.exceeded.load(Ordering::Relaxed) {
                PluginError::OutOfMemory {
                    plugin: self.inner.name.clone(),
                    call: "instantiate",
                    limit: self.inner.limits.memory_bytes,
                }
            } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                // A start function (a JavaScript or Python runtime starting up) that
                // outlasted the deadline: the limit to name, not a trap.
                PluginError::DeadlineExceeded {
                    plugin: self.inner.name.clone(),
                    call: "instantiate",
                    deadline_ms: self.inner.limits.deadline_ms,
                }
            } else {
                PluginError::Trap {
                    plugin: self.inner.name.clone(),
                    call: "instantiate",
                    message: format!("{e:#}"),
                }
            }
        })?;
        Ok(Instance {
            store,
            bindings,
            calls: 0,
        })
    }

    /// Creates one instance and drops it: what a call costs when no idle instance is
    /// pooled. For benchmarks.
    #[doc(hidden)]
    pub async fn cold_instantiate(&self) -> Result<(), PluginError> {
        self.instantiate().await.map(drop)
    }
}

/// One borrowed instance; see [`Plugin::session`].
pub struct Session<'a> {
    plugin: &'a Plugin,
    instance: Option<Instance>,
}

impl Session<'_> {
    /// Takes the session's instance (creating one if the pool had none) and arms it for
    /// one call.
    async fn begin(&mut self) -> Result<Instance, PluginError> {
        let mut instance = match self.instance.take() {
            Some(instance) => instance,
            // Boxed: creating an instance is rare, and its future is large; inline, every
            // call would carry (and move) it.
            None => Box::pin(self.plugin.instantiate()).await?,
        };
        instance.store.data_mut().reset_for_call();
        arm_deadline(
            &mut instance.store,
            self.plugin.inner.limits.deadline_ticks(),
        );
        Ok(instance)
    }

    /// Keeps the instance for the next call, or drops it if the call failed: after a
    /// trap its memory may be inconsistent.
    fn end<R>(
        &mut self,
        call: &'static str,
        mut instance: Instance,
        result: wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        match result {
            Ok(value) => {
                instance.calls += 1;
                // A session may make many calls (a replay makes one per event): an
                // instance due for recycling is replaced within it too, not only when
                // it goes back to the pool, or a leak of memory or resources would
                // fail a long replay at the same event every time.
                if instance.calls < INSTANCE_MAX_CALLS && !instance.store.data().limiter.past_half()
                {
                    self.instance = Some(instance);
                }
                Ok(value)
            }
            Err(error) => Err(self.plugin.classify(call, &instance, error)),
        }
    }

    /// `describe` on this session's instance: the cheapest call, for measuring the
    /// cost of crossing the boundary.
    #[doc(hidden)]
    pub async fn describe_call(&mut self) -> Result<(String, u32), PluginError> {
        let mut instance = self.begin().await?;
        let result = instance.bindings.describe(&mut instance.store).await;
        self.end("describe", instance, result)
    }

    /// `handle` on this session's instance; see [`Plugin::handle`].
    pub async fn handle(
        &mut self,
        state: &[u8],
        command: &[u8],
    ) -> Result<Result<Vec<DecidedEvent>, String>, PluginError> {
        let mut instance = self.begin().await?;
        let result = instance
            .bindings
            .handle(&mut instance.store, state, command)
            .await;
        match self.end("handle", instance, result)? {
            Ok(events) => self.plugin.check_decided("handle", events).map(Ok),
            Err(rejection) => Ok(Err(rejection)),
        }
    }

    /// Runs a command: decides its events and applies them to `state`. The outer error
    /// is a plugin fault; the inner one is the plugin's rejection message.
    ///
    /// One `execute` call for a 0.2.0 component; `handle` and then `apply` per event for
    /// a 0.1.0 one.
    pub async fn execute(
        &mut self,
        state: &[u8],
        command: &[u8],
    ) -> Result<Result<Executed, String>, PluginError> {
        if !matches!(self.plugin.inner.pre, Pre::Current(_)) {
            let events = match self.handle(state, command).await? {
                Ok(events) => events,
                Err(rejection) => return Ok(Err(rejection)),
            };
            let mut state = state.to_vec();
            for event in &events {
                state = self
                    .apply(&state, &event.event_type, event.payload.get().as_bytes())
                    .await?;
            }
            return Ok(Ok(Executed { events, state }));
        }
        let mut instance = self.begin().await?;
        let Bindings::Current(guest) = &instance.bindings else {
            unreachable!("checked above: a 0.2.0 component")
        };
        let result = guest
            .call_execute(&mut instance.store, state, command)
            .await;
        let decision = match self.end("execute", instance, result)? {
            Ok(decision) => decision,
            Err(rejection) => return Ok(Err(rejection.message)),
        };
        let events = decision
            .events
            .into_iter()
            .map(|e| (e.event_type, e.payload))
            .collect();
        let events = self.plugin.check_decided("execute", events)?;
        let state = self.plugin.check_state("execute", decision.state)?;
        Ok(Ok(Executed { events, state }))
    }

    /// `apply` on this session's instance; see [`Plugin::apply`].
    pub async fn apply(
        &mut self,
        state: &[u8],
        event_type: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, PluginError> {
        let mut instance = self.begin().await?;
        let result = instance
            .bindings
            .apply(&mut instance.store, state, event_type, payload)
            .await;
        let result = self.end("apply", instance, result)?;
        self.plugin.check_applied(event_type, result)
    }
}

/// Gives a call `ticks` epoch ticks: the deadline callback set at instantiation yields
/// at each and traps when none are left.
fn arm_deadline(store: &mut Store<GuestState>, ticks: u64) {
    store.data_mut().ticks_left = ticks;
    store.set_epoch_deadline(1);
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take()
            && instance.calls < INSTANCE_MAX_CALLS
            && !instance.store.data().limiter.past_half()
        {
            let mut idle = self
                .plugin
                .inner
                .idle
                .lock()
                .expect("instance pool poisoned");
            if idle.len() < MAX_IDLE_INSTANCES {
                idle.push(instance);
            }
        }
    }
}

/// Most bytes of an event type.
pub const MAX_EVENT_TYPE_BYTES: usize = 256;

/// Checks an event type a plugin decided. It travels in NATS headers
/// (`Meridian-Event-Type`, where a line break would end the header block) and into
/// a `TEXT` column (which refuses U+0000), so control characters are refused here,
/// where they fail one call, rather than wherever they would break.
fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.is_empty() {
        return Err("an event with an empty type".into());
    }
    if event_type.len() > MAX_EVENT_TYPE_BYTES {
        return Err(format!(
            "an event type of {} bytes, over the limit of {MAX_EVENT_TYPE_BYTES}",
            event_type.len()
        ));
    }
    if let Some(c) = event_type.chars().find(|c| c.is_control()) {
        return Err(format!(
            "event type {event_type:?} holds the control character {:?}",
            c
        ));
    }
    Ok(())
}

/// A store with the sandbox's limits in force (memory, instances, hostcall fuel) and
/// its deadline armed: what every instance of a plugin lives in.
fn sandboxed_store(engine: &Engine, limits: &SandboxLimits) -> Store<GuestState> {
    let mut store = Store::new(engine, GuestState::new(limits.memory_bytes));
    store.limiter(|state| &mut state.limiter);
    store.set_hostcall_fuel(limits.hostcall_fuel());
    // Each epoch tick gives the async runtime its thread back for a moment; once the
    // call has used up its ticks it traps. So a slow plugin never holds an async
    // worker for long, and a runaway one stops at its deadline.
    store.epoch_deadline_callback(|mut store| {
        let ticks = &mut store.data_mut().ticks_left;
        if *ticks <= 1 {
            Ok(UpdateDeadline::Interrupt)
        } else {
            *ticks -= 1;
            Ok(UpdateDeadline::Yield(1))
        }
    });
    // Instantiation runs the component's start code, which gets the same deadline.
    arm_deadline(&mut store, limits.deadline_ticks());
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component of one core module that defines `memories` empty linear memories
    /// (and, when `memory64`, makes them 64-bit), instantiated once.
    fn component_with_memories(memories: u8, memory64: bool) -> Vec<u8> {
        let flags = if memory64 { 0x04 } else { 0x00 };
        let mut memory_section = vec![memories];
        for _ in 0..memories {
            memory_section.extend([flags, 0x00]);
        }
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.push(0x05);
        module.push(memory_section.len() as u8);
        module.extend(memory_section);
        let mut component = b"\0asm\x0d\0\x01\0".to_vec();
        component.push(0x01);
        component.push(module.len() as u8);
        component.extend(module);
        // One core instance: instantiate module 0 with no arguments.
        component.extend([0x02, 0x04, 0x01, 0x00, 0x00, 0x00]);
        component
    }

    async fn instantiate_raw(runtime: &Runtime, bytes: &[u8]) -> Result<(), String> {
        let engine = &runtime.inner.engine;
        let component =
            wasmtime::component::Component::new(engine, bytes).map_err(|e| format!("{e:#}"))?;
        let mut store = sandboxed_store(engine, &SandboxLimits::default());
        wasmtime::component::Linker::<GuestState>::new(engine)
            .instantiate_async(&mut store, &component)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    /// Every memory reserves address space for as long as its instance lives, however
    /// small: an instance past the sandbox's count of memories is refused, so many
    /// instances of a hostile plugin cannot use up the host's address space.
    #[tokio::test]
    async fn an_instance_with_more_memories_than_the_sandbox_allows_is_refused() {
        let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
        let allowed = sandbox::MAX_MEMORIES as u8;
        instantiate_raw(&runtime, &component_with_memories(allowed, false))
            .await
            .expect("as many memories as allowed");
        let refused = instantiate_raw(&runtime, &component_with_memories(allowed + 1, false))
            .await
            .expect_err("one memory more than allowed");
        assert!(refused.contains("memor"), "{refused}");
    }

    /// A 64-bit memory could ask to grow by nearly 2^64 bytes; no toolchain a plugin is
    /// built with needs one, so such a component does not compile.
    #[tokio::test]
    async fn a_component_with_a_64_bit_memory_does_not_compile() {
        let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
        let refused = instantiate_raw(&runtime, &component_with_memories(1, true))
            .await
            .expect_err("64-bit memories are off");
        assert!(refused.contains("64"), "{refused}");
    }

    /// A NaN's bits are the processor's unless canonicalised: x86 divides 0 by 0
    /// into `0xffc00000`, ARM into `0x7fc00000`. A plugin storing them would replay
    /// differently on another host.
    #[tokio::test]
    async fn a_nan_has_the_same_bits_on_every_processor() {
        let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
        let engine = &runtime.inner.engine;
        // (func (export "f") (param f32 f32) (result i32)
        //   (i32.reinterpret_f32 (f32.div (local.get 0) (local.get 1))))
        let module: &[u8] = &[
            0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
            0x01, 0x07, 0x01, 0x60, 0x02, 0x7d, 0x7d, 0x01, 0x7f, // type
            0x03, 0x02, 0x01, 0x00, // function
            0x07, 0x05, 0x01, 0x01, b'f', 0x00, 0x00, // export
            0x0a, 0x0a, 0x01, 0x08, 0x00, 0x20, 0x00, 0x20, 0x01, 0x95, 0xbc, 0x0b, // code
        ];
        let module = wasmtime::Module::new(engine, module).unwrap();
        let mut store = sandboxed_store(engine, &SandboxLimits::default());
        let instance = wasmtime::Instance::new_async(&mut store, &module, &[])
            .await
            .unwrap();
        let divide = instance
            .get_typed_func::<(f32, f32), i32>(&mut store, "f")
            .unwrap();
        let bits = divide.call_async(&mut store, (0.0, 0.0)).await.unwrap();
        assert_eq!(bits as u32, 0x7fc0_0000, "{:#x}", bits as u32);
    }

    #[test]
    fn event_types_that_cannot_travel_are_refused() {
        assert_eq!(check_event_type("Deposited"), Ok(()));
        assert_eq!(check_event_type("Konto eröffnet ✓"), Ok(()));
        for bad in ["", "Line\nBreak", "Car\rriage", "Nul\0", &"x".repeat(257)] {
            assert!(check_event_type(bad).is_err(), "{bad:?}");
        }
    }
}
