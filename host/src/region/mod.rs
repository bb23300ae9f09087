//! Regions: each aggregate's home region, forwarding commands home over NATS, the
//! relay of events between regions (JetStream), and plugins shared by every region.
//!
//! A region is an independent cluster with its own PostgreSQL and its own NATS, which
//! is a JetStream *domain* named after the region. Regions are linked by leafnode
//! connections; a host is only given its own region's NATS URL and reaches other
//! regions' JetStream through their domain's API prefix (`$JS.<region>.API`).
//!
//! - **Home.** An aggregate is written only in its home region. A new aggregate's home
//!   is claimed by an atomic `create` in the *directory* (a KV bucket in one region's
//!   domain, [`HOMES_BUCKET`]); the first region to create the key wins, the other
//!   forwards. Once a region holds an aggregate's events, its `streams` row names the
//!   home and the append function refuses writes elsewhere (`not_home`).
//! - **Forwarding.** A command for an aggregate homed elsewhere goes, with its headers,
//!   to `meridian.rpc.<home>` (a queue group of the home region's hosts), which runs it
//!   through its own HTTP router and returns the status and body unchanged.
//! - **Relay** ([`relay`]): the region's relay leader publishes its own committed events
//!   to its JetStream stream and stores the other regions' events, which reach it as
//!   JetStream sources of their streams.
//! - **Plugins** ([`plugins`]): version numbers are allocated in the directory
//!   ([`PLUGINS_BUCKET`]), bytes live in the uploading region's object store, and every
//!   region's relay leader imports versions it lacks.

pub mod plugins;
pub mod relay;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::store::{self, AggregateKey, Changes, StoreError};

/// KV bucket (in the directory region's domain) that maps `type.<base64url id>` to
/// the aggregate's home region.
pub const HOMES_BUCKET: &str = "meridian_homes";

/// KV bucket (in the directory region's domain) that maps `type.<version>` to the
/// plugin version's sha256, size and the region whose object store holds its bytes.
pub const PLUGINS_BUCKET: &str = "meridian_plugins";

/// Object store (in every region's domain) with uploaded components, by sha256.
pub const PLUGIN_OBJECTS: &str = "meridian_plugins";

/// Header: how many regions a request has been forwarded through.
pub const HOPS_HEADER: &str = "x-meridian-region-hops";
/// Header: the region the sender believes is the aggregate's home.
pub const HOME_HEADER: &str = "x-meridian-home";
/// Header: the aggregate version at which the sender knew that home ([`Home::known_at`]).
pub const HOME_VERSION_HEADER: &str = "x-meridian-home-version";
/// Header: the regions a forwarded request passed through, in order, comma-separated;
/// named in the `too_many_hops` refusal so a loop between stale views can be traced.
pub const VIA_HEADER: &str = "x-meridian-via";
/// Header on answers: the region that executed (the aggregate's home).
pub const SERVED_BY_HEADER: &str = "x-meridian-region";
/// NATS header on answers to forwarded requests: the region that executed, when the
/// region asked passed the request on.
const SERVED_BY_NATS_HEADER: &str = "Meridian-Served-By";

/// A request is forwarded between regions at most this often (a home that moved
/// while caches were stale costs one extra hop).
pub const MAX_HOPS: u32 = 3;

/// How long a region told it is the home waits to receive the move before it refuses.
pub const MOVE_WAIT: Duration = Duration::from_secs(5);

/// Homes remembered per host.
const HOME_CACHE: usize = 100_000;

/// The JetStream stream with a region's own events.
pub fn events_stream(region: &str) -> String {
    format!("meridian-events-{region}")
}

/// The stream (in this region) that sources another region's events stream.
pub fn inbound_stream(from: &str) -> String {
    format!("meridian-from-{from}")
}

/// The subject an event is published on:
/// `meridian.events.<region>.<aggregate_type>.<aggregate_id>`, with `.` in the id
/// written as `%2E` (ids may contain dots; subject tokens may not).
pub fn event_subject(region: &str, aggregate_type: &str, aggregate_id: &str) -> String {
    format!(
        "meridian.events.{region}.{aggregate_type}.{}",
        aggregate_id.replace('.', "%2E")
    )
}

/// The subject the directory region's hosts answer directory requests on.
pub fn directory_subject(region: &str) -> String {
    format!("meridian.directory.{region}")
}

/// A directory operation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryOp {
    /// Create the key with the value unless it exists; answer the current value.
    Claim,
    /// Set the key.
    Put,
}

#[derive(Debug, Serialize, Deserialize)]
struct DirectoryRequest {
    op: DirectoryOp,
    bucket: String,
    key: String,
    value: String,
}

/// A directory operation's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct DirectoryAnswer {
    /// True when this request created (or set) the key.
    pub created: bool,
    /// The key's value now.
    pub value: String,
}

/// How long a directory request may take.
const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(3);

/// The subject a region's hosts answer forwarded requests on.
pub fn rpc_subject(region: &str) -> String {
    format!("meridian.rpc.{region}")
}

/// Checks a region name: it becomes a JetStream domain, part of subjects and of
/// stream names.
pub fn validate_region(region: &str) -> Result<(), RegionError> {
    let ok = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RegionError::Config(format!(
            "invalid region name `{region}`: use 1-32 characters of a-z, 0-9, `-` and `_`"
        )))
    }
}

/// Errors at the region seam.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The aggregate's home region cannot be reached; nothing was written.
    #[error(
        "{aggregate} is homed in region {home}, which cannot be reached from region {local} right now; nothing was written, retry later"
    )]
    HomeUnreachable {
        /// `type/id`.
        aggregate: String,
        /// Its home.
        home: String,
        /// This region.
        local: String,
    },
    /// The home region did not answer in time; the command may or may not have run.
    #[error(
        "{aggregate} is homed in region {home}, which did not answer within {timeout_ms} ms; retry with the same command_id (it never applies twice)"
    )]
    HomeTimedOut {
        /// `type/id`.
        aggregate: String,
        /// Its home.
        home: String,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The directory (where new aggregates get their home) cannot be reached.
    #[error(
        "cannot give {aggregate} a home: the directory in region {directory} is unreachable from region {local} ({reason}); aggregates that already exist keep working, new ones can be created in region {directory}"
    )]
    DirectoryUnreachable {
        /// `type/id`.
        aggregate: String,
        /// The directory region.
        directory: String,
        /// This region.
        local: String,
        /// What failed.
        reason: String,
    },
    /// The directory did not answer a claim of a plugin version. The claim may have
    /// been made (the answer lost), and then every region imports the version.
    #[error(
        "cannot register a new version of `{aggregate_type}`: the directory in region {directory} did not answer ({reason}); the version may have been registered all the same: send the same bytes again, answered with the version they got once the directory answers"
    )]
    PluginDirectoryUnreachable {
        /// The type uploaded.
        aggregate_type: String,
        /// The directory region.
        directory: String,
        /// What failed.
        reason: String,
    },
    /// This region was named the home but has not received the move yet.
    #[error(
        "{aggregate} is moving its home to region {local}, which has not received all its events yet; retry shortly"
    )]
    MoveInProgress {
        /// `type/id`.
        aggregate: String,
        /// This region.
        local: String,
    },
    /// Too many forwards between regions (caches disagree); the command did not run.
    #[error(
        "{aggregate}: forwarded between regions {hops} times ({via}) without reaching its \
         home: its home is moving and the regions' views of it differ; retry"
    )]
    TooManyHops {
        /// `type/id`.
        aggregate: String,
        /// Forwards so far.
        hops: u32,
        /// The regions the request passed through, `a → b → c`.
        via: String,
    },
    /// The request is larger than one NATS message, which is how it would travel to
    /// the home region; nothing was sent.
    #[error(
        "{aggregate} is homed in region {home}, reached over NATS, which carries at most {max} bytes per message; this request is {bytes}: send it to a host of region {home}, or raise max_payload in nats-server's configuration"
    )]
    TooLargeToForward {
        /// `type/id`.
        aggregate: String,
        /// Its home.
        home: String,
        /// The request's body and headers.
        bytes: usize,
        /// The NATS server's max_payload.
        max: usize,
    },
    /// Invalid configuration or request (unknown region, bad name).
    #[error("{0}")]
    Config(String),
    /// NATS failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a command for an aggregate runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// In this region.
    Local,
    /// In this other region.
    Remote(Home),
}

/// An aggregate's home as a region knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// The home region.
    pub region: String,
    /// The aggregate version at which a stream row named it (0: a new aggregate's
    /// claim, or a home learned from an answer). Versions only grow along one
    /// history, so of two views the one with the larger version is the newer.
    pub known_at: i64,
}

impl Home {
    fn new(region: &str, known_at: i64) -> Self {
        Self {
            region: region.to_string(),
            known_at,
        }
    }

    /// Reads a directory entry: `<region>` for a new aggregate's claim,
    /// `<region>@<version>` after a move (region names have no `@`).
    fn parse(entry: &str) -> Self {
        match entry.split_once('@') {
            Some((region, version)) => Self::new(region, version.parse().unwrap_or(0)),
            None => Self::new(entry, 0),
        }
    }
}

impl std::fmt::Display for Home {
    /// The directory entry [`Home::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.known_at > 0 {
            write!(f, "{}@{}", self.region, self.known_at)
        } else {
            f.write_str(&self.region)
        }
    }
}

/// Region settings of a host.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// This region's name (also its JetStream domain).
    pub region: String,
    /// The other regions whose events this region receives.
    pub peers: Vec<String>,
    /// The region whose JetStream domain holds the directory buckets.
    pub directory: String,
    /// How long a command forwarded to another region may take.
    pub forward_timeout: Duration,
    /// JetStream replicas of the streams and buckets this region creates.
    pub replicas: usize,
}

/// A host's view of the regions. Cheap to clone. Without NATS every aggregate is
/// local and nothing is relayed.
#[derive(Clone)]
pub struct Regions {
    inner: Arc<Inner>,
}

struct Inner {
    config: RegionConfig,
    pool: PgPool,
    nats: Option<async_nats::Client>,
    changes: Changes,
    homes: Mutex<LruCache<AggregateKey, Home>>,
}

/// An answer from another region: status and body, passed to the caller unchanged.
#[derive(Debug)]
pub struct Forwarded {
    /// HTTP status.
    pub status: axum::http::StatusCode,
    /// Body (JSON).
    pub body: Bytes,
    /// The region that answered: the one asked, or the one it passed the request on
    /// to (its home as far as the region asked knew).
    pub region: String,
}

impl Regions {
    /// Creates the view; `nats` is the region's NATS connection, if configured.
    pub fn new(
        config: RegionConfig,
        pool: PgPool,
        nats: Option<async_nats::Client>,
        changes: Changes,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                pool,
                nats,
                changes,
                homes: Mutex::new(LruCache::new(
                    NonZeroUsize::new(HOME_CACHE).expect("non-zero"),
                )),
            }),
        }
    }

    /// This region's name.
    pub fn local(&self) -> &str {
        &self.inner.config.region
    }

    /// The configuration.
    pub fn config(&self) -> &RegionConfig {
        &self.inner.config
    }

    /// This host's announcements of writes to the region's other hosts: events
    /// received from other regions and home moves are stored here, not by the
    /// committer, and must be announced too.
    pub fn changes(&self) -> &Changes {
        &self.inner.changes
    }

    /// The NATS connection, when configured.
    pub fn nats(&self) -> Option<&async_nats::Client> {
        self.inner.nats.as_ref()
    }

    /// True when hosts of several regions share aggregates (NATS configured).
    pub fn enabled(&self) -> bool {
        self.inner.nats.is_some()
    }

    /// Every region this host knows: itself and its peers.
    pub fn known(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.inner.config.region.as_str())
            .chain(self.inner.config.peers.iter().map(String::as_str))
    }

    /// JetStream in this region's domain.
    pub fn local_js(&self) -> Option<jetstream::Context> {
        self.inner.nats.clone().map(jetstream::new)
    }

    /// JetStream in another region's domain (through the leafnode link).
    pub fn js_of(&self, region: &str) -> Option<jetstream::Context> {
        self.inner
            .nats
            .clone()
            .map(|c| jetstream::with_domain(c, region))
    }

    /// Forgets a remembered home (after a refusal or a move).
    pub fn forget(&self, key: &AggregateKey) {
        self.inner.homes.lock().expect("homes lock").pop(key);
    }

    /// Remembers a home that a forwarded command's answer named (it ran there), if
    /// it is a region this host knows.
    pub fn learned_home(&self, key: &AggregateKey, home: &str) {
        if self.known().any(|r| r == home) {
            self.remember(key, Home::new(home, 0));
        }
    }

    fn remember(&self, key: &AggregateKey, home: Home) {
        self.inner
            .homes
            .lock()
            .expect("homes lock")
            .put(key.clone(), home);
    }

    /// Decides where a command for `key` runs. `claimed` is what the region that
    /// forwarded the command said: the home it sent the command to, and the version
    /// at which it knew that (0: it only remembered it).
    ///
    /// Named home while this host remembers another home, this region asks its stream
    /// row, whose version says whose knowledge is newer. If the forwarder knew of a
    /// later version than this region holds, a move here is on its way: this region
    /// waits up to [`MOVE_WAIT`] for it rather than bouncing the command back. Otherwise
    /// the command goes on to the home the row names (the forwarder only remembered an
    /// old home: a region that took no part in a move learns of it from the answers).
    /// Each hop carries knowledge at least as new as the one before, so a command ends
    /// at the home, or waits where the home's events are still arriving.
    pub async fn route(
        &self,
        key: &AggregateKey,
        claimed: Option<(&str, i64)>,
    ) -> Result<Route, RegionError> {
        if !self.enabled() {
            return Ok(Route::Local);
        }
        let local = self.local();
        let home = self.home(key).await?;
        if home.region == local {
            return Ok(Route::Local);
        }
        let Some((_, known_at)) = claimed.filter(|(region, _)| *region == local) else {
            return Ok(Route::Remote(home));
        };
        self.forget(key);
        let home = match store::regions::home_and_version(&self.inner.pool, key).await? {
            Some((region, version)) if region == local || version >= known_at => {
                Home::new(&region, version)
            }
            _ if known_at > 0 => self.await_move(key, known_at).await?,
            // Neither this region nor the forwarder has a stream row: the directory.
            _ => self.home(key).await?,
        };
        self.remember(key, home.clone());
        Ok(if home.region == local {
            Route::Local
        } else {
            Route::Remote(home)
        })
    }

    /// Waits up to [`MOVE_WAIT`] for this region's stream row to reach `version`, the
    /// version at which another region named this one the home: the move's event is
    /// on its way here. Answers the home the row then names.
    async fn await_move(&self, key: &AggregateKey, version: i64) -> Result<Home, RegionError> {
        let local = self.local();
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            match store::regions::home_and_version(&self.inner.pool, key).await? {
                Some((region, at)) if region == local || at >= version => {
                    return Ok(Home::new(&region, at));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RegionError::MoveInProgress {
                    aggregate: key.to_string(),
                    local: local.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The aggregate's home: remembered, else this region's stream row, else the
    /// directory — where a new aggregate's home is claimed for this region by an atomic
    /// create (the first region to create the key wins). A directory entry that names
    /// this region after a move, while none of the aggregate's events arrived here
    /// yet, waits for them: writing without them would start a second history.
    async fn home(&self, key: &AggregateKey) -> Result<Home, RegionError> {
        if let Some(home) = self.known_home(key).await? {
            return Ok(home);
        }
        let mut home = self.claim_home(key).await?;
        if home.region == self.local() && home.known_at > 0 {
            home = self.await_move(key, home.known_at).await?;
        }
        self.remember(key, home.clone());
        Ok(home)
    }

    /// The aggregate's home if it has one — remembered, this region's stream row, or
    /// the directory — without claiming one for a new aggregate: for requests that must
    /// not create an aggregate's home as a side effect (moving a home that does not
    /// exist).
    pub async fn existing_home(&self, key: &AggregateKey) -> Result<Option<String>, RegionError> {
        if let Some(home) = self.known_home(key).await? {
            return Ok(Some(home.region));
        }
        let entry = self
            .directory_kv(HOMES_BUCKET)
            .await?
            .get(home_key(key))
            .await
            .map_err(|e| RegionError::Nats(format!("directory {HOMES_BUCKET}: {e}")))?;
        let Some(mut home) = entry.map(|value| Home::parse(&String::from_utf8_lossy(&value)))
        else {
            return Ok(None);
        };
        // Named the home by a move whose events have not all arrived: wait for them, as
        // `home` does. Remembered before they are here, this host would run the
        // aggregate's commands on the state it has — none — and start a second history.
        if home.region == self.local() && home.known_at > 0 {
            home = self.await_move(key, home.known_at).await?;
        }
        self.remember(key, home.clone());
        Ok(Some(home.region))
    }

    /// The home this host remembers, else the one in this region's stream row.
    ///
    /// A remembered home in another region is checked against the row: when the row
    /// names this region, the aggregate moved here through another host of the region
    /// (a forced move away from a lost home), and only that host remembers it. Without
    /// the check this host sent every command on to the lost region until restarted.
    async fn known_home(&self, key: &AggregateKey) -> Result<Option<Home>, RegionError> {
        let remembered = self
            .inner
            .homes
            .lock()
            .expect("homes lock")
            .get(key)
            .cloned();
        if let Some(home) = &remembered
            && home.region == self.local()
        {
            return Ok(remembered);
        }
        let row = match store::regions::home_and_version(&self.inner.pool, key).await {
            Ok(row) => row,
            // A home remembered elsewhere still serves while the database is away.
            Err(_) if remembered.is_some() => None,
            Err(error) => return Err(error.into()),
        };
        let home = match (row, remembered) {
            (Some((region, version)), remembered)
                if remembered.is_none() || region == self.local() =>
            {
                Home::new(&region, version)
            }
            (_, Some(remembered)) => remembered,
            (_, None) => return Ok(None),
        };
        self.remember(key, home.clone());
        Ok(Some(home))
    }

    async fn claim_home(&self, key: &AggregateKey) -> Result<Home, RegionError> {
        let local = self.local().to_string();
        let answer = self
            .directory(DirectoryOp::Claim, HOMES_BUCKET, &home_key(key), &local)
            .await
            .map_err(|e| RegionError::DirectoryUnreachable {
                aggregate: key.to_string(),
                directory: self.inner.config.directory.clone(),
                local: local.clone(),
                reason: e.to_string(),
            })?;
        if answer.created {
            tracing::debug!(aggregate = %key, "claimed the home of a new aggregate");
        }
        Ok(Home::parse(&answer.value))
    }

    /// Records a new home in the directory after a move at `version` (best effort:
    /// regions that ask the directory are sent to the old home, which forwards once
    /// more). The entry names the version too, so the target knows to wait for the
    /// events it has not received.
    pub async fn publish_home(&self, key: &AggregateKey, home: &str, version: i64) {
        let home = Home::new(home, version);
        self.remember(key, home.clone());
        if let Err(error) = self
            .directory(
                DirectoryOp::Put,
                HOMES_BUCKET,
                &home_key(key),
                &home.to_string(),
            )
            .await
        {
            tracing::warn!(aggregate = %key, home = home.region, %error, "home move not recorded in the directory");
        }
    }

    /// Runs a directory operation: here when this region holds the directory, else by
    /// a request to the directory region's hosts ([`directory_subject`]). Writes go
    /// through the directory region's own hosts because a JetStream domain behind a
    /// leafnode accepts reads from other domains but not KV writes.
    pub async fn directory(
        &self,
        op: DirectoryOp,
        bucket: &str,
        key: &str,
        value: &str,
    ) -> Result<DirectoryAnswer, RegionError> {
        let directory = self.inner.config.directory.clone();
        if directory == self.local() {
            return self.directory_local(op, bucket, key, value).await;
        }
        let nats = self
            .inner
            .nats
            .as_ref()
            .ok_or_else(|| RegionError::Config("NATS is not configured".into()))?;
        let request = DirectoryRequest {
            op,
            bucket: bucket.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        };
        let payload = Bytes::from(serde_json::to_vec(&request).expect("serialisable"));
        let answer = tokio::time::timeout(
            DIRECTORY_TIMEOUT,
            nats.request(directory_subject(&directory), payload),
        )
        .await
        .map_err(|_| RegionError::Nats(format!("region {directory} did not answer in time")))?
        .map_err(|e| RegionError::Nats(e.to_string()))?;
        let answer: Result<DirectoryAnswer, String> = serde_json::from_slice(&answer.payload)
            .map_err(|e| RegionError::Nats(format!("bad directory answer: {e}")))?;
        answer.map_err(RegionError::Nats)
    }

    async fn directory_local(
        &self,
        op: DirectoryOp,
        bucket: &str,
        key: &str,
        value: &str,
    ) -> Result<DirectoryAnswer, RegionError> {
        let kv = self.directory_kv(bucket).await?;
        let nats = |e: String| RegionError::Nats(format!("directory {bucket}: {e}"));
        match op {
            DirectoryOp::Put => {
                kv.put(key, Bytes::from(value.to_string()))
                    .await
                    .map_err(|e| nats(e.to_string()))?;
                Ok(DirectoryAnswer {
                    created: true,
                    value: value.to_string(),
                })
            }
            DirectoryOp::Claim => match kv.create(key, Bytes::from(value.to_string())).await {
                Ok(_) => Ok(DirectoryAnswer {
                    created: true,
                    value: value.to_string(),
                }),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let current = kv
                        .get(key)
                        .await
                        .map_err(|e| nats(e.to_string()))?
                        .ok_or_else(|| nats(format!("key {key} vanished")))?;
                    Ok(DirectoryAnswer {
                        created: false,
                        value: String::from_utf8_lossy(&current).into_owned(),
                    })
                }
                Err(e) => Err(nats(e.to_string())),
            },
        }
    }

    /// Opens a directory bucket for reading (through the directory's domain); the
    /// directory region creates it on first use.
    pub async fn directory_kv(&self, bucket: &str) -> Result<kv::Store, RegionError> {
        let directory = &self.inner.config.directory;
        let js = self
            .js_of(directory)
            .ok_or_else(|| RegionError::Config("NATS is not configured".into()))?;
        match js.get_key_value(bucket).await {
            Ok(kv) => Ok(kv),
            Err(error) if directory == self.local() => {
                tracing::debug!(bucket, %error, "creating directory bucket");
                js.create_key_value(kv::Config {
                    bucket: bucket.to_string(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: self.inner.config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| RegionError::Nats(e.to_string()))
            }
            Err(error) => Err(RegionError::Nats(error.to_string())),
        }
    }

    /// Answers other regions' directory requests while this region holds the
    /// directory, until `stop`.
    pub fn serve_directory(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.inner.config.directory != self.local() {
            return None;
        }
        let nats = self.inner.nats.clone()?;
        let regions = self.clone();
        Some(serve_queue(
            nats,
            directory_subject(self.local()),
            stop,
            move |message| {
                let regions = regions.clone();
                async move {
                    let answer: Result<DirectoryAnswer, String> =
                        match serde_json::from_slice::<DirectoryRequest>(&message.payload) {
                            Ok(r) => regions
                                .directory_local(r.op, &r.bucket, &r.key, &r.value)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(format!("bad directory request: {e}")),
                        };
                    let body = Bytes::from(serde_json::to_vec(&answer).expect("serialisable"));
                    (async_nats::HeaderMap::new(), body)
                }
            },
        ))
    }

    /// Sends an HTTP request to another region's hosts over NATS and returns their
    /// answer. `headers` are the caller's (authorization, correlation id) plus hops.
    pub async fn forward(
        &self,
        home: &str,
        key: &AggregateKey,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Forwarded, RegionError> {
        let nats = self
            .inner
            .nats
            .as_ref()
            .ok_or_else(|| RegionError::Config("NATS is not configured".into()))?;
        let mut map = async_nats::HeaderMap::new();
        map.insert("Meridian-Method", method);
        map.insert("Meridian-Path", path);
        for (name, value) in headers {
            map.insert(*name, value.as_str());
        }
        map.insert(HOME_HEADER, home);
        // Refused here with what to do, rather than by the client as a NATS failure
        // that a retry cannot mend.
        let bytes = body.len() + headers_len(&map);
        let max = nats.server_info().max_payload;
        if bytes > max {
            return Err(RegionError::TooLargeToForward {
                aggregate: key.to_string(),
                home: home.to_string(),
                bytes,
                max,
            });
        }
        let timeout = self.inner.config.forward_timeout;
        // The client's own request timeout (10 s) would cut a longer one short.
        let request = nats.send_request(
            rpc_subject(home),
            async_nats::Request::new()
                .headers(map)
                .payload(body)
                .timeout(Some(timeout)),
        );
        let answer = match tokio::time::timeout(timeout, request).await {
            Err(_) => {
                return Err(RegionError::HomeTimedOut {
                    aggregate: key.to_string(),
                    home: home.to_string(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::TimedOut => {
                return Err(RegionError::HomeTimedOut {
                    aggregate: key.to_string(),
                    home: home.to_string(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                return Err(RegionError::HomeUnreachable {
                    aggregate: key.to_string(),
                    home: home.to_string(),
                    local: self.local().to_string(),
                });
            }
            Ok(Err(e)) => return Err(RegionError::Nats(e.to_string())),
            Ok(Ok(answer)) => answer,
        };
        let status = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Meridian-Status"))
            .and_then(|v| v.as_str().parse::<u16>().ok())
            .and_then(|v| axum::http::StatusCode::from_u16(v).ok())
            .ok_or_else(|| {
                RegionError::Nats(format!(
                    "region {home} answered without a valid Meridian-Status"
                ))
            })?;
        // Older hosts do not say who served: the region asked did.
        let region = answer
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVED_BY_NATS_HEADER))
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| home.to_string());
        Ok(Forwarded {
            status,
            body: answer.payload,
            region,
        })
    }

    /// Answers requests forwarded from other regions by running them through this
    /// host's own router (so authentication, validation and routing are the same as
    /// for HTTP callers), until `stop`.
    pub fn serve(
        &self,
        router: axum::Router,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let nats = self.inner.nats.clone()?;
        let local = self.local().to_string();
        Some(serve_queue(
            nats,
            rpc_subject(self.local()),
            stop,
            move |message| {
                let router = router.clone();
                let local = local.clone();
                async move {
                    let (status, served_by, body) = answer(router, message).await;
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Meridian-Status", status.to_string().as_str());
                    headers.insert(SERVED_BY_NATS_HEADER, served_by.unwrap_or(local).as_str());
                    (headers, body)
                }
            },
        ))
    }
}

/// Answers requests on `subject` in the queue group of this region's hosts (so each
/// request is answered once), each on its own task, until `stop`. Then it leaves the
/// queue group, answers the requests already delivered to it, and ends once every
/// answer is sent: a draining host fails none of the requests it was given.
fn serve_queue<F, Fut>(
    nats: async_nats::Client,
    subject: String,
    stop: tokio_util::sync::CancellationToken,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(async_nats::Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (async_nats::HeaderMap, Bytes)> + Send + 'static,
{
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut subscriber = match nats
            .queue_subscribe(subject.clone(), "meridian".into())
            .await
        {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, subject, "cannot subscribe; requests on it go unanswered");
                return;
            }
        };
        // Answers in flight: awaited before the task ends, so a host that stops
        // answers what it took (the host awaits this task before it exits).
        let mut answering = tokio::task::JoinSet::new();
        let mut draining = false;
        loop {
            let message = if draining {
                // Drained: the messages delivered before the server saw us leave the
                // queue group, then the end. Bounded, should the end never come.
                match tokio::time::timeout(DRAIN_WAIT, subscriber.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                }
            } else {
                tokio::select! {
                    _ = stop.cancelled() => {
                        // Leave the queue group so requests go to the region's other
                        // hosts, but take what was already delivered here: dropped, its
                        // sender would wait out its timeout for a command that may
                        // have run.
                        draining = true;
                        if let Err(error) = subscriber.drain().await {
                            tracing::warn!(%error, subject, "cannot drain a subscription");
                            break;
                        }
                        continue;
                    }
                    m = subscriber.next() => match m { Some(m) => m, None => break },
                }
            };
            // Answered ones are let go as the loop turns.
            while answering.try_join_next().is_some() {}
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let answer = handle(message);
            let nats = nats.clone();
            let subject = subject.clone();
            answering.spawn(async move {
                let (mut headers, mut body) = answer.await;
                // An answer too large for one message would be dropped, and the caller
                // would wait out its timeout for a command that may well have run.
                let max = nats.server_info().max_payload;
                if body.len() + headers_len(&headers) > max {
                    tracing::warn!(
                        subject,
                        bytes = body.len(),
                        max,
                        "an answer is too large to send back"
                    );
                    (headers, body) = answer_too_large(body.len(), max);
                }
                if let Err(error) = nats.publish_with_headers(reply, headers, body).await {
                    tracing::warn!(%error, subject, "cannot answer a request");
                }
                // Sent before the process may exit; with NATS away the answer is lost
                // anyway, and a flush would wait for it to come back.
                let _ = tokio::time::timeout(DRAIN_WAIT, nats.flush()).await;
            });
        }
        if !draining {
            let _ = subscriber.unsubscribe().await;
        }
        let answered = tokio::time::timeout(ANSWERS_WAIT, async {
            while answering.join_next().await.is_some() {}
        })
        .await;
        if answered.is_err() {
            tracing::warn!(
                subject,
                unanswered = answering.len(),
                "stopping with requests unanswered"
            );
            answering.shutdown().await;
        }
    })
}

/// How long a stopping host waits for the requests delivered to it before it left its
/// queue group, and for each answer to reach NATS.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping host waits for the answers to the requests it took (a command
/// waits for its partition's owner at most its route timeout, 10 s by default).
const ANSWERS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes a header map takes in a NATS message, about: `name: value\r\n` per value.
fn headers_len(headers: &async_nats::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
        + 16
}

/// The answer sent instead of one too large to travel back: a 502 in the API's error
/// shape saying what happened and how to get the result.
fn answer_too_large(bytes: usize, max: usize) -> (async_nats::HeaderMap, Bytes) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Meridian-Status", "502");
    let body = serde_json::json!({"error": {
        "code": "answer_too_large",
        "message": format!(
            "the home region ran the request, but its answer ({bytes} bytes) is larger than one NATS message ({max} bytes) and cannot be sent back; send the same request (same command_id) to a host of the home region for the answer, or raise max_payload in nats-server's configuration"
        ),
    }});
    (headers, Bytes::from(body.to_string()))
}

/// Runs one forwarded request through the router. Answers the status, the region the
/// router passed the request on to (`None`: answered here) and the body.
async fn answer(
    router: axum::Router,
    message: async_nats::Message,
) -> (u16, Option<String>, Bytes) {
    use tower::ServiceExt;
    let headers = message.headers.unwrap_or_default();
    let method = headers
        .get("Meridian-Method")
        .map(|v| v.as_str().to_string())
        .unwrap_or_else(|| "POST".into());
    let path = headers
        .get("Meridian-Path")
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let mut request = axum::http::Request::builder()
        .method(method.as_str())
        .uri(path.as_str())
        .header("content-type", "application/json");
    for (name, values) in headers.iter() {
        let name = name.to_string();
        if name.starts_with("Meridian-") {
            continue;
        }
        for value in values {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    let request = match request.body(axum::body::Body::from(message.payload)) {
        Ok(r) => r,
        Err(error) => {
            return (
                400,
                None,
                Bytes::from(
                    serde_json::json!({"error": {"code": "bad_request", "message": error.to_string()}})
                        .to_string(),
                ),
            );
        }
    };
    let response = match router.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    // Region names are header-safe (checked at start), so this survives into NATS.
    let served_by = response
        .headers()
        .get(SERVED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    (status, served_by, body)
}

/// The directory key of an aggregate: `type.<base64url(id)>` (KV keys allow fewer
/// characters than aggregate ids).
fn home_key(key: &AggregateKey) -> String {
    format!(
        "{}.{}",
        key.aggregate_type,
        base64url(key.aggregate_id.as_bytes())
    )
}

/// Unpadded base64url, to keep a dependency out for twenty lines.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_without_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn subjects_escape_dots_in_ids() {
        assert_eq!(
            event_subject("east", "bank-account", "a.b:c"),
            "meridian.events.east.bank-account.a%2Eb:c"
        );
    }

    #[test]
    fn region_names_are_checked() {
        assert!(validate_region("eu-west_1").is_ok());
        assert!(validate_region("").is_err());
        assert!(validate_region("East").is_err());
        assert!(validate_region("a.b").is_err());
    }
}
