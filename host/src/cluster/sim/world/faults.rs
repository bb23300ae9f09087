//! The fault menu: stale-owner pauses, pauses right after an observation, short
//! pauses, crashes, network splits, database isolation, lossy and duplicating links,
//! slow database, clock jumps and drift, drains, hot aggregates.

use super::*;

impl World {
    pub(super) fn running(&self) -> Vec<usize> {
        (0..self.p.nodes)
            .filter(|n| self.hosts[*n].status == Status::Running)
            .collect()
    }

    pub(super) fn fault(&mut self) {
        self.stats.faults += 1;
        let running = self.running();
        let roll = self.rng.below(100);
        let any = self.rng.index(self.p.nodes);
        let pick = if running.is_empty() {
            None
        } else {
            Some(running[self.rng.index(running.len())])
        };
        match (roll, pick) {
            (0..=16, Some(_)) => {
                // The stale owner: a node that serves partitions stops long enough to
                // be declared dead, with commands for those partitions waiting for it.
                let owners: Vec<usize> = running
                    .iter()
                    .copied()
                    .filter(|n| !self.hosts[*n].node.serving().is_empty())
                    .collect();
                let n = if owners.is_empty() {
                    pick.expect("matched")
                } else {
                    owners[self.rng.index(owners.len())]
                };
                let d = self.rng.range(3200 * MS, 9 * SEC);
                self.stats.stale_pauses += 1;
                self.pause(n, d, "(stale owner)");
                self.burst_to(n);
            }
            (17..=26, Some(n)) => {
                let d = self.rng.range(3200 * MS, 9 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "n{n} will stop for {} ms after its next read",
                    d / MS
                );
                self.stats.stale_pauses += 1;
                self.hosts[n].pause_on_observe = Some(d);
            }
            (27..=31, Some(n)) => {
                let d = self.rng.range(50 * MS, 2500 * MS);
                self.pause(n, d, "(short)");
            }
            (32..=42, _) => {
                if matches!(self.hosts[any].status, Status::Running | Status::Paused) {
                    self.crash(any);
                }
            }
            (43..=52, _) => {
                let mut side = BTreeSet::new();
                while side.is_empty() || side.len() == self.p.nodes {
                    side = (0..self.p.nodes).filter(|_| self.rng.chance(0.5)).collect();
                }
                let mut pairs = Vec::new();
                for a in &side {
                    for b in 0..self.p.nodes {
                        if !side.contains(&b) {
                            pairs.push((*a.min(&b), *a.max(&b)));
                        }
                    }
                }
                for pair in &pairs {
                    *self.net.cuts.entry(*pair).or_default() += 1;
                }
                let d = self.rng.range(500 * MS, 8 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "network split {side:?} | rest for {} ms",
                    d / MS
                );
                self.after(d, Ev::Heal(Heal::Cut(pairs)));
            }
            (53..=63, _) => {
                self.net.db_cuts[any] += 1;
                let d = self.rng.range(500 * MS, 8 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "n{any} cut off from the database for {} ms",
                    d / MS
                );
                self.after(d, Ev::Heal(Heal::Db(any)));
            }
            (64..=70, _) => {
                self.net.drop = self.rng.range(2, 30) as f64 / 100.0;
                self.net.dup = self.rng.range(0, 20) as f64 / 100.0;
                self.net.flaky_gen += 1;
                let d = self.rng.range(SEC, 5 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "flaky network: drop {:.2}, duplicate {:.2} for {} ms",
                    self.net.drop,
                    self.net.dup,
                    d / MS
                );
                let gen_ = self.net.flaky_gen;
                self.after(d, Ev::Heal(Heal::Flaky(gen_)));
            }
            (71..=77, _) => {
                let extra = self.rng.range(50 * MS, 1500 * MS);
                let d = self.rng.range(SEC, 6 * SEC);
                let targets: Vec<usize> = if self.rng.chance(0.3) {
                    (0..self.p.nodes).collect()
                } else {
                    vec![any]
                };
                tr!(
                    self,
                    Who::Fault,
                    "database slow (up to +{} ms) for {targets:?} for {} ms",
                    extra / MS,
                    d / MS
                );
                for n in targets {
                    self.net.slow[n] = extra;
                    self.net.slow_gen[n] += 1;
                    let gen_ = self.net.slow_gen[n];
                    self.after(d, Ev::Heal(Heal::Slow(n, gen_)));
                }
            }
            (78..=87, Some(n)) => self.clock_fault(n),
            (88..=92, Some(n)) => {
                if matches!(self.hosts[n].node.phase(), Phase::Ready | Phase::Syncing) {
                    tr!(self, Who::Fault, "SIGTERM n{n} (drain)");
                    self.stats.drains += 1;
                    self.hosts[n].ctl.push_back(Ctl::Drain);
                    self.pump(n);
                }
            }
            (93.., _) => {
                let agg = self.rng.index(self.p.aggregates);
                let count = self.rng.range(4, 11);
                tr!(
                    self,
                    Who::Fault,
                    "{count} concurrent commands on {}",
                    self.agg_names[agg]
                );
                for _ in 0..count {
                    let client = self.rng.index(self.p.clients);
                    self.new_cmd(client, agg, None, false, false);
                }
            }
            _ => {}
        }
    }

    /// The local clock misbehaves: the poll timer fires late (a backwards jump), at
    /// once (forwards), or runs fast or slow for a while. Liveness is judged by the
    /// database's clock only.
    pub(super) fn clock_fault(&mut self, n: usize) {
        match self.rng.below(3) {
            0 => {
                let d = self.rng.range(SEC, 6 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "n{n} clock jumps back: next poll in {} ms",
                    d / MS
                );
                self.retime_tick(n, d);
            }
            1 => {
                tr!(self, Who::Fault, "n{n} clock jumps forward: poll now");
                self.retime_tick(n, 0);
            }
            _ => {
                let permille = self.rng.range(250, 4000);
                let d = self.rng.range(2 * SEC, 8 * SEC);
                tr!(
                    self,
                    Who::Fault,
                    "n{n} clock rate: poll interval x{:.2} for {} ms",
                    permille as f64 / 1000.0,
                    d / MS
                );
                let h = &mut self.hosts[n];
                h.tick_permille = permille;
                h.rate_gen += 1;
                let gen_ = h.rate_gen;
                self.after(d, Ev::Heal(Heal::Rate(n, gen_)));
            }
        }
    }

    pub(super) fn retime_tick(&mut self, n: usize, delay: Time) {
        // The pending timer is replaced; a poll under way finishes first.
        let h = &mut self.hosts[n];
        h.tick_gen += 1;
        h.tick_armed = true;
        let ev = Ev::Tick {
            n,
            inc: h.inc,
            gen_: h.tick_gen,
        };
        self.after(delay, ev);
    }

    pub(super) fn heal(&mut self, heal: Heal) {
        match heal {
            Heal::Cut(pairs) => {
                for pair in pairs {
                    if let Some(count) = self.net.cuts.get_mut(&pair) {
                        *count -= 1;
                        if *count == 0 {
                            self.net.cuts.remove(&pair);
                        }
                    }
                }
                tr!(self, Who::Fault, "network split healed");
            }
            Heal::Db(n) => {
                self.net.db_cuts[n] = self.net.db_cuts[n].saturating_sub(1);
                tr!(self, Who::Fault, "n{n} reaches the database again");
            }
            Heal::Flaky(gen_) => {
                if self.net.flaky_gen == gen_ {
                    self.net.drop = 0.0;
                    self.net.dup = 0.0;
                    tr!(self, Who::Fault, "network reliable again");
                }
            }
            Heal::Slow(n, gen_) => {
                if self.net.slow_gen[n] == gen_ {
                    self.net.slow[n] = 0;
                }
            }
            Heal::Rate(n, gen_) => {
                if self.hosts[n].rate_gen == gen_ {
                    self.hosts[n].tick_permille = 1000;
                }
            }
        }
    }

    /// Client commands aimed at a (paused) node, for aggregates of the partitions it
    /// serves: after it resumes it routes them by its stale view.
    pub(super) fn burst_to(&mut self, n: usize) {
        let served: BTreeSet<Partition> = self.hosts[n].node.serving().into_keys().collect();
        let aggs: Vec<usize> = (0..self.p.aggregates)
            .filter(|a| served.contains(&self.agg_part[*a]))
            .collect();
        let count = self.rng.range(3, 9);
        for _ in 0..count {
            let agg = if aggs.is_empty() {
                self.rng.index(self.p.aggregates)
            } else {
                aggs[self.rng.index(aggs.len())]
            };
            let client = self.rng.index(self.p.clients);
            self.new_cmd(client, agg, Some(n), false, false);
        }
    }
}
