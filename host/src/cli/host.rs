//! `meridian host`: the server.
//!
//! Start-up runs in a fixed order so that failures are cheap and clear: bind the HTTP
//! port, connect to PostgreSQL and migrate, connect to NATS, then catch up (compile
//! every plugin) and only then report ready. SIGTERM (or Ctrl-C) stops taking new
//! requests, lets in-flight ones finish, and exits 0; a second signal exits at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cluster::{self, Cluster, ClusterConfig};
use crate::executor::{self, Executor, ExecutorConfig, PluginRegistry};
use crate::region::{self, RegionConfig, Regions};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::store::{self, Committer, CommitterConfig};

/// Arguments of `meridian host`. Every flag can also be set in the environment.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The region this host belongs to.
    #[arg(long, env = "MERIDIAN_REGION", default_value = "local")]
    pub region: String,
    /// This node's id, unique within the region (default: `<hostname>-<port>`).
    #[arg(long, env = "MERIDIAN_NODE_ID")]
    pub node_id: Option<String>,
    /// Address to serve HTTP on.
    #[arg(long, env = "MERIDIAN_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// PostgreSQL URL of the region's database.
    #[arg(long, env = "MERIDIAN_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// NATS URL of the region's NATS (JetStream enabled, NATS >= 2.10).
    #[arg(long, env = "MERIDIAN_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// A NATS credentials file (user JWT and nkey seed) for NATS servers that use
    /// decentralised authentication; a user and password or a token go in the URL.
    #[arg(long, env = "MERIDIAN_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// The other regions whose events this region receives (comma-separated). Each
    /// must be reachable through this region's NATS as a JetStream domain.
    #[arg(long, env = "MERIDIAN_PEER_REGIONS", value_delimiter = ',')]
    pub peer_regions: Vec<String>,
    /// The region whose JetStream domain holds the directory (homes of aggregates,
    /// plugin version numbers). Every region must name the same one.
    #[arg(long, env = "MERIDIAN_DIRECTORY_REGION")]
    pub directory_region: Option<String>,
    /// Copies JetStream keeps of each stream and bucket Meridian creates (its events,
    /// those received from other regions, the directory, plugin bytes): 3 on a NATS
    /// cluster of three or more servers, so one server lost loses nothing; 1 on a
    /// single server, which refuses more. Streams already made keep theirs (change
    /// them with `nats stream edit --replicas`).
    #[arg(long, env = "MERIDIAN_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
    /// Milliseconds a command forwarded to its home region may take.
    #[arg(long, env = "MERIDIAN_FORWARD_TIMEOUT_MS", default_value_t = 10_000)]
    pub forward_timeout_ms: u64,
    /// Database connections (each committer worker keeps one; the rest are shared).
    #[arg(long, env = "MERIDIAN_DB_CONNECTIONS", default_value_t = 16)]
    pub db_connections: u32,
    /// Append batches in flight at once.
    #[arg(long, env = "MERIDIAN_COMMIT_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub commit_workers: u32,
    /// While a batch is in flight, a smaller batch lingers (see `--commit-linger-ms`)
    /// for more appends before it commits; 1 turns lingering off.
    #[arg(long, env = "MERIDIAN_COMMIT_MIN_BATCH", default_value_t = 16)]
    pub commit_min_batch: usize,
    /// How long, at most, a small batch lingers.
    #[arg(long, env = "MERIDIAN_COMMIT_LINGER_MS", default_value_t = 2)]
    pub commit_linger_ms: u64,
    /// Milliseconds an append batch may wait for the database before its connection is
    /// given up for dead and its session ended; the batch is then sent once more on a
    /// fresh connection, and fails with 503 `store_unavailable` if that times out too.
    #[arg(long, env = "MERIDIAN_APPEND_TIMEOUT_MS", default_value_t = store::DEFAULT_BATCH_TIMEOUT.as_millis() as u64)]
    pub append_timeout_ms: u64,
    /// Milliseconds a read (loading an aggregate, a page of events, the tail, the plugin
    /// registry, a consumer group's position) may wait
    /// for the database before its connection is given up for dead; the read then
    /// fails (503 `store_unavailable` for a request) and the next one takes another
    /// connection.
    #[arg(long, env = "MERIDIAN_READ_TIMEOUT_MS", default_value_t = store::DEFAULT_READ_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout_ms: u64,
    /// Aggregate states cached in memory.
    #[arg(long, env = "MERIDIAN_CACHE_CAPACITY", default_value_t = executor::DEFAULT_CACHE_CAPACITY)]
    pub cache_capacity: usize,
    /// Bytes of aggregate states kept in memory: past them the least recently used
    /// states go, however few (a state may be as large as its plugin's output cap).
    #[arg(long, env = "MERIDIAN_CACHE_BYTES", default_value_t = executor::DEFAULT_CACHE_BYTES)]
    pub cache_bytes: usize,
    /// Snapshot an aggregate every N events (0: never).
    #[arg(long, env = "MERIDIAN_SNAPSHOT_EVERY", default_value_t = executor::DEFAULT_SNAPSHOT_EVERY)]
    pub snapshot_every: i64,
    /// Directory for compiled plugins, so restarts skip compilation.
    #[arg(long, env = "MERIDIAN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Largest command request body, in bytes.
    #[arg(long, env = "MERIDIAN_MAX_COMMAND_BYTES", default_value_t = api::DEFAULT_MAX_COMMAND_BYTES)]
    pub max_command_bytes: usize,
    /// Commands this host runs or forwards at once; past it, a command is answered 503
    /// `overloaded` with `Retry-After: 1` at once, with nothing written.
    #[arg(long, env = "MERIDIAN_MAX_COMMANDS_IN_FLIGHT",
          default_value_t = api::DEFAULT_MAX_COMMANDS_IN_FLIGHT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_commands_in_flight: u32,
    /// Live event streams (SSE) this host serves at once; past it a new stream is
    /// answered 503 `overloaded` with `Retry-After`.
    #[arg(long, env = "MERIDIAN_MAX_EVENT_STREAMS", default_value_t = api::DEFAULT_MAX_EVENT_STREAMS as u32)]
    pub max_event_streams: u32,
    /// Largest plugin upload accepted by this host, in bytes (per-type limits apply too).
    #[arg(long, env = "MERIDIAN_MAX_UPLOAD_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_upload_bytes: usize,
    /// How long the whole drain may take after SIGTERM, in seconds: handing partitions
    /// away, the grace below and finishing in-flight requests together. Past it the
    /// host exits with status 1, abandoning what is still in flight; give the
    /// orchestrator's kill timeout a few seconds more than this.
    #[arg(long, env = "MERIDIAN_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// After SIGTERM, how long the host goes on accepting requests (and passing
    /// commands to the partitions' new owners) from the moment `/readyz` turns 503, in
    /// milliseconds: a load balancer keeps sending new connections until its next
    /// probe, and closing the listener before then fails them. Set it to the time
    /// yours takes to stop (0 when clients connect directly).
    #[arg(long, env = "MERIDIAN_DRAIN_GRACE_MS", default_value_t = 3_000)]
    pub drain_grace_ms: u64,
    /// Virtual partitions of the region; fixed when the region first starts.
    #[arg(long, env = "MERIDIAN_PARTITIONS", default_value_t = cluster::core::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// The URL other hosts of the region reach this one at (default: http://<http-addr>).
    #[arg(long, env = "MERIDIAN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Milliseconds without a heartbeat after which a host is declared dead and its
    /// partitions move.
    #[arg(long, env = "MERIDIAN_DEAD_AFTER_MS", default_value_t = cluster::driver::DEFAULT_DEAD_AFTER.as_millis() as u64)]
    pub dead_after_ms: u64,
    /// Milliseconds between heartbeats (and reads of the membership).
    #[arg(long, env = "MERIDIAN_HEARTBEAT_MS", default_value_t = cluster::driver::DEFAULT_POLL_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,
    /// Bearer tokens, `token:scope[+scope]` separated by commas (scopes: read, write,
    /// admin). When set, every route but /healthz, /readyz and the status page (GET /)
    /// needs a token.
    #[arg(long, env = "MERIDIAN_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,
    /// A file of tokens, one `token scope [scope...]` per line (`#` comments).
    #[arg(long, env = "MERIDIAN_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Milliseconds between this host's reads of the region's commit order while
    /// idle, for live streams. Other hosts announce their commits (PostgreSQL
    /// `NOTIFY`), so this only bounds how late a commit whose announcement was lost
    /// reaches a stream here.
    #[arg(long, env = "MERIDIAN_TAIL_POLL_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tail_poll_ms: u64,
    /// Milliseconds between this host's checks for plugin versions and limits stored
    /// through other hosts. They announce them too; this bounds how long a lost
    /// announcement leaves the previous version running here.
    #[arg(long, env = "MERIDIAN_PLUGIN_REFRESH_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_refresh_ms: u64,
    /// Milliseconds an upload waits for every live host of the region to run the new
    /// version before it is answered anyway (the answer names the hosts that do not).
    #[arg(
        long,
        env = "MERIDIAN_PLUGIN_ROLLOUT_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub plugin_rollout_timeout_ms: u64,
    /// Milliseconds a command waits for its partition to get an owner before a 503.
    #[arg(long, env = "MERIDIAN_ROUTE_TIMEOUT_MS", default_value_t = cluster::driver::DEFAULT_ROUTE_TIMEOUT.as_millis() as u64)]
    pub route_timeout_ms: u64,
}

/// How the host authenticates to NATS: a user and password (`nats://user:password@…`)
/// or a token (`nats://token@…`) written in the URL, which the client does not take
/// from it by itself, and a credentials file (`MERIDIAN_NATS_CREDS`: a user JWT and
/// its nkey seed, as `nsc` writes them).
async fn nats_options(
    url: &str,
    creds: Option<&std::path::Path>,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut options = async_nats::ConnectOptions::new();
    for server in url.split(',') {
        let server: async_nats::ServerAddr = server.trim().parse().with_context(|| {
            format!(
                "MERIDIAN_NATS_URL {} is not a NATS URL",
                super::migrate::redact(url)
            )
        })?;
        if let Some(user) = server.username() {
            options = match server.password() {
                Some(password) => options.user_and_password(decode(user), decode(password)),
                None => options.token(decode(user)),
            };
            break;
        }
    }
    if let Some(path) = creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read the NATS credentials file {}", path.display()))?;
    }
    Ok(options)
}

/// Runs the host until it is told to stop.
pub async fn execute(args: HostArgs) -> anyhow::Result<()> {
    check_drain(args.drain_grace_ms, args.drain_timeout_secs)?;
    let mut token_text = args.tokens.clone().unwrap_or_default();
    if let Some(path) = &args.tokens_file {
        let file = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
        token_text.push('\n');
        token_text.push_str(&file);
    }
    let tokens =
        api::Tokens::parse(&token_text).map_err(|e| anyhow::anyhow!("invalid tokens: {e}"))?;
    // Given but empty (a secret not filled in yet, a template that rendered nothing),
    // the tokens would leave every route open without a word.
    let tokens_given =
        args.tokens_file.is_some() || args.tokens.as_deref().is_some_and(|t| !t.trim().is_empty());
    if tokens_given && !tokens.enabled() {
        anyhow::bail!(
            "MERIDIAN_TOKENS / MERIDIAN_TOKENS_FILE is set but holds no token, which would leave every route open: \
             add `<token>:<scopes>` entries, or unset both to run without authentication"
        );
    }
    if !tokens.enabled() {
        tracing::warn!(
            "authentication is off (no MERIDIAN_TOKENS or MERIDIAN_TOKENS_FILE): every route is open to whoever reaches this host"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.http_addr))?;
    let local_addr = listener.local_addr()?;
    // From the port bound, not the one asked for: hosts on one machine asked for port
    // 0 would all be `<hostname>-0`, and the second would find its id taken.
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| default_node_id(local_addr));

    store::set_read_timeout(std::time::Duration::from_millis(args.read_timeout_ms));
    let pool = super::migrate::connect_and_migrate(
        &args.database_url,
        args.db_connections.max(args.commit_workers + 2),
    )
    .await?;
    // Events restored from another server are invisible to every feed until renumbered.
    store::rekey::check(&pool).await?;
    if args.partitions == 0 {
        anyhow::bail!("--partitions must be at least 1");
    }
    if args.dead_after_ms <= args.heartbeat_ms {
        anyhow::bail!(
            "--dead-after-ms ({}) must be longer than --heartbeat-ms ({}): a host is declared \
             dead after that long without a heartbeat, so it would be declared dead between \
             two of its own (three heartbeats or more is usual)",
            args.dead_after_ms,
            args.heartbeat_ms
        );
    }
    cluster::driver::check_partitions(&pool, args.partitions).await?;

    region::validate_region(&args.region)?;
    let peers: Vec<String> = args
        .peer_regions
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty() && *p != args.region)
        .collect();
    for peer in &peers {
        region::validate_region(peer)?;
    }
    // Every new aggregate and every plugin version is settled in the directory: one
    // this region cannot reach (a typo, a template that rendered nothing) would make the
    // host ready and then refuse all of them.
    if let Some(directory) = &args.directory_region {
        region::validate_region(directory)?;
        if *directory != args.region && !peers.contains(directory) {
            anyhow::bail!(
                "--directory-region `{directory}` is neither this region (`{}`) nor one of --peer-regions ({}): name a region this one talks to",
                args.region,
                if peers.is_empty() {
                    "none".to_string()
                } else {
                    peers.join(", ")
                }
            );
        }
    }
    let nats = match &args.nats_url {
        Some(url) => Some(
            nats_options(url, args.nats_creds.as_deref())
                .await?
                .name(format!("meridian-{}-{node_id}", args.region))
                .connect(url)
                .await
                .with_context(|| {
                    format!("cannot connect to NATS at {}", super::migrate::redact(url))
                })?,
        ),
        None => {
            if !peers.is_empty() {
                anyhow::bail!("--peer-regions needs --nats-url (regions talk through NATS)");
            }
            None
        }
    };
    // Each event travels as one NATS message: the server's message size bounds them.
    let max_event_bytes = nats
        .as_ref()
        .map(|client| crate::region::relay::max_event_bytes(client.server_info().max_payload));
    // This host's writes, told to the region's other hosts and theirs to this one.
    let changes = store::Changes::new(node_id.clone());
    let changes_stop = CancellationToken::new();
    let changes_task = changes.spread(&pool, changes_stop.clone());
    let regions = Regions::new(
        RegionConfig {
            region: args.region.clone(),
            peers,
            directory: args
                .directory_region
                .clone()
                .unwrap_or_else(|| args.region.clone()),
            forward_timeout: Duration::from_millis(args.forward_timeout_ms),
            replicas: args.nats_replicas.into(),
        },
        pool.clone(),
        nats,
        changes.clone(),
    );

    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: args.cache_dir.clone(),
    })
    .context("starting the plugin runtime")?;
    let plugins = PluginRegistry::new(pool.clone(), runtime, changes.clone());
    let committer = Committer::start(
        pool.clone(),
        CommitterConfig {
            workers: args.commit_workers as usize,
            min_batch: args.commit_min_batch,
            linger: std::time::Duration::from_millis(args.commit_linger_ms),
            region: args.region.clone(),
            node_id: node_id.clone(),
            batch_timeout: std::time::Duration::from_millis(args.append_timeout_ms.max(1)),
            ..CommitterConfig::default()
        },
        changes.clone(),
    );
    let executor = Executor::new(
        pool.clone(),
        committer,
        plugins.clone(),
        ExecutorConfig {
            cache_capacity: args.cache_capacity,
            cache_bytes: args.cache_bytes,
            snapshot_every: args.snapshot_every,
            region: args.region.clone(),
            node_id: node_id.clone(),
            max_event_bytes,
        },
    );

    let shutdown = CancellationToken::new();
    // The driver outlives the HTTP drain, so it has its own token.
    let driver_stop = CancellationToken::new();
    let advertise = advertise_checked(&pool, &args, &node_id, local_addr).await?;
    let incarnation = claim_node_id(&pool, &node_id, &advertise, &args).await?;
    let cluster = Cluster::start(
        ClusterConfig {
            incarnation,
            node_id: node_id.clone(),
            address: advertise,
            partitions: args.partitions,
            dead_after: Duration::from_millis(args.dead_after_ms),
            poll_interval: Duration::from_millis(args.heartbeat_ms),
            route_timeout: Duration::from_millis(args.route_timeout_ms),
        },
        &pool,
        executor.clone(),
        driver_stop.clone(),
    );

    let metrics = install_metrics();
    let ready = Arc::new(AtomicBool::new(false));
    if tokens.enabled() {
        tracing::info!("authentication on: requests need a bearer token");
    }
    let state = AppState {
        tokens,
        metrics,
        cluster: cluster.clone(),
        executor: executor.clone(),
        pool: pool.clone(),
        ready: ready.clone(),
        node_id: node_id.as_str().into(),
        max_command_bytes: args.max_command_bytes,
        max_upload_bytes: args.max_upload_bytes,
        commands_in_flight: api::Admission::new(args.max_commands_in_flight as usize),
        event_streams: api::Admission::streams(args.max_event_streams as usize),
        draining: shutdown.clone(),
        plugin_rollout_timeout: Duration::from_millis(args.plugin_rollout_timeout_ms),
        regions: regions.clone(),
        tail: store::Tail::start(
            pool.clone(),
            store::TailConfig {
                poll: Duration::from_millis(args.tail_poll_ms),
                ..store::TailConfig::default()
            },
            changes.clone(),
        ),
    };
    spawn_signal_handler(shutdown.clone());

    // Serve at once (health, readiness) but report ready only after catching up.
    let rpc_router = api::router(state);
    let handlers = api::HandlersRunning::default();
    let app = handlers.count_in(api::for_clients(rpc_router.clone()));
    // The HTTP server keeps serving (and forwarding) while partitions are handed away.
    let server_shutdown = CancellationToken::new();
    let server_stop = server_shutdown.clone();
    // No Nagle: a live stream writes one small event at a time, and with Nagle each
    // write after the first waits for the client's delayed ACK (≈ 40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
            .await
    });
    tracing::info!(%local_addr, node_id, region = %args.region, "listening");

    // Catch up before taking work: every plugin compiled (and cached for restarts).
    // SIGTERM meanwhile stops it there: announced ready, the host would be given
    // partitions only to hand them back at once.
    let loaded = tokio::select! {
        loaded = plugins.refresh() => Some(loaded.context("loading plugins")?),
        _ = shutdown.cancelled() => None,
    };
    if let Some(loaded) = loaded {
        tracing::info!(plugins = loaded, "caught up");
        if args.cache_dir.is_some() {
            match store::plugins::stored_sha256s(&pool).await {
                Ok(keep) => {
                    let removed = plugins.runtime().prune_cache(&keep);
                    tracing::info!(
                        removed,
                        "compile cache pruned of components no stored version uses"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot list stored plugins; the compile cache is left as it is")
                }
            }
        }
        cluster.caught_up();
    }
    let mut phase = cluster.phase();
    tokio::select! {
        ready = phase.wait_for(|p| *p == cluster::core::Phase::Ready) => drop(ready),
        _ = shutdown.cancelled() => {}
        // Taken over while catching up (paused, or cut off, for longer than the
        // members' timeout): it would never be ready, and never leave.
        _ = cluster.superseded() => return Err(superseded(&node_id)),
    }
    ready.store(!shutdown.is_cancelled(), Ordering::Release);
    tracing::info!("ready");

    // Other regions' forwarded requests, and the relay (on whichever host leads it).
    let rpc_stop = CancellationToken::new();
    let rpc = regions.serve(rpc_router, rpc_stop.clone());
    let directory = regions.serve_directory(rpc_stop.clone());
    let history = crate::region::relay::serve_history(&regions, rpc_stop.clone());
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(region::relay::run(
        regions.clone(),
        pool.clone(),
        relay_stop.clone(),
    ));

    // Uploads through other hosts of the region take effect here as soon as they are
    // announced, or at the next tick when the announcement was lost.
    let refresher = {
        let plugins = plugins.clone();
        let shutdown = shutdown.clone();
        let changes = changes.clone();
        let every = Duration::from_millis(args.plugin_refresh_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut announced = Box::pin(changes.plugins());
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = announced.as_mut() => {}
                    _ = tick.tick() => {}
                }
                // Listening again before the refresh reads the registry: an
                // announcement is only heard by a listener already there, so one made
                // while a refresh ran (compiling a large component takes seconds) was
                // lost, and its version or limits waited for the next tick.
                announced.set(changes.plugins());
                announced.as_mut().enable();
                if let Err(error) = plugins.refresh().await {
                    tracing::warn!(%error, "plugin refresh failed");
                }
            }
        })
    };

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = cluster.superseded() => {
            ready.store(false, Ordering::Release);
            return Err(superseded(&node_id));
        }
    }
    ready.store(false, Ordering::Release);
    let unready_at = tokio::time::Instant::now();
    // Requests forwarded from other regions go to this region's other hosts now.
    rpc_stop.cancel();
    tracing::info!("draining: handing partitions to other hosts");
    cluster.drain();
    // One budget for the whole drain, not one per phase: an orchestrator kills the
    // process a fixed time after SIGTERM, and a hand-over that used up the budget must
    // not leave the requests in flight a second one it does not have.
    let deadline = unready_at + Duration::from_secs(args.drain_timeout_secs);
    // `wait_for` returns a read guard on the phase; holding it would block the
    // driver's next phase update, so only whether it happened is kept.
    let handed_over = tokio::time::timeout_at(
        deadline,
        phase.wait_for(|p| *p == cluster::core::Phase::Exited),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if handed_over {
        // Out of the membership now: the process may end before the driver's next
        // turn. A database gone silent must not hold the drain past its budget: the
        // member row expires by itself.
        if tokio::time::timeout_at(deadline, cluster.leave_if_exited())
            .await
            .is_err()
        {
            tracing::warn!(
                "drain timed out leaving the membership; this host's row expires by itself"
            );
        }
    } else {
        tracing::warn!(
            "drain timed out with partitions still held; they move when this host's heartbeat expires"
        );
    }
    let grace_ends = (unready_at + Duration::from_millis(args.drain_grace_ms)).min(deadline);
    if tokio::time::Instant::now() < grace_ends {
        tracing::info!(
            grace_ms = args.drain_grace_ms,
            "still accepting requests until load balancers have seen /readyz fail"
        );
        tokio::time::sleep_until(grace_ends).await;
    }
    // The driver keeps routing (observing leases) until the listener has closed.
    server_stop.cancel();
    let drained = tokio::time::timeout_at(deadline, finish_serving(server, &handlers)).await;
    driver_stop.cancel();
    refresher.abort();
    relay_stop.cancel();
    for task in [rpc, directory, history].into_iter().flatten() {
        let _ = task.await;
    }
    let _ = relay.await;
    changes_stop.cancel();
    let _ = changes_task.await;
    match drained {
        Ok(Ok(Ok(()))) => tracing::info!("stopped"),
        Ok(Ok(Err(error))) => return Err(error).context("HTTP server"),
        Ok(Err(error)) => return Err(error).context("HTTP server task"),
        // Not a clean stop: a supervisor must be able to tell, and the clients cut off
        // may not know whether their commands ran (a retry with the same command id
        // finds out).
        Err(_) => anyhow::bail!(
            "drain timed out after {} s (MERIDIAN_DRAIN_TIMEOUT_SECS) with requests in flight; they were abandoned",
            args.drain_timeout_secs
        ),
    }
    Ok(())
}

/// How long a draining host, once no handler runs, waits for the responses still being
/// written before it closes their connections.
const UNREAD_RESPONSES_AFTER: Duration = Duration::from_secs(5);

/// Waits for the server to finish what it accepted once told to stop. A live stream
/// ends at the drain's start, but its last bytes, like any response, are written only
/// as fast as the client reads them: a client that stopped reading (paused, or its
/// machine gone without closing the connection) holds its connection open for good,
/// and the server would wait for it until the drain timeout, then exit 1 for every
/// rolling restart. So once no handler has run for [`UNREAD_RESPONSES_AFTER`], the
/// connections left are closed: each one's request was answered, and only the writing
/// of the answer is cut (a read to repeat, a stream to resume elsewhere).
async fn finish_serving(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
    handlers: &api::HandlersRunning,
) -> Result<std::io::Result<()>, tokio::task::JoinError> {
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let mut idle_since = None;
    loop {
        tokio::select! {
            done = &mut server => return done,
            _ = check.tick() => {}
        }
        if handlers.count() > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= UNREAD_RESPONSES_AFTER {
            tracing::warn!(
                "closing connections whose clients stopped reading their answers (live streams, most likely)"
            );
            server.abort();
            return Ok(Ok(()));
        }
    }
}

/// Installs the Prometheus recorder behind `/metrics`. Latencies get explicit buckets
/// (milliseconds to seconds) so they render as histograms, not summaries.
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    const BUCKETS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("meridian_append_batch_size".into()),
            SIZES,
        )
        .and_then(|b| b.set_buckets(BUCKETS));
    match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(%error, "metrics disabled");
            None
        }
    }
}

/// Takes the node id for this process, waiting out a live member row of another one:
/// this host's own predecessor, killed a moment ago, stops heartbeating within
/// `dead_after`; a row still heartbeating after twice that belongs to another process
/// given the same node id, and this one refuses to start.
async fn claim_node_id(
    pool: &sqlx::PgPool,
    node_id: &str,
    advertise: &str,
    args: &HostArgs,
) -> anyhow::Result<uuid::Uuid> {
    let incarnation = uuid::Uuid::new_v4();
    let dead_after = Duration::from_millis(args.dead_after_ms);
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match store::cluster::claim(pool, node_id, incarnation, dead_after).await? {
            store::cluster::Claim::Claimed => return Ok(incarnation),
            store::cluster::Claim::HeldBy { address } => {
                if started.elapsed() > dead_after * 2 {
                    anyhow::bail!(
                        "another process runs as node {node_id} (its heartbeats are current; it \
                         advertises {address}, this one {advertise}): give each host its own \
                         --node-id (MERIDIAN_NODE_ID), or stop the other one first"
                    );
                }
                if !said {
                    tracing::info!(
                        node_id,
                        other = %address,
                        "waiting for the last process that ran as this node to stop heartbeating"
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(args.heartbeat_ms).min(dead_after)).await;
            }
        }
    }
}

/// [`advertise_url`], checked against the region: a host listening on every interface
/// without an advertise URL may run alone (nobody forwards to it), but joins no region
/// with other hosts; and no host joins a region where a live host advertises an address
/// no one can reach — commands routed there would come back to their sender.
async fn advertise_checked(
    pool: &sqlx::PgPool,
    args: &HostArgs,
    node_id: &str,
    listening: SocketAddr,
) -> anyhow::Result<String> {
    let dead_after = Duration::from_millis(args.dead_after_ms);
    let others: Vec<(String, String)> = store::cluster::live_addresses(pool, dead_after)
        .await?
        .into_iter()
        .filter(|(id, _)| id != node_id)
        .collect();
    let url = match advertise_url(args.advertise_url.as_deref(), listening) {
        Err(error) if args.advertise_url.is_none() && others.is_empty() => {
            tracing::warn!(
                %error,
                "running alone with an address other hosts cannot reach; set --advertise-url before adding hosts to this region"
            );
            format!("http://{listening}")
        }
        other => other?,
    };
    if let Some((id, address)) = others
        .iter()
        .find(|(_, address)| unreachable_address(address))
    {
        anyhow::bail!(
            "host {id} of this region advertises {address}, which no other host can reach \
             (it listens on every interface and has no advertise URL): set \
             --advertise-url (MERIDIAN_ADVERTISE_URL) on it to its address as the other \
             hosts see it and restart it, then start this one"
        );
    }
    Ok(url)
}

/// Whether an advertised URL names no host: 0.0.0.0 or [::].
fn unreachable_address(url: &str) -> bool {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|url| ip_of(&url))
        .is_some_and(|ip| ip.is_unspecified())
}

/// The IP address a URL names as its host, if it names one rather than a host name.
fn ip_of(url: &reqwest::Url) -> Option<std::net::IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(ip.into()),
        url::Host::Ipv6(ip) => Some(ip.into()),
        url::Host::Domain(_) => None,
    }
}

/// The URL other hosts of the region forward commands to: the one configured, or the
/// listening address. Not an unspecified one (0.0.0.0 or [::]): another host connecting
/// there reaches itself, so every forward would come back to its sender.
fn advertise_url(configured: Option<&str>, listening: SocketAddr) -> anyhow::Result<String> {
    let url = match configured {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if listening.ip().is_unspecified() => anyhow::bail!(
            "listening on {listening} (every interface), which other hosts cannot reach \
             this one at: set --advertise-url (MERIDIAN_ADVERTISE_URL) to this host's \
             address as other hosts of the region see it, e.g. http://10.0.0.5:{}",
            listening.port()
        ),
        None => format!("http://{listening}"),
    };
    let parsed = reqwest::Url::parse(&url).map_err(|e| {
        anyhow::anyhow!("--advertise-url `{url}` is not a URL ({e}); e.g. http://10.0.0.5:8080")
    })?;
    let host = parsed.host_str().unwrap_or_default();
    if !matches!(parsed.scheme(), "http" | "https") || host.is_empty() {
        anyhow::bail!(
            "--advertise-url `{url}` must be an http(s) URL with a host, e.g. http://10.0.0.5:8080"
        );
    }
    let ip = ip_of(&parsed);
    if ip.is_some_and(|ip| ip.is_unspecified()) {
        anyhow::bail!(
            "--advertise-url `{url}` names no host (every interface): other hosts connecting \
             there reach themselves; give this host's address as they see it"
        );
    }
    if ip.is_some_and(|ip| ip.is_loopback()) {
        tracing::info!(
            advertise = %url,
            "other hosts reach this one at a loopback address: only hosts on this machine can join its region"
        );
    }
    Ok(url)
}

fn default_node_id(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    format!("{host}-{}", addr.port())
}

/// First SIGTERM/SIGINT starts the drain; a second one exits immediately.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown signal received");
        shutdown.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// Refuses a drain grace that takes the whole drain budget: the grace is part of it, so
/// the server would be given no time at all to finish the requests it accepted, and
/// every drain would end in abandoned requests and exit 1.
fn check_drain(grace_ms: u64, timeout_secs: u64) -> anyhow::Result<()> {
    if grace_ms >= timeout_secs.saturating_mul(1000) {
        anyhow::bail!(
            "MERIDIAN_DRAIN_GRACE_MS ({grace_ms} ms) must be below MERIDIAN_DRAIN_TIMEOUT_SECS ({timeout_secs} s): the grace is part of the drain's budget, which would leave no time to finish in-flight requests; raise the timeout to the grace plus the longest command you expect (15 s or more)"
        );
    }
    Ok(())
}

/// Why a host stops when another process took its node id over: draining would hand
/// over, and leaving would remove, what is now the other process's. It fails, so that
/// a supervisor restarting it with the same id hears about it.
fn superseded(node_id: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "another process took node id {node_id} over while this one was out of touch with the database (paused or cut off for longer than MERIDIAN_DEAD_AFTER_MS); this one stops, taking no further part in the region. Give every host its own MERIDIAN_NODE_ID"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another host connecting to 0.0.0.0 or [::] reaches itself: such an address is
    /// refused, naming the setting to change, whether it is the listening address or
    /// the configured one.
    #[test]
    fn a_drain_grace_must_leave_the_drain_time() {
        assert!(check_drain(3_000, 30).is_ok());
        assert!(check_drain(0, 5).is_ok());
        for (grace_ms, timeout_secs) in [(30_000, 30), (45_000, 30), (1, 0)] {
            let error = check_drain(grace_ms, timeout_secs).unwrap_err().to_string();
            assert!(
                error.contains("MERIDIAN_DRAIN_GRACE_MS")
                    && error.contains("MERIDIAN_DRAIN_TIMEOUT_SECS"),
                "{error}"
            );
        }
    }

    #[test]
    fn an_unreachable_advertise_url_is_refused() {
        let every: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let error = advertise_url(None, every).unwrap_err().to_string();
        assert!(error.contains("--advertise-url"), "{error}");
        let every6: SocketAddr = "[::]:8080".parse().unwrap();
        assert!(advertise_url(None, every6).is_err());
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(advertise_url(None, local).unwrap(), "http://127.0.0.1:8080");
        for bad in [
            "http://0.0.0.0:8080",
            "http://[::]:8080",
            "10.0.0.5:8080",
            "ftp://a:1",
        ] {
            assert!(advertise_url(Some(bad), every).is_err(), "{bad}");
        }
        assert_eq!(
            advertise_url(Some("http://10.0.0.5:8080/"), every).unwrap(),
            "http://10.0.0.5:8080"
        );
        assert_eq!(
            advertise_url(Some("https://meridian-1.internal"), every).unwrap(),
            "https://meridian-1.internal"
        );
        assert!(unreachable_address("http://0.0.0.0:8080"));
        assert!(unreachable_address("http://[::]:8080"));
        assert!(!unreachable_address("http://10.0.0.5:8080"));
        assert!(!unreachable_address("http://[::1]:8080"));
    }
}
