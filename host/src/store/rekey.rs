//! The commit order after a restore onto another PostgreSQL server.
//!
//! The region's order is `(tx_id, position)`, `tx_id` being the id of the transaction
//! that wrote the event (see [`read`](super::read)), and readers only read below the
//! oldest transaction still running. Restored from a dump, or copied by logical
//! replication, onto another server, the rows keep the old server's ids while the new
//! server counts from its own, usually far lower: every old event then lies "in the
//! future" — feeds show none of them, and every event written from then on sorts
//! before them, behind the positions readers resume from. Nothing fails; feeds are
//! simply empty. (`pg_upgrade` keeps the counter, so an upgrade in place is fine.)
//!
//! So a host refuses to start on such a database ([`check`]). Two ways out, both keeping
//! the order:
//! - on the stopped new server, `pg_resetwal -e <epoch>` with an epoch past the old
//!   ids' (the error names it). A transaction id is `epoch << 32 | xid`; the epoch is
//!   stored nowhere else, so PostgreSQL documents any value as safe. Every new id is
//!   then past every old one, and nothing is rewritten. This fits any size.
//! - `meridian migrate --rekey-transaction-ids` ([`rekey`]) renumbers the stored ids to
//!   3, 4, 5, … in their order, below the server's counter — possible while fewer
//!   transactions wrote the events than the new server has used ids, so for small
//!   regions (or after the server has run a while).

use sqlx::PgPool;

use super::StoreError;

/// What [`check`] and [`rekey`] can refuse.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// Stored transaction ids are ahead of the server's: restored from another server.
    #[error(
        "the events were written on another PostgreSQL server: their transaction ids reach \
         {newest}, and this server's next is {next}, so every feed would leave them out and \
         order new events before them. Stop every host of the region, then either stop \
         PostgreSQL and run `pg_resetwal -e {epoch} <data directory>` (it only moves the \
         transaction id epoch past the old ids'; any size), or run \
         `meridian migrate --rekey-transaction-ids` (renumbers the stored ids; fits while \
         fewer transactions wrote them than this server has used), and start them again",
        epoch = (newest >> 32) + 1
    )]
    Foreign {
        /// The newest stored transaction id.
        newest: i64,
        /// The server's next transaction id.
        next: i64,
    },
    /// More distinct transaction ids are stored than this server has used.
    #[error(
        "cannot renumber: {count} transactions wrote the stored events, and this server has \
         used only {next} transaction ids, so the renumbered ids would still be ahead of it. \
         Stop PostgreSQL and run `pg_resetwal -e {epoch} <data directory>` instead: it moves \
         the transaction id epoch past the old ids', rewriting nothing",
        epoch = (newest >> 32) + 1
    )]
    TooMany {
        /// Distinct stored transaction ids.
        count: i64,
        /// The server's next transaction id.
        next: i64,
        /// The newest stored transaction id.
        newest: i64,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for RekeyError {
    fn from(error: sqlx::Error) -> Self {
        RekeyError::Store(error.into())
    }
}

/// The newest stored transaction id and the server's next one.
async fn ids<'e>(executor: impl sqlx::PgExecutor<'e>) -> Result<(Option<i64>, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT max(tx_id)::text::bigint FROM events), \
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
    )
    .fetch_one(executor)
    .await
}

/// Fails with [`RekeyError::Foreign`] when the stored events carry transaction ids from
/// another server (see the module docs).
pub async fn check(pool: &PgPool) -> Result<(), RekeyError> {
    match ids(pool).await? {
        (Some(newest), next) if newest >= next => Err(RekeyError::Foreign { newest, next }),
        _ => Ok(()),
    }
}

/// Renumbers the stored transaction ids (of events, and of the consumer group positions
/// that point at them) to 3, 4, 5, … in their order, when they are ahead of the
/// server's. Returns how many were renumbered (0: nothing to do). Run it with every host
/// of the region stopped; it locks both tables while it runs.
pub async fn rekey(pool: &PgPool) -> Result<u64, RekeyError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE events, consumer_group_positions IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let (newest, next) = ids(&mut *tx).await?;
    let Some(newest) = newest.filter(|newest| *newest >= next) else {
        return Ok(0);
    };
    let count: i64 = sqlx::query_scalar("SELECT count(DISTINCT tx_id) FROM events")
        .fetch_one(&mut *tx)
        .await?;
    // 0, 1 and 2 are the server's own (invalid, bootstrap, frozen): the new ids are
    // 3..=count + 2, all below `next` (this transaction's own id, taken by the updates
    // below, is at least `next`).
    if count + 2 >= next {
        return Err(RekeyError::TooMany {
            count,
            next,
            newest,
        });
    }
    sqlx::query(
        "CREATE TEMPORARY TABLE meridian_rekey ON COMMIT DROP AS \
         SELECT tx_id AS old, (dense_rank() OVER (ORDER BY tx_id) + 2)::text::xid8 AS new \
         FROM (SELECT DISTINCT tx_id FROM events) ids",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE events e SET tx_id = r.new FROM meridian_rekey r WHERE e.tx_id = r.old")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE consumer_group_positions g SET tx_id = r.new \
         FROM meridian_rekey r WHERE g.tx_id = r.old",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(count as u64)
}
