//! Membership and partition leases of the regional cluster.
//!
//! The decisions are made in `cluster::core`; these are the reads and writes it asks
//! for. Leases are only ever changed by compare-and-set on (owner, epoch), and every
//! acquisition bumps the epoch, which is what the append function's fence checks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::StoreError;
use crate::cluster::core::{Lease, MemberState, MemberView};

/// A member row with what the status page shows.
#[derive(Debug, Clone)]
pub struct MemberRow {
    /// Node id.
    pub id: String,
    /// Base URL for forwarding.
    pub address: String,
    /// Announced state.
    pub state: MemberState,
    /// Heartbeat within the timeout, by the database's clock.
    pub alive: bool,
    /// Last heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// The process heartbeating as this node (`None`: a row from before processes
    /// were told apart).
    pub incarnation: Option<uuid::Uuid>,
}

impl MemberRow {
    /// The view the decision logic needs.
    pub fn view(&self) -> MemberView {
        MemberView {
            id: self.id.clone(),
            state: self.state,
            alive: self.alive,
        }
    }
}

/// One read of the cluster tables.
#[derive(Debug, Clone)]
pub struct Observation {
    /// All members.
    pub members: Vec<MemberRow>,
    /// All lease rows.
    pub leases: Vec<Lease>,
    /// Membership changes so far.
    pub membership_epoch: i64,
}

/// Writes this node's row: heartbeat now, with its state and address. A change of
/// state (or a return from the dead) counts as a membership change.
///
/// `incarnation` is this process's: a row another process has taken over (see
/// [`claim`]) is left alone, and the answer is [`StoreError::NodeIdTaken`].
pub async fn heartbeat(
    conn: &mut PgConnection,
    node: &str,
    address: &str,
    state: MemberState,
    incarnation: Uuid,
) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    let old: Option<(String, bool, Option<Uuid>)> = sqlx::query_as(
        "SELECT state, dead, incarnation FROM members WHERE node_id = $1 FOR UPDATE",
    )
    .bind(node)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((_, _, Some(other))) = &old
        && *other != incarnation
    {
        return Err(StoreError::NodeIdTaken {
            node: node.to_string(),
        });
    }
    sqlx::query(
        "INSERT INTO members (node_id, address, state, incarnation) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (node_id) DO UPDATE SET last_heartbeat = now(), state = EXCLUDED.state, \
         address = EXCLUDED.address, dead = false, incarnation = EXCLUDED.incarnation",
    )
    .bind(node)
    .bind(address)
    .bind(state.as_str())
    .bind(incarnation)
    .execute(&mut *tx)
    .await?;
    let changed = old.is_none_or(|(old_state, dead, _)| dead || old_state != state.as_str());
    if changed {
        bump_membership_epoch(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn bump_membership_epoch(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("UPDATE region_settings SET value = (value::bigint + 1)::text WHERE key = 'membership_epoch'")
        .execute(tx)
        .await?;
    Ok(())
}

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The node id is this process's now.
    Claimed,
    /// Another process heartbeats as this node id, from `address`.
    HeldBy {
        /// The address its row advertises.
        address: String,
    },
}

/// Takes the node id for the process `incarnation`: free when no row has it, when the
/// row is this process's or was written before incarnations existed, or when its last
/// heartbeat is older than `dead_after` (its process died, or was cut off long enough
/// for the region to count it dead). A live row of another process is
/// [`Claim::HeldBy`]: that one may be this node's own predecessor, killed a moment ago,
/// so the caller waits `dead_after` before it believes it.
pub async fn claim(
    pool: &PgPool,
    node: &str,
    incarnation: Uuid,
    dead_after: Duration,
) -> Result<Claim, StoreError> {
    let mut tx = pool.begin().await?;
    // The row is locked first and judged after: the lock may be held by a process
    // frozen inside its heartbeat's transaction until the server ends it (10 s), and a
    // row judged by the clock of before that wait (`now()` is the transaction's start,
    // and the row is read before the wait) looked alive; the predecessor was taken for
    // another live process and this one refused to start.
    sqlx::query("SELECT 1 FROM members WHERE node_id = $1 FOR UPDATE")
        .bind(node)
        .execute(&mut *tx)
        .await?;
    let row: Option<(Option<Uuid>, String, bool)> = sqlx::query_as(
        "SELECT incarnation, address, \
                last_heartbeat >= clock_timestamp() - make_interval(secs => $2::double precision / 1000) \
         FROM members WHERE node_id = $1",
    )
    .bind(node)
    .bind(dead_after.as_millis() as i64)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some((Some(other), address, true)) if other != incarnation => {
            return Ok(Claim::HeldBy { address });
        }
        Some(_) => {
            sqlx::query("UPDATE members SET incarnation = $2 WHERE node_id = $1")
                .bind(node)
                .bind(incarnation)
                .execute(&mut *tx)
                .await?;
        }
        None => {}
    }
    tx.commit().await?;
    Ok(Claim::Claimed)
}

/// The ids and addresses of the members whose heartbeat is within `dead_after`.
pub async fn live_addresses(
    pool: &PgPool,
    dead_after: Duration,
) -> Result<Vec<(String, String)>, StoreError> {
    super::bounded_read(pool, async |conn| {
        Ok(sqlx::query_as(
            "SELECT node_id, address FROM members \
             WHERE last_heartbeat >= now() - make_interval(secs => $1::double precision / 1000) \
             ORDER BY node_id",
        )
        .bind(dead_after.as_millis() as i64)
        .fetch_all(conn)
        .await?)
    })
    .await
}

/// Removes this node's row when it leaves cleanly (unless another process has taken
/// it over: see [`claim`]).
pub async fn leave(
    conn: &mut PgConnection,
    node: &str,
    incarnation: Uuid,
) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "DELETE FROM members WHERE node_id = $1 AND (incarnation IS NULL OR incarnation = $2)",
    )
    .bind(node)
    .bind(incarnation)
    .execute(&mut *tx)
    .await?;
    // Read only for live members; without this, hosts with a fresh name per start
    // (containers) would leave a row per plugin each.
    sqlx::query("DELETE FROM plugins_running WHERE node_id = $1")
        .bind(node)
        .execute(&mut *tx)
        .await?;
    bump_membership_epoch(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Reads members (with liveness by the database's clock) and leases. The first
/// observer to see a member's heartbeat expire marks it dead, counting one membership
/// change; members dead for an hour are forgotten.
///
/// Marking and forgetting step over rows that are locked (`SKIP LOCKED`): a host paused
/// inside its heartbeat's transaction (a VM freeze, SIGSTOP) holds its row until it
/// resumes or the server ends its session, and waiting on it would stop every other
/// host's observations — and with them every hand-over in the region — for that long.
/// Liveness itself is read without locks, so the paused host is still seen as dead and
/// its partitions still move; only the count of membership changes waits for its row.
pub async fn observe(
    conn: &mut PgConnection,
    dead_after: Duration,
) -> Result<Observation, StoreError> {
    let dead_ms = dead_after.as_millis() as i64;
    let mut tx = conn.begin().await?;
    let newly_dead = sqlx::query(
        "UPDATE members SET dead = true WHERE node_id IN ( \
             SELECT node_id FROM members WHERE NOT dead \
             AND last_heartbeat < now() - make_interval(secs => $1::double precision / 1000) \
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(dead_ms)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if newly_dead > 0 {
        bump_membership_epoch(&mut tx).await?;
    }
    sqlx::query(
        "DELETE FROM members WHERE node_id IN ( \
             SELECT node_id FROM members WHERE last_heartbeat < now() - interval '1 hour' \
             FOR UPDATE SKIP LOCKED)",
    )
    .execute(&mut *tx)
    .await?;
    let members = sqlx::query(
        "SELECT node_id, address, state, last_heartbeat, incarnation, \
                last_heartbeat >= now() - make_interval(secs => $1::double precision / 1000) AS alive \
         FROM members ORDER BY node_id",
    )
    .bind(dead_ms)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .filter_map(|row| {
        let state: String = row.try_get("state").ok()?;
        Some(MemberRow {
            id: row.try_get("node_id").ok()?,
            address: row.try_get("address").ok()?,
            state: MemberState::parse(&state)?,
            alive: row.try_get("alive").ok()?,
            last_heartbeat: row.try_get("last_heartbeat").ok()?,
            incarnation: row.try_get("incarnation").ok()?,
        })
    })
    .collect();
    let leases =
        sqlx::query("SELECT partition, owner, epoch FROM partition_leases ORDER BY partition")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|row| {
                Ok(Lease {
                    partition: row.try_get::<i32, _>("partition")? as u32,
                    owner: row.try_get("owner")?,
                    epoch: row.try_get::<i64, _>("epoch")? as u64,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let membership_epoch: String =
        sqlx::query_scalar("SELECT value FROM region_settings WHERE key = 'membership_epoch'")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(Observation {
        members,
        leases,
        membership_epoch: membership_epoch.parse().unwrap_or(0),
    })
}

/// Takes a lease if it is still held by `expected_owner` at `expected_epoch` (a free,
/// never-acquired partition is `None` at 0). Returns the new epoch on success.
///
/// A lease held by another node is taken only while that node is dead by the
/// database's clock (no heartbeat within `dead_after`): the decision to take it was
/// made on an observation that may be seconds old by the time the statement runs (a
/// slow database, a long queue of acquisitions), and the owner may have come back
/// since. Taken anyway, the partition would move away from a live owner and then
/// back: two moves, with no membership change to call for them.
pub async fn acquire(
    conn: &mut PgConnection,
    partition: u32,
    node: &str,
    expected_owner: Option<&str>,
    expected_epoch: u64,
    dead_after: Duration,
) -> Result<Option<u64>, StoreError> {
    let epoch: Option<i64> = if expected_epoch == 0 && expected_owner.is_none() {
        sqlx::query_scalar(
            "INSERT INTO partition_leases (partition, owner, epoch) VALUES ($1, $2, 1) \
             ON CONFLICT (partition) DO UPDATE SET owner = EXCLUDED.owner, epoch = partition_leases.epoch + 1, updated_at = now() \
             WHERE partition_leases.epoch = 0 AND partition_leases.owner IS NULL \
             RETURNING epoch",
        )
        .bind(partition as i32)
        .bind(node)
        .fetch_optional(&mut *conn)
        .await?
    } else {
        sqlx::query_scalar(
            "UPDATE partition_leases SET owner = $2, epoch = epoch + 1, updated_at = now() \
             WHERE partition = $1 AND epoch = $3 AND owner IS NOT DISTINCT FROM $4 \
             AND ($4::text IS NULL OR $4 = $2 OR NOT EXISTS ( \
                 SELECT 1 FROM members WHERE node_id = $4 \
                 AND last_heartbeat >= now() - make_interval(secs => $5::double precision / 1000))) \
             RETURNING epoch",
        )
        .bind(partition as i32)
        .bind(node)
        .bind(expected_epoch as i64)
        .bind(expected_owner)
        .bind(dead_after.as_millis() as i64)
        .fetch_optional(&mut *conn)
        .await?
    };
    Ok(epoch.map(|e| e as u64))
}

/// Gives a lease up (if still held at `epoch`), keeping its epoch for the next owner.
pub async fn release(
    conn: &mut PgConnection,
    partition: u32,
    node: &str,
    epoch: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE partition_leases SET owner = NULL, updated_at = now() \
         WHERE partition = $1 AND owner = $2 AND epoch = $3",
    )
    .bind(partition as i32)
    .bind(node)
    .bind(epoch as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
