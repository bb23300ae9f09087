//! Plugins shared by every region.
//!
//! **Rule for version numbers.** A plugin version number is allocated by an atomic
//! `create` of the key `<type>.<version>` in the directory's [`PLUGINS_BUCKET`]. An
//! upload tries the next number after the directory's newest (its region may not have
//! imported that yet; bytes that are the newest get its number back). If another
//! region created that key first with different bytes, the upload was checked against
//! the histories of a version that is no longer the newest: it is refused (409
//! `plugin_changed`, to be sent again) unless forced, when it tries the next number.
//! Never two different "version 3"s; the same bytes racing with themselves get the
//! same version.
//!
//! **Bytes.** The uploading region keeps the component in its own object store
//! ([`PLUGIN_OBJECTS`], named by sha256); every region's relay leader lists the
//! directory, fetches versions it lacks from the object store of the region that
//! uploaded them, checks the sha256 and stores them in its PostgreSQL under the same
//! number. Hosts then load them as they load local uploads.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{kv, object_store};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use sqlx::PgPool;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{DirectoryOp, PLUGIN_OBJECTS, PLUGINS_BUCKET, RegionError, Regions};
use crate::runtime::SandboxLimits;
use crate::store::{self, plugins::PluginInfo};

/// How often the relay leader looks for plugin versions this region lacks.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The newest version of an aggregate type's plugin ([`Regions::newest_plugin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestPlugin {
    /// Its number.
    pub version: i32,
    /// Its component's sha256 (`None`: a directory entry that does not parse).
    pub sha256: Option<String>,
}

/// A directory entry: one plugin version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Component size.
    pub size_bytes: i64,
    /// Schema version the plugin reports.
    pub schema_version: i32,
    /// The region whose object store holds the bytes.
    pub region: String,
}

/// An uploaded component, validated: what [`Regions::register_plugin`] stores.
#[derive(Debug, Clone, Copy)]
pub struct Component<'a> {
    /// Hex sha256 of the bytes.
    pub sha256: &'a str,
    /// The schema version the component reports.
    pub schema_version: i32,
    /// The component.
    pub bytes: &'a Bytes,
}

impl Regions {
    /// Registers an uploaded (and already validated) component. With several regions
    /// its version number comes from the directory (so every region stores these bytes
    /// under the same number) and the bytes are kept in this region's object store; a
    /// single region numbers versions in its own database. `newest` is what
    /// [`Self::newest_plugin`] answered for the upload (which judged the bytes by it).
    /// Returns the version and whether it is new.
    ///
    /// Unless `forced`, a version stored by someone else after `newest` fails the
    /// upload with [`StoreError::PluginChanged`](store::StoreError::PluginChanged): the
    /// upload was checked against the histories `newest` wrote, not that version's.
    /// Limits other than `checked_under`, the ones it was validated under, fail it with
    /// [`StoreError::LimitsChanged`](store::StoreError::LimitsChanged).
    pub async fn register_plugin(
        &self,
        pool: &PgPool,
        aggregate_type: &str,
        component: Component<'_>,
        newest: Option<NewestPlugin>,
        forced: bool,
        checked_under: &SandboxLimits,
    ) -> Result<(PluginInfo, bool), RegionError> {
        let Component {
            sha256,
            schema_version,
            bytes,
        } = component;
        if !self.enabled() {
            let judged_by = (!forced).then(|| newest.as_ref().map(|n| n.version));
            return Ok(store::plugins::store(
                pool,
                aggregate_type,
                sha256,
                schema_version,
                bytes,
                judged_by,
                checked_under,
            )
            .await?);
        }
        // Checked here, not with the version stored: once claimed in the directory,
        // the version is every region's. A change of limits between this check and
        // the store below still slips through; a single region has no such window.
        store::plugins::ensure_limits(pool, aggregate_type, checked_under).await?;
        let unreachable = |e: String| RegionError::PluginDirectoryUnreachable {
            aggregate_type: aggregate_type.to_string(),
            directory: self.config().directory.clone(),
            reason: e,
        };
        if let Some(newest) = &newest
            && newest.sha256.as_deref() == Some(sha256)
        {
            let info = match store::plugins::versions(pool, aggregate_type)
                .await?
                .into_iter()
                .find(|v| v.version == newest.version)
            {
                Some(info) => info,
                // Listed in the directory, not imported here yet: these are its bytes.
                None => {
                    store::plugins::store_version(
                        pool,
                        aggregate_type,
                        newest.version,
                        sha256,
                        schema_version,
                        bytes,
                    )
                    .await?
                }
            };
            return Ok((info, false));
        }
        self.put_object(sha256, bytes).await?;
        let entry = VersionEntry {
            sha256: sha256.to_string(),
            size_bytes: bytes.len() as i64,
            schema_version,
            region: self.local().to_string(),
        };
        let value = Bytes::from(serde_json::to_vec(&entry).expect("serialisable"));
        let judged = newest.as_ref().map(|n| n.version);
        let mut version = judged.map_or(1, |v| v + 1);
        let created = loop {
            let key = format!("{aggregate_type}.{version}");
            let answer = self
                .directory(
                    DirectoryOp::Claim,
                    PLUGINS_BUCKET,
                    &key,
                    std::str::from_utf8(&value).expect("JSON is UTF-8"),
                )
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            if answer.created {
                break true;
            }
            let taken = serde_json::from_str::<VersionEntry>(&answer.value).ok();
            if taken.is_some_and(|t| t.sha256 == sha256) {
                break false;
            }
            if !forced {
                return Err(store::StoreError::PluginChanged {
                    aggregate_type: aggregate_type.to_string(),
                    checked: judged.map_or("no version".to_string(), |v| format!("version {v}")),
                    stored: version,
                }
                .into());
            }
            version += 1;
        };
        let info = store::plugins::store_version(
            pool,
            aggregate_type,
            version,
            sha256,
            schema_version,
            bytes,
        )
        .await?;
        Ok((info, created))
    }

    /// The newest version of a type: the directory's when there are regions (this
    /// region may not have imported it yet), else this region's. Judged by the
    /// region's own, an upload of the bytes it held as newest was answered "unchanged"
    /// (and not checked against the stored histories) while another region's newer
    /// version was on its way in, to be run in its place. With the directory out of
    /// reach, this region's: registering anything new needs the directory anyway.
    pub async fn newest_plugin(
        &self,
        pool: &PgPool,
        aggregate_type: &str,
    ) -> Result<Option<NewestPlugin>, RegionError> {
        let local = store::plugins::versions(pool, aggregate_type)
            .await?
            .into_iter()
            .next()
            .map(|v| NewestPlugin {
                version: v.version,
                sha256: Some(v.sha256),
            });
        if !self.enabled() {
            return Ok(local);
        }
        let after = local.as_ref().map_or(0, |v| v.version);
        match self.directory_newest(aggregate_type, after).await {
            Ok(Some(newest)) => Ok(Some(newest)),
            Ok(None) => Ok(local),
            Err(error) => {
                tracing::debug!(aggregate_type, %error, "cannot read the plugin directory; judging by this region's versions");
                Ok(local)
            }
        }
    }

    /// The directory's newest version of a type after `after`; `None` when it lists
    /// none after it. An entry that does not parse still takes its number.
    async fn directory_newest(
        &self,
        aggregate_type: &str,
        after: i32,
    ) -> Result<Option<NewestPlugin>, RegionError> {
        let kv = self.directory_kv(PLUGINS_BUCKET).await?;
        let mut newest = None;
        for version in after + 1.. {
            let value = kv
                .get(format!("{aggregate_type}.{version}"))
                .await
                .map_err(|e| RegionError::Nats(format!("directory {PLUGINS_BUCKET}: {e}")))?;
            let Some(value) = value else { break };
            let sha256 = serde_json::from_slice::<VersionEntry>(&value)
                .ok()
                .map(|entry| entry.sha256);
            newest = Some(NewestPlugin { version, sha256 });
        }
        Ok(newest)
    }

    async fn put_object(&self, sha256: &str, bytes: &Bytes) -> Result<(), RegionError> {
        let js = self.local_js().expect("enabled");
        let nats = |e: String| RegionError::Nats(format!("object store {PLUGIN_OBJECTS}: {e}"));
        let store = match js.get_object_store(PLUGIN_OBJECTS).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: PLUGIN_OBJECTS.to_string(),
                    storage: async_nats::jetstream::stream::StorageType::File,
                    num_replicas: self.config().replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(e.to_string()))?,
        };
        if store.info(sha256).await.is_ok() {
            return Ok(());
        }
        let mut reader: &[u8] = bytes;
        store
            .put(sha256, &mut reader)
            .await
            .map_err(|e| nats(e.to_string()))?;
        Ok(())
    }
}

/// Imports plugin versions the directory lists and this region lacks, until `stop`.
pub(super) async fn sync(
    regions: Regions,
    pool: PgPool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Versions that failed to import, with the error last logged: a failure is told
    // once as a warning (and again when it changes), not every second.
    let mut failing: HashMap<(String, i32), String> = HashMap::new();
    loop {
        match sync_once(&regions, &pool).await {
            Ok(imports) => {
                for (version, outcome) in imports {
                    match outcome {
                        Ok(()) => {
                            failing.remove(&version);
                        }
                        Err(error) => {
                            let error = format!("{error:#}");
                            if failing.get(&version) != Some(&error) {
                                tracing::warn!(
                                    aggregate_type = version.0,
                                    version = version.1,
                                    error,
                                    "cannot import a plugin version uploaded in another region; retrying"
                                );
                                failing.insert(version, error);
                            }
                        }
                    }
                }
            }
            Err(error) => {
                tracing::debug!(error = format!("{error:#}"), "plugin sync incomplete");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
}

/// Lists the versions the directory has and this region lacks, and imports each on
/// its own: one that cannot be imported (its region's object store unreachable, its
/// bytes lost, an entry that does not parse) must not hold back the others.
async fn sync_once(
    regions: &Regions,
    pool: &PgPool,
) -> anyhow::Result<Vec<((String, i32), anyhow::Result<()>)>> {
    let kv = regions.directory_kv(PLUGINS_BUCKET).await?;
    let have: HashSet<(String, i32)> = store::plugins::stored_versions(pool)
        .await?
        .into_iter()
        .collect();
    let mut keys = kv.keys().await?;
    let mut missing = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some((aggregate_type, version)) = key.rsplit_once('.') else {
            continue;
        };
        let Ok(version) = version.parse::<i32>() else {
            continue;
        };
        if !have.contains(&(aggregate_type.to_string(), version)) {
            missing.push((aggregate_type.to_string(), version, key.clone()));
        }
    }
    let mut imports = Vec::with_capacity(missing.len());
    for (aggregate_type, version, key) in missing {
        let outcome = import(regions, pool, &kv, &aggregate_type, version, key).await;
        imports.push(((aggregate_type, version), outcome));
    }
    Ok(imports)
}

/// Fetches one version's bytes from the object store of the region that holds them,
/// checks them against the directory's sha256 and stores them.
async fn import(
    regions: &Regions,
    pool: &PgPool,
    kv: &kv::Store,
    aggregate_type: &str,
    version: i32,
    key: String,
) -> anyhow::Result<()> {
    let Some(value) = kv.get(key).await? else {
        return Ok(());
    };
    let entry: VersionEntry = serde_json::from_slice(&value)?;
    tracing::info!(
        aggregate_type,
        version,
        from = entry.region,
        size = entry.size_bytes,
        "fetching a plugin uploaded in another region"
    );
    let js = regions
        .js_of(&entry.region)
        .ok_or_else(|| anyhow::anyhow!("no NATS to reach region {}", entry.region))?;
    let store = js.get_object_store(PLUGIN_OBJECTS).await?;
    let mut object = store.get(&entry.sha256).await?;
    let mut bytes = Vec::with_capacity(entry.size_bytes.max(0) as usize);
    object.read_to_end(&mut bytes).await?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    anyhow::ensure!(
        sha == entry.sha256,
        "plugin {aggregate_type} v{version} from region {}: sha256 {sha} does not match the directory's {}",
        entry.region,
        entry.sha256
    );
    store::plugins::store_version(
        pool,
        aggregate_type,
        version,
        &sha,
        entry.schema_version,
        &bytes,
    )
    .await?;
    tracing::info!(aggregate_type, version, sha256 = sha, "plugin imported");
    // Every host of the region runs it as soon as it has compiled it.
    regions.changes().plugins_changed();
    Ok(())
}
