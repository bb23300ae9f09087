//! A model of the region's PostgreSQL as far as the cluster protocol uses it: the
//! members table (heartbeats by the database's clock), the lease table (compare-and-set
//! acquisition, release) and `meridian_append` (fence, command-id claim, expected-version
//! compare-and-set, unique versions). Every operation is atomic at the instant it
//! reaches the database; latency and loss are the network's business.

use std::collections::BTreeMap;

use crate::cluster::core::{Lease, MemberState, MemberView, Partition};

use super::Time;

/// One member row.
#[derive(Debug, Clone)]
pub struct MemberRow {
    /// Announced state.
    pub state: MemberState,
    /// Last heartbeat, by the database's clock.
    pub heartbeat: Time,
}

impl MemberRow {
    /// Whether its last heartbeat is within `dead_after` of `now`.
    pub fn fresh(&self, now: Time, dead_after: Time) -> bool {
        now.saturating_sub(self.heartbeat) < dead_after
    }
}

/// One lease row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRow {
    /// Holder (node slot), if any.
    pub owner: Option<usize>,
    /// Epoch of the last acquisition.
    pub epoch: u64,
}

/// An append request (one command, one event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReq {
    /// Fence: the partition.
    pub partition: Partition,
    /// Fence: the epoch the node believes it holds.
    pub epoch: u64,
    /// Aggregate index.
    pub agg: usize,
    /// Expected current version.
    pub expected: u64,
    /// Command id.
    pub cmd: u64,
}

/// What a node asks the database.
#[derive(Debug, Clone)]
pub enum DbOp {
    /// Write own member row (heartbeat now) with this state.
    Heartbeat(MemberState),
    /// Same write, on behalf of an `Announce` action.
    Announce(MemberState),
    /// Read all members (with liveness) and leases.
    Observe,
    /// Lease compare-and-set.
    Acquire {
        /// Partition.
        partition: Partition,
        /// Expected owner slot.
        expected_owner: Option<usize>,
        /// Expected epoch.
        expected_epoch: u64,
    },
    /// Release if still held at `epoch`.
    Release {
        /// Partition.
        partition: Partition,
        /// Epoch held.
        epoch: u64,
    },
    /// Read an aggregate's current version.
    Load(usize),
    /// `meridian_append` for one command.
    Append(AppendReq),
    /// Delete own member row (a drained node leaving).
    Leave,
}

/// Outcome of an append, as `meridian_append` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended at this version.
    Ok(u64),
    /// The command id was executed before, at this version.
    Duplicate(u64),
    /// The aggregate is at this version, not the expected one.
    Conflict(u64),
    /// The node does not hold the partition at that epoch.
    Fenced,
    /// The unique (type, id, version) constraint fired: the transaction aborted.
    UniqueViolation,
}

/// The database's answer.
#[derive(Debug, Clone)]
pub enum DbReply {
    /// A write without a result.
    Done,
    /// Members and leases.
    Observed {
        /// Member views.
        members: Vec<MemberView>,
        /// Lease rows.
        leases: Vec<Lease>,
    },
    /// Acquisition result.
    Acquired(Option<u64>),
    /// An aggregate's version.
    Version(u64),
    /// Append result.
    Append(AppendOutcome),
}

/// A stored event.
#[derive(Debug, Clone, Copy)]
pub struct StoredEvent {
    /// The command that wrote it.
    pub cmd: u64,
}

/// The store.
#[derive(Debug)]
pub struct Db {
    /// Whether `meridian_append` checks the fence (off only to test the checker).
    pub fence: bool,
    /// Members by slot.
    pub members: BTreeMap<usize, MemberRow>,
    /// Leases by partition.
    pub leases: BTreeMap<Partition, LeaseRow>,
    /// `streams.version` per aggregate.
    pub streams: Vec<u64>,
    /// Events per aggregate (index = version - 1).
    pub events: Vec<Vec<StoredEvent>>,
    /// `commands`: command id to (aggregate, version).
    pub commands: BTreeMap<u64, (usize, u64)>,
    /// Heartbeat timeout.
    pub dead_after: Time,
    /// A member the store reads as dead until the given time, whatever its heartbeats
    /// (`SimOptions::blind_observation`, only to test the checker).
    pub blind: Option<(usize, Time)>,
}

impl Db {
    /// An empty store for `aggregates` aggregates.
    pub fn new(aggregates: usize, dead_after: Time, fence: bool) -> Self {
        Self {
            fence,
            members: BTreeMap::new(),
            leases: BTreeMap::new(),
            streams: vec![0; aggregates],
            events: vec![Vec::new(); aggregates],
            commands: BTreeMap::new(),
            dead_after,
            blind: None,
        }
    }

    /// Whether `slot` heartbeated within the timeout, by the database's clock.
    pub fn alive(&self, slot: usize, now: Time) -> bool {
        if self
            .blind
            .is_some_and(|(s, until)| s == slot && now < until)
        {
            return false;
        }
        self.members
            .get(&slot)
            .is_some_and(|m| m.fresh(now, self.dead_after))
    }

    /// Executes one operation from node `slot` at database time `now`.
    pub fn apply(&mut self, slot: usize, op: &DbOp, now: Time, names: &[String]) -> DbReply {
        match *op {
            DbOp::Heartbeat(state) | DbOp::Announce(state) => {
                self.members.insert(
                    slot,
                    MemberRow {
                        state,
                        heartbeat: now,
                    },
                );
                DbReply::Done
            }
            DbOp::Observe => DbReply::Observed {
                members: self
                    .members
                    .iter()
                    .map(|(s, m)| MemberView {
                        id: names[*s].clone(),
                        state: m.state,
                        alive: self.alive(*s, now),
                    })
                    .collect(),
                leases: self
                    .leases
                    .iter()
                    .map(|(p, l)| Lease {
                        partition: *p,
                        owner: l.owner.map(|o| names[o].clone()),
                        epoch: l.epoch,
                    })
                    .collect(),
            },
            DbOp::Acquire {
                partition,
                expected_owner,
                expected_epoch,
            } => {
                let row = self.leases.get(&partition).copied();
                // Another node's lease only while it is dead (`store::cluster::acquire`).
                let owner_alive = expected_owner.is_some_and(|o| o != slot && self.alive(o, now));
                let taken = match row {
                    None if expected_owner.is_none() && expected_epoch == 0 => Some(1),
                    Some(r)
                        if r.owner == expected_owner
                            && r.epoch == expected_epoch
                            && !owner_alive =>
                    {
                        Some(r.epoch + 1)
                    }
                    _ => None,
                };
                if let Some(epoch) = taken {
                    self.leases.insert(
                        partition,
                        LeaseRow {
                            owner: Some(slot),
                            epoch,
                        },
                    );
                }
                DbReply::Acquired(taken)
            }
            DbOp::Release { partition, epoch } => {
                if let Some(row) = self.leases.get_mut(&partition)
                    && row.owner == Some(slot)
                    && row.epoch == epoch
                {
                    row.owner = None;
                }
                DbReply::Done
            }
            DbOp::Load(agg) => DbReply::Version(self.streams[agg]),
            DbOp::Leave => {
                self.members.remove(&slot);
                DbReply::Done
            }
            DbOp::Append(req) => DbReply::Append(self.append(slot, req)),
        }
    }

    /// `meridian_append` for one request, in the function's order: fence (FOR SHARE on
    /// the lease row), command-id claim, expected-version compare-and-set, insert.
    fn append(&mut self, slot: usize, req: AppendReq) -> AppendOutcome {
        if self.fence {
            let held = self
                .leases
                .get(&req.partition)
                .is_some_and(|l| l.owner == Some(slot) && l.epoch == req.epoch);
            if !held {
                return AppendOutcome::Fenced;
            }
        }
        if let Some((_, version)) = self.commands.get(&req.cmd) {
            return AppendOutcome::Duplicate(*version);
        }
        let current = self.streams[req.agg];
        if current != req.expected {
            // The claim is given back: nothing is stored for a conflict.
            return AppendOutcome::Conflict(current);
        }
        let version = req.expected + 1;
        let events = &mut self.events[req.agg];
        if events.len() as u64 >= version {
            // UNIQUE (aggregate_type, aggregate_id, version): the whole statement aborts.
            return AppendOutcome::UniqueViolation;
        }
        self.streams[req.agg] = version;
        self.commands.insert(req.cmd, (req.agg, version));
        events.push(StoredEvent { cmd: req.cmd });
        AppendOutcome::Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["n0".into(), "n1".into()]
    }

    fn append(db: &mut Db, slot: usize, epoch: u64, expected: u64, cmd: u64) -> AppendOutcome {
        match db.apply(
            slot,
            &DbOp::Append(AppendReq {
                partition: 0,
                epoch,
                agg: 0,
                expected,
                cmd,
            }),
            0,
            &names(),
        ) {
            DbReply::Append(o) => o,
            other => panic!("{other:?}"),
        }
    }

    /// As `store::cluster::acquire`: another node's lease only while it is dead; one's
    /// own at any time.
    #[test]
    fn another_nodes_lease_is_taken_only_while_it_is_dead() {
        let mut db = Db::new(1, 3_000_000, true);
        let op = |owner, epoch| DbOp::Acquire {
            partition: 0,
            expected_owner: owner,
            expected_epoch: epoch,
        };
        db.apply(0, &DbOp::Heartbeat(MemberState::Ready), 0, &names());
        assert!(matches!(
            db.apply(0, &op(None, 0), 0, &names()),
            DbReply::Acquired(Some(1))
        ));
        assert!(matches!(
            db.apply(1, &op(Some(0), 1), 2_999_999, &names()),
            DbReply::Acquired(None)
        ));
        assert!(matches!(
            db.apply(0, &op(Some(0), 1), 2_999_999, &names()),
            DbReply::Acquired(Some(2))
        ));
        assert!(matches!(
            db.apply(1, &op(Some(0), 2), 3_000_000, &names()),
            DbReply::Acquired(Some(3))
        ));
    }

    #[test]
    fn the_model_follows_the_append_function() {
        let mut db = Db::new(1, 3_000_000, true);
        let acquire = |db: &mut Db, slot, owner, epoch| {
            db.apply(
                slot,
                &DbOp::Acquire {
                    partition: 0,
                    expected_owner: owner,
                    expected_epoch: epoch,
                },
                0,
                &names(),
            )
        };
        assert!(matches!(
            acquire(&mut db, 0, None, 0),
            DbReply::Acquired(Some(1))
        ));
        assert!(matches!(
            acquire(&mut db, 1, None, 0),
            DbReply::Acquired(None)
        ));
        assert_eq!(append(&mut db, 0, 1, 0, 10), AppendOutcome::Ok(1));
        assert_eq!(append(&mut db, 0, 1, 0, 10), AppendOutcome::Duplicate(1));
        assert_eq!(append(&mut db, 0, 1, 0, 11), AppendOutcome::Conflict(1));
        assert_eq!(append(&mut db, 1, 1, 1, 11), AppendOutcome::Fenced);
        assert!(matches!(
            acquire(&mut db, 1, Some(0), 1),
            DbReply::Acquired(Some(2))
        ));
        assert_eq!(append(&mut db, 0, 1, 1, 11), AppendOutcome::Fenced);
        assert_eq!(append(&mut db, 1, 2, 1, 11), AppendOutcome::Ok(2));
        db.apply(
            1,
            &DbOp::Release {
                partition: 0,
                epoch: 1,
            },
            0,
            &names(),
        );
        assert_eq!(
            db.leases[&0].owner,
            Some(1),
            "a release at an old epoch is ignored"
        );
        db.apply(
            1,
            &DbOp::Release {
                partition: 0,
                epoch: 2,
            },
            0,
            &names(),
        );
        assert_eq!(
            db.leases[&0],
            LeaseRow {
                owner: None,
                epoch: 2
            }
        );
        db.fence = false;
        assert_eq!(append(&mut db, 0, 1, 2, 12), AppendOutcome::Ok(3));
    }
}
