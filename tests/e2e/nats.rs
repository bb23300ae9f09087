//! Real nats-server processes for region tests: one per region, each its own JetStream
//! domain, linked by a leafnode connection (the first region is the hub).
//!
//! The binary comes from `MERIDIAN_NATS_SERVER_BIN` (set by `scripts/test.sh` to the
//! pinned nats-server the install script fetched), else `.tools/bin/nats-server`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::harness::free_port;

/// The nats-server binary the tests use.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("MERIDIAN_NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server");
    assert!(
        local.exists(),
        "no nats-server: run scripts/install-deps.sh or set MERIDIAN_NATS_SERVER_BIN"
    );
    local
}

/// One region's nats-server.
pub struct NatsServer {
    pub domain: String,
    pub port: u16,
    /// Leafnode listen port (hub only).
    pub leaf_port: Option<u16>,
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// The hub: listens for leafnode connections from the other regions.
    pub fn hub(domain: &str) -> Self {
        let leaf_port = free_port();
        Self::start(
            domain,
            format!("leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}"),
            Some(leaf_port),
        )
    }

    /// A hub whose clients authenticate, with the users and permissions of
    /// `deploy/nats/permissions.conf`: [`Self::url_as`] gives each user's URL.
    pub fn hub_with_users(domain: &str) -> Self {
        let leaf_port = free_port();
        Self::start(
            domain,
            format!(
                "leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}\ninclude \"permissions.conf\"\n"
            ),
            Some(leaf_port),
        )
    }

    /// The URL for `user` of [`Self::hub_with_users`] (`meridian` or `reader`).
    pub fn url_as(&self, user: &str) -> String {
        let password = password_of(user).replace('/', "%2F");
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// A client signed in as `user` of [`Self::hub_with_users`].
    pub async fn connect_as(&self, user: &str) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .user_and_password(user.into(), password_of(user))
            .connect(format!("127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot sign in: {e}"))
    }

    /// A region that connects to `hub` as a leafnode.
    pub fn leaf(domain: &str, hub: &NatsServer) -> Self {
        let hub_port = hub.leaf_port.expect("the hub listens for leafnodes");
        Self::start(
            domain,
            format!("leafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{hub_port}\" }} ] }}"),
            None,
        )
    }

    fn start(domain: &str, leafnodes: String, leaf_port: Option<u16>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("nats.conf");
        // Included by name (nats-server reads includes beside the configuration).
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/nats/permissions.conf"
            ),
            dir.path().join("permissions.conf"),
        )
        .expect("copy deploy/nats/permissions.conf");
        let store = dir.path().join("jetstream");
        std::fs::write(
            &config,
            format!(
                "server_name: {domain}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ domain: {domain}, store_dir: \"{}\" }}\n{leafnodes}\n",
                store.display()
            ),
        )
        .expect("write nats config");
        let mut server = Self {
            domain: domain.to_string(),
            port,
            leaf_port,
            dir,
            config,
            child: None,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .env("MERIDIAN_NATS_PASSWORD", password_of("meridian"))
            .env("MERIDIAN_NATS_READER_PASSWORD", password_of("reader"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nats://` URL for clients and hosts.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A JetStream context on this server, to look at or change what the hosts keep
    /// there.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(
            async_nats::connect(self.url())
                .await
                .expect("connect to NATS"),
        )
    }

    /// Stops the server (SIGKILL: an abrupt loss of the region's NATS).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same configuration and JetStream data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The password of a user of `deploy/nats/permissions.conf` in the tests, with a
/// character a URL must percent-encode.
fn password_of(user: &str) -> String {
    format!("{user}-pass/word")
}
