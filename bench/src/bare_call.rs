//! Reference points for the WASM-vs-native benchmark: the same component called the
//! plainest ways wasmtime allows, outside Meridian's runtime.
//!
//! Meridian calls a plugin with wasmtime's async API (the guest runs on a fiber inside
//! the command's task), on an instance borrowed from a pool, under an epoch deadline,
//! and checks what comes back. Timing the same `execute` export on bare instances
//! splits the gap to native code into its parts:
//!
//! - *async*: one bare instance called as the host calls, with wasmtime's async API and
//!   epoch checks, but without the pool, the deadline callback or the output checks —
//!   the difference to the runtime's figure is Meridian's own call path;
//! - *sync*: the same with a synchronous call (no fiber) — the difference is what the
//!   async API costs;
//! - *sync, no epoch*: compiled without epoch checks — the difference is what the
//!   deadline checks cost inside the guest; what is left over native is the guest
//!   code as Cranelift compiles it, plus copying the arguments and results.
//!
//! The last two are not ways the host may run plugins: a synchronous call cannot await
//! WASI (a plugin writing to stderr) without blocking an async worker, and without
//! epoch checks nothing stops a runaway plugin. The benchmark makes them all the same,
//! on its one thread and interleaved with the other measurements, so that all of them
//! meet the same machine: bank-account's `execute` and `describe` call no WASI, and a
//! component that did would make wasmtime-wasi panic here, not measure wrong.

use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod sync_bindings {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "aggregate",
    });
}

mod async_bindings {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "aggregate",
        exports: { default: async },
    });
}

/// A command's state and command bytes.
pub type Input = (Vec<u8>, Vec<u8>);

/// The command mix the WASM-vs-native benchmark times, natively, through the runtime
/// and on the bare instances alike: deposits, withdrawals and a rejection on one state.
pub fn workload() -> Vec<Input> {
    let state = br#"{"owner":"alice","balance":500,"open":true}"#.to_vec();
    let commands: [&[u8]; 4] = [
        br#"{"type":"Deposit","amount":17}"#,
        br#"{"type":"Withdraw","amount":5}"#,
        br#"{"type":"Deposit","amount":3}"#,
        br#"{"type":"Withdraw","amount":100000}"#, // rejected: insufficient funds
    ];
    commands
        .iter()
        .map(|c| (state.clone(), c.to_vec()))
        .collect()
}

/// What `execute` gave: the events as `(type, payload)` and the new state, or the
/// rejection message. The shape of `meridian_guest::codec::execute`'s result, so the two
/// can be compared.
pub type Outcome = Result<(Vec<(String, Vec<u8>)>, Vec<u8>), String>;

/// What native code gives for a command: the component's `execute` export, bank-account's
/// `meridian_guest::codec::execute`, called directly.
pub fn native_outcome(state: &[u8], command: &[u8]) -> Outcome {
    meridian_guest::codec::execute::<bank_account::BankAccount>(state, command)
        .map_err(|rejection| rejection.into_message())
}

/// One round's mean cost per call.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// `execute` through wasmtime's async API, with epoch checks.
    pub execute_async: Duration,
    /// `execute` called synchronously, with epoch checks.
    pub execute_sync: Duration,
    /// `execute` called synchronously on an instance compiled without epoch checks.
    pub execute_sync_without_epoch: Duration,
    /// `describe` (no input, a small record out) called synchronously, with epoch
    /// checks: the bare cost of crossing into the guest and back.
    pub describe_sync: Duration,
}

/// wasmtime's error as an `anyhow` one, its causes included.
fn wasm_error(error: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{error:#}")
}

/// The store data: a WASI context with nothing in it.
struct Data {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Data {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One bare instance of each kind, each in a store and engine of its own.
pub struct BareCalls {
    sync: (Store<Data>, sync_bindings::Aggregate),
    sync_without_epoch: (Store<Data>, sync_bindings::Aggregate),
    async_: (Store<Data>, async_bindings::Aggregate),
}

/// A store whose engine does or does not compile epoch checks in. Nothing increments
/// the epoch, so the deadline is never reached; the checks still run, as they do under
/// the host's ticker.
fn store(epoch: bool) -> wasmtime::Result<Store<Data>> {
    let mut config = Config::new();
    config.epoch_interruption(epoch);
    let mut store = Store::new(
        &Engine::new(&config)?,
        Data {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    store.set_epoch_deadline(1);
    Ok(store)
}

fn sync_instance(
    component: &[u8],
    epoch: bool,
) -> wasmtime::Result<(Store<Data>, sync_bindings::Aggregate)> {
    let mut store = store(epoch)?;
    let component = Component::from_binary(store.engine(), component)?;
    let mut linker = Linker::new(store.engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    let guest = sync_bindings::Aggregate::instantiate(&mut store, &component, &linker)?;
    Ok((store, guest))
}

/// Converts a decision of either bindings (sync or async) into an [`Outcome`].
macro_rules! outcome {
    ($result:expr) => {
        $result
            .map(|decision| {
                let events = decision
                    .events
                    .into_iter()
                    .map(|e| (e.event_type, e.payload))
                    .collect();
                (events, decision.state)
            })
            .map_err(|rejection| rejection.message)
    };
}

impl BareCalls {
    /// Compiles `component` for each kind of call and instantiates it.
    pub async fn new(component: &[u8]) -> anyhow::Result<Self> {
        Self::create(component).await.map_err(wasm_error)
    }

    async fn create(component: &[u8]) -> wasmtime::Result<Self> {
        let mut store = store(true)?;
        let compiled = Component::from_binary(store.engine(), component)?;
        let mut linker = Linker::new(store.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        let guest =
            async_bindings::Aggregate::instantiate_async(&mut store, &compiled, &linker).await?;
        Ok(Self {
            sync: sync_instance(component, true)?,
            sync_without_epoch: sync_instance(component, false)?,
            async_: (store, guest),
        })
    }

    /// Fails unless each kind of call gives native code's outcome for every input: a
    /// reference row that computed something else would time the wrong thing.
    pub async fn check_against_native(&mut self, work: &[Input]) -> anyhow::Result<()> {
        for (state, command) in work {
            let native = native_outcome(state, command);
            let calls = [
                ("async", self.execute_async(state, command).await),
                ("sync", Self::execute_sync(&mut self.sync, state, command)),
                (
                    "sync without epoch checks",
                    Self::execute_sync(&mut self.sync_without_epoch, state, command),
                ),
            ];
            for (kind, bare) in calls {
                let bare = bare.map_err(wasm_error)?;
                anyhow::ensure!(
                    native == bare,
                    "a bare {kind} call and native code disagree: {native:?} vs {bare:?}"
                );
            }
        }
        Ok(())
    }

    async fn execute_async(&mut self, state: &[u8], command: &[u8]) -> wasmtime::Result<Outcome> {
        let (store, guest) = &mut self.async_;
        // What the host does before every call.
        store.set_epoch_deadline(1);
        Ok(outcome!(guest.call_execute(store, state, command).await?))
    }

    fn execute_sync(
        (store, guest): &mut (Store<Data>, sync_bindings::Aggregate),
        state: &[u8],
        command: &[u8],
    ) -> wasmtime::Result<Outcome> {
        store.set_epoch_deadline(1);
        Ok(outcome!(guest.call_execute(store, state, command)?))
    }

    /// Measures `calls` calls of each kind, cycling through `work`.
    pub async fn round(&mut self, work: &[Input], calls: usize) -> anyhow::Result<Round> {
        self.timed_round(work, calls).await.map_err(wasm_error)
    }

    async fn timed_round(&mut self, work: &[Input], calls: usize) -> wasmtime::Result<Round> {
        let per_call = |started: Instant| started.elapsed() / calls.max(1) as u32;
        let inputs = || work.iter().cycle().take(calls);

        let started = Instant::now();
        for (state, command) in inputs() {
            std::hint::black_box(self.execute_async(state, command).await?.ok());
        }
        let execute_async = per_call(started);

        let started = Instant::now();
        for (state, command) in inputs() {
            std::hint::black_box(Self::execute_sync(&mut self.sync, state, command)?.ok());
        }
        let execute_sync = per_call(started);

        let started = Instant::now();
        for (state, command) in inputs() {
            let outcome = Self::execute_sync(&mut self.sync_without_epoch, state, command)?;
            std::hint::black_box(outcome.ok());
        }
        let execute_sync_without_epoch = per_call(started);

        let (store, guest) = &mut self.sync;
        let started = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(guest.call_describe(&mut *store)?);
        }
        let describe_sync = per_call(started);

        Ok(Round {
            execute_async,
            execute_sync,
            execute_sync_without_epoch,
            describe_sync,
        })
    }
}
