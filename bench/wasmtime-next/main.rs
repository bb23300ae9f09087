//! The bare-instance reference rows of `meridian-runtime-bench` (`bare_call.rs`), built
//! against another wasmtime release than the host's, next to native code.
//!
//! Not part of the workspace: `scripts/bench-wasmtime-next.sh` assembles it into a crate
//! of its own per wasmtime version (a newer wasmtime may need a newer Rust than the
//! workspace's), so that the same bank-account component can be timed under both
//! releases on one machine. It answers one question: would upgrading wasmtime close
//! the gap between the plugin runtime and native code?

mod bare_call;

use std::time::{Duration, Instant};

use bank_account::BankAccount;
use meridian_guest::codec;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(wasm), Some(label)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: wasmtime-next <component.wasm> <label>");
    };
    let component = std::fs::read(&wasm)?;
    let work = bare_call::workload();
    let mut bare = bare_call::BareCalls::new(&component).await?;

    // Every kind of call must give native code's answer before anything is timed.
    bare.check_against_native(&work).await?;

    const CALLS: usize = 100_000;
    const ROUNDS: usize = 15;
    let mut rounds: Vec<[Duration; 5]> = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let round = bare.round(&work, CALLS).await?;
        let started = Instant::now();
        for (state, command) in work.iter().cycle().take(CALLS) {
            if let Ok(decision) = codec::execute::<BankAccount>(state, command) {
                std::hint::black_box(decision);
            }
        }
        let native = started.elapsed() / CALLS as u32;
        rounds.push([
            round.execute_async,
            round.execute_sync,
            round.execute_sync_without_epoch,
            round.describe_sync,
            native,
        ]);
    }
    let median = |k: usize| {
        let mut values: Vec<Duration> = rounds.iter().map(|r| r[k]).collect();
        values.sort();
        values[values.len() / 2].as_secs_f64() * 1e6
    };
    println!(
        "{label}: async {:.2} µs · sync {:.2} µs · sync without epoch checks {:.2} µs · \
         empty sync call {:.2} µs · native {:.2} µs (medians of {ROUNDS} rounds)",
        median(0),
        median(1),
        median(2),
        median(3),
        median(4),
    );
    Ok(())
}
