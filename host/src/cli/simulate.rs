//! `meridian simulate`: run the deterministic cluster simulator over many seeds, or
//! replay one seed with its full trace.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::cluster::sim::{self, SimOptions, SimReport, Stats};

/// Counters summed over seeds.
#[derive(Default)]
struct Totals {
    stats: Stats,
    seeds_fenced: u64,
    /// Slowest convergence after healing, and its seed.
    slowest: (u64, u64),
}

impl Totals {
    fn add(&mut self, seed: u64, s: &Stats) {
        self.slowest = self.slowest.max((s.converged_after, seed));
        let t = &mut self.stats;
        t.commands += s.commands;
        t.acked += s.acked;
        t.given_up += s.given_up;
        t.appends += s.appends;
        t.fenced += s.fenced;
        t.conflicts += s.conflicts;
        t.duplicates += s.duplicates;
        t.faults += s.faults;
        t.crashes += s.crashes;
        t.pauses += s.pauses;
        t.stale_pauses += s.stale_pauses;
        t.drains += s.drains;
        self.seeds_fenced += u64::from(s.fenced > 0);
    }
}

/// Arguments of `meridian simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub start_seed: u64,
    /// Run only this seed (e.g. to replay a failure).
    #[arg(long)]
    pub seed: Option<u64>,
    /// With `--seed`: print every trace line as it happens.
    #[arg(long, requires = "seed")]
    pub trace: bool,
    /// Threads running seeds in parallel (default: one per core).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Turn off the store's fence check, to see the checker catch stale owners.
    #[arg(long, hide = true)]
    pub disable_fence: bool,
    /// Have the store, once converged, read a live member as dead for a second, to see
    /// the checker catch partitions moving with no membership change.
    #[arg(long, hide = true)]
    pub blind_observation: bool,
    /// Simulate a degraded database (2–60 ms per operation, one in ten 0.1–1.5 s more).
    #[arg(long)]
    pub slow_db: bool,
    /// Model a driver that heartbeats inside its poll loop, behind lease operations
    /// (the real driver heartbeats on its own timer).
    #[arg(long)]
    pub heartbeat_in_loop: bool,
}

impl SimulateArgs {
    /// The simulator's options these arguments ask for.
    fn options(&self) -> SimOptions {
        SimOptions {
            disable_fence: self.disable_fence,
            blind_observation: self.blind_observation,
            slow_db: self.slow_db,
            heartbeat_apart: !self.heartbeat_in_loop,
            ..SimOptions::default()
        }
    }
}

/// Runs the seeds; fails (exit code 1) if any seed violated an invariant.
pub async fn execute(args: SimulateArgs) -> anyhow::Result<()> {
    let options = args.options();
    if let Some(seed) = args.seed {
        let options = SimOptions {
            echo_trace: args.trace,
            ..options
        };
        let report = sim::run_seed(seed, &options);
        if args.trace {
            // The trace is already out; just the verdict.
            out!("seed {seed}: {}", report.summary);
            match &report.violation {
                Some(v) => out!("VIOLATION of {:?}: {}", v.invariant, v.message),
                None => out!("passed ({:?})", report.stats),
            }
            out!(
                "{} trace lines, hash {:016x}",
                report.trace_lines,
                report.trace_hash
            );
        } else {
            out!("{report}");
        }
        if report.failed() {
            anyhow::bail!("seed {seed} failed");
        }
        return Ok(());
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failures: Mutex<Vec<SimReport>> = Mutex::new(Vec::new());
    let totals: Mutex<Totals> = Mutex::new(Totals::default());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.seeds {
                        return;
                    }
                    let seed = args.start_seed + i;
                    let report = sim::run_seed(seed, &options);
                    totals
                        .lock()
                        .expect("not poisoned")
                        .add(seed, &report.stats);
                    if report.failed() {
                        eprintln!(
                            "seed {seed} FAILED: {}",
                            report.violation.as_ref().map_or("", |v| v.message.as_str())
                        );
                        failures.lock().expect("not poisoned").push(report);
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished.is_multiple_of(1000) {
                        let failed = failures.lock().expect("not poisoned").len();
                        eprintln!(
                            "{finished}/{} seeds, {failed} failing, {:.0} seeds/s",
                            args.seeds,
                            finished as f64 / started.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().expect("not poisoned");
    failures.sort_by_key(|r| r.seed);
    let elapsed = started.elapsed().as_secs_f64();
    for report in failures.iter().take(5) {
        out!("{report}");
    }
    let t = totals.into_inner().expect("not poisoned");
    out!(
        "exercised: {} commands ({} acknowledged, {} given up), {} appends, {} fenced \
         (in {} seeds), {} conflicts, {} duplicates; {} faults: {} crashes, {} pauses \
         ({} of an owner with commands waiting), {} drains; slowest convergence after \
         healing {} ms (seed {})",
        t.stats.commands,
        t.stats.acked,
        t.stats.given_up,
        t.stats.appends,
        t.stats.fenced,
        t.seeds_fenced,
        t.stats.conflicts,
        t.stats.duplicates,
        t.stats.faults,
        t.stats.crashes,
        t.stats.pauses,
        t.stats.stale_pauses,
        t.stats.drains,
        t.slowest.0 / sim::MS,
        t.slowest.1
    );
    out!(
        "{} seeds from {} in {elapsed:.1} s ({:.0} seeds/s): {} failed",
        args.seeds,
        args.start_seed,
        args.seeds as f64 / elapsed,
        failures.len()
    );
    if failures.is_empty() {
        return Ok(());
    }
    let seeds: Vec<String> = failures.iter().map(|r| r.seed.to_string()).collect();
    anyhow::bail!(
        "{} seeds failed: {} (replay one with `meridian simulate --seed S --trace`)",
        failures.len(),
        seeds.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A failing seed prints the command that replays it: that command must parse,
    /// and run the seed with the options it failed with.
    #[test]
    fn the_printed_replay_command_runs_the_seed_as_it_failed() {
        for bits in 0..16u8 {
            let options = SimOptions {
                disable_fence: bits & 1 != 0,
                slow_db: bits & 2 != 0,
                heartbeat_apart: bits & 4 != 0,
                blind_observation: bits & 8 != 0,
                ..SimOptions::default()
            };
            let line = sim::replay_command(42, &options);
            let cli = crate::cli::Cli::try_parse_from(line.split(' '))
                .unwrap_or_else(|e| panic!("`{line}` does not parse: {e}"));
            let crate::cli::Commands::Simulate(args) = cli.command else {
                panic!("`{line}` is not a simulate command");
            };
            let parsed = args.options();
            assert_eq!(args.seed, Some(42), "{line}");
            assert_eq!(
                (
                    parsed.disable_fence,
                    parsed.slow_db,
                    parsed.heartbeat_apart,
                    parsed.blind_observation
                ),
                (
                    options.disable_fence,
                    options.slow_db,
                    options.heartbeat_apart,
                    options.blind_observation
                ),
                "{line}"
            );
        }
    }
}
