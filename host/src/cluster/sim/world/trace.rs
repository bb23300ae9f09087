//! The trace: who did what when, one line each, hashed for replay checks.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::io::Write as _;

use crate::cluster::core::{Action, Lease, MemberState, MemberView};

use super::super::db::LeaseRow;
use super::super::{SEC, Time};

/// Who a trace line is about.
#[derive(Debug, Clone, Copy)]
pub(super) enum Who {
    Node(usize),
    Db,
    Net,
    Client,
    Fault,
    Sim,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Node(n) => write!(f, "n{n}"),
            Who::Db => f.write_str("db"),
            Who::Net => f.write_str("net"),
            Who::Client => f.write_str("client"),
            Who::Fault => f.write_str("FAULT"),
            Who::Sim => f.write_str("sim"),
        }
    }
}

/// The trace: a hash of every line (for replay checks), the last lines in a ring, and
/// optionally every line on stdout.
pub(super) struct Trace {
    pub(super) ring: VecDeque<String>,
    pub(super) cap: usize,
    pub(super) hash: u64,
    pub(super) lines: u64,
    pub(super) echo: bool,
}

impl Trace {
    pub(super) fn line(&mut self, now: Time, who: Who, args: fmt::Arguments<'_>) {
        let mut s = if self.ring.len() >= self.cap {
            self.ring.pop_front().unwrap_or_default()
        } else {
            String::with_capacity(120)
        };
        s.clear();
        let _ = write!(s, "{:>3}.{:06}s {:<6} ", now / SEC, now % SEC, who);
        let _ = s.write_fmt(args);
        for byte in s.as_bytes() {
            self.hash ^= u64::from(*byte);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash ^= 0xff;
        self.lines += 1;
        if self.echo {
            // Ignore a closed pipe (`| head`): the run goes on, deterministic either way.
            let _ = writeln!(std::io::stdout(), "{s}");
        }
        if self.cap > 0 {
            self.ring.push_back(s);
        }
    }
}

pub(super) fn owner_text(owner: Option<usize>) -> String {
    owner.map_or_else(|| "-".into(), |o| format!("n{o}"))
}

pub(super) fn row_text(row: Option<LeaseRow>) -> String {
    match row {
        None => "none".into(),
        Some(r) => format!("{}@{}", owner_text(r.owner), r.epoch),
    }
}

pub(super) fn view_text(members: &[MemberView]) -> String {
    let mut s = String::from("[");
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let state = match m.state {
            MemberState::Syncing => 'S',
            MemberState::Ready => 'R',
            MemberState::Draining => 'D',
        };
        let _ = write!(s, "{}:{state}{}", m.id, if m.alive { "" } else { "(dead)" });
    }
    s.push(']');
    s
}

pub(super) fn lease_text(leases: &[Lease]) -> String {
    let mut s = String::new();
    for (i, l) in leases.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(
            s,
            "p{}={}@{}",
            l.partition,
            l.owner.as_deref().unwrap_or("-"),
            l.epoch
        );
    }
    s
}

pub(super) fn actions_text(actions: &[Action]) -> String {
    let mut s = String::new();
    for (i, a) in actions.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = match a {
            Action::Announce { state } => write!(s, "Announce({})", state.as_str()),
            Action::Acquire {
                partition,
                expected_owner,
                expected_epoch,
            } => write!(
                s,
                "Acquire(p{partition} from {}@{expected_epoch})",
                expected_owner.as_deref().unwrap_or("-")
            ),
            Action::Serve { partition, epoch } => write!(s, "Serve(p{partition}@{epoch})"),
            Action::StopServing { partition, epoch } => {
                write!(s, "StopServing(p{partition}@{epoch})")
            }
            Action::Release { partition, epoch } => write!(s, "Release(p{partition}@{epoch})"),
            Action::Evict { partition } => write!(s, "Evict(p{partition})"),
            Action::Exit => write!(s, "Exit"),
        };
    }
    s
}
