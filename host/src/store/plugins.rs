//! The plugin registry: component bytes and sandbox limits per aggregate type.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

use super::{StoreError, bounded_read};
use crate::runtime::SandboxLimits;

/// A stored plugin version, without its bytes.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginInfo {
    /// The aggregate type it implements.
    pub aggregate_type: String,
    /// Version number, counting up from 1 per aggregate type.
    pub version: i32,
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Component size.
    pub size_bytes: i64,
    /// Schema version the plugin reports.
    pub schema_version: i32,
    /// When it was uploaded.
    pub uploaded_at: DateTime<Utc>,
}

fn info(row: &sqlx::postgres::PgRow) -> Result<PluginInfo, StoreError> {
    Ok(PluginInfo {
        aggregate_type: row.try_get("aggregate_type")?,
        version: row.try_get("version")?,
        sha256: row.try_get("sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        schema_version: row.try_get("schema_version")?,
        uploaded_at: row.try_get("uploaded_at")?,
    })
}

const INFO_COLUMNS: &str =
    "aggregate_type, version, sha256, size_bytes, schema_version, uploaded_at";

/// Stores an upload. The same bytes as the newest version return that version
/// (`created == false`); anything else becomes the next version.
///
/// `judged_by` is the version the upload was checked against (`Some(None)`: there was
/// none). If another has become the newest since, the check says nothing about it —
/// the upload may not replay the events that version wrote — so nothing is stored
/// and the answer is [`StoreError::PluginChanged`]. `None` stores whatever is newest
/// (a forced upload).
///
/// `checked_under` are the limits the upload was validated under: if the type's have
/// changed since, nothing is stored ([`StoreError::LimitsChanged`]), as the version
/// may not start under the new ones.
pub async fn store(
    pool: &PgPool,
    aggregate_type: &str,
    sha256: &str,
    schema_version: i32,
    bytes: &[u8],
    judged_by: Option<Option<i32>>,
    checked_under: &SandboxLimits,
) -> Result<(PluginInfo, bool), StoreError> {
    let mut tx = pool.begin().await?;
    lock_type(&mut tx, aggregate_type).await?;
    let latest = sqlx::query(&format!(
        "SELECT {INFO_COLUMNS} FROM plugins WHERE aggregate_type = $1 ORDER BY version DESC LIMIT 1"
    ))
    .bind(aggregate_type)
    .fetch_optional(&mut *tx)
    .await?
    .map(|row| info(&row))
    .transpose()?;
    if let Some(latest) = &latest
        && latest.sha256 == sha256
    {
        return Ok((latest.clone(), false));
    }
    let newest = latest.as_ref().map(|l| l.version);
    if let Some(judged) = judged_by
        && judged != newest
    {
        return Err(StoreError::PluginChanged {
            aggregate_type: aggregate_type.to_string(),
            checked: judged.map_or("no version".to_string(), |v| format!("version {v}")),
            stored: newest.unwrap_or_default(),
        });
    }
    if limits_of(&mut tx, aggregate_type).await? != *checked_under {
        return Err(StoreError::LimitsChanged {
            aggregate_type: aggregate_type.to_string(),
        });
    }
    let next = latest.map_or(1, |l| l.version + 1);
    let row = sqlx::query(&format!(
        "INSERT INTO plugins (aggregate_type, version, sha256, size_bytes, schema_version, component) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {INFO_COLUMNS}"
    ))
    .bind(aggregate_type)
    .bind(next)
    .bind(sha256)
    .bind(bytes.len() as i64)
    .bind(schema_version)
    .bind(bytes)
    .fetch_one(&mut *tx)
    .await?;
    let stored = info(&row)?;
    tx.commit().await?;
    Ok((stored, true))
}

/// The newest version of every aggregate type.
pub async fn list_latest(pool: &PgPool) -> Result<Vec<PluginInfo>, StoreError> {
    bounded_read(pool, async |conn| {
        Ok(sqlx::query(&format!(
            "SELECT DISTINCT ON (aggregate_type) {INFO_COLUMNS} FROM plugins \
             ORDER BY aggregate_type, version DESC"
        ))
        .fetch_all(conn)
        .await?)
    })
    .await?
    .iter()
    .map(info)
    .collect()
}

/// The sha256 of every stored version, of every type.
pub async fn stored_sha256s(
    pool: &PgPool,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let shas: Vec<String> = bounded_read(pool, async |conn| {
        Ok(sqlx::query_scalar("SELECT DISTINCT sha256 FROM plugins")
            .fetch_all(conn)
            .await?)
    })
    .await?;
    Ok(shas.into_iter().collect())
}

/// Every version of one aggregate type, newest first.
pub async fn versions(pool: &PgPool, aggregate_type: &str) -> Result<Vec<PluginInfo>, StoreError> {
    bounded_read(pool, async |conn| {
        Ok(sqlx::query(&format!(
            "SELECT {INFO_COLUMNS} FROM plugins WHERE aggregate_type = $1 ORDER BY version DESC"
        ))
        .bind(aggregate_type)
        .fetch_all(conn)
        .await?)
    })
    .await?
    .iter()
    .map(info)
    .collect()
}

/// The newest version of a type with its component bytes.
pub async fn latest_with_bytes(
    pool: &PgPool,
    aggregate_type: &str,
) -> Result<Option<(PluginInfo, Vec<u8>)>, StoreError> {
    let row = bounded_read(pool, async |conn| {
        Ok(sqlx::query(&format!(
            "SELECT {INFO_COLUMNS}, component FROM plugins WHERE aggregate_type = $1 \
             ORDER BY version DESC LIMIT 1"
        ))
        .bind(aggregate_type)
        .fetch_optional(conn)
        .await?)
    })
    .await?;
    row.map(|row| Ok((info(&row)?, row.try_get("component")?)))
        .transpose()
}

/// Serialises the changes of one type's versions and limits region-wide, until the
/// transaction ends: two uploads cannot take the same next version number, and an
/// upload and a change of limits cannot each pass its check against what the other
/// is replacing.
async fn lock_type(tx: &mut sqlx::PgConnection, aggregate_type: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('meridian-plugin:' || $1, 0))")
        .bind(aggregate_type)
        .execute(tx)
        .await?;
    Ok(())
}

/// The sandbox limits of a type: the operator's, or the defaults.
pub async fn limits(pool: &PgPool, aggregate_type: &str) -> Result<SandboxLimits, StoreError> {
    bounded_read(pool, async |conn| limits_of(conn, aggregate_type).await).await
}

async fn limits_of(
    conn: &mut sqlx::PgConnection,
    aggregate_type: &str,
) -> Result<SandboxLimits, StoreError> {
    let stored: Option<sqlx::types::Json<SandboxLimits>> =
        sqlx::query_scalar("SELECT limits FROM plugin_limits WHERE aggregate_type = $1")
            .bind(aggregate_type)
            .fetch_optional(conn)
            .await?;
    Ok(stored.map(|j| j.0).unwrap_or_default())
}

/// Fails with [`StoreError::LimitsChanged`] when the type's limits are no longer
/// `checked_under`: what an upload registered elsewhere (the directory of several
/// regions) checks before it claims a version number.
pub async fn ensure_limits(
    pool: &PgPool,
    aggregate_type: &str,
    checked_under: &SandboxLimits,
) -> Result<(), StoreError> {
    if limits(pool, aggregate_type).await? != *checked_under {
        return Err(StoreError::LimitsChanged {
            aggregate_type: aggregate_type.to_string(),
        });
    }
    Ok(())
}

/// The sandbox limits of every type that has limits set (others run with the defaults).
pub async fn all_limits(
    pool: &PgPool,
) -> Result<std::collections::HashMap<String, SandboxLimits>, StoreError> {
    let rows: Vec<(String, sqlx::types::Json<SandboxLimits>)> = bounded_read(pool, async |conn| {
        Ok(
            sqlx::query_as("SELECT aggregate_type, limits FROM plugin_limits")
                .fetch_all(conn)
                .await?,
        )
    })
    .await?;
    Ok(rows.into_iter().map(|(t, l)| (t, l.0)).collect())
}

/// Sets the sandbox limits of a type. `checked_with` is the version the limits were
/// checked to start (`None`: there was none): if another has been stored since, the
/// check says nothing about it and nothing is changed
/// ([`StoreError::LimitsOutdated`]).
pub async fn set_limits(
    pool: &PgPool,
    aggregate_type: &str,
    limits: &SandboxLimits,
    checked_with: Option<i32>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    lock_type(&mut tx, aggregate_type).await?;
    let newest: Option<i32> =
        sqlx::query_scalar("SELECT max(version) FROM plugins WHERE aggregate_type = $1")
            .bind(aggregate_type)
            .fetch_one(&mut *tx)
            .await?;
    if newest != checked_with {
        return Err(StoreError::LimitsOutdated {
            aggregate_type: aggregate_type.to_string(),
            checked: checked_with.map_or("no version".to_string(), |v| format!("version {v}")),
            stored: newest.unwrap_or_default(),
        });
    }
    sqlx::query(
        "INSERT INTO plugin_limits (aggregate_type, limits) VALUES ($1, $2) \
         ON CONFLICT (aggregate_type) DO UPDATE SET limits = EXCLUDED.limits, updated_at = now()",
    )
    .bind(aggregate_type)
    .bind(sqlx::types::Json(limits))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Stores a plugin version whose number was allocated elsewhere (the directory of a
/// multi-region deployment). Storing the same version again changes nothing.
pub async fn store_version(
    pool: &PgPool,
    aggregate_type: &str,
    version: i32,
    sha256: &str,
    schema_version: i32,
    bytes: &[u8],
) -> Result<PluginInfo, StoreError> {
    sqlx::query(
        "INSERT INTO plugins (aggregate_type, version, sha256, size_bytes, schema_version, component) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (aggregate_type, version) DO NOTHING",
    )
    .bind(aggregate_type)
    .bind(version)
    .bind(sha256)
    .bind(bytes.len() as i64)
    .bind(schema_version)
    .bind(bytes)
    .execute(pool)
    .await?;
    let row = sqlx::query(&format!(
        "SELECT {INFO_COLUMNS} FROM plugins WHERE aggregate_type = $1 AND version = $2"
    ))
    .bind(aggregate_type)
    .bind(version)
    .fetch_one(pool)
    .await?;
    info(&row)
}

/// Every `(aggregate_type, version)` stored in this region.
pub async fn stored_versions(pool: &PgPool) -> Result<Vec<(String, i32)>, StoreError> {
    bounded_read(pool, async |conn| {
        Ok(
            sqlx::query_as("SELECT aggregate_type, version FROM plugins")
                .fetch_all(conn)
                .await?,
        )
    })
    .await
}

/// Records that `node` now runs `version` of `aggregate_type` (see [`hosts_running`]).
pub async fn record_running(
    pool: &PgPool,
    node: &str,
    aggregate_type: &str,
    version: i32,
) -> Result<(), StoreError> {
    bounded_read(pool, async |conn| {
        sqlx::query(
            "INSERT INTO plugins_running (node_id, aggregate_type, version) VALUES ($1, $2, $3) \
             ON CONFLICT (node_id, aggregate_type) DO UPDATE SET version = EXCLUDED.version, since = now()",
        )
        .bind(node)
        .bind(aggregate_type)
        .bind(version)
        .execute(conn)
        .await?;
        Ok(())
    })
    .await
}

/// The live hosts of the region (not found dead, a heartbeat within `live_within`), by
/// node id, each with whether it runs `version` of `aggregate_type` or a newer one.
pub async fn hosts_running(
    pool: &PgPool,
    aggregate_type: &str,
    version: i32,
    live_within: std::time::Duration,
) -> Result<Vec<(String, bool)>, StoreError> {
    bounded_read(pool, async |conn| {
        Ok(sqlx::query_as(
            "SELECT m.node_id, coalesce(r.version >= $2, false) FROM members m \
             LEFT JOIN plugins_running r ON r.node_id = m.node_id AND r.aggregate_type = $1 \
             WHERE NOT m.dead AND m.last_heartbeat > now() - make_interval(secs => $3) \
             ORDER BY m.node_id",
        )
        .bind(aggregate_type)
        .bind(version)
        .bind(live_within.as_secs_f64())
        .fetch_all(conn)
        .await?)
    })
    .await
}
