//! `meridian dev`: a whole region on this machine, for trying Meridian out and for
//! developing plugins against real hosts.
//!
//! Start-up runs in dependency order: PostgreSQL, the schema, the hosts, the example
//! plugin; the banner is printed only when all of it works. Whatever was started is
//! stopped again when start-up fails half-way and on Ctrl-C/SIGTERM: hosts first, so
//! they drain while their database is still there, then PostgreSQL, then the directory.

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
use crate::store;

/// The aggregate type the example plugin is uploaded as.
const PLUGIN_TYPE: &str = "bank-account";
const HOST_READY_TIMEOUT: Duration = Duration::from_secs(60);
const POSTGRES_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long hosts (and then PostgreSQL) get to stop before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The database the private cluster holds the region in.
const PRIVATE_DATABASE: &str = "meridian";
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
            "Runs a whole Meridian region on this machine, then stops it all on Ctrl-C.\n",
            "\n",
            "What it does, in order:\n",
            "\n",
            "1. PostgreSQL. With --database-url, that server is used and the database named\n",
            "   in the URL is created if it is missing. Without it, a private cluster is made\n",
            "   with this machine's PostgreSQL server binaries (initdb and postgres from PATH,\n",
            "   or the newest /usr/lib/postgresql/*/bin; on Debian: apt-get install postgresql),\n",
            "   listening on a free port of 127.0.0.1 with trust authentication. As root it\n",
            "   runs as the postgres user, because PostgreSQL refuses to run as root.\n",
            "\n",
            "2. --hosts `meridian host` processes, node ids dev-1, dev-2, ..., serving HTTP on\n",
            "   127.0.0.1 from --port upwards (a port in use is replaced by a free one, and\n",
            "   the output says so), each with its own plugin cache and log file in the data\n",
            "   directory. Waits up to 60 s for each to answer 200 on /readyz.\n",
            "\n",
            "3. Uploads the example plugin (--plugin) as aggregate type bank-account.\n",
            "\n",
            "4. Prints the host URLs, where the logs and data are, and commands to try.\n",
            "\n",
            "Ctrl-C or SIGTERM stops the hosts one at a time (SIGTERM, killed after 10 s),\n",
            "then PostgreSQL, and removes the temporary directory unless --keep is given. The\n",
            "same happens when start-up fails half-way. A second Ctrl-C kills what is left.\n",
        )
    };
}

#[doc = dev_help!()]
#[derive(Debug, clap::Args)]
#[command(after_long_help = dev_help!())]
pub struct DevArgs {
    /// Number of hosts to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub hosts: u16,
    /// The region the hosts belong to.
    #[arg(long, default_value = "local")]
    pub region: String,
    /// HTTP port of the first host; the others use the next ones.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// PostgreSQL URL to use instead of a private cluster, e.g.
    /// `postgres://postgres@127.0.0.1:5432/meridian_dev`; the database is created if it is
    /// missing.
    #[arg(long, env = "MERIDIAN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The example plugin's component (build it with `bash plugins/build.sh`).
    #[arg(long, default_value = "target/wasm32-wasip2/release/bank_account.wasm")]
    pub plugin: PathBuf,
    /// Directory for logs, plugin caches and the private cluster, instead of a new
    /// temporary one. It is kept on exit, and a cluster already in it is reused.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the temporary directory on exit (logs, data) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the region until Ctrl-C or SIGTERM, then stops everything it started.
pub async fn execute(args: DevArgs) -> anyhow::Result<()> {
    // Installed first: from here on a signal is ours to handle, never a silent exit that
    // would leave PostgreSQL and the hosts behind.
    let mut stop = StopSignals::install()?;

    // Checked before anything starts, as a missing build is the commonest failure.
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
        hosts: Vec::new(),
    };
    let started = tokio::select! {
        started = cluster.start(&args, plugin) => started,
        signal = stop.recv() => Err(anyhow!("{signal} received while starting")),
    };
    match started {
        Ok(summary) => {
            cluster.print_banner(&summary);
            let signal = stop.recv().await;
            eprintln!("\n{signal} received: stopping the region (again to kill it at once)");
            shut_down(&mut cluster, &mut stop, args.keep).await;
            Ok(())
        }
        Err(error) => {
            eprintln!("start-up failed; stopping what was started");
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
            eprintln!("{signal} again: killing what is still running");
            true
        }
    };
    if hurried {
        cluster.kill().await;
    }
    cluster.work.remove_unless(keep);
}

/// SIGINT and SIGTERM, both meaning "stop everything".
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Waits for the next signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// What one region of the dev setup consists of. There is one region today; a
/// multi-region setup adds one spec per region (with its own NATS) to the same plan.
#[derive(Debug)]
struct RegionSpec {
    name: String,
    hosts: Vec<HostSpec>,
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

impl RegionSpec {
    /// Plans `count` hosts `dev-1..count`, preferring ports `first_port`, `first_port + 1`, ...
    fn plan(name: &str, count: u16, first_port: u16, work: &Path) -> anyhow::Result<Self> {
        let ports = pick_ports(first_port, usize::from(count))?;
        let hosts = ports
            .into_iter()
            .enumerate()
            .map(|(i, (port, preferred))| {
                let node_id = format!("dev-{}", i + 1);
                HostSpec {
                    region: name.to_string(),
                    addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                    displaced_from: preferred.filter(|p| *p != port),
                    cache_dir: work.join("cache").join(name).join(&node_id),
                    log: work.join("logs").join(name).join(format!("{node_id}.log")),
                    node_id,
                }
            })
            .collect();
        Ok(Self {
            name: name.to_string(),
            hosts,
        })
    }
}

/// Where the logs, plugin caches and private cluster live.
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
    url: String,
    log: PathBuf,
    data: PathBuf,
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
    hosts: Vec<RunningHost>,
}

/// What the banner reports.
struct Summary {
    regions: Vec<String>,
    database_url: String,
    plugin_version: String,
    /// The admin token the hosts were started with (authentication is on).
    admin_token: String,
}

impl Cluster {
    async fn start(&mut self, args: &DevArgs, plugin: Vec<u8>) -> anyhow::Result<Summary> {
        // Authentication is on, as in production; one token with every scope.
        let admin_token = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let database_url = match &args.database_url {
            Some(url) => {
                eprintln!("using PostgreSQL at {}", redact(url));
                ensure_database(url).await?;
                url.clone()
            }
            None => {
                let bin = find_postgres_bin()?;
                self.postgres =
                    Some(spawn_private_postgres(&bin, &self.work.path, args.hosts).await?);
                let postgres = self.postgres.as_mut().expect("just set");
                wait_for_postgres(postgres).await?;
                ensure_database(&postgres.url).await?;
                postgres.url.clone()
            }
        };

        // Migrating here, once, gives a clear error before any host starts, instead of
        // every host racing to migrate and failing with the same message.
        let pool = store::connect(&store::DatabaseConfig {
            url: database_url.clone(),
            max_connections: 2,
        })
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(&database_url)))?;
        store::migrate(&pool).await.context("applying migrations")?;
        pool.close().await;

        let regions = vec![RegionSpec::plan(
            &args.region,
            args.hosts,
            args.port,
            &self.work.path,
        )?];
        for host in regions.iter().flat_map(|r| &r.hosts) {
            if let Some(port) = host.displaced_from {
                eprintln!(
                    "port {port} is in use; {} serves on {} instead",
                    host.node_id, host.addr
                );
            }
        }
        let region_names = regions.iter().map(|r| r.name.clone()).collect();
        for spec in regions.into_iter().flat_map(|r| r.hosts) {
            let child = spawn_host(&spec, &database_url, &admin_token)?;
            eprintln!(
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

        let first = &self.hosts[0].spec;
        let plugin_version =
            upload_plugin(&first.url(), &args.plugin, plugin, &admin_token).await?;
        Ok(Summary {
            admin_token,
            regions: region_names,
            database_url,
            plugin_version,
        })
    }

    fn print_banner(&self, summary: &Summary) {
        let first = self.hosts[0].spec.url();
        let width = self
            .hosts
            .iter()
            .map(|h| h.spec.node_id.len())
            .max()
            .unwrap_or(0);
        let hosts = match self.hosts.len() {
            1 => "1 host".to_string(),
            n => format!("{n} hosts"),
        };
        let mut out = String::new();
        out.push_str(&format!(
            "\nMeridian dev is running: region {}, {hosts}, plugin {PLUGIN_TYPE} version {}\n\n",
            summary.regions.join(", "),
            summary.plugin_version
        ));
        out.push_str("hosts\n");
        for host in &self.hosts {
            out.push_str(&format!(
                "  {:<width$}  {:<22}  log {}\n",
                host.spec.node_id,
                host.spec.url(),
                host.spec.log.display()
            ));
        }
        out.push_str(&format!("\npostgres  {}\n", redact(&summary.database_url)));
        if let Some(pg) = &self.postgres {
            out.push_str(&format!(
                "          private cluster in {}, log {}\n",
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

        let aggregate = format!("{first}/v1/aggregates/{PLUGIN_TYPE}/acc-1");
        let token = &summary.admin_token;
        let auth = format!("-H 'authorization: Bearer {token}'");
        out.push_str(&format!(
            "\nadmin token  {token}   (export MERIDIAN_TOKEN={token})\n"
        ));
        out.push_str("\ntry:\n");
        out.push_str(&format!(
            "  curl -s -X POST {aggregate} {auth} -H 'content-type: application/json' -d '{{\"command\":{{\"type\":\"Open\",\"owner\":\"alice\"}}}}'\n"
        ));
        out.push_str(&format!(
            "  curl -s -X POST {aggregate} {auth} -H 'content-type: application/json' -d '{{\"command\":{{\"type\":\"Deposit\",\"amount\":10}}}}'\n"
        ));
        out.push_str(&format!("  curl -s {auth} {aggregate}\n"));
        out.push_str(&format!(
            "  meridian events tail --url {first} --token {token}\n"
        ));
        out.push_str("\nCtrl-C stops everything.\n");
        print!("{out}");
    }

    /// Stops the hosts, then PostgreSQL. Never fails: it is the way out of errors too,
    /// so it reports problems and carries on.
    async fn stop(&mut self) {
        // Hosts before PostgreSQL, as draining needs the database. One at a time, newest
        // first: a draining host hands its partitions to the hosts still running, so
        // stopping all at once leaves them handing partitions to each other until their
        // drain times out.
        for host in self.hosts.iter_mut().rev() {
            send_signal(&mut host.child, "TERM").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            stop_child(&mut host.child, &host.spec.node_id, deadline).await;
        }
        self.hosts.clear();

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
        if let Some(mut postgres) = self.postgres.take() {
            // SIGQUIT is the "immediate" shutdown: unlike SIGKILL, the server still takes
            // its backends down with it instead of leaving them running.
            send_signal(&mut postgres.child, "QUIT").await;
            let deadline = Instant::now() + STOP_TIMEOUT;
            stop_child(&mut postgres.child, "PostgreSQL", deadline).await;
        }
    }
}

impl WorkDir {
    /// Removes the directory if it is a temporary one and `keep` is not set.
    fn remove_unless(&self, keep: bool) {
        let path = &self.path;
        if self.temporary && !keep {
            match std::fs::remove_dir_all(path) {
                Ok(()) => eprintln!("removed {}", path.display()),
                Err(e) => eprintln!("could not remove {}: {e}", path.display()),
            }
        } else {
            eprintln!("logs and data kept in {}", path.display());
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
                .filter(|port| *port != 0)
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
        Ok(_) => eprintln!("created database {name}"),
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
    eprintln!(
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
        url: format!("postgres://postgres@127.0.0.1:{port}/{PRIVATE_DATABASE}"),
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
    let port = postgres.url.parse::<PgConnectOptions>()?.get_port();
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

/// Starts one `meridian host`, logging to its file.
fn spawn_host(spec: &HostSpec, database_url: &str, admin_token: &str) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the meridian executable")?;
    std::fs::create_dir_all(&spec.cache_dir)
        .with_context(|| format!("cannot create {}", spec.cache_dir.display()))?;
    create_parent(&spec.log)?;
    let log = open_log(&spec.log)?;
    let mut command = Command::new(exe);
    command
        .arg("host")
        .args(["--region", &spec.region])
        .args(["--node-id", &spec.node_id])
        .args(["--http-addr", &spec.addr.to_string()])
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        // In the environment rather than on the command line, where `ps` shows passwords.
        .env("MERIDIAN_DATABASE_URL", database_url)
        .env("MERIDIAN_TOKENS", format!("{admin_token}:admin"))
        // A NATS from the calling shell is not part of this region.
        .env_remove("MERIDIAN_NATS_URL")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
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

/// Uploads the example plugin and returns the version it is stored as.
async fn upload_plugin(
    base: &str,
    path: &Path,
    bytes: Vec<u8>,
    admin_token: &str,
) -> anyhow::Result<String> {
    let url = format!("{base}/v1/plugins/{PLUGIN_TYPE}");
    eprintln!("uploading {} as {PLUGIN_TYPE}", path.display());
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
        Ok(Ok(_)) => eprintln!("stopped {name}"),
        Ok(Err(e)) => eprintln!("could not wait for {name}: {e}"),
        Err(_) => {
            eprintln!("{name} did not stop in time; killing it");
            if let Err(e) = child.kill().await {
                eprintln!("could not kill {name}: {e}");
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
