//! A node's process: the driver loop around the real `Node` (heartbeat, observe, step,
//! carry out the actions one at a time feeding each result back), the executor (load,
//! decide, append with the fence), the HTTP front (route, forward, retry), and the
//! process's life: start, crash, drain-exit, SIGSTOP and SIGCONT.

use super::*;

impl World {
    /// Runs the driver loop until it waits for the store or has nothing to do.
    pub(super) fn pump(&mut self, n: usize) {
        loop {
            let h = &mut self.hosts[n];
            if h.status != Status::Running || h.busy {
                return;
            }
            if let Some(action) = h.actions.pop_front() {
                self.act(n, action);
                continue;
            }
            if h.polling {
                // The poll and everything it led to are done: sleep until the next
                // one (unless the timer is already set: a nudged poll, a clock jump).
                h.polling = false;
                if !h.tick_armed {
                    h.tick_armed = true;
                    let jitter = self.rng.below(self.p.poll / 5);
                    let h = &self.hosts[n];
                    let delay = (self.p.poll * 9 / 10 + jitter) * h.tick_permille / 1000;
                    let ev = Ev::Tick {
                        n,
                        inc: h.inc,
                        gen_: h.tick_gen,
                    };
                    self.after(delay, ev);
                }
                continue;
            }
            match h.ctl.pop_front() {
                Some(Ctl::Tick) => {
                    h.polling = true;
                    h.busy = true;
                    if self.heartbeat_apart || h.left {
                        let now = self.now;
                        self.db_call(n, Wait::Observe(now), DbOp::Observe);
                    } else {
                        let state = h.node.announced_state();
                        self.db_call(n, Wait::Heartbeat, DbOp::Heartbeat(state));
                    }
                }
                Some(Ctl::CaughtUp) => self.step(n, Input::CaughtUp),
                Some(Ctl::Drain) => self.step(n, Input::Drain),
                Some(Ctl::Idle(partition, epoch)) => {
                    if h.stopping.get(&partition) == Some(&epoch) && h.inflight(partition) == 0 {
                        h.stopping.remove(&partition);
                        self.step(n, Input::Idle { partition, epoch });
                    }
                }
                None => return,
            }
        }
    }

    /// Feeds the core one input; its actions go to the back of the driver's queue.
    pub(super) fn step(&mut self, n: usize, input: Input) {
        let text = match &input {
            Input::Observed { members, .. } => view_text(members),
            other => format!("{other:?}"),
        };
        let actions = self.hosts[n].node.step(input.clone());
        let h = &mut self.hosts[n];
        let observed = matches!(input, Input::Observed { .. });
        if !observed || !actions.is_empty() || text != h.last_view {
            let leases = match (&input, actions.is_empty()) {
                (Input::Observed { leases, .. }, false) => {
                    format!(" leases [{}]", lease_text(leases))
                }
                _ => String::new(),
            };
            if observed {
                h.last_view = text.clone();
            }
            tr!(
                self,
                Who::Node(n),
                "step {}{} -> [{}]",
                if observed {
                    format!("observed {text}")
                } else {
                    text
                },
                leases,
                actions_text(&actions)
            );
        }
        for action in &actions {
            if let Action::Serve { partition, epoch } = *action {
                match self.grants.get(&(partition, epoch)) {
                    Some(&holder) if holder == n => {}
                    other => self.fail(
                        Invariant::Grant,
                        format!(
                            "n{n} serves p{partition}@{epoch}, but the store granted that epoch to {other:?}"
                        ),
                    ),
                }
            }
        }
        self.hosts[n].actions.extend(actions);
    }

    /// Carries out one action, as the real driver does.
    pub(super) fn act(&mut self, n: usize, action: Action) {
        let h = &mut self.hosts[n];
        match action {
            Action::Announce { state } => {
                h.busy = true;
                self.db_call(n, Wait::Announce, DbOp::Announce(state));
            }
            Action::Acquire {
                partition,
                expected_owner,
                expected_epoch,
            } => {
                h.busy = true;
                let expected_owner = expected_owner.map(|o| self.slot_of(&o));
                self.db_call(
                    n,
                    Wait::Acquire(partition),
                    DbOp::Acquire {
                        partition,
                        expected_owner,
                        expected_epoch,
                    },
                );
            }
            Action::Serve { partition, epoch } => {
                h.serving.insert(partition, epoch);
                h.stopping.remove(&partition);
            }
            Action::StopServing { partition, epoch } => {
                h.serving.remove(&partition);
                h.stopping.insert(partition, epoch);
                if h.inflight(partition) == 0 {
                    h.ctl.push_back(Ctl::Idle(partition, epoch));
                }
            }
            Action::Release { partition, epoch } => {
                h.busy = true;
                self.db_call(
                    n,
                    Wait::Release(partition),
                    DbOp::Release { partition, epoch },
                );
            }
            Action::Evict { partition } => {
                let agg_part = &self.agg_part;
                h.cache.retain(|agg, _| agg_part[*agg] != partition);
            }
            Action::Exit => self.exit(n),
        }
    }

    /// Asks the store; the answer (or a timeout) comes back through `on_db`.
    pub(super) fn db_call(&mut self, n: usize, wait: Wait, op: DbOp) {
        let req = self.id();
        let inc = self.hosts[n].inc;
        self.hosts[n].db_wait.insert(req, wait);
        let timeout = self.p.db_timeout;
        self.after(timeout, Ev::DbTimeout { n, inc, req });
        if self.net.db_link(n) && !self.rng.chance(self.net.drop) {
            let d = self.db_delay(n);
            self.after(d, Ev::DbArrive { n, inc, req, op });
        } else if !matches!(op, DbOp::Heartbeat(_) | DbOp::Observe) {
            tr!(self, Who::Net, "lost n{n} -> db: {op:?}");
        }
    }

    pub(super) fn db_arrive(&mut self, n: usize, inc: u32, req: u64, op: DbOp) {
        if !self.net.db_link(n) {
            if !matches!(op, DbOp::Heartbeat(_) | DbOp::Observe) {
                tr!(self, Who::Net, "lost n{n} -> db: {op:?}");
            }
            return;
        }
        let lease_before = match &op {
            DbOp::Append(r) => self.db.leases.get(&r.partition).copied(),
            DbOp::Acquire { partition, .. } | DbOp::Release { partition, .. } => {
                self.db.leases.get(partition).copied()
            }
            _ => None,
        };
        let member_before = self.db.members.get(&n).cloned();
        let reply = self.db.apply(n, &op, self.now, &self.names);
        self.audit(n, &op, &reply, lease_before);
        self.audit_membership(n, &op, member_before);
        if self.net.db_link(n) && !self.rng.chance(self.net.drop) {
            let d = self.db_delay(n);
            self.after(d, Ev::DbReply { n, inc, req, reply });
        } else if !matches!(op, DbOp::Heartbeat(_) | DbOp::Observe) {
            tr!(self, Who::Net, "lost db -> n{n}: reply to {op:?}");
        }
    }

    pub(super) fn on_db(&mut self, n: usize, wait: Wait, reply: Option<DbReply>) {
        match wait {
            Wait::Heartbeat => {
                // The real driver observes whether or not the heartbeat went through.
                let now = self.now;
                self.db_call(n, Wait::Observe(now), DbOp::Observe);
            }
            Wait::HeartbeatApart(sent) => {
                if reply.is_some() {
                    let stored = &mut self.hosts[n].heartbeat_stored_from;
                    *stored = (*stored).max(Some(sent));
                }
            }
            Wait::Leave => {}
            Wait::Observe(sent) => {
                self.hosts[n].busy = false;
                if let Some(DbReply::Observed {
                    mut members,
                    leases,
                }) = reply
                {
                    let heartbeat = self.hosts[n].heartbeat_stored_from;
                    if outdated_death(&mut members, &self.names[n], sent, heartbeat) {
                        tr!(
                            self,
                            Who::Node(n),
                            "an observation older than its last heartbeat shows it dead: taken as alive"
                        );
                    }
                    self.step(n, Input::Observed { members, leases });
                }
                self.pump(n);
            }
            Wait::Announce => {
                self.hosts[n].busy = false;
                self.pump(n);
            }
            Wait::Acquire(partition) => {
                self.hosts[n].busy = false;
                let epoch = match reply {
                    Some(DbReply::Acquired(epoch)) => epoch,
                    _ => None,
                };
                self.step(n, Input::Acquired { partition, epoch });
                self.pump(n);
            }
            Wait::Release(partition) => {
                self.hosts[n].busy = false;
                self.step(n, Input::Released { partition });
                self.pump(n);
            }
            Wait::Load(exec) => self.exec_loaded(n, exec, reply),
            Wait::Append(exec) => self.exec_appended(n, exec, reply),
        }
    }

    /// Re-observe soon (after a fenced append), unless a poll is under way.
    pub(super) fn nudge(&mut self, n: usize) {
        let h = &mut self.hosts[n];
        if !h.polling && !h.ctl.contains(&Ctl::Tick) {
            h.ctl.push_back(Ctl::Tick);
            self.pump(n);
        }
    }

    pub(super) fn start_exec(&mut self, n: usize, cmd: u64, epoch: u64, target: Target) {
        let agg = self.cmds[cmd as usize].agg;
        let partition = self.agg_part[agg];
        let id = self.id();
        let h = &mut self.hosts[n];
        *h.inflight.entry(partition).or_default() += 1;
        let cached = h.cache.get(&agg).copied();
        h.execs.insert(
            id,
            Exec {
                cmd,
                agg,
                partition,
                epoch,
                expected: cached.unwrap_or(0),
                conflicts: 0,
                target,
            },
        );
        match cached {
            Some(_) => self.decide(n, id),
            None => self.db_call(n, Wait::Load(id), DbOp::Load(agg)),
        }
    }

    /// The plugin decides (usually fast, sometimes slow).
    pub(super) fn decide(&mut self, n: usize, exec: u64) {
        let d = if self.rng.chance(0.02) {
            self.rng.range(20 * MS, 300 * MS)
        } else {
            self.rng.range(50, 2 * MS)
        };
        let inc = self.hosts[n].inc;
        self.after(d, Ev::Decided { n, inc, exec });
    }

    pub(super) fn exec_loaded(&mut self, n: usize, id: u64, reply: Option<DbReply>) {
        let Some(e) = self.hosts[n].execs.get_mut(&id) else {
            return;
        };
        match reply {
            Some(DbReply::Version(v)) => {
                e.expected = v;
                let (agg, partition, epoch) = (e.agg, e.partition, e.epoch);
                let h = &mut self.hosts[n];
                if h.serving.get(&partition) == Some(&epoch) {
                    h.cache.insert(agg, v);
                }
                self.decide(n, id);
            }
            _ => self.finish(n, id, Res::Retry),
        }
    }

    pub(super) fn exec_appended(&mut self, n: usize, id: u64, reply: Option<DbReply>) {
        let Some(e) = self.hosts[n].execs.get(&id).copied() else {
            return;
        };
        let h = &mut self.hosts[n];
        match reply {
            Some(DbReply::Append(AppendOutcome::Ok(v))) => {
                if h.serving.get(&e.partition) == Some(&e.epoch) {
                    h.cache.insert(e.agg, v);
                }
                self.finish(n, id, Res::Ok(v));
            }
            Some(DbReply::Append(AppendOutcome::Duplicate(v))) => self.finish(n, id, Res::Ok(v)),
            Some(DbReply::Append(AppendOutcome::Conflict(_))) => {
                h.cache.remove(&e.agg);
                let exec = h.execs.get_mut(&id).expect("present");
                exec.conflicts += 1;
                if exec.conflicts <= 3 {
                    self.db_call(n, Wait::Load(id), DbOp::Load(e.agg));
                } else {
                    self.finish(n, id, Res::Retry);
                }
            }
            Some(DbReply::Append(AppendOutcome::Fenced)) => {
                h.cache.remove(&e.agg);
                tr!(
                    self,
                    Who::Node(n),
                    "cmd {} fenced at p{}@{}: lost the partition, re-observing",
                    e.cmd,
                    e.partition,
                    e.epoch
                );
                self.finish(n, id, Res::NotOwner);
                self.nudge(n);
            }
            _ => {
                h.cache.remove(&e.agg);
                self.finish(n, id, Res::Retry);
            }
        }
    }

    pub(super) fn finish(&mut self, n: usize, id: u64, res: Res) {
        let Some(e) = self.hosts[n].execs.remove(&id) else {
            return;
        };
        let h = &mut self.hosts[n];
        let count = h.inflight.entry(e.partition).or_default();
        *count -= 1;
        if *count == 0 {
            h.inflight.remove(&e.partition);
            if let Some(&epoch) = h.stopping.get(&e.partition)
                && !h.ctl.contains(&Ctl::Idle(e.partition, epoch))
            {
                h.ctl.push_back(Ctl::Idle(e.partition, epoch));
            }
        }
        match e.target {
            Target::Front(front) => self.front_result(n, front, res),
            Target::Remote {
                to,
                to_inc,
                front,
                seq,
            } => {
                let ev = Ev::ForwardReply {
                    to,
                    to_inc,
                    from: n,
                    front,
                    seq,
                    res,
                };
                self.send_node(n, to, ev);
            }
        }
        self.pump(n);
    }

    pub(super) fn on_request(&mut self, n: usize, cmd: u64, attempt: u32) {
        if self.hosts[n].status != Status::Running {
            let d = self.net_delay();
            self.after(
                d,
                Ev::Response {
                    cmd,
                    attempt,
                    reply: Reply::Refused,
                },
            );
            return;
        }
        let front = self.id();
        let deadline = self.now + self.p.route_timeout;
        self.hosts[n].fronts.insert(
            front,
            Front {
                cmd,
                attempt,
                deadline,
                seq: 0,
                waiting: false,
            },
        );
        self.front_route(n, front);
    }

    /// The core's route, except that a local route waits until the driver has carried
    /// out the `Serve` (the real driver runs a command only while its partition's slot
    /// holds an epoch).
    pub(super) fn local_route(&self, n: usize, partition: Partition) -> Route {
        let h = &self.hosts[n];
        match h.node.route(partition) {
            Route::Local(epoch) if h.serving.get(&partition) != Some(&epoch) => Route::Unavailable,
            route => route,
        }
    }

    /// The HTTP front: route by the core, run here, forward, or wait and try again.
    pub(super) fn front_route(&mut self, n: usize, front: u64) {
        let Some(f) = self.hosts[n].fronts.get(&front).copied() else {
            return;
        };
        if self.now >= f.deadline {
            self.hosts[n].fronts.remove(&front);
            tr!(
                self,
                Who::Node(n),
                "cmd {} unavailable: route timeout",
                f.cmd
            );
            self.respond(f.cmd, f.attempt, Reply::Unavailable);
            return;
        }
        let partition = self.agg_part[self.cmds[f.cmd as usize].agg];
        let route = self.local_route(n, partition);
        match route {
            Route::Local(epoch) => {
                tr!(
                    self,
                    Who::Node(n),
                    "cmd {} p{partition}: local @{epoch}",
                    f.cmd
                );
                self.start_exec(n, f.cmd, epoch, Target::Front(front));
            }
            Route::Forward(owner) => {
                let to = self.slot_of(&owner);
                let inc = self.hosts[n].inc;
                let fr = self.hosts[n].fronts.get_mut(&front).expect("present");
                fr.seq += 1;
                fr.waiting = true;
                let seq = fr.seq;
                tr!(
                    self,
                    Who::Node(n),
                    "cmd {} p{partition}: forward to n{to}",
                    f.cmd
                );
                let ev = Ev::Forward {
                    to,
                    from: n,
                    from_inc: inc,
                    front,
                    seq,
                    cmd: f.cmd,
                };
                self.send_node(n, to, ev);
                let timeout = self.p.forward_timeout;
                self.after(timeout, Ev::ForwardTimeout { n, inc, front, seq });
            }
            Route::Unavailable => {
                // The view may be stale: the real driver looks again at once.
                self.nudge(n);
                let inc = self.hosts[n].inc;
                let d = self.backoff();
                self.after(d, Ev::FrontWake { n, inc, front });
            }
        }
    }

    pub(super) fn front_result(&mut self, n: usize, front: u64, res: Res) {
        let Some(f) = self.hosts[n].fronts.get_mut(&front) else {
            return;
        };
        f.waiting = false;
        let (cmd, attempt) = (f.cmd, f.attempt);
        match res {
            Res::Ok(v) => {
                self.hosts[n].fronts.remove(&front);
                self.respond(cmd, attempt, Reply::Ok(v));
            }
            Res::NotOwner | Res::Retry => {
                let inc = self.hosts[n].inc;
                let d = self.backoff();
                self.after(d, Ev::FrontWake { n, inc, front });
            }
        }
    }

    /// A forwarded command: run it here if this node serves the partition, else say so.
    pub(super) fn on_forward(
        &mut self,
        to: usize,
        from: usize,
        from_inc: u32,
        front: u64,
        seq: u32,
        cmd: u64,
    ) {
        if !self.net.node_link(from, to) || self.hosts[to].status != Status::Running {
            return;
        }
        let partition = self.agg_part[self.cmds[cmd as usize].agg];
        match self.local_route(to, partition) {
            Route::Local(epoch) => {
                tr!(
                    self,
                    Who::Node(to),
                    "cmd {cmd} from n{from}: local @{epoch}"
                );
                let target = Target::Remote {
                    to: from,
                    to_inc: from_inc,
                    front,
                    seq,
                };
                self.start_exec(to, cmd, epoch, target);
            }
            _ => {
                self.nudge(to);
                tr!(self, Who::Node(to), "cmd {cmd} from n{from}: not owner");
                let ev = Ev::ForwardReply {
                    to: from,
                    to_inc: from_inc,
                    from: to,
                    front,
                    seq,
                    res: Res::NotOwner,
                };
                self.send_node(to, from, ev);
            }
        }
    }

    /// Node-to-node message: partitions, loss, duplication, reordering.
    pub(super) fn send_node(&mut self, from: usize, to: usize, ev: Ev) {
        if !self.net.node_link(from, to) || self.rng.chance(self.net.drop) {
            tr!(self, Who::Net, "lost n{from} -> n{to}");
            return;
        }
        let d = self.net_delay();
        if self.rng.chance(self.net.dup) {
            let d2 = self.net_delay();
            self.after(d2, ev.clone());
        }
        self.after(d, ev);
    }

    pub(super) fn restart(&mut self, n: usize) {
        if !matches!(self.hosts[n].status, Status::Down | Status::Exited) {
            return;
        }
        let name = self.names[n].clone();
        self.hosts[n].wipe(&name, self.p.partitions, Status::Running);
        self.stats.restarts += 1;
        let h = &mut self.hosts[n];
        let (inc, gen_) = (h.inc, h.tick_gen);
        h.tick_armed = true;
        let start = h.node.start();
        h.actions.extend(start);
        tr!(self, Who::Node(n), "process starts (incarnation {inc})");
        let catch_up = self.rng.range(50 * MS, 1500 * MS);
        self.after(catch_up, Ev::CatchUp { n, inc });
        let first = self.rng.below(self.p.poll);
        self.after(first, Ev::Tick { n, inc, gen_ });
        if self.heartbeat_apart {
            self.after(first, Ev::Heartbeat { n, inc });
        }
        self.pump(n);
    }

    pub(super) fn crash(&mut self, n: usize) {
        let name = self.names[n].clone();
        self.hosts[n].wipe(&name, self.p.partitions, Status::Down);
        self.stats.crashes += 1;
        let d = self.rng.range(200 * MS, 12 * SEC);
        tr!(self, Who::Fault, "crash n{n}; restart in {} ms", d / MS);
        self.after(d, Ev::Restart { n });
    }

    /// `Exit`: the driver deletes its member row (best effort) and stops heartbeating,
    /// but keeps observing and forwarding until the process is gone.
    pub(super) fn exit(&mut self, n: usize) {
        self.hosts[n].left = true;
        self.db_call(n, Wait::Leave, DbOp::Leave);
        let inc = self.hosts[n].inc;
        let linger = self.rng.range(100 * MS, 2 * SEC);
        tr!(
            self,
            Who::Node(n),
            "drained: leaves; the process ends in {} ms",
            linger / MS
        );
        self.after(linger, Ev::ProcessEnd { n, inc });
    }

    /// The drained process is gone; an orchestrator starts a new one.
    pub(super) fn process_end(&mut self, n: usize) {
        let name = self.names[n].clone();
        self.hosts[n].wipe(&name, self.p.partitions, Status::Exited);
        let d = if self.stage == Stage::Chaos {
            self.rng.range(SEC, 5 * SEC)
        } else {
            self.rng.range(200 * MS, 800 * MS)
        };
        tr!(
            self,
            Who::Node(n),
            "process ends; a new one starts in {} ms",
            d / MS
        );
        self.after(d, Ev::Restart { n });
    }

    pub(super) fn pause(&mut self, n: usize, duration: Time, why: &str) {
        let h = &mut self.hosts[n];
        h.status = Status::Paused;
        h.pause_gen += 1;
        let gen_ = h.pause_gen;
        self.stats.pauses += 1;
        tr!(
            self,
            Who::Fault,
            "SIGSTOP n{n} for {} ms {why}",
            duration / MS
        );
        self.after(duration, Ev::Resume { n, gen_ });
    }

    pub(super) fn resume(&mut self, n: usize) {
        let h = &mut self.hosts[n];
        h.status = Status::Running;
        h.pause_gen += 1;
        let pending = std::mem::take(&mut h.pending);
        tr!(
            self,
            Who::Fault,
            "SIGCONT n{n}: {} pending events",
            pending.len()
        );
        for ev in pending {
            self.after(0, ev);
        }
    }
}
