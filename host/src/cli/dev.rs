//! `meridian dev`: the whole platform on this machine — by default two regions, `east`
//! and `west` — for trying Meridian out and for developing plugins against real hosts.
//!
//! Start-up runs in dependency order: PostgreSQL with one database per region and the
//! schema in each, one nats-server per region (each its own JetStream domain; the first
//! region is the hub the others connect to as leafnodes), the hosts, and the example
//! plugin, uploaded once in the first region and waited for in the others (it reaches
//! them through the directory and the relay, as in production). The banner is printed
//! only when all of it works. Whatever was started is stopped again when start-up fails
//! half-way and on Ctrl-C/SIGTERM: hosts first, so they drain while their database and
//! NATS are still there, then the nats-servers, then PostgreSQL, then the directory.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use super::migrate::redact;
use crate::region;

/// `eprintln!` that cannot fail. What `dev` says goes to a terminal or a pipe (`| tee`)
/// that may be gone by the time it stops — Ctrl-C reaches `tee` too, and closing the
/// terminal is a way to stop it — and `eprintln!` panics then, which would skip the
/// cleanup: hosts killed undrained, PostgreSQL killed, the data directory left.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The aggregate type the example plugin is uploaded as.
const PLUGIN_TYPE: &str = "bank-account";
const HOST_READY_TIMEOUT: Duration = Duration::from_secs(60);
const POSTGRES_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a nats-server gets to report healthy, and the leafnode links to come up.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the plugin uploaded in the first region may take to reach the others.
const PLUGIN_SPREAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long hosts (then the nats-servers, then PostgreSQL) get to stop before they are
/// killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The oldest nats-server with the JetStream features regions use (domains over
/// leafnodes, KV `create`, stream sources across domains).
const MIN_NATS_VERSION: (u32, u32) = (2, 10);
/// Lines of a log shown when something fails to start.
const LOG_TAIL_LINES: usize = 25;
/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What `meridian dev` does. A macro, not a doc comment, because the subcommand's
/// one-line doc in `Commands` replaces a struct's doc comment in `--help`; this text is
/// both `DevArgs`' documentation and the long help's closing section.
macro_rules! dev_help {
    () => {
        concat!(
            "Runs the whole Meridian platform on this machine, by default two regions (east\n",
            "with two hosts, west with one), then stops it all on Ctrl-C.\n",
            "\n",
            "What it does, in order:\n",
            "\n",
            "1. PostgreSQL, one database per region. With --database-url, that server is\n",
            "   used: one region uses the database named in the URL, several use that name\n",
            "   with `_<region>` appended (meridian_dev_east, meridian_dev_west), created if\n",
            "   missing. Without it, a private cluster is made with this machine's PostgreSQL\n",
            "   server binaries (initdb and postgres from PATH, or the newest\n",
            "   /usr/lib/postgresql/*/bin; on Debian: apt-get install postgresql), listening\n",
            "   on a free port of 127.0.0.1 with trust authentication, holding databases\n",
            "   meridian_<region>. As root it runs as the postgres user, because PostgreSQL\n",
            "   refuses to run as root.\n",
            "\n",
            "2. With two or more regions, one nats-server (>= 2.10) per region on free ports of\n",
            "   127.0.0.1, each its own JetStream domain named after the region; the first\n",
            "   region is the hub and every other one connects to it as a leafnode. The\n",
            "   binary is --nats-server-bin, else .tools/bin/nats-server of the repository\n",
            "   (`bash scripts/install-deps.sh` puts the pinned 2.15.1 there), else nats-server\n",
            "   on PATH. With --nats-url, those servers are used instead (deploy/nats/ shows\n",
            "   how to configure them). One region runs without NATS.\n",
            "\n",
            "3. `meridian host` processes (--hosts per region; node ids <region>-1, -2, ...),\n",
            "   serving HTTP on 127.0.0.1 from --port upwards (a port in use is replaced by a\n",
            "   free one, and the output says so), each with its own plugin cache and log file\n",
            "   in the data directory. The first region holds the directory (homes and plugin\n",
            "   versions). Waits up to 60 s for each to answer 200 on /readyz.\n",
            "\n",
            "4. Uploads the example plugin (--plugin) as aggregate type bank-account in the\n",
            "   first region and waits until every other region lists it.\n",
            "\n",
            "5. Prints the host URLs per region, the admin token, where the logs and data are,\n",
            "   and commands to try (one sends a command to west for an account created in\n",
            "   east: west forwards it to east, the account's home).\n",
            "\n",
            "Ctrl-C or SIGTERM stops the hosts one at a time (SIGTERM, killed after 10 s),\n",
            "then the nats-servers, then PostgreSQL, and removes the temporary directory\n",
            "unless --keep is given. The same happens when start-up fails half-way. A second\n",
            "Ctrl-C kills what is left.\n",
        )
    };
}

#[doc = dev_help!()]
#[derive(Debug, clap::Args)]
#[command(after_long_help = dev_help!())]
pub struct DevArgs {
    /// The regions, comma-separated. The first is the NATS hub and holds the directory;
    /// a single region runs without NATS.
    #[arg(long, value_delimiter = ',', default_value = "east,west")]
    pub regions: Vec<String>,
    /// Hosts per region, comma-separated in the order of --regions; the last number
    /// also counts for the regions after it. Default: 2 in the first region, 1 in each
    /// of the others.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub hosts: Vec<u16>,
    /// HTTP port of the first host; the others use the next ones, region after region
    /// (0: any free ports).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// PostgreSQL URL to use instead of a private cluster, e.g.
    /// `postgres://postgres@127.0.0.1:5432/meridian_dev`. With several regions each
    /// gets `<database>_<region>`; databases are created if missing. (Not read from
    /// `MERIDIAN_DATABASE_URL`: that names a host's own database, perhaps a production
    /// one, which a demo must never migrate and fill.)
    #[arg(long, env = "MERIDIAN_DEV_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS URLs to use instead of starting nats-servers, one per region in the order
    /// of --regions (comma-separated). Each must be a JetStream domain named after its
    /// region, linked to the others (see deploy/nats/).
    #[arg(long, value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// The nats-server binary (NATS >= 2.10). Default: .tools/bin/nats-server of the
    /// repository (installed by `bash scripts/install-deps.sh`), else nats-server on PATH.
    #[arg(long, env = "MERIDIAN_NATS_SERVER_BIN")]
    pub nats_server_bin: Option<PathBuf>,
    /// The example plugin's component (build it with `bash plugins/build.sh`).
    #[arg(long, default_value = "target/wasm32-wasip2/release/bank_account.wasm")]
    pub plugin: PathBuf,
    /// Directory for logs, plugin caches, NATS and the private cluster, instead of a
    /// new temporary one. It is kept on exit, and data already in it is reused.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the temporary directory on exit (logs, data) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the regions until Ctrl-C or SIGTERM, then stops everything it started.
pub async fn execute(args: DevArgs) -> anyhow::Result<()> {
    // Installed first: from here on a signal is ours to handle, never a silent exit that
    // would leave PostgreSQL, NATS and the hosts behind.
    let mut stop = StopSignals::install()?;

    // Everything that can be checked without starting anything is checked first: a
    // missing binary or build is the commonest failure, and its message says what to
    // install.
    let plan = Plan::resolve(&args)?;
    let plugin = std::fs::read(&args.plugin).with_context(|| {
        format!(
            "cannot read the example plugin at {}; build it with `bash plugins/build.sh` \
             (from the repository root) or pass --plugin",
            args.plugin.display()
        )
    })?;

    let work = WorkDir::create(args.data_dir.as_deref())?;
    let mut cluster = Cluster {
        work,
        postgres: None,
        nats: Vec::new(),
        hosts: Vec::new(),
    };
    let started = tokio::select! {
        started = cluster.start(&args, &plan, plugin) => started,
        signal = stop.recv() => Err(anyhow!("{signal} received while starting")),
    };
    match started {
        Ok(summary) => {
            cluster.print_banner(&summary);
            let signal = stop.recv().await;
            say!("\n{signal} received: stopping everything (again to kill it at once)");
            shut_down(&mut cluster, &mut stop, args.keep).await;
            Ok(())
        }
        Err(error) => {
            say!("start-up failed; stopping what was started");
            shut_down(&mut cluster, &mut stop, args.keep).await;
            Err(error)
        }
    }
}

/// Stops everything in order and removes the temporary directory. A second signal
/// meanwhile kills what is still running instead of waiting for it.
async fn shut_down(cluster: &mut Cluster, stop: &mut StopSignals, keep: bool) {
    let hurried = tokio::select! {
        () = cluster.stop() => false,
        signal = stop.recv() => {
            say!("{signal} again: killing what is still running");
            true
        }
    };
    if hurried {
        cluster.kill().await;
    }
    cluster.work.remove_unless(keep);
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT, all meaning "stop everything". SIGHUP comes
/// when the terminal closes (a tab, an SSH session dropped): the hosts, nats-servers and
/// PostgreSQL run in process groups of their own and get no signal from the terminal,
/// so left unhandled it would end this process alone and leave them all running.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    quit: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            quit: signal(SignalKind::quit()).context("cannot handle SIGQUIT")?,
        })
    }

    /// Waits for the next signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP (the terminal closed)",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

/// The arguments checked and resolved before anything starts.
#[derive(Debug)]
struct Plan {
    /// Region names with their host counts; the first is the hub and the directory.
    regions: Vec<(String, u16)>,
    nats: NatsPlan,
    /// Where `initdb` and `postgres` are, when a private cluster is to be made.
    postgres_bin: Option<PathBuf>,
}

/// Where the regions' NATS comes from.
#[derive(Debug)]
enum NatsPlan {
    /// A single region needs none: there is nobody to forward to or relay with.
    None,
    /// The user's servers, one URL per region.
    Given(Vec<String>),
    /// One nats-server per region, started from this binary.
    Start(PathBuf),
}

impl Plan {
    fn resolve(args: &DevArgs) -> anyhow::Result<Self> {
        let names: Vec<String> = args.regions.iter().map(|r| r.trim().to_string()).collect();
        if names.is_empty() {
            bail!("--regions names no region");
        }
        for (i, name) in names.iter().enumerate() {
            region::validate_region(name)?;
            if names[..i].contains(name) {
                bail!("--regions names `{name}` twice");
            }
        }
        // The default fits however many regions are named; counts given must.
        let hosts = if args.hosts.is_empty() {
            vec![2, 1]
        } else if args.hosts.len() > names.len() {
            bail!(
                "--hosts gives {} counts for {} regions",
                args.hosts.len(),
                names.len()
            );
        } else {
            args.hosts.clone()
        };
        let last = *hosts.last().context("--hosts gives no count")?;
        let regions: Vec<(String, u16)> = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name, hosts.get(i).copied().unwrap_or(last)))
            .collect();

        let nats = if !args.nats_url.is_empty() {
            if args.nats_url.len() != regions.len() {
                bail!(
                    "--nats-url gives {} URLs for {} regions; give one per region, in the \
                     order of --regions",
                    args.nats_url.len(),
                    regions.len()
                );
            }
            NatsPlan::Given(args.nats_url.clone())
        } else if regions.len() == 1 {
            NatsPlan::None
        } else {
            NatsPlan::Start(find_nats_server(args.nats_server_bin.as_deref())?)
        };
        let postgres_bin = match args.database_url {
            Some(_) => None,
            None => Some(find_postgres_bin()?),
        };
        Ok(Self {
            regions,
            nats,
            postgres_bin,
        })
    }

    /// The region that is the NATS hub and holds the directory.
    fn first(&self) -> &str {
        &self.regions[0].0
    }

    fn total_hosts(&self) -> u16 {
        self.regions.iter().map(|(_, hosts)| hosts).sum()
    }
}

/// What one region's hosts are started with.
#[derive(Debug)]
struct RegionEnv {
    name: String,
    database_url: String,
    nats_url: Option<String>,
    /// Every other region: this one receives their events.
    peers: Vec<String>,
    /// The region holding the directory, the same for all.
    directory: String,
}

/// One `meridian host` process of a region.
#[derive(Debug)]
struct HostSpec {
    region: String,
    node_id: String,
    addr: SocketAddr,
    /// The port it was meant to have, when `addr` had to use another.
    displaced_from: Option<u16>,
    cache_dir: PathBuf,
    log: PathBuf,
}

impl HostSpec {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Plans every region's hosts, `<region>-1..n`, on ports `first_port`, `first_port + 1`,
/// ... region after region, so that the first host keeps the port the README names.
fn plan_hosts(plan: &Plan, first_port: u16, work: &Path) -> anyhow::Result<Vec<HostSpec>> {
    let mut ports = pick_ports(first_port, usize::from(plan.total_hosts()))?.into_iter();
    let mut hosts = Vec::new();
    for (region, count) in &plan.regions {
        for i in 1..=*count {
            let (port, preferred) = ports.next().expect("a port per host");
            let node_id = format!("{region}-{i}");
            hosts.push(HostSpec {
                region: region.clone(),
                addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                displaced_from: preferred.filter(|p| *p != port),
                cache_dir: work.join("cache").join(region).join(&node_id),
                log: work
                    .join("logs")
                    .join(region)
                    .join(format!("{node_id}.log")),
                node_id,
            });
        }
    }
    Ok(hosts)
}

/// Where the logs, plugin caches, NATS data and private cluster live.
struct WorkDir {
    path: PathBuf,
    /// Created by us for this run, so ours to remove.
    temporary: bool,
}

impl WorkDir {
    fn create(data_dir: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // Absolute, as the children get these paths and the banner prints them.
            let path = std::fs::canonicalize(dir)
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            return Ok(Self {
                path,
                temporary: false,
            });
        }
        let base = std::env::temp_dir().join(format!("meridian-dev-{}", std::process::id()));
        // `create_dir` (not `_all`) fails on an existing directory, so a leftover of an
        // earlier run with the same pid is never reused or removed by this one.
        for attempt in 0..100 {
            let path = if attempt == 0 {
                base.clone()
            } else {
                PathBuf::from(format!("{}-{attempt}", base.display()))
            };
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(Self {
                        path,
                        temporary: true,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        bail!(
            "cannot create a temporary directory next to {}",
            base.display()
        )
    }
}

/// The private PostgreSQL cluster.
struct PrivatePostgres {
    child: Child,
    port: u16,
    log: PathBuf,
    data: PathBuf,
}

impl PrivatePostgres {
    /// The URL of one of its databases (trust authentication: no password).
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// A started nats-server: one region's NATS.
struct RunningNats {
    region: String,
    /// What clients (the hosts) connect to.
    url: String,
    /// The monitoring endpoint (`/healthz`, `/leafz`).
    monitor: String,
    /// Where the hub listens for the other regions' leafnode connections.
    leaf_port: Option<u16>,
    log: PathBuf,
    child: Child,
}

/// A started `meridian host`.
struct RunningHost {
    spec: HostSpec,
    child: Child,
}

/// Everything started so far, so that it can all be stopped, however far start-up got.
struct Cluster {
    work: WorkDir,
    postgres: Option<PrivatePostgres>,
    /// In start order: the hub first.
    nats: Vec<RunningNats>,
    /// In start order: region after region.
    hosts: Vec<RunningHost>,
}

/// What the banner reports.
struct Summary {
    regions: Vec<RegionEnv>,
    plugin_version: String,
    /// The admin token the hosts were started with (authentication is on).
    admin_token: String,
}

impl Cluster {
    async fn start(
        &mut self,
        args: &DevArgs,
        plan: &Plan,
        plugin: Vec<u8>,
    ) -> anyhow::Result<Summary> {
        // Authentication is on, as in production; one token with every scope, accepted
        // by every region (a forwarded command is authenticated again at home).
        let admin_token = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let several = plan.regions.len() > 1;
        let database_urls: Vec<String> = match (&args.database_url, &plan.postgres_bin) {
            (Some(url), _) => {
                say!("using PostgreSQL at {}", redact(url));
                plan.regions
                    .iter()
                    .map(|(region, _)| {
                        if several {
                            region_database_url(url, region)
                        } else {
                            Ok(url.clone())
                        }
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            (None, bin) => {
                let bin = bin.as_deref().expect("resolved without --database-url");
                self.postgres =
                    Some(spawn_private_postgres(bin, &self.work.path, plan.total_hosts()).await?);
                let postgres = self.postgres.as_mut().expect("just set");
                wait_for_postgres(postgres).await?;
                plan.regions
                    .iter()
                    .map(|(region, _)| postgres.url(&format!("meridian_{region}")))
                    .collect()
            }
        };
        for url in &database_urls {
            ensure_database(url).await?;
            // Migrating here, once per region, gives a clear error before any host
            // starts, instead of every host racing to migrate and failing alike.
            super::migrate::connect_and_migrate(url, 2)
                .await?
                .close()
                .await;
        }

        let nats_urls: Vec<Option<String>> = match &plan.nats {
            NatsPlan::None => vec![None; plan.regions.len()],
            NatsPlan::Given(urls) => urls.iter().cloned().map(Some).collect(),
            NatsPlan::Start(bin) => {
                self.start_nats(bin, plan).await?;
                self.nats.iter().map(|n| Some(n.url.clone())).collect()
            }
        };

        let names: Vec<&String> = plan.regions.iter().map(|(name, _)| name).collect();
        let regions: Vec<RegionEnv> = names
            .iter()
            .zip(database_urls)
            .zip(nats_urls)
            .map(|((name, database_url), nats_url)| RegionEnv {
                name: name.to_string(),
                database_url,
                nats_url,
                peers: names
                    .iter()
                    .filter(|other| *other != name)
                    .map(|other| other.to_string())
                    .collect(),
                directory: plan.first().to_string(),
            })
            .collect();

        let specs = plan_hosts(plan, args.port, &self.work.path)?;
        for host in &specs {
            if let Some(port) = host.displaced_from {
                say!(
                    "port {port} is in use; {} serves on {} instead",
                    host.node_id,
                    host.addr
                );
            }
        }
        for spec in specs {
            let env = regions
                .iter()
                .find(|r| r.name == spec.region)
                .expect("every host's region is planned");
            let child = spawn_host(&spec, env, &admin_token)?;
            say!(
                "started {} on {} (log: {})",
                spec.node_id,
                spec.url(),
                spec.log.display()
            );
            self.hosts.push(RunningHost { spec, child });
        }
        // One deadline for all: they start in parallel, so waiting for them in turn
        // costs nothing.
        let deadline = Instant::now() + HOST_READY_TIMEOUT;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        for host in &mut self.hosts {
            wait_for_host(&http, host, deadline).await?;
        }

        // Uploaded once, where the directory is: the other regions import it like any
        // production region would, and "ready" means they have.
        let first = &self.hosts[0].spec;
        let plugin_version =
            upload_plugin(&first.url(), &args.plugin, plugin, &admin_token).await?;
        let deadline = Instant::now() + PLUGIN_SPREAD_TIMEOUT;
        for region in regions.iter().skip(1) {
            let host = self
                .hosts
                .iter_mut()
                .find(|h| h.spec.region == region.name)
                .expect("every region has a host");
            say!("waiting for {} to import the plugin", region.name);
            wait_for_plugin(&http, host, &plugin_version, &admin_token, deadline).await?;
        }
        Ok(Summary {
            admin_token,
            regions,
            plugin_version,
        })
    }

    /// Starts one nats-server per region, the hub first, and waits until each is healthy
    /// and every leaf has connected to the hub.
    async fn start_nats(&mut self, bin: &Path, plan: &Plan) -> anyhow::Result<()> {
        say!("starting nats-server ({})", bin.display());
        for (region, _) in &plan.regions {
            let hub_leaf_port = self.nats.first().and_then(|hub| hub.leaf_port);
            let server = spawn_nats(bin, &self.work.path, region, hub_leaf_port).await?;
            self.nats.push(server);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        for server in &mut self.nats {
            wait_for_nats(&http, server, deadline).await?;
        }
        let (hub, leaves) = self.nats.split_first_mut().expect("two regions or more");
        wait_for_leafnodes(&http, hub, leaves, deadline).await
    }

    fn print_banner(&self, summary: &Summary) {
        let width = self
            .hosts
            .iter()
            .map(|h| h.spec.node_id.len())
            .chain([8]) // "postgres"
            .max()
            .unwrap_or(0);
        let regions = summary
            .regions
            .iter()
            .map(|region| {
                let hosts = self
                    .hosts
                    .iter()
                    .filter(|h| h.spec.region == region.name)
                    .count();
                let s = if hosts == 1 { "" } else { "s" };
                format!("{} ({hosts} host{s})", region.name)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = String::new();
        out.push_str(&format!(
            "\nMeridian dev is ready: {regions}; plugin {PLUGIN_TYPE} version {}\n",
            summary.plugin_version
        ));
        let several = summary.regions.len() > 1;
        for (i, region) in summary.regions.iter().enumerate() {
            let role = match (several, i) {
                (false, _) => String::new(),
                (true, 0) => " (NATS hub; holds the directory)".to_string(),
                (true, _) => format!(" (NATS leafnode of {})", summary.regions[0].name),
            };
            out.push_str(&format!("\nregion {}{role}\n", region.name));
            for host in self.hosts.iter().filter(|h| h.spec.region == region.name) {
                out.push_str(&format!(
                    "  {:<width$}  {:<22}  log {}\n",
                    host.spec.node_id,
                    host.spec.url(),
                    host.spec.log.display()
                ));
            }
            if let Some(url) = &region.nats_url {
                let log = self
                    .nats
                    .iter()
                    .find(|n| n.region == region.name)
                    .map(|n| format!("  log {}", n.log.display()))
                    .unwrap_or_default();
                out.push_str(&format!("  {:<width$}  {:<22}{log}\n", "nats", redact(url)));
            }
            out.push_str(&format!(
                "  {:<width$}  {}\n",
                "postgres",
                redact(&region.database_url)
            ));
        }
        out.push('\n');
        if let Some(pg) = &self.postgres {
            out.push_str(&format!(
                "postgres  private cluster in {}, log {}\n",
                pg.data.display(),
                pg.log.display()
            ));
        }
        out.push_str(&format!("data      {}", self.work.path.display()));
        out.push_str(if self.work.temporary {
            " (removed on exit; --keep keeps it)\n"
        } else {
            " (kept on exit)\n"
        });

        let token = &summary.admin_token;
        out.push_str(&format!(
            "\nadmin token  {token}\n\ntry (in another shell):\n  export MERIDIAN_TOKEN={token}\n"
        ));
        let meridian = meridian_command();
        let first_url = |region: &RegionEnv| {
            self.hosts
                .iter()
                .find(|h| h.spec.region == region.name)
                .map(|h| h.spec.url())
                .unwrap_or_default()
        };
        let home = &summary.regions[0];
        let other = summary.regions.get(1).unwrap_or(home);
        let (home_url, other_url) = (first_url(home), first_url(other));
        out.push_str(&format!(
            "  # open an account; {} becomes its home region\n  {meridian} command {PLUGIN_TYPE} acc-1 '{{\"type\":\"Open\",\"owner\":\"alice\"}}' --url {home_url}\n",
            home.name
        ));
        if several {
            out.push_str(&format!(
                "  # deposit through {}: it forwards the command to {} (the answer's x-meridian-region header says {})\n",
                other.name, home.name, home.name
            ));
        } else {
            out.push_str("  # deposit\n");
        }
        out.push_str(&format!(
            "  {meridian} command {PLUGIN_TYPE} acc-1 '{{\"type\":\"Deposit\",\"amount\":10}}' --url {other_url}\n"
        ));
        if several {
            out.push_str(&format!(
                "  # follow the events in {}, relayed from {}\n",
                other.name, home.name
            ));
        } else {
            out.push_str("  # follow the events\n");
        }
        out.push_str(&format!("  {meridian} events tail --url {other_url}\n"));
        out.push_str("\nCtrl-C stops everything.\n");
        {
            use std::io::Write as _;
            let mut stdout = std::io::stdout();
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush());
        }
    }

    /// Stops the hosts, then the nats-servers, then PostgreSQL. Never fails: it is the
    /// way out of errors too, so it reports problems and carries on.
    async fn stop(&mut self) {
        // Hosts before NATS and PostgreSQL, as draining needs both. One at a time,
        // newest first: a draining host hands its partitions to the hosts still running,
        // so stopping all at once leaves them handing partitions to each other until
        // their drain times out.
        for host in self.hosts.iter_mut().rev() {
            send_signal(&mut host.child, "TERM").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            stop_child(&mut host.child, &host.spec.node_id, deadline).await;
        }
        self.hosts.clear();

        // Leaves before the hub, so none of them logs a lost link on the way out.
        for server in self.nats.iter_mut().rev() {
            send_signal(&mut server.child, "TERM").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            let name = format!("nats-server {}", server.region);
            stop_child(&mut server.child, &name, deadline).await;
        }
        self.nats.clear();

        if let Some(postgres) = &mut self.postgres {
            // SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, write
            // a checkpoint, exit.
            send_signal(&mut postgres.child, "INT").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            stop_child(&mut postgres.child, "PostgreSQL", deadline).await;
        }
        self.postgres = None;
    }

    /// Kills whatever is still running, without waiting for drains or checkpoints.
    async fn kill(&mut self) {
        for host in self.hosts.drain(..).rev() {
            let mut child = host.child;
            // Fails only for a child already reaped, which is what we want anyway.
            let _ = child.kill().await;
        }
        for server in self.nats.drain(..).rev() {
            let mut child = server.child;
            let _ = child.kill().await;
        }
        if let Some(mut postgres) = self.postgres.take() {
            // SIGQUIT is the "immediate" shutdown: unlike SIGKILL, the server still takes
            // its backends down with it instead of leaving them running.
            send_signal(&mut postgres.child, "QUIT").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            stop_child(&mut postgres.child, "PostgreSQL", deadline).await;
        }
    }
}

/// How to run this binary in the printed examples: relative to the current directory
/// when it is below it (`target/release/meridian` in the repository), else absolute.
fn meridian_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "meridian".to_string();
    };
    std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or(exe)
        .display()
        .to_string()
}

/// The database URL of `region` when several regions share the server of `url`: the
/// URL's database name with `_<region>` appended, everything else kept.
fn region_database_url(url: &str, region: &str) -> anyhow::Result<String> {
    let mut parsed =
        url::Url::parse(url).with_context(|| format!("invalid database URL {}", redact(url)))?;
    let name = parsed.path().trim_start_matches('/').to_string();
    if name.is_empty() {
        bail!(
            "the database URL {} names no database; add one, e.g. `.../meridian_dev` \
             (each region gets `meridian_dev_<region>`)",
            redact(url)
        );
    }
    parsed.set_path(&format!("/{name}_{region}"));
    Ok(parsed.into())
}

impl WorkDir {
    /// Removes the directory if it is a temporary one and `keep` is not set.
    fn remove_unless(&self, keep: bool) {
        let path = &self.path;
        if self.temporary && !keep {
            match std::fs::remove_dir_all(path) {
                Ok(()) => say!("removed {}", path.display()),
                Err(e) => say!("could not remove {}: {e}", path.display()),
            }
        } else {
            say!("logs and data kept in {}", path.display());
        }
    }
}

/// Picks `count` distinct free ports on 127.0.0.1: `first`, `first + 1`, ... where free,
/// one chosen by the kernel where not. Returns each with the port it was meant to be
/// (`None` past 65535, or for `--port 0`, which asks for any port).
fn pick_ports(first: u16, count: usize) -> anyhow::Result<Vec<(u16, Option<u16>)>> {
    let preferred: Vec<Option<u16>> = (0..count)
        .map(|i| {
            u16::try_from(i)
                .ok()
                .and_then(|i| first.checked_add(i))
                // Port 0 means "any" for all of them, not "1, 2, ..." for the rest.
                .filter(|_| first != 0)
        })
        .collect();
    // Listeners are held until every port is chosen, so no two hosts get the same one.
    let mut held: Vec<Option<TcpListener>> = preferred
        .iter()
        .map(|port| port.and_then(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).ok()))
        .collect();
    for slot in held.iter_mut().filter(|slot| slot.is_none()) {
        *slot = Some(
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("cannot find a free port on 127.0.0.1")?,
        );
    }
    held.iter()
        .zip(preferred)
        .map(|(listener, preferred)| {
            let listener = listener.as_ref().expect("every slot is filled");
            Ok((listener.local_addr()?.port(), preferred))
        })
        .collect()
}

/// Creates the database named in `url` if it does not exist yet.
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid database URL {}", redact(url)))?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        bail!(
            "the database URL {} names no database; add one, e.g. `.../meridian_dev`",
            redact(url)
        );
    };
    // Connecting to the database itself first needs no rights on `postgres`, so a user
    // who owns only their database can still use an existing one.
    match PgConnection::connect_with(&options).await {
        Ok(connection) => {
            let _ = connection.close().await;
            return Ok(());
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)));
        }
    }
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .with_context(|| {
            format!(
                "cannot connect to the `postgres` database of {} to create `{name}`",
                redact(url)
            )
        })?;
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::raw_sql(&create).execute(&mut admin).await {
        Ok(_) => say!("created database {name}"),
        // Someone else created it in the meantime: that is all we wanted.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create database `{name}`")),
    }
    let _ = admin.close().await;
    Ok(())
}

/// Finds a directory holding both `initdb` and `postgres`, so that both come from one
/// PostgreSQL version: PATH first, then the newest `/usr/lib/postgresql/*/bin`.
fn find_postgres_bin() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // PATH often holds symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/
                // 15/bin/initdb); `postgres` must be looked for next to the real file.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                candidates.extend(real.parent().map(Path::to_path_buf));
            }
        }
    }
    // Debian keeps the server binaries out of PATH, one directory per major version.
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    candidates.extend(versioned.into_iter().map(|(_, dir)| dir));
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        .ok_or_else(|| {
            anyhow!(
                "PostgreSQL server binaries (initdb, postgres) not found in PATH or \
                 /usr/lib/postgresql/*/bin; install them (Debian: `apt-get install postgresql`) \
                 or pass --database-url to use a running server"
            )
        })
}

/// The account PostgreSQL runs as: `None` for our own, the `postgres` user's uid and gid
/// when we are root, because the server refuses to run as root.
async fn postgres_account() -> anyhow::Result<Option<(u32, u32)>> {
    if id(&["-u"])
        .await
        .context("cannot tell which user this is (`id -u`)")?
        != 0
    {
        return Ok(None);
    }
    let account = async {
        Ok::<_, anyhow::Error>((
            id(&["-u", "postgres"]).await?,
            id(&["-g", "postgres"]).await?,
        ))
    };
    let account = account.await.context(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
         user to run it as; create one (`useradd --system postgres`), run as another user, \
         or pass --database-url",
    )?;
    Ok(Some(account))
}

/// Runs `id` and parses the number it prints.
async fn id(args: &[&str]) -> anyhow::Result<u32> {
    let output = Command::new("id")
        .args(args)
        .output()
        .await
        .context("cannot run `id`")?;
    if !output.status.success() {
        bail!(
            "`id {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("`id {}` printed {text:?}", args.join(" ")))
}

/// Makes a cluster (unless the directory already holds one) and starts its server.
async fn spawn_private_postgres(
    bin: &Path,
    work: &Path,
    hosts: u16,
) -> anyhow::Result<PrivatePostgres> {
    let account = postgres_account().await?;
    let dir = work.join("postgres");
    let data = dir.join("data");
    let log = work.join("logs").join("postgres.log");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    create_parent(&log)?;
    if let Some((uid, gid)) = account {
        // initdb creates the data directory and the server its socket here, as `postgres`.
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to the postgres user", dir.display()))?;
    }

    let version = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .await;
    let version = version
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    say!(
        "starting a private PostgreSQL cluster ({version}, {})",
        bin.display()
    );

    if !data.join("PG_VERSION").is_file() {
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            // C exists everywhere; the shell's locale may not be installed.
            .arg("--locale=C");
        as_account(&mut initdb, account, &dir);
        let output = initdb.output().await.context("cannot run initdb")?;
        if !output.status.success() {
            let hint = if account.is_some() {
                " (as root, every directory above it must be reachable by the postgres user)"
            } else {
                ""
            };
            bail!(
                "initdb failed ({}) for {}{hint}:\n{}{}",
                output.status,
                data.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    let (port, _) = pick_ports(0, 1)?[0];
    // Hosts open up to ~18 connections each; keep room for psql and the migration.
    let max_connections = (u32::from(hosts) * 20 + 20).max(100);
    let mut server = Command::new(bin.join("postgres"));
    server
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", &format!("max_connections={max_connections}")]);
    // The socket goes into our directory, not /var/run/postgresql (not ours, and maybe
    // not writable); a path too long for a socket means TCP only.
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        server.arg("-k").arg(&dir);
    } else {
        server.args(["-c", "unix_socket_directories="]);
    }
    as_account(&mut server, account, &dir);
    let log_file = open_log(&log)?;
    server.stdout(log_file.try_clone()?).stderr(log_file);
    let child = server.spawn().context("cannot start postgres")?;
    Ok(PrivatePostgres {
        child,
        port,
        log,
        data,
    })
}

/// Runs `command` as `account` (if any) from `dir`, detached from our terminal.
fn as_account(command: &mut Command, account: Option<(u32, u32)>, dir: &Path) {
    if let Some((uid, gid)) = account {
        command.uid(uid).gid(gid);
    }
    // Our working directory may not be readable by `postgres`.
    command.current_dir(dir).stdin(Stdio::null());
    detach(command);
}

/// Puts a child in its own process group and kills it if we are dropped. Ctrl-C in a
/// terminal signals the whole foreground group; the children must not see it, so that
/// they are stopped in order (hosts before their database) and signalled only once (a
/// host exits at once on a second signal, skipping its drain).
fn detach(command: &mut Command) {
    command.process_group(0).kill_on_drop(true);
}

/// Waits until the private cluster accepts connections.
async fn wait_for_postgres(postgres: &mut PrivatePostgres) -> anyhow::Result<()> {
    let port = postgres.port;
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("postgres")
        .database("postgres");
    let deadline = Instant::now() + POSTGRES_READY_TIMEOUT;
    loop {
        if let Some(status) = postgres.child.try_wait()? {
            bail!(
                "postgres exited ({status}) while starting; last lines of {}:\n{}",
                postgres.log.display(),
                tail(&postgres.log)
            );
        }
        match PgConnection::connect_with(&options).await {
            Ok(connection) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "PostgreSQL did not accept connections on 127.0.0.1:{port} within {} s ({e}); \
                     last lines of {}:\n{}",
                    POSTGRES_READY_TIMEOUT.as_secs(),
                    postgres.log.display(),
                    tail(&postgres.log)
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Starts one `meridian host` of `region`, logging to its file.
fn spawn_host(spec: &HostSpec, region: &RegionEnv, admin_token: &str) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the meridian executable")?;
    std::fs::create_dir_all(&spec.cache_dir)
        .with_context(|| format!("cannot create {}", spec.cache_dir.display()))?;
    create_parent(&spec.log)?;
    let log = open_log(&spec.log)?;
    let mut command = Command::new(exe);
    // The calling shell's host settings (a MERIDIAN_ADVERTISE_URL, a tokens file, a
    // database) are not this cluster's: each host gets only what is set below, and
    // the log filter.
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("MERIDIAN_") && text != "MERIDIAN_LOG" {
            command.env_remove(name);
        }
    }
    command
        .arg("host")
        .args(["--region", &spec.region])
        .args(["--node-id", &spec.node_id])
        .args(["--http-addr", &spec.addr.to_string()])
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        // In the environment rather than on the command line, where `ps` shows passwords.
        .env("MERIDIAN_DATABASE_URL", &region.database_url)
        .env("MERIDIAN_TOKENS", format!("{admin_token}:admin"))
        // No load balancer in front: stopping need not wait for one.
        .env("MERIDIAN_DRAIN_GRACE_MS", "0")
        // The calling shell's region settings are not part of this setup.
        .env_remove("MERIDIAN_NATS_URL")
        .env_remove("MERIDIAN_PEER_REGIONS")
        .env_remove("MERIDIAN_DIRECTORY_REGION")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(url) = &region.nats_url {
        command
            .env("MERIDIAN_NATS_URL", url)
            .args(["--directory-region", &region.directory]);
        if !region.peers.is_empty() {
            command.args(["--peer-regions", &region.peers.join(",")]);
        }
    }
    detach(&mut command);
    command
        .spawn()
        .with_context(|| format!("cannot start {}", spec.node_id))
}

/// Waits until a host answers 200 on `/readyz`.
async fn wait_for_host(
    http: &reqwest::Client,
    host: &mut RunningHost,
    deadline: Instant,
) -> anyhow::Result<()> {
    let url = format!("{}/readyz", host.spec.url());
    loop {
        if let Some(status) = host.child.try_wait()? {
            bail!(
                "{} exited ({status}) while starting; last lines of {}:\n{}",
                host.spec.node_id,
                host.spec.log.display(),
                tail(&host.spec.log)
            );
        }
        if let Ok(response) = http.get(&url).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not become ready on {url} within {} s; last lines of {}:\n{}",
                host.spec.node_id,
                HOST_READY_TIMEOUT.as_secs(),
                host.spec.log.display(),
                tail(&host.spec.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Finds the nats-server to run and checks that it is new enough: `explicit`
/// (--nats-server-bin), else the repository's `.tools/bin/nats-server` (looked for in
/// the current directory and above this executable's `target/<profile>/`), else
/// `nats-server` on PATH.
fn find_nats_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    const INSTALL: &str = "`bash scripts/install-deps.sh` (from the repository root) installs \
         the pinned nats-server 2.15.1 into .tools/bin; elsewhere get NATS >= 2.10 from \
         https://nats.io/download and pass --nats-server-bin (or MERIDIAN_NATS_SERVER_BIN), \
         or pass --nats-url to use running servers";
    let bin = match explicit {
        Some(path) => {
            if !path.is_file() {
                bail!("nats-server not found at {}; {INSTALL}", path.display());
            }
            path.to_path_buf()
        }
        None => {
            let local = Path::new(".tools/bin/nats-server").to_path_buf();
            let beside_build = std::env::current_exe().ok().and_then(|exe| {
                // <repo>/target/<profile>/meridian -> <repo>/.tools/bin/nats-server
                Some(
                    exe.parent()?
                        .parent()?
                        .parent()?
                        .join(".tools/bin/nats-server"),
                )
            });
            let on_path = std::env::var_os("PATH")
                .map(|path| {
                    std::env::split_paths(&path)
                        .map(|dir| dir.join("nats-server"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            [local]
                .into_iter()
                .chain(beside_build)
                .chain(on_path)
                .find(|path| path.is_file())
                .with_context(|| {
                    format!(
                        "nats-server not found (in .tools/bin of the repository or on PATH); \
                         two regions need one NATS each. {INSTALL}"
                    )
                })?
        }
    };
    let output = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version; {INSTALL}", bin.display()))?;
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match nats_version(&printed) {
        Some(version) if version >= MIN_NATS_VERSION => Ok(bin),
        Some((major, minor)) => bail!(
            "{} is nats-server {major}.{minor}, older than the {}.{} regions need (JetStream \
             domains over leafnodes); {INSTALL}",
            bin.display(),
            MIN_NATS_VERSION.0,
            MIN_NATS_VERSION.1
        ),
        None => bail!(
            "cannot tell the version of {} (it printed {printed:?}); {INSTALL}",
            bin.display()
        ),
    }
}

/// Major and minor version from `nats-server --version` (`nats-server: v2.15.1`).
fn nats_version(printed: &str) -> Option<(u32, u32)> {
    let version = printed.rsplit(['v', ' ']).next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// The configuration of one region's nats-server: its own JetStream domain named after
/// the region; the hub (`hub_leaf_port` is `None`) listens for leafnodes on
/// `leaf_port`, every other region connects to the hub's. `deploy/nats/` has the same
/// shape, commented, for running it yourself.
fn nats_config(
    region: &str,
    ports: NatsPorts,
    store_dir: &Path,
    hub_leaf_port: Option<u16>,
) -> String {
    let NatsPorts {
        client,
        monitor,
        leaf,
    } = ports;
    let leafnodes = match hub_leaf_port {
        None => format!("leafnodes {{ listen: \"127.0.0.1:{leaf}\" }}"),
        Some(hub) => {
            format!("leafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{hub}\" }} ] }}")
        }
    };
    format!(
        "# Written by `meridian dev` for region {region}.\n\
         server_name: \"{region}\"\n\
         listen: \"127.0.0.1:{client}\"\n\
         http: \"127.0.0.1:{monitor}\"\n\
         jetstream {{ domain: \"{region}\", store_dir: \"{}\" }}\n\
         {leafnodes}\n",
        store_dir.display()
    )
}

/// The ports of one nats-server.
#[derive(Debug, Clone, Copy)]
struct NatsPorts {
    client: u16,
    monitor: u16,
    /// Listened on by the hub only.
    leaf: u16,
}

/// Writes a region's NATS configuration and starts its server.
async fn spawn_nats(
    bin: &Path,
    work: &Path,
    region: &str,
    hub_leaf_port: Option<u16>,
) -> anyhow::Result<RunningNats> {
    let dir = work.join("nats").join(region);
    let store_dir = dir.join("jetstream");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("cannot create {}", store_dir.display()))?;
    let ports = match pick_ports(0, 3)?.as_slice() {
        [(client, _), (monitor, _), (leaf, _)] => NatsPorts {
            client: *client,
            monitor: *monitor,
            leaf: *leaf,
        },
        _ => unreachable!("three ports were asked for"),
    };
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        nats_config(region, ports, &store_dir, hub_leaf_port),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let log = work.join("logs").join(format!("nats-{region}.log"));
    create_parent(&log)?;
    let log_file = open_log(&log)?;
    let mut command = Command::new(bin);
    command
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    detach(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {} for region {region}", bin.display()))?;
    say!(
        "started nats-server {region} on 127.0.0.1:{} (log: {})",
        ports.client,
        log.display()
    );
    Ok(RunningNats {
        region: region.to_string(),
        url: format!("nats://127.0.0.1:{}", ports.client),
        monitor: format!("http://127.0.0.1:{}", ports.monitor),
        leaf_port: hub_leaf_port.is_none().then_some(ports.leaf),
        log,
        child,
    })
}

/// Waits until a nats-server answers 200 on `/healthz`, which includes JetStream.
async fn wait_for_nats(
    http: &reqwest::Client,
    server: &mut RunningNats,
    deadline: Instant,
) -> anyhow::Result<()> {
    let url = format!("{}/healthz", server.monitor);
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "nats-server {} exited ({status}) while starting; last lines of {}:\n{}",
                server.region,
                server.log.display(),
                tail(&server.log)
            );
        }
        if let Ok(response) = http.get(&url).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "nats-server {} did not become healthy on {url} within {} s; last lines of {}:\n{}",
                server.region,
                NATS_READY_TIMEOUT.as_secs(),
                server.log.display(),
                tail(&server.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the hub counts every other region's leafnode connection, so the hosts
/// start with the regions linked.
async fn wait_for_leafnodes(
    http: &reqwest::Client,
    hub: &RunningNats,
    leaves: &[RunningNats],
    deadline: Instant,
) -> anyhow::Result<()> {
    let url = format!("{}/leafz", hub.monitor);
    let expected = leaves.len() as u64;
    loop {
        let connected = match http.get(&url).send().await {
            Ok(response) => response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|leafz| leafz["leafnodes"].as_u64())
                .unwrap_or(0),
            Err(_) => 0,
        };
        if connected >= expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: String = leaves
                .iter()
                .map(|leaf| format!("\n--- {} ---\n{}", leaf.log.display(), tail(&leaf.log)))
                .collect();
            bail!(
                "only {connected} of {expected} regions connected to the hub {} within {} s; \
                 last lines of their logs:{logs}",
                hub.region,
                NATS_READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `host` lists the example plugin at `version`: its region has imported
/// the plugin uploaded in another.
async fn wait_for_plugin(
    http: &reqwest::Client,
    host: &mut RunningHost,
    version: &str,
    admin_token: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/plugins", host.spec.url());
    let expected: Option<i64> = version.parse().ok();
    loop {
        if let Some(status) = host.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                host.spec.node_id,
                host.spec.log.display(),
                tail(&host.spec.log)
            );
        }
        let listed = match http.get(&url).bearer_auth(admin_token).send().await {
            Ok(response) => response.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        let found = listed.is_some_and(|listed| {
            listed["plugins"].as_array().is_some_and(|plugins| {
                plugins.iter().any(|p| {
                    p["aggregate_type"] == PLUGIN_TYPE && p["version"].as_i64() == expected
                })
            })
        });
        if found {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "region {} did not import plugin {PLUGIN_TYPE} version {version} within {} s \
                 (it comes through the directory and the relay over the leafnode link); \
                 last lines of {}:\n{}",
                host.spec.region,
                PLUGIN_SPREAD_TIMEOUT.as_secs(),
                host.spec.log.display(),
                tail(&host.spec.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Uploads the example plugin and returns the version it is stored as.
async fn upload_plugin(
    base: &str,
    path: &Path,
    bytes: Vec<u8>,
    admin_token: &str,
) -> anyhow::Result<String> {
    let url = format!("{base}/v1/plugins/{PLUGIN_TYPE}");
    say!("uploading {} as {PLUGIN_TYPE}", path.display());
    let response = reqwest::Client::new()
        .put(&url)
        .bearer_auth(admin_token)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .with_context(|| format!("cannot upload the plugin to {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "uploading {} to {url} failed with {status}: {}",
            path.display(),
            body["error"]["message"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(body["version"].to_string())
}

/// Sends `signal` (e.g. `TERM`) with `kill(1)`, which needs no unsafe code; kills the
/// child outright if that is not possible.
async fn send_signal(child: &mut Child, signal: &str) {
    // `None`: it has exited and been reaped already.
    let Some(pid) = child.id() else { return };
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    if !sent {
        let _ = child.start_kill();
    }
}

/// Waits for a signalled child until `deadline`, then kills it.
async fn stop_child(child: &mut Child, name: &str, deadline: Instant) {
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(_)) => say!("stopped {name}"),
        Ok(Err(e)) => say!("could not wait for {name}: {e}"),
        Err(_) => {
            say!("{name} did not stop in time; killing it");
            if let Err(e) = child.kill().await {
                say!("could not kill {name}: {e}");
            }
        }
    }
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Ok(())
}

/// Opens a log for appending, so that a reused --data-dir keeps earlier runs' lines.
fn open_log(path: &Path) -> anyhow::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_asks_for_any_free_ports() {
        let ports = pick_ports(0, 3).unwrap();
        assert!(
            ports
                .iter()
                .all(|(port, preferred)| *port > 1024 && preferred.is_none())
        );
    }

    #[test]
    fn nats_versions_are_read_from_the_version_line() {
        assert_eq!(nats_version("nats-server: v2.15.1"), Some((2, 15)));
        assert_eq!(nats_version("nats-server: v2.9.25"), Some((2, 9)));
        assert!(nats_version("nats-server: v2.9.25").unwrap() < MIN_NATS_VERSION);
        assert_eq!(nats_version("something else"), None);
    }

    #[test]
    fn each_region_gets_its_own_database_on_the_given_server() {
        assert_eq!(
            region_database_url(
                "postgres://u:p@db:5432/meridian_dev?sslmode=disable",
                "east"
            )
            .unwrap(),
            "postgres://u:p@db:5432/meridian_dev_east?sslmode=disable"
        );
        assert!(region_database_url("postgres://db:5432", "east").is_err());
    }

    #[test]
    fn the_hub_listens_for_leafnodes_and_the_others_connect_to_it() {
        let ports = NatsPorts {
            client: 1,
            monitor: 2,
            leaf: 3,
        };
        let hub = nats_config("east", ports, Path::new("/d"), None);
        assert!(hub.contains("jetstream { domain: \"east\", store_dir: \"/d\" }"));
        assert!(hub.contains("leafnodes { listen: \"127.0.0.1:3\" }"));
        let leaf = nats_config("west", ports, Path::new("/d"), Some(9));
        assert!(leaf.contains("url: \"nats-leaf://127.0.0.1:9\""));
        assert!(!leaf.contains("listen: \"127.0.0.1:3\""));
    }
}
