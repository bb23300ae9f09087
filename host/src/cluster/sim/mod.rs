//! The deterministic cluster simulator.
//!
//! One seed describes a whole run: the region's shape (3–7 nodes, 8–32 partitions, a
//! few dozen aggregates, clients), the workload and the fault schedule. Everything —
//! network delays, losses, crashes, pauses — comes from one seeded generator and one
//! discrete-event queue ordered by (simulated time, insertion order), so a seed
//! replays exactly, and a failure is reported with its seed and the tail of its trace.
//!
//! What runs is the real [`crate::cluster::core::Node`], driven the way
//! `cluster::driver` drives it (heartbeat, observe, step, carry out the actions one by
//! one feeding results back), against a model of the store's rules
//! (`migrations/0001_event_store.sql`, `0002_cluster.sql`): member rows with heartbeats
//! judged by the database's clock, lease compare-and-set and release, and
//! `meridian_append`'s fence, command-id claim, expected-version compare-and-set and
//! unique versions.
//!
//! Checked as each store operation takes effect and each acknowledgement arrives:
//! 1. one linear history per aggregate (accepted versions unique and contiguous);
//! 2. an append is accepted only from the lease holder at the lease's current epoch;
//! 3. a command is applied at most once, and every acknowledged command is stored,
//!    once, at the acknowledged version;
//! 4. (at the end) after every fault is healed the cluster converges — each partition
//!    leased to the node the assignment picks, which serves it — and a probe command
//!    on every partition succeeds within a bounded time;
//! 5. partitions move only when the membership changes: once converged, no lease
//!    changes hands (taken or given up) through the probes and a quiet spell after them
//!    unless a member joined, left, changed state, or missed its heartbeats first;
//!
//! plus: a node only ever serves an epoch the store granted to it. The store's tables
//! and the acknowledgements change only at those points, so checking there is checking
//! after every step.
//!
//! [`SimOptions::disable_fence`] turns the store's fence off, and
//! [`SimOptions::blind_observation`] has the store read a live member as dead for a
//! moment, to prove the checker has teeth; [`SimOptions::slow_db`] makes the database
//! slow (tens of milliseconds, with second-long tails); [`SimOptions::heartbeat_apart`] (on by default, as in the real
//! driver) keeps the heartbeat on its own timer; turned off, it models a driver whose
//! heartbeat waits behind its lease operations, which a slow database turns into
//! flapping membership.
//!
//! Run many seeds with `meridian simulate --seeds 10000`; replay one with
//! `meridian simulate --seed S --trace`.

mod db;
mod rng;
mod world;

use std::fmt;

/// Simulated time, in microseconds.
pub type Time = u64;
/// One simulated millisecond.
pub const MS: Time = 1_000;
/// One simulated second.
pub const SEC: Time = 1_000_000;

/// How to run a seed.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Turn off the store's fence check (owner and epoch) in `meridian_append`. Only
    /// for testing the checker: the simulator must then find stale-owner appends.
    pub disable_fence: bool,
    /// Once the region has converged, the store reads a live member as dead for a
    /// second (its observations and its lease checks). Only for testing the checker:
    /// the simulator must then find partitions moving with no membership change.
    pub blind_observation: bool,
    /// Print every trace line to stdout as it happens.
    pub echo_trace: bool,
    /// How many of the last trace lines to keep for the report.
    pub trace_ring: usize,
    /// A degraded database: every operation takes 2–60 ms, one in ten another
    /// 0.1–1.5 s (the default is 0.3–3 ms with a rare tail).
    pub slow_db: bool,
    /// Heartbeat on its own timer, as the real driver does (`false`: at the start of
    /// each poll, behind the previous poll's lease operations).
    pub heartbeat_apart: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            disable_fence: false,
            blind_observation: false,
            echo_trace: false,
            trace_ring: 400,
            slow_db: false,
            heartbeat_apart: true,
        }
    }
}

/// The invariant a run violated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// (1) An aggregate's accepted versions are not unique and contiguous.
    LinearHistory,
    /// (2) An append was accepted from a node that did not hold the partition at that
    /// epoch when the store accepted it.
    StaleEpoch,
    /// (3) A command was applied twice, or acknowledged but not stored (once, at the
    /// acknowledged version).
    ExactlyOnce,
    /// (4) The cluster did not converge, or a probe command did not succeed, after
    /// every fault was healed.
    Liveness,
    /// A lease epoch was granted twice, or a node served an epoch not granted to it.
    Grant,
    /// (5) A partition changed hands while the membership stayed as it was.
    Stability,
}

/// A failed check.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// What exactly.
    pub message: String,
    /// When (simulated).
    pub at: Time,
}

/// Counters of one run, to see what a seed exercised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Client commands issued (probes excluded).
    pub commands: u64,
    /// Client commands acknowledged.
    pub acked: u64,
    /// Client commands given up after their attempts.
    pub given_up: u64,
    /// Appends accepted.
    pub appends: u64,
    /// Appends refused by the fence.
    pub fenced: u64,
    /// Appends refused for a version conflict.
    pub conflicts: u64,
    /// Appends answered as duplicates.
    pub duplicates: u64,
    /// Faults injected.
    pub faults: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Process starts (including the first).
    pub restarts: u64,
    /// SIGSTOPs.
    pub pauses: u64,
    /// Long pauses of an owner with commands waiting for it (the stale-owner scenario).
    pub stale_pauses: u64,
    /// SIGTERMs.
    pub drains: u64,
    /// Simulated time at the end.
    pub sim_time: Time,
    /// How long the cluster took to converge once every fault was healed.
    pub converged_after: Time,
}

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The region and workload the seed drew.
    pub summary: String,
    /// The first violation, if any.
    pub violation: Option<Violation>,
    /// The last trace lines.
    pub trace_tail: Vec<String>,
    /// A hash of every trace line: equal for equal runs.
    pub trace_hash: u64,
    /// Trace lines written.
    pub trace_lines: u64,
    /// Counters.
    pub stats: Stats,
    /// The options it ran with.
    pub options: SimOptions,
}

impl SimReport {
    /// Whether an invariant was violated.
    pub fn failed(&self) -> bool {
        self.violation.is_some()
    }
}

impl fmt::Display for SimReport {
    /// The seed, what it drew, the violation and the trace tail.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.summary)?;
        match &self.violation {
            None => writeln!(f, "passed ({:?})", self.stats)?,
            Some(v) => {
                writeln!(
                    f,
                    "VIOLATION of {:?} at {}.{:06}s: {}",
                    v.invariant,
                    v.at / SEC,
                    v.at % SEC,
                    v.message
                )?;
                writeln!(
                    f,
                    "last {} of {} trace lines:",
                    self.trace_tail.len(),
                    self.trace_lines
                )?;
                for line in &self.trace_tail {
                    writeln!(f, "  {line}")?;
                }
                writeln!(f, "replay: {}", replay_command(self.seed, &self.options))?;
            }
        }
        Ok(())
    }
}

/// The command line that runs `seed` again with `options`, its trace printed.
pub fn replay_command(seed: u64, options: &SimOptions) -> String {
    let mut command = format!("meridian simulate --seed {seed} --trace");
    if options.disable_fence {
        command.push_str(" --disable-fence");
    }
    if options.blind_observation {
        command.push_str(" --blind-observation");
    }
    if options.slow_db {
        command.push_str(" --slow-db");
    }
    if !options.heartbeat_apart {
        command.push_str(" --heartbeat-in-loop");
    }
    command
}

/// Runs one seed to its end: success, or the first violation.
pub fn run_seed(seed: u64, options: &SimOptions) -> SimReport {
    world::World::new(seed, options).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(seeds: std::ops::Range<u64>, options: &SimOptions) {
        for seed in seeds {
            let report = run_seed(seed, options);
            assert!(!report.failed(), "{report}");
        }
    }

    // Six hundred seeds, split so that the test harness runs them in parallel; the
    // `meridian simulate` command runs as many as one likes.
    #[test]
    fn seeds_0_to_199_hold_every_invariant() {
        sweep(0..200, &SimOptions::default());
    }

    #[test]
    fn seeds_200_to_399_hold_every_invariant() {
        sweep(200..400, &SimOptions::default());
    }

    #[test]
    fn seeds_400_to_599_hold_every_invariant() {
        sweep(400..600, &SimOptions::default());
    }

    // With a degraded database the real driver's heartbeat waits behind its lease
    // operations, and nodes flap (`meridian simulate --slow-db` fails about 15 seeds in
    // 10 000); with heartbeats on their own timer none fail. Keeps that design covered.
    #[test]
    fn a_slow_database_converges_when_heartbeats_run_apart() {
        let options = SimOptions {
            slow_db: true,
            heartbeat_apart: true,
            ..SimOptions::default()
        };
        sweep(0..100, &options);
    }

    #[test]
    fn a_seed_replays_exactly() {
        let options = SimOptions::default();
        for seed in [3, 77] {
            let a = run_seed(seed, &options);
            let b = run_seed(seed, &options);
            assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} diverged");
            assert_eq!(a.trace_lines, b.trace_lines);
            assert_eq!(a.stats, b.stats);
            assert_eq!(a.trace_tail, b.trace_tail);
        }
        assert_ne!(
            run_seed(3, &options).trace_hash,
            run_seed(4, &options).trace_hash
        );
    }

    #[test]
    fn stale_owners_show_up_often_and_the_fence_stops_them() {
        let options = SimOptions::default();
        let (mut fenced, mut stale_pauses) = (0, 0);
        let mut seeds_with_fenced = 0;
        for seed in 1000..1040 {
            let report = run_seed(seed, &options);
            assert!(!report.failed(), "{report}");
            fenced += report.stats.fenced;
            stale_pauses += report.stats.stale_pauses;
            seeds_with_fenced += u64::from(report.stats.fenced > 0);
        }
        assert!(stale_pauses >= 40, "only {stale_pauses} stale-owner pauses");
        assert!(
            seeds_with_fenced >= 20,
            "only {seeds_with_fenced} of 40 seeds saw a fenced append ({fenced} in all)"
        );
    }

    #[test]
    fn without_the_fence_a_stale_owner_append_is_caught_quickly() {
        let options = SimOptions {
            disable_fence: true,
            ..SimOptions::default()
        };
        let caught = (0..200).find_map(|seed| {
            let report = run_seed(seed, &options);
            report.violation.map(|v| (seed, v))
        });
        let (seed, violation) = caught.expect("no violation in 200 seeds with the fence off");
        assert!(
            matches!(
                violation.invariant,
                Invariant::StaleEpoch | Invariant::LinearHistory | Invariant::ExactlyOnce
            ),
            "seed {seed}: {violation:?}"
        );
        assert!(seed < 20, "the first violation took {seed} seeds");
    }

    /// Seeds in which partitions moved after the region had converged, on observations
    /// made while a member was dead, acted on after it had come back: a node took that
    /// member's partitions (until the store gave another node's lease only while it is
    /// dead), or the member itself, shown its death late by a slow database, released
    /// all of its own (until `core::outdated_death`).
    #[test]
    fn a_member_back_from_the_dead_keeps_its_partitions() {
        sweep(3897..3898, &SimOptions::default());
        sweep(6225..6226, &SimOptions::default());
        let slow = SimOptions {
            slow_db: true,
            ..SimOptions::default()
        };
        for seed in [1224, 1264, 2704, 5031] {
            sweep(seed..seed + 1, &slow);
        }
    }

    /// A store that reads a live member as dead for a moment lets the others take its
    /// partitions, which the stability check must catch: nothing in the membership
    /// changed.
    #[test]
    fn a_partition_moving_with_no_membership_change_is_caught() {
        let options = SimOptions {
            blind_observation: true,
            ..SimOptions::default()
        };
        let mut caught = 0;
        for seed in 0..20 {
            let report = run_seed(seed, &options);
            if let Some(violation) = report.violation {
                assert_eq!(
                    violation.invariant,
                    Invariant::Stability,
                    "seed {seed}: {violation:?}"
                );
                caught += 1;
            }
        }
        assert!(caught >= 15, "only {caught} of 20 seeds caught the move");
    }
}
