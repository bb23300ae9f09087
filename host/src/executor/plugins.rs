//! Which compiled plugin runs each aggregate type on this host.
//!
//! Plugins live in Postgres, so every host of the region can run every type. A host
//! compiles a type's newest version the first time it needs it, and a background task
//! (see [`PluginRegistry::refresh`]) notices newer versions uploaded through any host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use crate::runtime::{Plugin, PluginError, Runtime};
use crate::store::{self, StoreError};

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
    loaded: Mutex<HashMap<String, Plugin>>,
    /// One load at a time, so a burst of first commands compiles a plugin once.
    loading: tokio::sync::Mutex<()>,
}

impl PluginRegistry {
    /// An empty registry over the region's plugins table.
    pub fn new(pool: PgPool, runtime: Runtime) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                runtime,
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
        Ok(plugin)
    }

    /// Loads every type whose newest version this host does not have yet. Returns the
    /// number of plugins (re)loaded. A host runs this before it reports ready, and then
    /// periodically, so uploads through other hosts take effect here too.
    pub async fn refresh(&self) -> Result<usize, RegistryError> {
        let latest = store::plugins::list_latest(&self.inner.pool).await?;
        let mut reloaded = 0;
        for info in latest {
            let current = self.cached(&info.aggregate_type).map(|p| p.version());
            if current != Some(info.version) {
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
    /// upload or a change of limits).
    pub fn invalidate(&self, aggregate_type: &str) {
        self.inner
            .loaded
            .lock()
            .expect("registry poisoned")
            .remove(aggregate_type);
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
