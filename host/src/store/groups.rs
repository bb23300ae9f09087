//! Consumer groups: where each member of an application's group has got to.
//!
//! A group splits the region's events between `members` members by aggregate (see
//! [`member_of`]); each member walks the whole gap-free tail and keeps the events of
//! its own aggregates, so it sees each of them in version order. What a member has
//! processed is its *acknowledged position*: a resume token in the tail order
//! `(tx_id, position)`, stored with its `tx_id` so that "forward" is judged in that order.
//! Positions are kept per layout `(group, members, member)`; a member of a layout with
//! no stored position starts from the oldest position stored for any other layout of
//! the group (a resize loses nothing, and redelivers what the old layout had not
//! acknowledged), or from the beginning: when nothing is stored for the group, or when
//! a member of another layout never acknowledged (it may have processed nothing).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::{StoreError, bounded_read};

/// The member of a group of `members` that an aggregate's events go to: the same stable
/// hash of type and id the cluster uses for partitions (FNV-1a, then splitmix64's
/// finaliser: see [`crate::cluster::core::partition_of`]), modulo `members`. Consumers
/// may compute it themselves: the README spells it out, and a test keeps its example.
pub fn member_of(aggregate_type: &str, aggregate_id: &str, members: u32) -> u32 {
    crate::cluster::core::partition_of(aggregate_type, aggregate_id, members)
}

/// One member's slot in a group: `member` of `members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The group's name, chosen by the application.
    pub group: String,
    /// How many members the group has (its layout).
    pub members: u32,
    /// This member, `0..members`.
    pub member: u32,
}

/// Where a member starts reading, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The member's own acknowledged position.
    Acknowledged,
    /// The oldest position of another layout of the group (the group was resized), or
    /// the beginning when a member of that layout never acknowledged.
    OtherLayout,
    /// The beginning of the region's events (nothing stored for the group).
    Beginning,
}

/// The position a member resumes after (0: the beginning) and where it came from.
pub async fn start(pool: &PgPool, slot: &GroupMember) -> Result<(i64, StartFrom), StoreError> {
    bounded_read(pool, async |conn| start_on(conn, slot).await).await
}

async fn start_on(
    conn: &mut PgConnection,
    slot: &GroupMember,
) -> Result<(i64, StartFrom), StoreError> {
    if let Some(position) = acknowledged(&mut *conn, slot).await? {
        return Ok((position, StartFrom::Acknowledged));
    }
    // Not the same layout: a member of this layout that has not acknowledged yet may be
    // far behind one that has, and starting from the other's position would skip events.
    // Nor a layout with a member that never acknowledged: that member's aggregates may
    // have had none of their events processed, so it counts as the beginning.
    let (oldest, incomplete): (Option<i64>, bool) = sqlx::query_as(
        "SELECT (SELECT position FROM consumer_group_positions \
                  WHERE group_name = $1 AND members <> $2 ORDER BY tx_id, position LIMIT 1), \
                EXISTS (SELECT 1 FROM consumer_group_positions \
                         WHERE group_name = $1 AND members <> $2 \
                         GROUP BY members HAVING count(*) < members)",
    )
    .bind(&slot.group)
    .bind(slot.members as i32)
    .fetch_one(conn)
    .await?;
    Ok(match oldest {
        Some(_) if incomplete => (0, StartFrom::OtherLayout),
        Some(position) => (position, StartFrom::OtherLayout),
        None => (0, StartFrom::Beginning),
    })
}

/// The member's own acknowledged position, if it has one.
async fn acknowledged(
    conn: &mut PgConnection,
    slot: &GroupMember,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT position FROM consumer_group_positions \
         WHERE group_name = $1 AND members = $2 AND member = $3",
    )
    .bind(&slot.group)
    .bind(slot.members as i32)
    .bind(slot.member as i32)
    .fetch_optional(conn)
    .await?)
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The stored position moved forward to the acknowledged one.
    Advanced,
    /// The stored position is already at or past it (a late or repeated ack); it stays
    /// at `stored`.
    Ignored {
        /// The position still stored.
        stored: i64,
    },
    /// No event at that position has been delivered by the tail: it does not exist, or
    /// an older transaction may still commit before it.
    NotDelivered,
}

/// Stores `position` as the member's acknowledged position if it is ahead of the stored
/// one in tail order. Never moves a position backwards.
pub async fn ack(
    pool: &PgPool,
    slot: &GroupMember,
    position: i64,
) -> Result<AckOutcome, StoreError> {
    bounded_read(pool, async |conn| ack_on(conn, slot, position).await).await
}

async fn ack_on(
    conn: &mut PgConnection,
    slot: &GroupMember,
    position: i64,
) -> Result<AckOutcome, StoreError> {
    // 0 is the `next` of a page from the beginning that found nothing: acknowledging
    // it is acknowledging nothing, which leaves any stored position as it is.
    if position == 0 {
        let stored = acknowledged(conn, slot).await?.unwrap_or(0);
        return Ok(AckOutcome::Ignored { stored });
    }
    // Only a position the tail could have delivered (below the horizon of running
    // transactions) is accepted: resuming after a later one could skip an event that
    // commits afterwards with a smaller transaction id.
    let horizon = super::read::horizon(conn).await?;
    let advanced: Option<i64> = sqlx::query_scalar(
        "WITH target AS ( \
             SELECT position, tx_id FROM events \
              WHERE position = $4 AND tx_id < $5::text::xid8) \
         INSERT INTO consumer_group_positions (group_name, members, member, position, tx_id) \
         SELECT $1, $2, $3, position, tx_id FROM target \
         ON CONFLICT (group_name, members, member) DO UPDATE \
            SET position = EXCLUDED.position, tx_id = EXCLUDED.tx_id, acked_at = now() \
          WHERE (consumer_group_positions.tx_id, consumer_group_positions.position) \
              < (EXCLUDED.tx_id, EXCLUDED.position) \
         RETURNING position",
    )
    .bind(&slot.group)
    .bind(slot.members as i32)
    .bind(slot.member as i32)
    .bind(position)
    .bind(horizon.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    if advanced.is_some() {
        return Ok(AckOutcome::Advanced);
    }
    // Nothing written: either the position was not deliverable, or the stored one is
    // not behind it. The stored row exists in the second case only.
    let delivered: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE position = $1 AND tx_id < $2::text::xid8)",
    )
    .bind(position)
    .bind(horizon.to_string())
    .fetch_one(&mut *conn)
    .await?;
    if !delivered {
        return Ok(AckOutcome::NotDelivered);
    }
    let (stored, _) = start_on(conn, slot).await?;
    Ok(AckOutcome::Ignored { stored })
}

/// One stored position of a group.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GroupPosition {
    /// The layout: how many members.
    pub members: u32,
    /// The member, `0..members`.
    pub member: u32,
    /// Its acknowledged position (resume after this event).
    pub position: i64,
    /// When it was last moved.
    pub acked_at: DateTime<Utc>,
}

/// Every stored position of a group, by layout and member.
pub async fn positions(pool: &PgPool, group: &str) -> Result<Vec<GroupPosition>, StoreError> {
    bounded_read(pool, async |conn| {
        Ok(sqlx::query(
            "SELECT members, member, position, acked_at FROM consumer_group_positions \
             WHERE group_name = $1 ORDER BY members, member",
        )
        .bind(group)
        .fetch_all(conn)
        .await?)
    })
    .await?
    .iter()
    .map(|row| {
        Ok(GroupPosition {
            members: row.try_get::<i32, _>("members")? as u32,
            member: row.try_get::<i32, _>("member")? as u32,
            position: row.try_get("position")?,
            acked_at: row.try_get("acked_at")?,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_of_spreads_and_stays_in_range() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let m = member_of("t", &format!("a-{i}"), 4);
            counts[m as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(member_of("t", "x", 1), 0);
        // Stable: the same aggregate always lands on the same member.
        assert_eq!(member_of("t", "a-7", 4), member_of("t", "a-7", 4));
    }

    /// The README's worked example, for consumers computing members themselves.
    #[test]
    fn member_of_is_the_hash_the_readme_spells_out() {
        let hash: u64 = 0x6d23_da6a_c54e_4ddd;
        assert_eq!(member_of("bank-account", "acc-1", 4), (hash % 4) as u32);
        assert_eq!(member_of("bank-account", "acc-1", 4), 1);
        assert_eq!(
            member_of("bank-account", "acc-1", 1_000_003),
            (hash % 1_000_003) as u32
        );
    }
}
