//! Drives the decision core ([`super::core::Node`]) with PostgreSQL and the clock, and
//! routes commands by it.
//!
//! A heartbeat task writes this node's member row every poll interval. One task owns
//! the decision loop: every poll interval it reads the membership and lease tables,
//! feeds the observation to the core and carries out the actions, feeding each result
//! back — sequentially, so the core never sees a result out of order.
//! Signals from elsewhere (a partition went idle, drain, caught up, "look again now")
//! arrive on a channel and go through the same loop.
//!
//! Serving is a per-partition `RwLock` holding the serving epoch: a command holds the read lock
//! while it runs; stopping a partition takes the write lock, which waits for in-flight
//! commands to finish, and then clears it. That is the "old owner finishes in-flight
//! commands before it releases" rule, with no per-command lock beyond an uncontended
//! read lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{RwLock, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::core::{
    Action, Input, MemberState, Node, NodeId, Partition, Phase, Route, partition_of,
};
use crate::executor::{Command, CommandError, CommandResult, Executor};
use crate::store::{self, Fence, StoreError};

/// Default time without a heartbeat after which a member is declared dead.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(3);

/// Default interval between heartbeats and observations.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Default time a command waits for its partition to have a serving owner.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Header marking a command forwarded by another host: the receiver executes it
/// locally or answers `not_owner`, never forwards again.
pub const FORWARDED_HEADER: &str = "x-meridian-forwarded-by";

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node.
    pub node_id: NodeId,
    /// The URL other hosts reach this one at.
    pub address: String,
    /// Virtual partitions in the region.
    pub partitions: u32,
    /// Heartbeat timeout.
    pub dead_after: Duration,
    /// Poll interval.
    pub poll_interval: Duration,
    /// How long a command waits for an owner.
    pub route_timeout: Duration,
    /// This process's claim on `node_id` (see [`store::cluster::claim`]).
    pub incarnation: uuid::Uuid,
}

/// Errors refusing a command before any owner ran it.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The partition has no serving owner (it is moving) for longer than we wait.
    #[error(
        "partition {partition} has no owner that answered within {waited_ms} ms (it is moving between hosts, or its owner is slow); send the command again with the same command_id (answered in x-meridian-command-id), which never applies twice"
    )]
    Unavailable {
        /// The partition.
        partition: Partition,
        /// How long we waited.
        waited_ms: u64,
    },
    /// This host was asked (by another host) to run a command it does not own.
    #[error("this host does not own partition {partition}")]
    NotOwner {
        /// The partition.
        partition: Partition,
    },
}

/// How a command was answered.
pub enum Dispatched {
    /// Executed here.
    Local(Result<CommandResult, CommandError>),
    /// The owner's HTTP answer, to be returned unchanged.
    Forwarded {
        /// Its status.
        status: axum::http::StatusCode,
        /// The region that ran it, when the owner passed it on to another region
        /// (its `x-meridian-region` header).
        region: Option<axum::http::HeaderValue>,
        /// Its body.
        body: Bytes,
    },
    /// No owner could take it.
    Refused(RouteError),
}

/// The cluster membership and routing of one host. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    /// The membership's own connections, apart from the pool commands use.
    pool: PgPool,
    executor: Executor,
    node: Mutex<Node>,
    /// Per partition: (generation of the last Serve/StopServing applied, serving epoch).
    slots: Vec<RwLock<(u64, Option<u64>)>>,
    /// Issues generations in the order the core asked for Serve/StopServing.
    slot_generation: std::sync::atomic::AtomicU64,
    addresses: Mutex<HashMap<NodeId, String>>,
    status: Mutex<Option<store::cluster::Observation>>,
    /// When the last heartbeat that was stored was started (see [`Cluster::in_touch`]).
    heartbeat_at: Mutex<Option<std::time::Instant>>,
    membership_epoch: AtomicI64,
    /// Set once the drained node removed its member row.
    left: std::sync::atomic::AtomicBool,
    /// Cancelled when another process took this node id over (see
    /// [`Cluster::superseded`]).
    superseded: CancellationToken,
    /// Held while the member row is written or removed: a heartbeat in flight when
    /// the node leaves would otherwise put the row back after its removal.
    member_row: tokio::sync::Mutex<()>,
    inputs: mpsc::UnboundedSender<Input>,
    nudge: tokio::sync::Notify,
    phase: watch::Sender<Phase>,
    http: reqwest::Client,
}

impl Cluster {
    /// Joins the region as a syncing member and starts the driver loop. Call
    /// [`Cluster::caught_up`] once the host may take work.
    ///
    /// Heartbeats, observations and leases go through a connection of their own, made
    /// with `pool`'s options. Taken from `pool`, the heartbeat waited behind commands
    /// whenever the database was slow enough to hold all its connections, and the other
    /// hosts declared this one dead and moved its partitions on top of the slowness.
    /// Two connections: the driver loop and the heartbeat each run one statement at a
    /// time, and a lease update waiting on a row lock (an append still running under
    /// the old owner) must not hold up the heartbeat either.
    pub fn start(
        config: ClusterConfig,
        pool: &PgPool,
        executor: Executor,
        shutdown: CancellationToken,
    ) -> Self {
        // The server gives up on a statement when the driver does (`bounded`): an
        // acquire waiting on a lease row's lock (an append still running under the old
        // owner) would otherwise commit long after its caller moved on, on a check of
        // the old owner's liveness made when it started waiting.
        let options = (*pool.connect_options()).clone().options([(
            "statement_timeout",
            format!("{}ms", config.dead_after.as_millis()),
        )]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(config.dead_after)
            .connect_lazy_with(options);
        let (inputs, rx) = mpsc::unbounded_channel();
        let node = Node::new(config.node_id.clone(), config.partitions);
        let slots = (0..config.partitions)
            .map(|_| RwLock::new((0, None)))
            .collect();
        let (phase, _) = watch::channel(Phase::Syncing);
        let cluster = Cluster {
            inner: Arc::new(Inner {
                config,
                pool,
                executor,
                node: Mutex::new(node),
                slots,
                slot_generation: std::sync::atomic::AtomicU64::new(0),
                addresses: Mutex::new(HashMap::new()),
                status: Mutex::new(None),
                heartbeat_at: Mutex::new(None),
                membership_epoch: AtomicI64::new(0),
                left: std::sync::atomic::AtomicBool::new(false),
                superseded: CancellationToken::new(),
                member_row: tokio::sync::Mutex::new(()),
                inputs,
                nudge: tokio::sync::Notify::new(),
                phase,
                http: reqwest::Client::builder()
                    .pool_max_idle_per_host(256)
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("HTTP client builds"),
            }),
        };
        let driver = cluster.clone();
        let heartbeat = cluster.clone();
        let heartbeat_stop = shutdown.clone();
        tokio::spawn(async move { driver.run(rx, shutdown).await });
        tokio::spawn(async move { heartbeat.heartbeat_loop(heartbeat_stop).await });
        cluster
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// Whether `node_id` names a member of the region as this node last observed it:
    /// what a forwarded request's `x-meridian-forwarded-by` must name to be taken for one.
    pub fn is_member(&self, node_id: &str) -> bool {
        self.inner
            .addresses
            .lock()
            .expect("addresses poisoned")
            .contains_key(node_id)
    }

    /// How long without a heartbeat before a member counts as dead.
    pub fn dead_after(&self) -> Duration {
        self.inner.config.dead_after
    }

    /// The partition count.
    pub fn partitions(&self) -> u32 {
        self.inner.config.partitions
    }

    /// The host caught up (plugins compiled): announce ready and take partitions.
    pub fn caught_up(&self) {
        let _ = self.inner.inputs.send(Input::CaughtUp);
    }

    /// Resolves once another process has taken this node id over: this host was out
    /// of touch long enough to be declared dead (paused, cut off) and a replacement
    /// started under its id. Leases name a node by id, so this process must act on
    /// none of them again — the driver stops at once, and the host should stop too,
    /// without draining: what it would hand over belongs to the replacement.
    pub async fn superseded(&self) {
        self.inner.superseded.cancelled().await;
    }

    /// Starts handing every partition away (SIGTERM).
    pub fn drain(&self) {
        let _ = self.inner.inputs.send(Input::Drain);
    }

    /// Watches the node's phase (ready, draining, exited).
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.inner.phase.subscribe()
    }

    /// Whether this node currently serves the aggregate's partition.
    ///
    /// Not while the host is out of touch with the region's database (see
    /// [`Self::in_touch`]): the other hosts may have taken its partitions by then, and
    /// what it holds for them (cached states) may be stale.
    pub fn owns(&self, aggregate_type: &str, aggregate_id: &str) -> bool {
        let p = partition_of(aggregate_type, aggregate_id, self.inner.config.partitions);
        self.in_touch()
            && matches!(
                self.inner.node.lock().expect("node poisoned").route(p),
                Route::Local(_)
            )
    }

    /// Whether this host stored a heartbeat less than `dead_after` ago (timed from
    /// before it was sent). Longer, and the other hosts have most likely declared it
    /// dead and taken its partitions: it must not answer from what it holds for them,
    /// and should not be sent work. Heartbeats run on their own timer and
    /// connection, so a driver loop busy taking partitions does not count against it;
    /// judged by this host's monotonic clock, so clock skew does not matter. A host
    /// that has left the region (drained) stops heartbeating and is out of touch a
    /// moment later, which is what it is.
    pub fn in_touch(&self) -> bool {
        !self.inner.superseded.is_cancelled()
            && self
                .inner
                .heartbeat_at
                .lock()
                .expect("heartbeat_at poisoned")
                .is_some_and(|at| at.elapsed() < self.inner.config.dead_after)
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<Input>, shutdown: CancellationToken) {
        let start = self.inner.node.lock().expect("node poisoned").start();
        self.execute(start).await;
        let mut tick = tokio::time::interval(self.inner.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.inner.superseded.cancelled() => {
                    tracing::error!("another process runs as this node now; this host takes no further part in the region");
                    return;
                }
                _ = shutdown.cancelled() => {
                    // The host may stop this loop before a tick noticed the exit (the
                    // phase can change outside it); the row must go all the same.
                    self.leave_if_exited().await;
                    return;
                }
                // Inputs before polls: a poll slower than the tick (a slow database)
                // leaves the tick ready again at once, and a drain or a partition's
                // idle report behind it would then wait for ever.
                Some(input) = rx.recv() => self.feed(input).await,
                _ = tick.tick() => self.poll().await,
                _ = self.inner.nudge.notified() => self.poll().await,
            }
            // Gone from the membership, but keep observing: this host still forwards
            // what reaches it until its listener closes.
            self.leave_if_exited().await;
        }
    }

    /// Removes the member row once the node has handed everything over (once; a
    /// no-op before). The driver does it on its next turn after the exit, and the host
    /// once more before it stops, so the row is gone whichever comes first.
    pub async fn leave_if_exited(&self) {
        if *self.inner.phase.borrow() != Phase::Exited {
            return;
        }
        let _row = self.inner.member_row.lock().await;
        if self.inner.left.swap(true, Ordering::Relaxed) {
            return;
        }
        let config = &self.inner.config;
        if let Err(error) = self
            .bounded(async |conn| {
                store::cluster::leave(conn, &config.node_id, config.incarnation).await
            })
            .await
        {
            tracing::warn!(%error, "could not remove the member row; it will expire");
        }
    }

    /// Sets the partition's slot once the commands holding it are done; `idle_at`: the
    /// epoch a stop ends, reported as [`Input::Idle`] then.
    fn set_slot(&self, partition: Partition, value: Option<u64>, idle_at: Option<u64>) {
        let generation = self.inner.slot_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let cluster = self.clone();
        tokio::spawn(async move {
            {
                let mut slot = cluster.inner.slots[partition as usize].write().await;
                if slot.0 < generation {
                    *slot = (generation, value);
                }
            }
            if let Some(epoch) = idle_at {
                let _ = cluster.inner.inputs.send(Input::Idle { partition, epoch });
            }
        });
    }

    /// Heartbeats on its own timer, so that slow lease operations in the loop can never
    /// make this node look dead.
    async fn heartbeat_loop(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.inner.left.load(Ordering::Relaxed) {
                return;
            }
            let started = std::time::Instant::now();
            match self.write_member(None).await {
                Ok(()) => {
                    *self
                        .inner
                        .heartbeat_at
                        .lock()
                        .expect("heartbeat_at poisoned") = Some(started);
                }
                Err(error @ StoreError::NodeIdTaken { .. }) => {
                    // Heartbeating on would take the row back and forth with the other
                    // process. Out of touch from now on, this host turns unready, and
                    // the partitions it holds are fenced as the other one takes them.
                    tracing::error!(%error, "node id taken over");
                    return;
                }
                Err(error) => tracing::warn!(%error, "heartbeat failed"),
            }
        }
    }

    /// Writes this node's member row (a heartbeat, with the state to announce), unless
    /// the node has left. `None`: the state the node announces now, read once the row
    /// is this call's: read before, a heartbeat could write back `ready` over the
    /// `draining` an announce wrote while it waited, and the region would hand this
    /// draining node partitions for a poll interval.
    async fn write_member(&self, state: Option<MemberState>) -> Result<(), StoreError> {
        let _row = self.inner.member_row.lock().await;
        if self.inner.left.load(Ordering::Relaxed) {
            return Ok(());
        }
        let state = state.unwrap_or_else(|| {
            self.inner
                .node
                .lock()
                .expect("node poisoned")
                .announced_state()
        });
        let config = &self.inner.config;
        let written = self
            .bounded(async |conn| {
                store::cluster::heartbeat(
                    conn,
                    &config.node_id,
                    &config.address,
                    state,
                    config.incarnation,
                )
                .await
            })
            .await;
        if let Err(StoreError::NodeIdTaken { .. }) = &written {
            self.inner.superseded.cancel();
        }
        written
    }

    /// Runs one membership call on the driver's own pool with `dead_after` to answer
    /// (later, the region counts this node dead anyway); see [`store::bounded`].
    async fn bounded<T>(
        &self,
        call: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        store::bounded(&self.inner.pool, Some(self.inner.config.dead_after), call).await
    }

    async fn poll(&self) {
        let dead_after = self.inner.config.dead_after;
        let observed_from = Instant::now();
        match self
            .bounded(async |conn| store::cluster::observe(conn, dead_after).await)
            .await
        {
            // Checked before the core sees the observation: resumed after a long pause,
            // this process must not take one lease in the id's name before its own
            // heartbeat (on its own timer) finds the row taken over.
            Ok(observation)
                if observation.members.iter().any(|m| {
                    m.id == self.inner.config.node_id
                        && m.incarnation
                            .is_some_and(|i| i != self.inner.config.incarnation)
                }) =>
            {
                tracing::error!("the member row of this node id belongs to another process now");
                self.inner.superseded.cancel();
            }
            Ok(observation) => {
                {
                    let mut addresses = self.inner.addresses.lock().expect("addresses poisoned");
                    addresses.clear();
                    for m in &observation.members {
                        addresses.insert(m.id.clone(), m.address.clone());
                    }
                }
                let previous = self
                    .inner
                    .membership_epoch
                    .swap(observation.membership_epoch, Ordering::Relaxed);
                if previous != observation.membership_epoch {
                    tracing::info!(
                        membership_epoch = observation.membership_epoch,
                        "membership changed"
                    );
                }
                let mut members: Vec<_> = observation.members.iter().map(|m| m.view()).collect();
                let heartbeat = *self
                    .inner
                    .heartbeat_at
                    .lock()
                    .expect("heartbeat_at poisoned");
                if super::core::outdated_death(
                    &mut members,
                    &self.inner.config.node_id,
                    observed_from,
                    heartbeat,
                ) {
                    tracing::info!(
                        "an observation older than this node's last heartbeat shows it dead; taken as alive"
                    );
                }
                let input = Input::Observed {
                    members,
                    leases: observation.leases.clone(),
                };
                let owned = observation
                    .leases
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some(self.inner.config.node_id.as_str()))
                    .count();
                metrics::gauge!("meridian_partitions_owned").set(owned as f64);
                metrics::gauge!("meridian_membership_epoch")
                    .set(observation.membership_epoch as f64);
                *self.inner.status.lock().expect("status poisoned") = Some(observation);
                self.feed(input).await;
            }
            Err(error) => tracing::warn!(%error, "cannot read cluster membership"),
        }
    }

    async fn feed(&self, input: Input) {
        let (actions, draining) = {
            let mut node = self.inner.node.lock().expect("node poisoned");
            let actions = node.step(input);
            let draining =
                (node.phase() == Phase::Draining).then(|| (node.serving().len(), node.pending()));
            (actions, draining)
        };
        if let Some((serving, (handing_over, acquiring))) = draining {
            tracing::debug!(serving, ?handing_over, ?acquiring, "draining");
        }
        self.execute(actions).await;
    }

    async fn execute(&self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let next = match action {
                Action::Announce { state } => {
                    if let Err(error) = self.write_member(Some(state)).await {
                        tracing::warn!(%error, "announce failed");
                    }
                    let phase = self.inner.node.lock().expect("node poisoned").phase();
                    self.inner.phase.send_replace(phase);
                    tracing::info!(state = state.as_str(), "announced");
                    None
                }
                Action::Acquire {
                    partition,
                    expected_owner,
                    expected_epoch,
                } => {
                    // An acquire that timed out may still commit on the server (once a
                    // lock it waited on is free): the next observation shows the lease
                    // in this node's name, and the core takes it as its own again.
                    let result = self
                        .bounded(async |conn| {
                            store::cluster::acquire(
                                conn,
                                partition,
                                &self.inner.config.node_id,
                                expected_owner.as_deref(),
                                expected_epoch,
                                self.inner.config.dead_after,
                            )
                            .await
                        })
                        .await;
                    let epoch = match result {
                        Ok(epoch) => epoch,
                        Err(error) => {
                            tracing::warn!(partition, %error, "acquire failed");
                            None
                        }
                    };
                    if let Some(epoch) = epoch {
                        tracing::debug!(partition, epoch, from = ?expected_owner, "partition acquired");
                    }
                    Some(Input::Acquired { partition, epoch })
                }
                // Both take the slot's write lock, which waits for commands in flight,
                // so they run in their own tasks: the loop (and so the heartbeat)
                // never waits on a command. The generation, taken here in the order
                // the core decided, makes the later decision win whichever task gets
                // the lock first.
                Action::Serve { partition, epoch } => {
                    self.set_slot(partition, Some(epoch), None);
                    None
                }
                Action::StopServing { partition, epoch } => {
                    self.set_slot(partition, None, Some(epoch));
                    None
                }
                Action::Release { partition, epoch } => {
                    if let Err(error) = self
                        .bounded(async |conn| {
                            store::cluster::release(
                                conn,
                                partition,
                                &self.inner.config.node_id,
                                epoch,
                            )
                            .await
                        })
                        .await
                    {
                        // The core sees the lease still in our name at the next
                        // observation and releases it again; the fence keeps it safe.
                        tracing::warn!(partition, %error, "release failed");
                    }
                    tracing::debug!(partition, epoch, "partition released");
                    Some(Input::Released { partition })
                }
                Action::Evict { partition } => {
                    let partitions = self.inner.config.partitions;
                    self.inner.executor.evict(|key| {
                        partition_of(&key.aggregate_type, &key.aggregate_id, partitions)
                            == partition
                    });
                    None
                }
                Action::Exit => {
                    self.inner.phase.send_replace(Phase::Exited);
                    tracing::info!("drained: no partitions held");
                    None
                }
            };
            if let Some(input) = next {
                let more = self.inner.node.lock().expect("node poisoned").step(input);
                queue.extend(more);
                let phase = self.inner.node.lock().expect("node poisoned").phase();
                if phase == Phase::Exited {
                    self.inner.phase.send_replace(Phase::Exited);
                }
            }
        }
    }

    /// Runs a command where it belongs: here if this node serves its partition, else
    /// at the owner (unless `forwarded`, in which case this node is the owner or says
    /// it is not). Waits up to the route timeout while the partition moves.
    pub async fn dispatch(
        &self,
        mut command: Command,
        body: &[u8],
        forwarded: bool,
        authorization: Option<&str>,
    ) -> Dispatched {
        let partition = partition_of(
            &command.key.aggregate_type,
            &command.key.aggregate_id,
            self.inner.config.partitions,
        );
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            match self.route(partition) {
                Route::Local(_) => {
                    let slot = self.inner.slots[partition as usize].read().await;
                    if let Some(epoch) = slot.1 {
                        command.fence = Some(Fence {
                            partition: partition as i32,
                            epoch: epoch as i64,
                        });
                        match self.inner.executor.execute(command.clone()).await {
                            Err(CommandError::Fenced(error)) => {
                                tracing::warn!(partition, epoch, %error, "append fenced: this node lost the partition");
                                drop(slot);
                                self.inner.nudge.notify_one();
                            }
                            result => return Dispatched::Local(result),
                        }
                    }
                }
                Route::Forward(owner) if !forwarded => {
                    let address = self
                        .inner
                        .addresses
                        .lock()
                        .expect("addresses poisoned")
                        .get(&owner)
                        .cloned();
                    if let Some(address) = address {
                        // An owner that hangs (a dead machine, a partition, a paused
                        // process) keeps the request until the HTTP timeout; its
                        // partitions move after the heartbeat timeout. Route again
                        // then: if it comes back, it is fenced, and the command id
                        // makes the command run once.
                        tokio::select! {
                            answer = self.forward(&address, &command, body, authorization) => {
                                if let Some(answer) = answer {
                                    return answer;
                                }
                            }
                            () = self.moved_from(partition, &owner) => {
                                tracing::info!(partition, owner, "the partition moved while a command forwarded to its owner was unanswered; routing again");
                                continue;
                            }
                        }
                    }
                }
                // Our view may be stale (a lease we released, an owner that moved):
                // look again now rather than at the next tick.
                _ => self.inner.nudge.notify_one(),
            }
            if forwarded {
                return Dispatched::Refused(RouteError::NotOwner { partition });
            }
            if started.elapsed() >= self.inner.config.route_timeout {
                return Dispatched::Refused(RouteError::Unavailable {
                    partition,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Where this node sends a command of `partition` now.
    fn route(&self, partition: u32) -> Route {
        self.inner
            .node
            .lock()
            .expect("node poisoned")
            .route(partition)
    }

    /// Returns once `partition` is no longer routed to `owner`.
    async fn moved_from(&self, partition: u32, owner: &str) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !matches!(self.route(partition), Route::Forward(o) if o == owner) {
                return;
            }
        }
    }

    /// Sends a command to its owner. `None`: the owner was not reachable or said it
    /// is not the owner (any more): route again.
    async fn forward(
        &self,
        address: &str,
        command: &Command,
        body: &[u8],
        authorization: Option<&str>,
    ) -> Option<Dispatched> {
        let url = format!(
            "{}/v1/aggregates/{}/{}",
            address.trim_end_matches('/'),
            command.key.aggregate_type,
            command.key.aggregate_id
        );
        let mut request = self
            .inner
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(FORWARDED_HEADER, &self.inner.config.node_id)
            .body(body.to_vec());
        if let Some(correlation) = &command.correlation_id {
            request = request.header("x-correlation-id", correlation);
        }
        // The owner checks the caller's token itself.
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let region = response
                    .headers()
                    .get(crate::region::SERVED_BY_HEADER)
                    .cloned();
                let body = response.bytes().await.ok()?;
                if status == axum::http::StatusCode::SERVICE_UNAVAILABLE
                    && error_code(&body).as_deref() == Some("not_owner")
                {
                    return None;
                }
                metrics::counter!("meridian_commands_forwarded_total").increment(1);
                Some(Dispatched::Forwarded {
                    status,
                    region,
                    body,
                })
            }
            Err(error) => {
                tracing::debug!(address, %error, "forward failed; routing again");
                None
            }
        }
    }

    /// The cluster as this node sees it, for `GET /v1/cluster`.
    pub fn status(&self) -> ClusterStatus {
        let observation = self.inner.status.lock().expect("status poisoned").clone();
        let node = self.inner.node.lock().expect("node poisoned").clone();
        let partitions = self.inner.config.partitions;
        let mut owners: Vec<Option<String>> = vec![None; partitions as usize];
        let mut epochs: Vec<u64> = vec![0; partitions as usize];
        for lease in node.leases() {
            if (lease.partition as usize) < owners.len() {
                owners[lease.partition as usize] = lease.owner.clone();
                epochs[lease.partition as usize] = lease.epoch;
            }
        }
        let members = observation
            .map(|o| {
                o.members
                    .into_iter()
                    .map(|m| MemberStatus {
                        partitions_owned: owners
                            .iter()
                            .filter(|o| o.as_deref() == Some(m.id.as_str()))
                            .count(),
                        id: m.id,
                        address: m.address,
                        state: m.state,
                        alive: m.alive,
                        last_heartbeat: m.last_heartbeat.to_rfc3339(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            node_id: self.inner.config.node_id.clone(),
            phase: node.phase(),
            partitions,
            membership_epoch: self.inner.membership_epoch.load(Ordering::Relaxed),
            members,
            partition_owners: owners,
            partition_epochs: epochs,
        }
    }
}

/// The `error.code` of an error answer. Read from the JSON, not searched for in the
/// bytes: a message may quote an aggregate id that contains any code.
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
    }
    serde_json::from_slice::<Answer>(body)
        .ok()
        .map(|answer| answer.error.code)
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: String,
    /// Its phase.
    #[schema(value_type = String)]
    pub phase: Phase,
    /// Virtual partitions in the region.
    pub partitions: u32,
    /// Membership changes so far (joins, state changes, deaths, departures).
    pub membership_epoch: i64,
    /// Members.
    pub members: Vec<MemberStatus>,
    /// Owner of each partition (index = partition), `null` while it moves.
    pub partition_owners: Vec<Option<String>>,
    /// Lease epoch of each partition.
    pub partition_epochs: Vec<u64>,
}

/// One member in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MemberStatus {
    /// Node id.
    pub id: String,
    /// Base URL.
    pub address: String,
    /// Announced state.
    pub state: MemberState,
    /// Heartbeating within the timeout.
    pub alive: bool,
    /// Last heartbeat (database clock).
    pub last_heartbeat: String,
    /// Partitions it holds.
    pub partitions_owned: usize,
}

/// Records the region's partition count at first start, refusing a different one.
pub async fn check_partitions(pool: &PgPool, partitions: u32) -> Result<(), ClusterSetupError> {
    let stored = store::region_setting(pool, "partitions", &partitions.to_string()).await?;
    if stored != partitions.to_string() {
        return Err(ClusterSetupError::PartitionMismatch {
            configured: partitions,
            stored,
        });
    }
    Ok(())
}

/// Errors setting up the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSetupError {
    /// The region was created with another partition count.
    #[error(
        "this region was created with {stored} partitions, but this host is configured with {configured}; start it with --partitions {stored} (MERIDIAN_PARTITIONS={stored}): the count cannot change once a region has data"
    )]
    PartitionMismatch {
        /// This host's setting.
        configured: u32,
        /// The region's.
        stored: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::error_code;

    #[test]
    fn an_error_code_is_read_from_the_answer_not_found_in_its_message() {
        let moving =
            br#"{"error":{"code":"home_moving","message":"bank-account/not_owner-1 is moving"}}"#;
        assert_eq!(error_code(moving).as_deref(), Some("home_moving"));
        let refused = br#"{"error":{"code":"not_owner","message":"partition 7 moved"}}"#;
        assert_eq!(error_code(refused).as_deref(), Some("not_owner"));
        assert_eq!(error_code(b"not_owner"), None);
    }
}
