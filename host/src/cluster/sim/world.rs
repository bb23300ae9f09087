//! The simulated region: nodes (the real [`Node`] plus a model of its driver and
//! executor), the store, the network, clients, the fault schedule and the checker,
//! all advanced by one discrete-event loop from one seeded generator.
//!
//! - this file: the world's state, the event loop and dispatch;
//! - [`host`]: a node's process: the driver loop, the executor, routing, crash and pause;
//! - [`clients`]: clients with idempotent retries;
//! - [`faults`]: the fault menu;
//! - [`checks`]: the invariants, and the end (heal, converge, probe);
//! - [`trace`]: the trace ring and its line formats.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use crate::cluster::core::{
    Action, Input, MemberState, Node, Partition, Phase, Route, assign, outdated_death, partition_of,
};

use super::db::{AppendOutcome, AppendReq, Db, DbOp, DbReply, LeaseRow};
use super::rng::Rng;
use super::{Invariant, MS, SEC, SimOptions, SimReport, Stats, Time, Violation};

/// The aggregate type every simulated command addresses.
const AGGREGATE_TYPE: &str = "account";
/// Hard cap on events per seed: a run that needs more is stuck in a loop.
const EVENT_CAP: u64 = 3_000_000;

/// Writes one trace line: `tr!(world, who, format, args...)`.
macro_rules! tr {
    ($w:expr, $who:expr, $($arg:tt)*) => {
        $w.trace.line($w.now, $who, format_args!($($arg)*))
    };
}

mod checks;
mod clients;
mod faults;
mod host;
mod trace;

use trace::{Trace, Who, actions_text, lease_text, owner_text, row_text, view_text};

/// The seed's shape of the region and its workload.
#[derive(Debug, Clone)]
struct Params {
    nodes: usize,
    partitions: u32,
    aggregates: usize,
    clients: usize,
    client_gap: (Time, Time),
    chaos: Time,
    fault_gap: Time,
    poll: Time,
    dead_after: Time,
    db_timeout: Time,
    forward_timeout: Time,
    route_timeout: Time,
    client_timeout: Time,
    client_attempts: u32,
    converge_bound: Time,
    probe_bound: Time,
}

impl Params {
    fn draw(rng: &mut Rng, slow_db: bool) -> Self {
        Params {
            nodes: rng.range(3, 8) as usize,
            partitions: rng.range(8, 33) as u32,
            aggregates: rng.range(8, 41) as usize,
            clients: rng.range(2, 9) as usize,
            client_gap: (20 * MS, rng.range(60, 400) * MS),
            chaos: rng.range(10, 31) * SEC,
            fault_gap: rng.range(300, 2500) * MS,
            poll: 200 * MS,
            dead_after: 3 * SEC,
            db_timeout: SEC,
            // Longer than an owner can take (load and append, each up to the database
            // timeout), as the real forwarding timeout is.
            forward_timeout: 3 * SEC,
            route_timeout: 5 * SEC,
            client_timeout: 8 * SEC,
            client_attempts: 8,
            // A drain begun before the end may still be handing partitions over.
            converge_bound: if slow_db { 30 * SEC } else { 20 * SEC },
            probe_bound: 10 * SEC,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    /// SIGSTOP: events addressed to the node pile up in `pending`.
    Paused,
    /// Crashed: memory gone.
    Down,
    /// Drained and exited.
    Exited,
}

/// Inputs that reach the driver loop from elsewhere (a channel in the real driver),
/// and the poll tick; handled one at a time, between polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    Tick,
    CaughtUp,
    Drain,
    /// The partition and the epoch its stop ended.
    Idle(Partition, u64),
}

/// What a node's outstanding database request is for.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Heartbeat,
    /// A heartbeat sent by its own timer, outside the driver loop, at this time.
    HeartbeatApart(Time),
    /// The member row's deletion by a drained node.
    Leave,
    /// An observation asked for at this time.
    Observe(Time),
    Announce,
    Acquire(Partition),
    Release(Partition),
    Load(u64),
    Append(u64),
}

/// Result of running a command at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    /// Appended (or a duplicate of an append) at this version.
    Ok(u64),
    /// This node does not own the partition (or was fenced).
    NotOwner,
    /// Conflicts exhausted, or the store failed: outcome unknown, retry.
    Retry,
}

/// An answer to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Ok(u64),
    /// 503: no owner within the route timeout, or the store failed.
    Unavailable,
    /// Connection refused: the node is down.
    Refused,
}

/// Where an execution's result goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Front(u64),
    Remote {
        to: usize,
        to_inc: u32,
        front: u64,
        seq: u32,
    },
}

/// A command executing locally (executor: load, decide, append with fence).
#[derive(Debug, Clone, Copy)]
struct Exec {
    cmd: u64,
    agg: usize,
    partition: Partition,
    epoch: u64,
    expected: u64,
    conflicts: u32,
    target: Target,
}

/// A client request being routed by a node's HTTP front.
#[derive(Debug, Clone, Copy)]
struct Front {
    cmd: u64,
    attempt: u32,
    deadline: Time,
    seq: u32,
    waiting: bool,
}

/// One host: the real `Node`, and the simulated driver and executor state around it.
struct Host {
    status: Status,
    /// Process incarnation: events of a crashed process are dropped.
    inc: u32,
    node: Node,
    ctl: VecDeque<Ctl>,
    actions: VecDeque<Action>,
    /// The driver loop awaits a database answer.
    busy: bool,
    /// A poll (heartbeat, observe, step, actions) is running.
    polling: bool,
    tick_gen: u32,
    /// A poll timer of the current generation is pending (there is exactly one).
    tick_armed: bool,
    /// Poll interval scale (per mille) while the local clock drifts.
    tick_permille: u64,
    rate_gen: u32,
    serving: BTreeMap<Partition, u64>,
    /// Partitions told to stop, with the epoch they were served at.
    stopping: BTreeMap<Partition, u64>,
    inflight: BTreeMap<Partition, u32>,
    cache: BTreeMap<usize, u64>,
    db_wait: BTreeMap<u64, Wait>,
    fronts: BTreeMap<u64, Front>,
    execs: BTreeMap<u64, Exec>,
    pending: Vec<Ev>,
    pause_gen: u32,
    /// Pause for this long right after the next observation arrives, before stepping it.
    pause_on_observe: Option<Time>,
    /// Drained and deleted its member row: no more heartbeats.
    left: bool,
    /// When the newest heartbeat stored (on its own timer) was sent.
    heartbeat_stored_from: Option<Time>,
    last_view: String,
}

impl Host {
    fn new(name: &str, partitions: u32) -> Self {
        Host {
            status: Status::Down,
            inc: 0,
            node: Node::new(name, partitions),
            ctl: VecDeque::new(),
            actions: VecDeque::new(),
            busy: false,
            polling: false,
            tick_gen: 0,
            tick_armed: false,
            tick_permille: 1000,
            rate_gen: 0,
            serving: BTreeMap::new(),
            stopping: BTreeMap::new(),
            inflight: BTreeMap::new(),
            cache: BTreeMap::new(),
            db_wait: BTreeMap::new(),
            fronts: BTreeMap::new(),
            execs: BTreeMap::new(),
            pending: Vec::new(),
            pause_gen: 0,
            heartbeat_stored_from: None,
            pause_on_observe: None,
            left: false,
            last_view: String::new(),
        }
    }

    /// The process is gone: everything in memory with it.
    fn wipe(&mut self, name: &str, partitions: u32, status: Status) {
        let inc = self.inc + 1;
        let tick_gen = self.tick_gen + 1;
        let pause_gen = self.pause_gen + 1;
        *self = Host::new(name, partitions);
        self.status = status;
        self.inc = inc;
        self.tick_gen = tick_gen;
        self.pause_gen = pause_gen;
    }

    fn inflight(&self, p: Partition) -> u32 {
        self.inflight.get(&p).copied().unwrap_or(0)
    }
}

/// A client command (idempotent: one id for all its attempts).
#[derive(Debug, Clone)]
struct Cmd {
    client: usize,
    agg: usize,
    attempt: u32,
    acked: Option<u64>,
    done: bool,
    probe: bool,
    counted: bool,
}

#[derive(Debug, Clone)]
enum Heal {
    Cut(Vec<(usize, usize)>),
    Db(usize),
    Flaky(u32),
    Slow(usize, u32),
    Rate(usize, u32),
}

/// Everything that can happen.
#[derive(Debug, Clone)]
enum Ev {
    Tick {
        n: usize,
        inc: u32,
        gen_: u32,
    },
    Heartbeat {
        n: usize,
        inc: u32,
    },
    CatchUp {
        n: usize,
        inc: u32,
    },
    DbArrive {
        n: usize,
        inc: u32,
        req: u64,
        op: DbOp,
    },
    DbReply {
        n: usize,
        inc: u32,
        req: u64,
        reply: DbReply,
    },
    DbTimeout {
        n: usize,
        inc: u32,
        req: u64,
    },
    Decided {
        n: usize,
        inc: u32,
        exec: u64,
    },
    FrontWake {
        n: usize,
        inc: u32,
        front: u64,
    },
    ForwardTimeout {
        n: usize,
        inc: u32,
        front: u64,
        seq: u32,
    },
    Forward {
        to: usize,
        from: usize,
        from_inc: u32,
        front: u64,
        seq: u32,
        cmd: u64,
    },
    ForwardReply {
        to: usize,
        to_inc: u32,
        from: usize,
        front: u64,
        seq: u32,
        res: Res,
    },
    Request {
        to: usize,
        cmd: u64,
        attempt: u32,
    },
    Response {
        cmd: u64,
        attempt: u32,
        reply: Reply,
    },
    ClientTimeout {
        cmd: u64,
        attempt: u32,
    },
    ClientRetry {
        cmd: u64,
    },
    ClientNew {
        client: usize,
    },
    Fault,
    Heal(Heal),
    Resume {
        n: usize,
        gen_: u32,
    },
    Restart {
        n: usize,
    },
    ProcessEnd {
        n: usize,
        inc: u32,
    },
    Settle,
    Check,
}

impl Ev {
    /// The node whose process handles the event (queued while that node is paused).
    fn host(&self) -> Option<usize> {
        match *self {
            Ev::Tick { n, .. }
            | Ev::Heartbeat { n, .. }
            | Ev::CatchUp { n, .. }
            | Ev::DbReply { n, .. }
            | Ev::DbTimeout { n, .. }
            | Ev::Decided { n, .. }
            | Ev::FrontWake { n, .. }
            | Ev::ForwardTimeout { n, .. } => Some(n),
            Ev::Forward { to, .. } | Ev::ForwardReply { to, .. } | Ev::Request { to, .. } => {
                Some(to)
            }
            _ => None,
        }
    }
}

struct Scheduled {
    at: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Network conditions.
struct Net {
    cuts: BTreeMap<(usize, usize), u32>,
    db_cuts: Vec<u32>,
    drop: f64,
    dup: f64,
    flaky_gen: u32,
    slow: Vec<Time>,
    slow_gen: Vec<u32>,
}

impl Net {
    fn node_link(&self, a: usize, b: usize) -> bool {
        !self.cuts.contains_key(&(a.min(b), a.max(b)))
    }
    fn db_link(&self, n: usize) -> bool {
        self.db_cuts[n] == 0
    }
}

/// How long the region runs on after its probes, for the stability check: many polls
/// of every node, any of which could move a partition it should not.
const QUIET: Time = 5 * SEC;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Chaos,
    Converging,
    Probing,
    /// Probes answered; the region runs on undisturbed until `quiet_until`.
    Quiet,
    Done,
}

/// The simulated world for one seed.
pub struct World {
    seed: u64,
    p: Params,
    rng: Rng,
    now: Time,
    seq: u64,
    next_id: u64,
    queue: BinaryHeap<Scheduled>,
    names: Vec<String>,
    agg_names: Vec<String>,
    agg_part: Vec<Partition>,
    probe_aggs: Vec<usize>,
    probes: Vec<u64>,
    hosts: Vec<Host>,
    cmds: Vec<Cmd>,
    outstanding: Vec<u32>,
    db: Db,
    net: Net,
    trace: Trace,
    stats: Stats,
    stage: Stage,
    settle_at: Time,
    probe_deadline: Time,
    last_unconverged: String,
    violation: Option<Violation>,
    slow_db: bool,
    heartbeat_apart: bool,
    options: SimOptions,
    // The checker's own records, independent of the store model's tables.
    history: Vec<u64>,
    applied: BTreeMap<u64, (usize, u64)>,
    grants: BTreeMap<(Partition, u64), usize>,
    /// Since when the region has been converged with its membership unchanged (`None`
    /// before convergence, and for good once the membership changes after it).
    stable_since: Option<Time>,
    quiet_until: Time,
}

impl World {
    /// Builds the world a seed describes.
    pub fn new(seed: u64, options: &SimOptions) -> Self {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng, options.slow_db);
        let names: Vec<String> = (0..p.nodes).map(|i| format!("n{i}")).collect();
        let mut agg_names: Vec<String> = (0..p.aggregates).map(|i| format!("acct-{i}")).collect();
        // One probe aggregate per partition, for the liveness check.
        let mut probe_aggs = Vec::new();
        for part in 0..p.partitions {
            let id = (0..)
                .map(|k| format!("probe-{part}-{k}"))
                .find(|id| partition_of(AGGREGATE_TYPE, id, p.partitions) == part)
                .expect("some id hashes to every partition");
            probe_aggs.push(agg_names.len());
            agg_names.push(id);
        }
        let agg_part: Vec<Partition> = agg_names
            .iter()
            .map(|id| partition_of(AGGREGATE_TYPE, id, p.partitions))
            .collect();
        let hosts = names.iter().map(|n| Host::new(n, p.partitions)).collect();
        let db = Db::new(agg_names.len(), p.dead_after, !options.disable_fence);
        let net = Net {
            cuts: BTreeMap::new(),
            db_cuts: vec![0; p.nodes],
            drop: 0.0,
            dup: 0.0,
            flaky_gen: 0,
            slow: vec![0; p.nodes],
            slow_gen: vec![0; p.nodes],
        };
        let history = vec![0; agg_names.len()];
        let outstanding = vec![0; p.clients];
        let mut world = World {
            seed,
            p,
            rng,
            now: 0,
            seq: 0,
            next_id: 1,
            queue: BinaryHeap::new(),
            names,
            agg_names,
            agg_part,
            probe_aggs,
            probes: Vec::new(),
            hosts,
            cmds: Vec::new(),
            outstanding,
            db,
            net,
            trace: Trace {
                ring: VecDeque::new(),
                cap: options.trace_ring,
                hash: 0xcbf2_9ce4_8422_2325,
                lines: 0,
                echo: options.echo_trace,
            },
            stats: Stats::default(),
            stage: Stage::Chaos,
            settle_at: 0,
            probe_deadline: 0,
            last_unconverged: String::new(),
            violation: None,
            slow_db: options.slow_db,
            heartbeat_apart: options.heartbeat_apart,
            options: options.clone(),
            history,
            applied: BTreeMap::new(),
            grants: BTreeMap::new(),
            stable_since: None,
            quiet_until: 0,
        };
        let summary = world.summary();
        tr!(world, Who::Sim, "seed {seed}: {summary}");
        for n in 0..world.p.nodes {
            let at = world.rng.below(300 * MS);
            world.at(at, Ev::Restart { n });
        }
        for client in 0..world.p.clients {
            let at = 400 * MS + world.rng.below(400 * MS);
            world.at(at, Ev::ClientNew { client });
        }
        let first_fault = SEC + world.rng.below(world.p.fault_gap);
        world.at(first_fault, Ev::Fault);
        let chaos = world.p.chaos;
        world.at(chaos, Ev::Settle);
        world
    }

    /// One line describing the seed's region and workload.
    pub fn summary(&self) -> String {
        let fence = if self.db.fence { "on" } else { "OFF" };
        format!(
            "{} nodes, {} partitions, {} aggregates, {} clients, chaos {} s, a fault every ~{} ms, fence {fence}",
            self.p.nodes,
            self.p.partitions,
            self.p.aggregates,
            self.p.clients,
            self.p.chaos / SEC,
            self.p.fault_gap / MS,
        ) + if self.slow_db { ", slow database" } else { "" }
            + if self.heartbeat_apart {
                ", heartbeats apart"
            } else {
                ""
            }
    }

    /// Runs to the end (success or the first violation) and reports.
    pub fn run(mut self) -> SimReport {
        while let Some(s) = self.queue.pop() {
            self.now = s.at;
            self.stats.events += 1;
            self.dispatch(s.ev);
            if self.violation.is_some() || self.stage == Stage::Done {
                break;
            }
            if self.stats.events > EVENT_CAP {
                self.fail(Invariant::Liveness, format!("more than {EVENT_CAP} events"));
                break;
            }
        }
        if self.violation.is_none() && self.stage != Stage::Done {
            self.fail(Invariant::Liveness, "the event queue ran dry".into());
        }
        self.stats.sim_time = self.now;
        self.stats.commands = self.cmds.iter().filter(|c| !c.probe).count() as u64;
        self.stats.acked = self
            .cmds
            .iter()
            .filter(|c| !c.probe && c.acked.is_some())
            .count() as u64;
        SimReport {
            seed: self.seed,
            summary: self.summary(),
            violation: self.violation,
            trace_tail: self.trace.ring.into_iter().collect(),
            trace_hash: self.trace.hash,
            trace_lines: self.trace.lines,
            stats: self.stats,
            options: self.options,
        }
    }

    fn at(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: Time, ev: Ev) {
        self.at(self.now + delay, ev);
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn fail(&mut self, invariant: Invariant, message: String) {
        if self.violation.is_none() {
            tr!(self, Who::Sim, "VIOLATION {invariant:?}: {message}");
            self.violation = Some(Violation {
                invariant,
                message,
                at: self.now,
            });
        }
    }

    fn live(&self, n: usize, inc: u32) -> bool {
        let h = &self.hosts[n];
        h.status == Status::Running && h.inc == inc
    }

    fn slot_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .expect("the core only names members it observed")
    }

    /// One-way delay between nodes or to a client: mostly sub-millisecond to a few ms,
    /// with a tail, so that messages reorder.
    fn net_delay(&mut self) -> Time {
        let base = self.rng.range(200, 4000);
        if self.rng.chance(0.03) {
            base + self.rng.range(20 * MS, 400 * MS)
        } else {
            base
        }
    }

    fn db_delay(&mut self, n: usize) -> Time {
        let mut d = if self.slow_db {
            // A degraded database: tens of milliseconds, one in ten much slower.
            let base = self.rng.range(2 * MS, 60 * MS);
            if self.rng.chance(0.1) {
                base + self.rng.range(100 * MS, 1500 * MS)
            } else {
                base
            }
        } else {
            self.rng.range(300, 3000)
        };
        if self.rng.chance(0.03) {
            d += self.rng.range(10 * MS, 300 * MS);
        }
        let slow = self.net.slow[n];
        if slow > 0 {
            d += self.rng.below(slow);
        }
        d
    }

    fn backoff(&mut self) -> Time {
        self.rng.range(10 * MS, 120 * MS)
    }

    fn dispatch(&mut self, ev: Ev) {
        if let Some(n) = ev.host()
            && self.hosts[n].status == Status::Paused
        {
            self.hosts[n].pending.push(ev);
            return;
        }
        match ev {
            Ev::Tick { n, inc, gen_ } => {
                if self.live(n, inc) && self.hosts[n].tick_gen == gen_ {
                    let h = &mut self.hosts[n];
                    h.tick_armed = false;
                    if !h.polling && !h.ctl.contains(&Ctl::Tick) {
                        h.ctl.push_back(Ctl::Tick);
                    }
                    self.pump(n);
                }
            }
            Ev::Heartbeat { n, inc } => {
                if self.live(n, inc) && !self.hosts[n].left {
                    let state = self.hosts[n].node.announced_state();
                    let now = self.now;
                    self.db_call(n, Wait::HeartbeatApart(now), DbOp::Heartbeat(state));
                    let d = self.p.poll * self.hosts[n].tick_permille / 1000;
                    self.after(d, Ev::Heartbeat { n, inc });
                }
            }
            Ev::CatchUp { n, inc } => {
                if self.live(n, inc) {
                    self.hosts[n].ctl.push_back(Ctl::CaughtUp);
                    self.pump(n);
                }
            }
            Ev::DbArrive { n, inc, req, op } => self.db_arrive(n, inc, req, op),
            Ev::DbReply { n, inc, req, reply } => {
                if !self.live(n, inc) {
                    return;
                }
                let Some(wait) = self.hosts[n].db_wait.remove(&req) else {
                    return;
                };
                if let (Wait::Observe(_), DbReply::Observed { .. }) = (&wait, &reply)
                    && let Some(duration) = self.hosts[n].pause_on_observe.take()
                {
                    // SIGSTOP between reading the tables and acting on them: the
                    // observation will be stale when the node steps it.
                    self.hosts[n].db_wait.insert(req, wait);
                    self.pause(n, duration, "right after reading an observation");
                    self.hosts[n]
                        .pending
                        .push(Ev::DbReply { n, inc, req, reply });
                    self.burst_to(n);
                    return;
                }
                self.on_db(n, wait, Some(reply));
            }
            Ev::DbTimeout { n, inc, req } => {
                if self.live(n, inc)
                    && let Some(wait) = self.hosts[n].db_wait.remove(&req)
                {
                    tr!(self, Who::Node(n), "db request {wait:?} timed out");
                    self.on_db(n, wait, None);
                }
            }
            Ev::Decided { n, inc, exec } => {
                if self.live(n, inc)
                    && let Some(e) = self.hosts[n].execs.get(&exec).copied()
                {
                    let req = AppendReq {
                        partition: e.partition,
                        epoch: e.epoch,
                        agg: e.agg,
                        expected: e.expected,
                        cmd: e.cmd,
                    };
                    self.db_call(n, Wait::Append(exec), DbOp::Append(req));
                }
            }
            Ev::FrontWake { n, inc, front } => {
                if self.live(n, inc) {
                    self.front_route(n, front);
                }
            }
            Ev::ForwardTimeout { n, inc, front, seq } => {
                if self.live(n, inc)
                    && let Some(f) = self.hosts[n].fronts.get(&front)
                    && f.seq == seq
                    && f.waiting
                {
                    tr!(self, Who::Node(n), "forward of cmd {} timed out", f.cmd);
                    self.front_result(n, front, Res::Retry);
                }
            }
            Ev::Forward {
                to,
                from,
                from_inc,
                front,
                seq,
                cmd,
            } => self.on_forward(to, from, from_inc, front, seq, cmd),
            Ev::ForwardReply {
                to,
                to_inc,
                from,
                front,
                seq,
                res,
            } => {
                if !self.net.node_link(from, to) || !self.live(to, to_inc) {
                    return;
                }
                if let Some(f) = self.hosts[to].fronts.get(&front)
                    && f.seq == seq
                    && f.waiting
                {
                    self.front_result(to, front, res);
                }
            }
            Ev::Request { to, cmd, attempt } => self.on_request(to, cmd, attempt),
            Ev::Response {
                cmd,
                attempt,
                reply,
            } => self.on_response(cmd, attempt, reply),
            Ev::ClientTimeout { cmd, attempt } => {
                let c = &self.cmds[cmd as usize];
                if !c.done && c.attempt == attempt {
                    tr!(self, Who::Client, "cmd {cmd} attempt {attempt} timed out");
                    self.client_retry(cmd);
                }
            }
            Ev::ClientRetry { cmd } => self.client_retry(cmd),
            Ev::ClientNew { client } => {
                if self.stage == Stage::Chaos {
                    if self.outstanding[client] < 3 {
                        let agg = self.rng.index(self.p.aggregates);
                        self.new_cmd(client, agg, None, false, true);
                    }
                    let gap = self.rng.range(self.p.client_gap.0, self.p.client_gap.1);
                    self.after(gap, Ev::ClientNew { client });
                }
            }
            Ev::Fault => {
                if self.stage == Stage::Chaos {
                    self.fault();
                    let gap = self
                        .rng
                        .range(self.p.fault_gap / 4, self.p.fault_gap * 7 / 4);
                    self.after(gap, Ev::Fault);
                }
            }
            Ev::Heal(heal) => self.heal(heal),
            Ev::Resume { n, gen_ } => {
                if self.hosts[n].status == Status::Paused && self.hosts[n].pause_gen == gen_ {
                    self.resume(n);
                }
            }
            Ev::Restart { n } => self.restart(n),
            Ev::ProcessEnd { n, inc } => {
                if self.hosts[n].inc == inc
                    && matches!(self.hosts[n].status, Status::Running | Status::Paused)
                {
                    self.process_end(n);
                }
            }
            Ev::Settle => self.settle(),
            Ev::Check => self.check(),
        }
    }
}
