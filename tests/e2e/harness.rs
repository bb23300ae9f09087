//! Test harness: real PostgreSQL databases and real `meridian` host processes.
//!
//! Every test gets its own database (created here, dropped on drop), so tests run in
//! parallel. Hosts are started from the binary cargo built (`CARGO_BIN_EXE_meridian`)
//! on a free loopback port; their logs go to a file that is printed when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The admin connection used to create and drop test databases.
pub fn admin_url() -> String {
    std::env::var("MERIDIAN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new(label: &str) -> Self {
        let name = format!(
            "meridian_t_{}_{}",
            label,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let admin = sqlx::PgPool::connect(&admin_url())
            .await
            .expect("connect to PostgreSQL (is it running? see scripts/install-deps.sh)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let base = admin_url();
        let url = format!(
            "{}/{}",
            base.rsplit_once('/').expect("url has a path").0,
            name
        );
        Self { name, url }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime we can block on; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = sqlx::PgPool::connect(&admin_url()).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Path of a plugin built by `plugins/build.sh`.
pub fn wasm(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh` first",
        path.display()
    );
    path
}

pub fn wasm_bytes(name: &str) -> Vec<u8> {
    std::fs::read(wasm(name)).expect("read wasm")
}

/// A free loopback port (bound then released; a race with another process is unlikely).
/// The bank-account component with a custom section appended: other bytes (another
/// sha256), the same behaviour.
pub fn with_custom_section(tag: &[u8]) -> Vec<u8> {
    plus_custom_section(wasm_bytes("bank-account"), tag)
}

/// `bytes` (a component) with a custom section holding `tag`: another version of the
/// same behaviour.
pub fn plus_custom_section(mut bytes: Vec<u8>, tag: &[u8]) -> Vec<u8> {
    let name = b"meridian-test";
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(tag);
    bytes.push(0); // custom section id
    bytes.push(section.len() as u8); // LEB128 size (< 128)
    bytes.extend_from_slice(&section);
    bytes
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Options for starting a host.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    pub node_id: Option<String>,
    pub region: Option<String>,
    pub nats_url: Option<String>,
    pub port: Option<u16>,
    pub env: Vec<(String, String)>,
}

/// A running `meridian host` process. Killed on drop.
pub struct Host {
    pub child: Option<Child>,
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
    pub node_id: String,
    db_url: String,
    options: HostOptions,
    _dir: tempfile::TempDir,
}

pub fn meridian_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meridian")
}

impl Host {
    /// Starts a host and waits until `/readyz` says ready.
    pub async fn start(db: &TestDb, options: HostOptions) -> Host {
        let host = Self::spawn(&db.url, options);
        host.wait_ready(Duration::from_secs(60)).await;
        host
    }

    pub fn spawn(db_url: &str, options: HostOptions) -> Host {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = options.port.unwrap_or_else(free_port);
        let node_id = options
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{port}"));
        let log = dir.path().join("host.log");
        let mut command = Command::new(meridian_bin());
        command
            .arg("host")
            .env("MERIDIAN_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("MERIDIAN_DATABASE_URL", db_url)
            .env("MERIDIAN_NODE_ID", &node_id)
            .env(
                "MERIDIAN_REGION",
                options.region.clone().unwrap_or_else(|| "local".into()),
            )
            .env("MERIDIAN_CACHE_DIR", dir.path().join("cache"))
            .env("MERIDIAN_LOG", "info,meridian=debug")
            // Tests run several hosts per database and two tests at once; PostgreSQL
            // allows 100 connections.
            .env("MERIDIAN_DB_CONNECTIONS", "6")
            .env("MERIDIAN_COMMIT_WORKERS", "3")
            .env_remove("MERIDIAN_NATS_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(nats) = &options.nats_url {
            command.env("MERIDIAN_NATS_URL", nats);
        }
        for (k, v) in &options.env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start meridian host");
        Host {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
            node_id,
            db_url: db_url.to_string(),
            options,
            _dir: dir,
        }
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "host {} not ready after {timeout:?}; log:\n{}",
                    self.node_id,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(400)..].join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (off the async workers) up to a minute for the process to exit; its exit
    /// code and the tail of its log.
    pub async fn exit_and_log(mut self) -> (Option<i32>, String) {
        tokio::task::spawn_blocking(move || {
            let code = self.wait_exit(Duration::from_secs(60));
            (code, self.log_tail())
        })
        .await
        .unwrap()
    }

    /// Starts the same host again (same port, node id and database).
    pub async fn restart(&mut self) {
        self.kill9();
        let mut options = self.options.clone();
        options.port = Some(self.port);
        options.node_id = Some(self.node_id.clone());
        let fresh = Host::spawn(&self.db_url, options);
        let old = std::mem::replace(self, fresh);
        // Keep the old log dir alive no longer than needed.
        drop(old);
        self.wait_ready(Duration::from_secs(60)).await;
    }

    pub fn client(&self) -> Api {
        Api {
            base: self.url.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of host {} ---\n{}", self.node_id, self.log_tail());
        }
        self.kill9();
    }
}

/// A small typed client for the HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn upload(&self, aggregate_type: &str, bytes: Vec<u8>) -> (u16, Value) {
        self.put_raw(&format!("/v1/plugins/{aggregate_type}"), bytes)
            .await
    }

    pub async fn put_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .expect("put");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn command(&self, aggregate_type: &str, id: &str, body: Value) -> (u16, Value) {
        self.post_raw(
            &format!("/v1/aggregates/{aggregate_type}/{id}"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `PUT /v1/plugins/{aggregate_type}/limits`: the status.
    pub async fn put_limits(&self, aggregate_type: &str, limits: Value) -> u16 {
        self.http
            .put(format!("{}/v1/plugins/{aggregate_type}/limits", self.base))
            .json(&limits)
            .send()
            .await
            .expect("put limits")
            .status()
            .as_u16()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Polls `check` until it returns `Some` (at most 20 s), for effects that become
/// visible asynchronously.
pub async fn eventually<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "condition not met within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads bank-account through `api` and opens account `id` with it, each answered
/// as it should be (201, 200): a host shown to take commands before a test goes on.
pub async fn upload_and_open(api: &Api, id: &str) {
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "upload: {body}");
    let (status, body) = api
        .command(
            "bank-account",
            id,
            serde_json::json!({"command": {"type": "Open", "owner": "o"}}),
        )
        .await;
    assert_eq!(status, 200, "open {id}: {body}");
}

/// Sends a bank-account command to `base` (with a bearer token when given) and returns
/// the status, the body and the region that executed it when the command was
/// forwarded to another region (`x-meridian-region`).
pub async fn send_command(
    base: &str,
    id: &str,
    token: Option<&str>,
    command: Value,
) -> (u16, Value, Option<String>) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/aggregates/bank-account/{id}"))
        .json(&serde_json::json!({ "command": command }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("send command");
    let status = response.status().as_u16();
    let region = response
        .headers()
        .get("x-meridian-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, response.json().await.unwrap_or(Value::Null), region)
}

/// One aggregate's events as a region's global feed shows them.
pub async fn events_of(host: &Host, id: &str) -> Vec<Value> {
    let (status, page) = host
        .client()
        .get(&format!(
            "/v1/events?aggregate_type=bank-account&aggregate_id={id}&limit=10000"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().cloned().unwrap_or_default()
}

/// A metric of `host`'s `/metrics` labelled `region="<region>"` (0 when absent).
pub async fn region_metric(host: &Host, name: &str, region: &str) -> f64 {
    series(host, &format!("{name}{{region=\"{region}\"}}")).await
}

/// An unlabelled metric of `host`'s `/metrics` (0 when absent).
pub async fn metric(host: &Host, name: &str) -> f64 {
    series(host, name).await
}

/// The value of one series (name and labels as `/metrics` prints them), 0 when absent.
async fn series(host: &Host, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", host.url))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A TCP proxy in front of a test database (or a nats-server) that a test can cut, as a
/// network partition or a failover would: [`TcpProxy::cut`] drops every connection through it and refuses
/// new ones until [`TcpProxy::restore`]; [`TcpProxy::silence`] makes the connections open
/// so far pass nothing on any more, their sockets held open (no answer and no reset),
/// as a failover to another address or a firewall dropping packets would. Hosts are
/// pointed at [`TcpProxy::url`].
pub struct TcpProxy {
    pub url: String,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    connections: std::sync::Mutex<tokio_util::sync::CancellationToken>,
    /// Connections numbered below this pass nothing on.
    silence_before: std::sync::atomic::AtomicU64,
    next_id: std::sync::atomic::AtomicU64,
}

impl TcpProxy {
    pub async fn start(db: &TestDb) -> TcpProxy {
        Self::start_slow(db, Duration::ZERO).await
    }

    /// A proxy that holds each piece of the server's answers for `delay`: every round
    /// trip to the database takes that much longer, as on a distant or overloaded one.
    pub async fn start_slow(db: &TestDb, delay: Duration) -> TcpProxy {
        let mut url = url::Url::parse(&db.url).unwrap();
        let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let (port, state) = Self::forward(upstream, delay).await;
        url.set_port(Some(port)).unwrap();
        TcpProxy {
            url: url.to_string(),
            state,
        }
    }

    /// A proxy in front of a nats-server: hosts given its `url` reach the server only
    /// through it.
    pub async fn start_nats(nats: &crate::nats::NatsServer) -> TcpProxy {
        let (port, state) = Self::forward(format!("127.0.0.1:{}", nats.port), Duration::ZERO).await;
        TcpProxy {
            url: format!("nats://127.0.0.1:{port}"),
            state,
        }
    }

    /// Listens on a free port and passes what arrives on to `upstream`.
    async fn forward(upstream: String, delay: Duration) -> (u16, std::sync::Arc<ProxyState>) {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState {
            cut: false.into(),
            connections: std::sync::Mutex::new(tokio_util::sync::CancellationToken::new()),
            silence_before: 0.into(),
            next_id: 0.into(),
        });
        tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if state.cut.load(Ordering::SeqCst) {
                        continue; // dropped: refused
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
                    let cut = state.connections.lock().unwrap().clone();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    // The server's answers are held for `delay`; the client's requests
                    // are not.
                    for (mut from, mut to, delay) in [
                        (client_read, server_write, Duration::ZERO),
                        (server_read, client_write, delay),
                    ] {
                        let (cut, state) = (cut.clone(), state.clone());
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let pass = async {
                                let mut buffer = vec![0; 64 * 1024];
                                loop {
                                    let n = match from.read(&mut buffer).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => n,
                                    };
                                    if id < state.silence_before.load(Ordering::SeqCst) {
                                        // Silent, the sockets held open.
                                        std::future::pending::<()>().await;
                                    }
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    if to.write_all(&buffer[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            };
                            tokio::select! {
                                _ = cut.cancelled() => {}
                                _ = pass => {}
                            }
                        });
                    }
                }
            }
        });
        (port, state)
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.connections.lock().unwrap().cancel();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        *self.state.connections.lock().unwrap() = tokio_util::sync::CancellationToken::new();
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes every connection open so far silent for good: what is sent on it goes
    /// nowhere and no answer comes, yet it is not closed. New connections pass.
    pub fn silence(&self) {
        use std::sync::atomic::Ordering;
        let opened = self.state.next_id.load(Ordering::SeqCst);
        self.state.silence_before.store(opened, Ordering::SeqCst);
    }
}

/// Stores `events` (type and payload JSON each) for `<aggregate_type>/<id>` after
/// `expected_version`, straight into the store and not through a host: for tests that
/// need long histories quickly.
pub async fn store_events(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    id: &str,
    expected_version: i64,
    events: &[(&str, &str)],
) {
    use meridian::store::{self, AppendRequest, CommitterConfig, NewEvent};
    use serde_json::value::RawValue;
    let raw = |text: &str| RawValue::from_string(text.to_string()).unwrap();
    let request = AppendRequest {
        aggregate_type: aggregate_type.into(),
        aggregate_id: id.into(),
        expected_version,
        events: events
            .iter()
            .map(|(event_type, payload)| NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event_type: (*event_type).into(),
                payload: raw(payload),
                metadata: raw("{}"),
            })
            .collect(),
        command_id: None,
        fence: None,
    };
    let outcome = store::append::append_batch(pool, &CommitterConfig::default(), &[&request])
        .await
        .unwrap();
    assert!(outcome[0].is_ok(), "{outcome:?}");
}
