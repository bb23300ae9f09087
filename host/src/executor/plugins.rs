//! Which compiled plugin runs each aggregate type on this host.
//!
//! Plugins live in Postgres, so every host of the region can run every type. A host
//! compiles a type's newest version the first time it needs it, and a background task
//! (see [`PluginRegistry::refresh`]) notices newer versions uploaded through any host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use crate::runtime::{Plugin, PluginError, Runtime};
use crate::store::{self, Changes, StoreError};

/// Errors finding or loading a plugin.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No plugin was uploaded for this type.
    #[error(
        "no plugin is uploaded for aggregate type `{0}`; upload one with `meridian plugin upload {0} <file.wasm>`"
    )]
    UnknownType(String),
    /// The stored component no longer loads (e.g. limits changed to impossible values).
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Compiled plugins by aggregate type. Cheap to clone.
#[derive(Clone)]
pub struct PluginRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    runtime: Runtime,
    changes: Changes,
    loaded: Mutex<HashMap<String, Plugin>>,
    /// One load at a time, so a burst of first commands compiles a plugin once.
    loading: tokio::sync::Mutex<()>,
}

impl PluginRegistry {
    /// An empty registry over the region's plugins table.
    pub fn new(pool: PgPool, runtime: Runtime, changes: Changes) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                runtime,
                changes,
                loaded: Mutex::new(HashMap::new()),
                loading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The runtime plugins are compiled with.
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    /// The newest plugin for a type, compiling it if this host has not yet.
    pub async fn get(&self, aggregate_type: &str) -> Result<Plugin, RegistryError> {
        if let Some(plugin) = self.cached(aggregate_type) {
            return Ok(plugin);
        }
        let _guard = self.inner.loading.lock().await;
        if let Some(plugin) = self.cached(aggregate_type) {
            return Ok(plugin);
        }
        self.load(aggregate_type).await
    }

    /// Whether a plugin is uploaded for the type, without compiling it: what a host that
    /// only passes a command on to another region needs to know.
    pub async fn knows(&self, aggregate_type: &str) -> Result<bool, RegistryError> {
        if self.is_loaded(aggregate_type) {
            return Ok(true);
        }
        Ok(!store::plugins::versions(&self.inner.pool, aggregate_type)
            .await?
            .is_empty())
    }

    /// Whether this host has a plugin for the type loaded. Every host loads every
    /// uploaded type (see [`Self::refresh`]), so this answers "is it a known type"
    /// without the database, a moment late after an upload.
    pub fn is_loaded(&self, aggregate_type: &str) -> bool {
        self.cached(aggregate_type).is_some()
    }

    fn cached(&self, aggregate_type: &str) -> Option<Plugin> {
        self.inner
            .loaded
            .lock()
            .expect("registry poisoned")
            .get(aggregate_type)
            .cloned()
    }

    async fn load(&self, aggregate_type: &str) -> Result<Plugin, RegistryError> {
        let Some((info, bytes)) =
            store::plugins::latest_with_bytes(&self.inner.pool, aggregate_type).await?
        else {
            return Err(RegistryError::UnknownType(aggregate_type.to_string()));
        };
        let limits = store::plugins::limits(&self.inner.pool, aggregate_type).await?;
        let runtime = self.inner.runtime.clone();
        let ty = aggregate_type.to_string();
        let started = std::time::Instant::now();
        // Compiling takes from milliseconds (Rust) to seconds (interpreters): keep it off
        // the async workers.
        let plugin = tokio::task::spawn_blocking(move || {
            runtime.load(&ty, info.version, &info.sha256, &bytes, limits)
        })
        .await
        .map_err(|e| PluginError::Internal(format!("compile task failed: {e}")))??;
        tracing::info!(
            plugin = plugin.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin loaded"
        );
        self.inner
            .loaded
            .lock()
            .expect("registry poisoned")
            .insert(aggregate_type.to_string(), plugin.clone());
        // What an upload waits for on every host. Failing to say so only makes the
        // upload wait until its timeout; the plugin runs all the same.
        if let Err(error) = store::plugins::record_running(
            &self.inner.pool,
            self.inner.changes.node_id(),
            aggregate_type,
            plugin.version(),
        )
        .await
        {
            tracing::warn!(%error, aggregate_type, "cannot record the plugin version this host runs");
        }
        Ok(plugin)
    }

    /// Loads every type whose newest version, or whose limits, this host does not have
    /// yet. Returns the number of plugins (re)loaded. A host runs this before it
    /// reports ready, and then periodically, so uploads and changes of limits through
    /// other hosts take effect here too.
    pub async fn refresh(&self) -> Result<usize, RegistryError> {
        let latest = store::plugins::list_latest(&self.inner.pool).await?;
        let limits = store::plugins::all_limits(&self.inner.pool).await?;
        let mut reloaded = 0;
        for info in latest {
            let wanted = limits
                .get(&info.aggregate_type)
                .copied()
                .unwrap_or_default();
            let current = self
                .cached(&info.aggregate_type)
                .map(|p| (p.version(), *p.limits()));
            if current != Some((info.version, wanted)) {
                let _guard = self.inner.loading.lock().await;
                match self.load(&info.aggregate_type).await {
                    Ok(_) => reloaded += 1,
                    Err(error) => {
                        tracing::error!(aggregate_type = %info.aggregate_type, %error, "cannot load plugin")
                    }
                }
            }
        }
        Ok(reloaded)
    }

    /// Forgets a type's compiled plugin, so the next command loads it again (after an
    /// upload or a change of limits), and tells the region's other hosts to refresh.
    ///
    /// Waits for a load in flight: one that read the stored versions before the upload
    /// would otherwise put the previous version back after this, and the host would run
    /// it until its next refresh although the upload was answered.
    pub async fn invalidate(&self, aggregate_type: &str) {
        let _guard = self.inner.loading.lock().await;
        self.inner
            .loaded
            .lock()
            .expect("registry poisoned")
            .remove(aggregate_type);
        self.inner.changes.plugins_changed();
    }

    /// The loaded plugins, for status pages.
    pub fn loaded(&self) -> Vec<(String, i32)> {
        let mut list: Vec<_> = self
            .inner
            .loaded
            .lock()
            .expect("registry poisoned")
            .iter()
            .map(|(t, p)| (t.clone(), p.version()))
            .collect();
        list.sort();
        list
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sha2::{Digest, Sha256};
    use sqlx::{Connection, PgConnection};

    use super::*;
    use crate::runtime::RuntimeConfig;
    use crate::store::DatabaseConfig;

    /// The example component with a custom section naming `tag`: other bytes (so a
    /// version of its own, compiled anew), the same code.
    fn component(tag: u8) -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/wasm32-wasip2/release/bank_account.wasm"
        );
        let mut bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("{path}: {e}; build it with `bash plugins/build.sh`"));
        let name = b"meridian-test";
        bytes.extend_from_slice(&[0, (name.len() + 2) as u8, name.len() as u8]);
        bytes.extend_from_slice(name);
        bytes.push(tag);
        bytes
    }

    async fn store(pool: &PgPool, bytes: &[u8]) -> i32 {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let (info, _) = store::plugins::store(
            pool,
            "bank-account",
            &sha256,
            1,
            bytes,
            None,
            &crate::runtime::SandboxLimits::default(),
        )
        .await
        .expect("store a version");
        info.version
    }

    /// An upload answered while the background refresh was loading the version before
    /// it: the host must run the uploaded version from then on, not the one the refresh
    /// was loading.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_load_in_flight_cannot_put_back_the_version_an_upload_replaced() {
        // The tests' admin connection, as the end-to-end harness reads it.
        let admin_url = std::env::var("MERIDIAN_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("meridian_registry_{}", std::process::id());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL (MERIDIAN_TEST_PG)");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let pool = store::connect(&DatabaseConfig {
            url: format!("{}/{name}", admin_url.rsplit_once('/').expect("a URL").0),
            max_connections: 4,
        })
        .await
        .unwrap();
        store::migrate(&pool).await.unwrap();
        let registry = PluginRegistry::new(
            pool.clone(),
            Runtime::new(RuntimeConfig::default()).unwrap(),
            Changes::default(),
        );

        store(&pool, &component(0)).await;
        for tag in 1..=4 {
            // The refresh sees a version this host has not loaded and compiles it (tens
            // of milliseconds: each version is other bytes) ...
            registry.invalidate("bank-account").await;
            let refresh = tokio::spawn({
                let registry = registry.clone();
                async move { registry.refresh().await }
            });
            tokio::time::sleep(Duration::from_millis(15)).await;
            // ... while an upload stores the next one and invalidates.
            let stored = store(&pool, &component(tag)).await;
            registry.invalidate("bank-account").await;
            refresh.await.unwrap().unwrap();
            let running = registry.get("bank-account").await.unwrap().version();
            assert_eq!(
                running, stored,
                "the host runs version {running} after version {stored} was uploaded"
            );
        }

        pool.close().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}
