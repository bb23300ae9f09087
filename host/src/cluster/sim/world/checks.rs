//! The checker: each store operation audited at the instant it takes effect
//! (invariants 1–3 and lease grants), and the end of a run (heal everything, wait for
//! convergence, probe every partition: invariant 4).

use super::*;

impl World {
    /// The checker's view of each store operation, at the instant it takes effect.
    pub(super) fn audit(&mut self, n: usize, op: &DbOp, reply: &DbReply, before: Option<LeaseRow>) {
        match (op, reply) {
            (DbOp::Announce(state), _) => {
                tr!(self, Who::Db, "n{n} announces {}", state.as_str());
            }
            (DbOp::Leave, _) => tr!(self, Who::Db, "n{n} leaves"),
            (
                DbOp::Acquire {
                    partition,
                    expected_owner,
                    expected_epoch,
                },
                DbReply::Acquired(result),
            ) => {
                tr!(
                    self,
                    Who::Db,
                    "n{n} acquire p{partition} expecting {}@{expected_epoch} (row {}) -> {}",
                    owner_text(*expected_owner),
                    row_text(before),
                    match result {
                        Some(e) => format!("granted @{e}"),
                        None => "lost".into(),
                    }
                );
                if let Some(epoch) = *result
                    && let Some(prev) = self.grants.insert((*partition, epoch), n)
                {
                    self.fail(
                        Invariant::Grant,
                        format!("p{partition}@{epoch} granted to n{prev} and then to n{n}"),
                    );
                }
                if result.is_some() {
                    self.audit_move(*partition, before);
                }
            }
            (DbOp::Release { partition, epoch }, _) => {
                let after = self.db.leases.get(partition).copied();
                tr!(
                    self,
                    Who::Db,
                    "n{n} release p{partition}@{epoch} (row {}) -> row {}",
                    row_text(before),
                    row_text(after)
                );
                if after != before {
                    self.audit_move(*partition, before);
                }
            }
            (DbOp::Append(r), DbReply::Append(outcome)) => {
                tr!(
                    self,
                    Who::Db,
                    "n{n} append cmd {} to {} (p{}) fenced @{} expecting v{} (lease {}) -> {outcome:?}",
                    r.cmd,
                    self.agg_names[r.agg],
                    r.partition,
                    r.epoch,
                    r.expected,
                    row_text(before)
                );
                match *outcome {
                    AppendOutcome::Ok(version) => self.audit_append(n, r, version, before),
                    AppendOutcome::Fenced => self.stats.fenced += 1,
                    AppendOutcome::Conflict(_) => self.stats.conflicts += 1,
                    AppendOutcome::Duplicate(_) => self.stats.duplicates += 1,
                    AppendOutcome::UniqueViolation => self.fail(
                        Invariant::LinearHistory,
                        format!(
                            "the unique (type, id, version) constraint fired for {} v{}",
                            self.agg_names[r.agg],
                            r.expected + 1
                        ),
                    ),
                }
            }
            _ => {}
        }
    }

    /// (5) A lease changed hands (`before` is its row before): fine while the region
    /// converges or after its membership changed, a violation otherwise.
    fn audit_move(&mut self, partition: Partition, before: Option<LeaseRow>) {
        let Some(since) = self.stable_since else {
            return;
        };
        // A member past its heartbeat timeout is a membership change (the real
        // store marks it dead at the next observation), even before anyone saw it.
        // By the rows themselves, not `Db::alive`, which a blinded store gets wrong.
        let now = self.now;
        let dead_after = self.db.dead_after;
        if let Some(dead) = self
            .db
            .members
            .iter()
            .find(|(_, m)| !m.fresh(now, dead_after))
            .map(|(n, _)| *n)
        {
            let why = format!("n{dead} missed its heartbeats");
            self.membership_changed(why);
            return;
        }
        let after = self.db.leases.get(&partition).copied();
        let message = format!(
            "p{partition} went from {} to {} {} ms after the region converged, with no membership change",
            row_text(before),
            row_text(after),
            (now - since) / MS
        );
        self.fail(Invariant::Stability, message);
    }

    /// Notes a change of membership the store just saw from node `n`'s `op`: a member
    /// joining, coming back from the dead, changing state, or leaving.
    pub(super) fn audit_membership(
        &mut self,
        n: usize,
        op: &DbOp,
        before: Option<crate::cluster::sim::db::MemberRow>,
    ) {
        let why = match (op, before) {
            (DbOp::Heartbeat(_) | DbOp::Announce(_), None) => format!("n{n} joined"),
            (DbOp::Heartbeat(state) | DbOp::Announce(state), Some(m)) if m.state != *state => {
                format!("n{n} is {} now", state.as_str())
            }
            (DbOp::Heartbeat(_) | DbOp::Announce(_), Some(m))
                if !m.fresh(self.now, self.db.dead_after) =>
            {
                format!("n{n} is back from the dead")
            }
            (DbOp::Leave, _) => format!("n{n} left"),
            _ => return,
        };
        self.membership_changed(why);
    }

    fn membership_changed(&mut self, why: String) {
        if self.stable_since.take().is_some() {
            tr!(
                self,
                Who::Sim,
                "membership changed after convergence ({why}): partitions may move again"
            );
        }
    }

    /// [`SimOptions::blind_observation`]: once the region has converged, the store
    /// reads the owner of partition 0 as dead for a second, though it heartbeats.
    fn blind_store(&mut self) {
        if let Some(owner) = self.db.leases.get(&0).and_then(|l| l.owner) {
            tr!(self, Who::Sim, "the store reads n{owner} as dead for 1 s");
            self.db.blind = Some((owner, self.now + SEC));
        }
    }

    pub(super) fn audit_append(
        &mut self,
        n: usize,
        r: &AppendReq,
        version: u64,
        lease: Option<LeaseRow>,
    ) {
        self.stats.appends += 1;
        let agg = self.agg_names[r.agg].clone();
        // (2) Accepted only from the lease holder at the lease's current epoch.
        let current = LeaseRow {
            owner: Some(n),
            epoch: r.epoch,
        };
        if lease != Some(current) {
            let message = format!(
                "append of cmd {} to {agg} v{version} accepted from n{n} fenced @{} on p{}, but the lease is {}",
                r.cmd,
                r.epoch,
                r.partition,
                row_text(lease)
            );
            self.fail(Invariant::StaleEpoch, message);
        }
        if self.agg_part[r.agg] != r.partition {
            let message = format!("{agg} appended under the wrong partition p{}", r.partition);
            self.fail(Invariant::StaleEpoch, message);
        }
        // (1) One linear history: the next version, exactly.
        let last = self.history[r.agg];
        if version != last + 1 || r.expected != last {
            let message = format!(
                "{agg}: v{version} accepted (expected v{}) after v{last}",
                r.expected
            );
            self.fail(Invariant::LinearHistory, message);
        }
        self.history[r.agg] = self.history[r.agg].max(version);
        // (3) No command applied twice.
        if let Some((a, v)) = self.applied.insert(r.cmd, (r.agg, version)) {
            let message = format!(
                "cmd {} applied twice: {} v{v} and {agg} v{version}",
                r.cmd, self.agg_names[a]
            );
            self.fail(Invariant::ExactlyOnce, message);
        }
    }

    /// Heal everything, resume and restart every node, then wait for the cluster to
    /// converge and probe every partition.
    pub(super) fn settle(&mut self) {
        self.stage = Stage::Converging;
        self.settle_at = self.now;
        tr!(self, Who::Sim, "settle: faults stop, everything heals");
        self.net.cuts.clear();
        self.net.db_cuts.iter_mut().for_each(|c| *c = 0);
        self.net.drop = 0.0;
        self.net.dup = 0.0;
        self.net.flaky_gen += 1;
        for n in 0..self.p.nodes {
            self.net.slow[n] = 0;
            self.net.slow_gen[n] += 1;
            let h = &mut self.hosts[n];
            h.tick_permille = 1000;
            h.rate_gen += 1;
            h.pause_on_observe = None;
            match h.status {
                Status::Paused => self.resume(n),
                Status::Down | Status::Exited => {
                    let d = self.rng.below(500 * MS);
                    self.after(d, Ev::Restart { n });
                }
                Status::Running => {}
            }
        }
        self.after(500 * MS, Ev::Check);
    }

    pub(super) fn check(&mut self) {
        match self.stage {
            Stage::Converging => match self.converged() {
                Ok(()) => {
                    tr!(
                        self,
                        Who::Sim,
                        "converged {} ms after settling; probing every partition",
                        (self.now - self.settle_at) / MS
                    );
                    self.stage = Stage::Probing;
                    self.stable_since = Some(self.now);
                    if self.options.blind_observation {
                        self.blind_store();
                    }
                    self.stats.converged_after = self.now - self.settle_at;
                    self.probe_deadline = self.now + self.p.probe_bound;
                    for agg in self.probe_aggs.clone() {
                        self.probes.push(self.cmds.len() as u64);
                        self.new_cmd(0, agg, None, true, false);
                    }
                    self.after(100 * MS, Ev::Check);
                }
                Err(why) => {
                    if self.now >= self.settle_at + self.p.converge_bound {
                        let message = format!(
                            "not converged {} s after all faults healed: {why}",
                            self.p.converge_bound / SEC
                        );
                        self.fail(Invariant::Liveness, message);
                    } else {
                        if why != self.last_unconverged {
                            tr!(self, Who::Sim, "not converged yet: {why}");
                            self.last_unconverged = why;
                        }
                        self.after(250 * MS, Ev::Check);
                    }
                }
            },
            Stage::Probing => {
                let waiting: Vec<String> = self
                    .probes
                    .iter()
                    .map(|id| &self.cmds[*id as usize])
                    .filter(|c| c.acked.is_none())
                    .map(|c| self.agg_names[c.agg].clone())
                    .collect();
                if waiting.is_empty() {
                    tr!(
                        self,
                        Who::Sim,
                        "every partition answered a probe; {} ms undisturbed follow",
                        QUIET / MS
                    );
                    self.stage = Stage::Quiet;
                    self.quiet_until = self.now + QUIET;
                    self.after(QUIET, Ev::Check);
                } else if self.now >= self.probe_deadline {
                    let message = format!(
                        "probe commands not acknowledged within {} ms of convergence: {waiting:?}",
                        self.p.probe_bound / MS
                    );
                    self.fail(Invariant::Liveness, message);
                } else {
                    self.after(100 * MS, Ev::Check);
                }
            }
            Stage::Quiet if self.now >= self.quiet_until => {
                self.final_check();
                if self.violation.is_none() {
                    tr!(
                        self,
                        Who::Sim,
                        "no partition moved while nothing changed: pass"
                    );
                    self.stage = Stage::Done;
                }
            }
            Stage::Quiet | Stage::Chaos | Stage::Done => {}
        }
    }

    /// Every node running and ready, and every partition leased to the node the
    /// assignment picks, which serves it at the lease's epoch and nothing else.
    pub(super) fn converged(&self) -> Result<(), String> {
        let mut serving = Vec::new();
        for (n, h) in self.hosts.iter().enumerate() {
            if h.status != Status::Running {
                return Err(format!("n{n} is {:?}", h.status));
            }
            if h.node.phase() != Phase::Ready {
                return Err(format!("n{n} is {:?}", h.node.phase()));
            }
            match self.db.members.get(&n) {
                Some(m) if m.state == MemberState::Ready && self.db.alive(n, self.now) => {}
                other => return Err(format!("n{n}'s member row is {other:?}")),
            }
            if !h.stopping.is_empty() {
                return Err(format!("n{n} is still stopping {:?}", h.stopping));
            }
            serving.push(h.node.serving());
        }
        let ids: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let mut wanted = vec![0usize; self.p.nodes];
        for partition in 0..self.p.partitions {
            let desired = self.slot_of(assign(partition, &ids).expect("nodes exist"));
            wanted[desired] += 1;
            let lease = self.db.leases.get(&partition).copied();
            let Some(LeaseRow {
                owner: Some(owner),
                epoch,
            }) = lease
            else {
                return Err(format!("p{partition} has lease {}", row_text(lease)));
            };
            if owner != desired {
                return Err(format!(
                    "p{partition} is leased to n{owner}@{epoch}, but n{desired} should own it"
                ));
            }
            if serving[owner].get(&partition) != Some(&epoch)
                || self.hosts[owner].serving.get(&partition) != Some(&epoch)
            {
                return Err(format!(
                    "p{partition} is leased to n{owner}@{epoch}, which serves {:?}",
                    serving[owner].get(&partition)
                ));
            }
        }
        for (n, s) in serving.iter().enumerate() {
            if s.len() != wanted[n] {
                return Err(format!(
                    "n{n} serves {} partitions, should serve {}",
                    s.len(),
                    wanted[n]
                ));
            }
        }
        Ok(())
    }

    /// The checker's records agree with the store, and every acknowledged command is
    /// stored exactly once.
    pub(super) fn final_check(&mut self) {
        for agg in 0..self.agg_names.len() {
            let stored = self.db.events[agg].len() as u64;
            if stored != self.history[agg] {
                let message = format!(
                    "{}: the store holds {stored} events, the checker saw {}",
                    self.agg_names[agg], self.history[agg]
                );
                self.fail(Invariant::LinearHistory, message);
            }
        }
        for (id, c) in self.cmds.iter().enumerate() {
            if let Some(version) = c.acked {
                let copies = self.db.events[c.agg]
                    .iter()
                    .filter(|e| e.cmd == id as u64)
                    .count();
                if copies != 1 || self.db.events[c.agg][version as usize - 1].cmd != id as u64 {
                    let message =
                        format!("cmd {id} acknowledged at v{version} is stored {copies} times");
                    self.violation.get_or_insert(Violation {
                        invariant: Invariant::ExactlyOnce,
                        message,
                        at: self.now,
                    });
                }
            }
        }
    }
}
