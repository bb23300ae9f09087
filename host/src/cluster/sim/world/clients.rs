//! Clients: each command has one id for all its attempts (idempotent retries), goes to
//! a random node, and is retried on timeouts and refusals; acknowledgements are checked
//! against the store as they arrive.

use super::*;

impl World {
    pub(super) fn respond(&mut self, cmd: u64, attempt: u32, reply: Reply) {
        if self.rng.chance(self.net.drop) {
            return;
        }
        let d = self.net_delay();
        if self.rng.chance(self.net.dup) {
            let d2 = self.net_delay();
            self.after(
                d2,
                Ev::Response {
                    cmd,
                    attempt,
                    reply,
                },
            );
        }
        self.after(
            d,
            Ev::Response {
                cmd,
                attempt,
                reply,
            },
        );
    }

    pub(super) fn new_cmd(
        &mut self,
        client: usize,
        agg: usize,
        to: Option<usize>,
        probe: bool,
        counted: bool,
    ) {
        let id = self.cmds.len() as u64;
        self.cmds.push(Cmd {
            client,
            agg,
            attempt: 0,
            acked: None,
            done: false,
            probe,
            counted,
        });
        if counted {
            self.outstanding[client] += 1;
        }
        self.send_attempt(id, to);
    }

    pub(super) fn send_attempt(&mut self, cmd: u64, to: Option<usize>) {
        let to = to.unwrap_or_else(|| self.rng.index(self.p.nodes));
        let c = &mut self.cmds[cmd as usize];
        c.attempt += 1;
        let attempt = c.attempt;
        let agg = c.agg;
        tr!(
            self,
            Who::Client,
            "cmd {cmd} on {} -> n{to} (attempt {attempt})",
            self.agg_names[agg]
        );
        if !self.rng.chance(self.net.drop) {
            let d = self.net_delay();
            if self.rng.chance(self.net.dup) {
                let d2 = self.net_delay();
                self.after(d2, Ev::Request { to, cmd, attempt });
            }
            self.after(d, Ev::Request { to, cmd, attempt });
        }
        let timeout = self.p.client_timeout;
        self.after(timeout, Ev::ClientTimeout { cmd, attempt });
    }

    pub(super) fn on_response(&mut self, cmd: u64, attempt: u32, reply: Reply) {
        match reply {
            Reply::Ok(version) => {
                self.ack(cmd, version);
                let c = &mut self.cmds[cmd as usize];
                if !c.done {
                    c.done = true;
                    if c.counted {
                        self.outstanding[c.client] -= 1;
                    }
                }
            }
            Reply::Unavailable | Reply::Refused => {
                let c = &self.cmds[cmd as usize];
                if !c.done && c.attempt == attempt {
                    let d = self.rng.range(30 * MS, 300 * MS);
                    self.after(d, Ev::ClientRetry { cmd });
                }
            }
        }
    }

    /// An acknowledgement: the store must hold exactly this command at this version.
    pub(super) fn ack(&mut self, cmd: u64, version: u64) {
        let agg = self.cmds[cmd as usize].agg;
        let first = self.cmds[cmd as usize].acked.is_none();
        if first {
            tr!(
                self,
                Who::Client,
                "cmd {cmd} on {} acknowledged at v{version}",
                self.agg_names[agg]
            );
        }
        if self.applied.get(&cmd) != Some(&(agg, version)) {
            let message = format!(
                "cmd {cmd} acknowledged at {} v{version}, but the store applied it as {:?}",
                self.agg_names[agg],
                self.applied.get(&cmd)
            );
            self.fail(Invariant::ExactlyOnce, message);
        }
        let stored = self.db.events[agg]
            .get(version.wrapping_sub(1) as usize)
            .map(|e| e.cmd);
        if stored != Some(cmd) {
            let message = format!(
                "cmd {cmd} acknowledged at {} v{version}, but that version holds {stored:?}",
                self.agg_names[agg]
            );
            self.fail(Invariant::ExactlyOnce, message);
        }
        if let Some(previous) = self.cmds[cmd as usize].acked
            && previous != version
        {
            let message = format!("cmd {cmd} acknowledged at v{previous} and at v{version}");
            self.fail(Invariant::ExactlyOnce, message);
        }
        self.cmds[cmd as usize].acked = Some(version);
    }

    pub(super) fn client_retry(&mut self, cmd: u64) {
        let c = &self.cmds[cmd as usize];
        if c.done {
            return;
        }
        let give_up = if c.probe {
            self.now >= self.probe_deadline
        } else {
            c.attempt >= self.p.client_attempts
        };
        if give_up {
            tr!(
                self,
                Who::Client,
                "cmd {cmd} given up after {} attempts",
                c.attempt
            );
            let c = &mut self.cmds[cmd as usize];
            c.done = true;
            if c.counted {
                self.outstanding[c.client] -= 1;
            }
            self.stats.given_up += 1;
            return;
        }
        self.send_attempt(cmd, None);
    }
}
