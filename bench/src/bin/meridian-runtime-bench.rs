//! WASM vs native: the bank-account aggregate's per-command cost through Meridian's
//! plugin runtime against the same code compiled natively, plus instantiate and
//! compile cost and replay speed.
//!
//! Both sides run the identical byte-level path, `meridian_guest::codec::execute`: JSON
//! state and command in, the decided events and the new state out. Natively that is a
//! plain function call; through WASM it is one call of the component's `execute`
//! export, as the host's executor makes it. The two must agree on every command of the
//! workload, or the run fails.
//!
//! For reference it also times the same export on bare instances, through wasmtime's
//! async API as the host calls, synchronously, and synchronously without epoch checks
//! ([`meridian_bench::bare_call`]), which splits the gap to native code into Meridian's
//! call path, the async API, the deadline checks and the guest code itself.
//!
//! ```text
//! bash plugins/build.sh
//! cargo run --release -p meridian-bench --bin meridian-runtime-bench -- \
//!     --wasm target/wasm32-wasip2/release/bank_account.wasm --json runtime.json
//! ```
//!
//! With `--language NAME=PATH` (repeated) it compares bank-account components written in
//! different languages instead: size, cold start (compile with no cache, then the first
//! instantiation), a restart's load from the compile cache, and the same per-command
//! workload; every component's replay must fold to the native state byte for byte.
//!
//! ```text
//! cargo run --release -p meridian-bench --bin meridian-runtime-bench -- \
//!     --language rust=target/wasm32-wasip2/release/bank_account.wasm \
//!     --language python=target/wasm32-wasip2/release/bank_account_py.wasm \
//!     --language javascript=target/wasm32-wasip2/release/bank_account_js.wasm \
//!     --commands 20000 --replay-events 20000 --json languages.json
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bank_account::BankAccount;
use clap::Parser;
use meridian::runtime::{Runtime, RuntimeConfig, SandboxLimits};
use meridian_bench::bare_call::{BareCalls, Round, native_outcome, workload};
use meridian_guest::codec;

/// Command-line options.
#[derive(Debug, Parser)]
struct Args {
    /// The bank-account component.
    #[arg(long, default_value = "target/wasm32-wasip2/release/bank_account.wasm")]
    wasm: PathBuf,
    /// Commands per measurement.
    #[arg(long, default_value_t = 200_000)]
    commands: usize,
    /// Rounds the commands are split into; each side's median round is reported.
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Events replayed through `apply` for the replay measurement.
    #[arg(long, default_value_t = 100_000)]
    replay_events: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Compare components across languages instead: `NAME=PATH`, repeated.
    #[arg(long = "language", value_parser = parse_language)]
    languages: Vec<(String, PathBuf)>,
}

fn parse_language(arg: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got `{arg}`"))?;
    Ok((name.to_owned(), PathBuf::from(path)))
}

// The host runs plugin calls on async tasks (wasmtime's async API); so does this,
// on one thread, so the measurement has no thread hops in it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.languages.is_empty() {
        return compare_languages(&args).await;
    }
    let bytes = std::fs::read(&args.wasm)
        .with_context(|| format!("reading {} (run plugins/build.sh)", args.wasm.display()))?;
    let runtime = Runtime::new(RuntimeConfig::default())?;

    let started = Instant::now();
    let plugin = runtime.load("bank-account", 1, "bench", &bytes, SandboxLimits::default())?;
    let compile = started.elapsed();

    let plugin = &plugin;
    let instantiate = time(200, |_| async move { Ok(plugin.cold_instantiate().await?) }).await?;

    let work = workload();
    for (state, command) in &work {
        let native = native_outcome(state, command);
        let wasm = plugin
            .session()
            .execute(state, command)
            .await?
            .map(|executed| {
                let events = executed
                    .events
                    .into_iter()
                    .map(|e| (e.event_type, e.payload.get().as_bytes().to_vec()))
                    .collect::<Vec<_>>();
                (events, executed.state)
            });
        anyhow::ensure!(
            native == wasm,
            "WASM and native disagree: {native:?} vs {wasm:?}"
        );
    }
    let mut bare = BareCalls::new(&bytes).await?;
    bare.check_against_native(&work).await?;
    // Warm every path (allocators, instance pool, caches).
    for (state, command) in work.iter().cycle().take(10_000) {
        native_command(state, command);
        wasm_command(plugin, state, command).await?;
    }
    bare.round(&work, 10_000).await?;

    // Rounds alternate native code, the runtime and the bare calls, so a burst of load
    // from elsewhere on the machine lands on all of them rather than on one; the median
    // round is what is reported.
    let rounds = usize::from(args.rounds);
    let per_round = (args.commands / rounds).max(1);
    let mut native_rounds = Vec::with_capacity(rounds);
    let mut wasm_rounds = Vec::with_capacity(rounds);
    let mut bare_rounds = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        native_rounds.push(
            time(per_round, |i| {
                let (state, command) = &work[i % work.len()];
                native_command(state, command);
                std::future::ready(Ok(()))
            })
            .await?,
        );
        wasm_rounds.push(
            time(per_round, |i| {
                let (state, command) = &work[i % work.len()];
                wasm_command(plugin, state, command)
            })
            .await?,
        );
        bare_rounds.push(bare.round(&work, per_round).await?);
    }
    drop(bare);
    let native = median(native_rounds);
    let wasm = median(wasm_rounds);
    let bare = |of: fn(&Round) -> Duration| median(bare_rounds.iter().map(of).collect());
    let bare_async = bare(|r| r.execute_async);
    let bare_sync = bare(|r| r.execute_sync);
    let bare_sync_without_epoch = bare(|r| r.execute_sync_without_epoch);
    let bare_describe = bare(|r| r.describe_sync);

    // Replay: fold `replay_events` Deposited events into one state through WASM apply.
    let payload = br#"{"amount":1}"#;
    let mut state = codec::apply::<BankAccount>(b"", "Opened", br#"{"owner":"r"}"#)
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let mut session = plugin.session();
    for _ in 0..args.replay_events {
        state = session.apply(&state, "Deposited", payload).await?;
    }
    drop(session);
    let replay = started.elapsed();
    let replay_rate = args.replay_events as f64 / replay.as_secs_f64();
    let mut native_state = codec::apply::<BankAccount>(b"", "Opened", br#"{"owner":"r"}"#)
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    for _ in 0..args.replay_events {
        native_state = codec::apply::<BankAccount>(&native_state, "Deposited", payload)
            .map_err(anyhow::Error::msg)?;
    }
    let native_replay_rate = args.replay_events as f64 / started.elapsed().as_secs_f64();
    assert_eq!(state, native_state, "WASM and native replay disagree");

    // The bare cost of crossing into the guest and back: `describe` takes no input and
    // returns a small record, so this is almost all boundary.
    let mut boundary_rounds = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        boundary_rounds.push(time(per_round, |_| describe_call(plugin)).await?);
    }
    let boundary = median(boundary_rounds);

    let ratio = wasm.as_secs_f64() / native.as_secs_f64();
    println!("component size         {:>10} bytes", bytes.len());
    println!(
        "compile (cold)         {:>10.1} ms",
        compile.as_secs_f64() * 1e3
    );
    println!(
        "instantiate            {:>10.1} µs",
        instantiate.as_secs_f64() * 1e6
    );
    println!(
        "native execute         {:>10.2} µs/command",
        native.as_secs_f64() * 1e6
    );
    println!(
        "WASM execute           {:>10.2} µs/command",
        wasm.as_secs_f64() * 1e6
    );
    println!("WASM / native          {:>10.2}x  (goal <= 1.3x)", ratio);
    println!(
        "one empty guest call   {:>10.2} µs",
        boundary.as_secs_f64() * 1e6
    );
    println!("for reference, a bare instance (no pool, no output checks):");
    println!(
        "  async execute        {:>10.2} µs/command",
        bare_async.as_secs_f64() * 1e6
    );
    println!(
        "  sync execute         {:>10.2} µs/command  (no fiber: cannot serve WASI safely)",
        bare_sync.as_secs_f64() * 1e6
    );
    println!(
        "  sync, no epoch       {:>10.2} µs/command  (and no CPU deadline)",
        bare_sync_without_epoch.as_secs_f64() * 1e6
    );
    println!(
        "  sync empty call      {:>10.2} µs",
        bare_describe.as_secs_f64() * 1e6
    );
    println!(
        "replay through WASM    {:>10.0} events/s  (goal >= 100,000)",
        replay_rate
    );
    println!(
        "replay natively        {:>10.0} events/s",
        native_replay_rate
    );
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "component_bytes": bytes.len(),
            "compile_ms": compile.as_secs_f64() * 1e3,
            "instantiate_us": instantiate.as_secs_f64() * 1e6,
            "native_us_per_command": native.as_secs_f64() * 1e6,
            "wasm_us_per_command": wasm.as_secs_f64() * 1e6,
            "wasm_over_native": ratio,
            "empty_call_us": boundary.as_secs_f64() * 1e6,
            "bare_async_us_per_command": bare_async.as_secs_f64() * 1e6,
            "bare_sync_us_per_command": bare_sync.as_secs_f64() * 1e6,
            "bare_sync_no_epoch_us_per_command": bare_sync_without_epoch.as_secs_f64() * 1e6,
            "bare_sync_empty_call_us": bare_describe.as_secs_f64() * 1e6,
            "replay_events_per_s": replay_rate,
            "native_replay_events_per_s": native_replay_rate,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

/// Mean time per iteration.
async fn time<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    for i in 0..n {
        f(i).await?;
    }
    Ok(started.elapsed() / n as u32)
}

/// The middle value.
fn median(mut rounds: Vec<Duration>) -> Duration {
    rounds.sort();
    rounds[rounds.len() / 2]
}

/// One call of the cheapest export, `describe`, on a pooled instance.
async fn describe_call(plugin: &meridian::runtime::Plugin) -> anyhow::Result<()> {
    plugin.session().describe_call().await?;
    Ok(())
}

fn native_command(state: &[u8], command: &[u8]) {
    // What the component's `execute` export runs, called directly.
    if let Ok(decision) = codec::execute::<BankAccount>(state, command) {
        std::hint::black_box(decision);
    }
}

async fn wasm_command(
    plugin: &meridian::runtime::Plugin,
    state: &[u8],
    command: &[u8],
) -> anyhow::Result<()> {
    // As the executor does: a pooled instance, one `execute` call.
    if let Ok(executed) = plugin.session().execute(state, command).await? {
        std::hint::black_box(executed);
    }
    Ok(())
}

/// What one language's component costs; see [`compare_languages`].
#[derive(serde::Serialize)]
struct LanguageResult {
    name: String,
    component_bytes: usize,
    /// Compiling the component with an empty cache.
    compile_ms: f64,
    /// The first instantiation after compiling (runs the component's start code).
    first_instantiate_ms: f64,
    /// `compile_ms + first_instantiate_ms`: a host's first command of a new plugin.
    cold_start_ms: f64,
    /// Loading the compiled component from the on-disk cache, as a restart does.
    cached_load_ms: f64,
    /// Size of the compiled (cached) component.
    compiled_bytes: u64,
    /// Creating one more instance of a loaded plugin.
    instantiate_us: f64,
    us_per_command: f64,
    empty_call_us: f64,
    replay_events_per_s: f64,
}

/// Runs the bank-account workload through each `--language` component.
async fn compare_languages(args: &Args) -> anyhow::Result<()> {
    let work = workload();
    let mut results = Vec::new();
    for (name, path) in &args.languages {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading {} (run plugins/build.sh)", path.display()))?;
        // A cache directory of our own: the first load compiles and fills it, a second
        // runtime (a restarted host) loads from it.
        let cache = std::env::temp_dir().join(format!(
            "meridian-runtime-bench-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&cache);
        let config = RuntimeConfig {
            cache_dir: Some(cache.clone()),
        };
        let limits = SandboxLimits::default();
        let sha = format!("bench-{name}");

        let runtime = Runtime::new(config.clone())?;
        let started = Instant::now();
        let plugin = runtime.load("bank-account", 1, &sha, &bytes, limits)?;
        let compile = started.elapsed();
        let started = Instant::now();
        plugin.session().describe_call().await?;
        let first_instantiate = started.elapsed();

        let restarted = Runtime::new(config)?;
        let started = Instant::now();
        let reloaded = restarted.load("bank-account", 1, &sha, &bytes, limits)?;
        let cached_load = started.elapsed();
        drop(reloaded);
        let compiled_bytes = std::fs::read_dir(&cache)?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.metadata().ok())
            .map(|meta| meta.len())
            .sum();
        let _ = std::fs::remove_dir_all(&cache);

        let plugin = &plugin;
        let instantiate = time(20, |_| async move { Ok(plugin.cold_instantiate().await?) }).await?;

        for (state, command) in work.iter().cycle().take(args.commands.min(2_000)) {
            wasm_command(plugin, state, command).await?;
        }
        let per_command = time(args.commands, |i| {
            let (state, command) = &work[i % work.len()];
            wasm_command(plugin, state, command)
        })
        .await?;
        let empty_call = time(args.commands, |_| describe_call(plugin)).await?;

        let payload = br#"{"amount":1}"#;
        let opened = br#"{"owner":"r"}"#;
        let mut native =
            codec::apply::<BankAccount>(b"", "Opened", opened).map_err(anyhow::Error::msg)?;
        let mut session = plugin.session();
        let mut state = session.apply(b"", "Opened", opened).await?;
        let started = Instant::now();
        for _ in 0..args.replay_events {
            state = session.apply(&state, "Deposited", payload).await?;
        }
        let replay = started.elapsed();
        drop(session);
        for _ in 0..args.replay_events {
            native = codec::apply::<BankAccount>(&native, "Deposited", payload)
                .map_err(anyhow::Error::msg)?;
        }
        anyhow::ensure!(
            state == native,
            "{name}: replay folded to {} instead of {}",
            String::from_utf8_lossy(&state),
            String::from_utf8_lossy(&native)
        );

        let result = LanguageResult {
            name: name.clone(),
            component_bytes: bytes.len(),
            compile_ms: compile.as_secs_f64() * 1e3,
            first_instantiate_ms: first_instantiate.as_secs_f64() * 1e3,
            cold_start_ms: (compile + first_instantiate).as_secs_f64() * 1e3,
            cached_load_ms: cached_load.as_secs_f64() * 1e3,
            compiled_bytes,
            instantiate_us: instantiate.as_secs_f64() * 1e6,
            us_per_command: per_command.as_secs_f64() * 1e6,
            empty_call_us: empty_call.as_secs_f64() * 1e6,
            replay_events_per_s: args.replay_events as f64 / replay.as_secs_f64(),
        };
        println!(
            "{:<11} {:>10} bytes  cold start {:>8.0} ms (compile {:.0} + instantiate {:.1})  \
             cached load {:>6.0} ms  instantiate {:>7.1} µs  {:>7.2} µs/command  \
             empty call {:>6.2} µs  replay {:>9.0} events/s",
            result.name,
            result.component_bytes,
            result.cold_start_ms,
            result.compile_ms,
            result.first_instantiate_ms,
            result.cached_load_ms,
            result.instantiate_us,
            result.us_per_command,
            result.empty_call_us,
            result.replay_events_per_s,
        );
        results.push(result);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}
