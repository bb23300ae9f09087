//! `meridian dev` as a user runs it: two regions (a private PostgreSQL, one nats-server
//! per region), a command in east, the same aggregate's next command through west, then
//! Ctrl-C, which must stop everything and remove the temporary directory.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{meridian_bin, send_command, wasm};
use super::nats::nats_server_bin;

/// Start-up includes initdb, two nats-servers, three hosts compiling the plugin and the
/// plugin's trip to west.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Hosts drain one after the other, each within 10 s.
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// A running `meridian dev`, interrupted (and at worst killed) on drop so that a failed
/// test does not leave it and its children running.
struct Dev {
    child: Child,
    stderr: tempfile::NamedTempFile,
    lines: mpsc::Receiver<String>,
}

impl Dev {
    fn start() -> Self {
        Self::start_with(false)
    }

    /// With `stderr_piped`, stderr is a pipe the test holds (see [`Self::close_stderr`])
    /// rather than a file.
    fn start_with(stderr_piped: bool) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("stderr file");
        let mut child = Command::new(meridian_bin())
            .args(["dev", "--port", "0", "--plugin"])
            .arg(wasm("bank-account"))
            .env("MERIDIAN_NATS_SERVER_BIN", nats_server_bin())
            // A host's database exported in the shell is not the demo's: it uses a
            // private cluster (this one would not even answer).
            .env(
                "MERIDIAN_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/not_the_demos",
            )
            .env_remove("MERIDIAN_DEV_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if stderr_piped {
                Stdio::piped()
            } else {
                stderr.reopen().expect("stderr file").into()
            })
            .spawn()
            .expect("start meridian dev");
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stderr,
            lines,
        }
    }

    /// Reads the banner up to its last line.
    fn banner(&self) -> Vec<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let last = line.starts_with("Ctrl-C stops everything");
                    banner.push(line);
                    if last {
                        return banner;
                    }
                }
                Err(e) => panic!(
                    "no complete banner from meridian dev ({e}); stdout so far:\n{}\nstderr:\n{}",
                    banner.join("\n"),
                    self.stderr_text()
                ),
            }
        }
    }

    /// Closes the only reader of a piped stderr: from now on every write there fails,
    /// as when the `tee` it was piped to, or the terminal, is gone.
    fn close_stderr(&mut self) {
        drop(self.child.stderr.take().expect("stderr piped"));
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT failed");
    }

    /// Waits for the process to exit, returning `None` on timeout.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for meridian dev") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Ctrl-C first: it stops PostgreSQL and the nats-servers too, a kill would
            // orphan them.
            self.interrupt();
            if self.wait(EXIT_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("--- stderr of meridian dev ---\n{}", self.stderr_text());
        }
    }
}

/// The second word of the banner line whose first word is `first`.
fn field(banner: &[String], first: &str) -> String {
    banner
        .iter()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(first)).then(|| words.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("no `{first}` line in the banner:\n{}", banner.join("\n")))
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_two_regions_forwards_from_west_and_cleans_up_on_ctrl_c() {
    let mut dev = Dev::start();
    let banner = dev.banner();
    let text = banner.join("\n");
    assert!(
        text.contains("Meridian dev is ready: east (2 hosts), west (1 host)"),
        "{text}"
    );
    for node in ["east-1", "east-2", "west-1"] {
        assert!(
            field(&banner, node).starts_with("http://127.0.0.1:"),
            "{text}"
        );
    }
    let east = field(&banner, "east-1");
    let west = field(&banner, "west-1");
    let token = banner
        .iter()
        .find_map(|line| line.strip_prefix("admin token"))
        .map(|rest| rest.trim().to_string())
        .unwrap_or_else(|| panic!("no admin token in the banner:\n{text}"));
    let data = PathBuf::from(field(&banner, "data"));
    assert!(data.is_dir(), "{text}");
    assert!(
        text.contains(&format!(
            "command bank-account acc-1 '{{\"type\":\"Deposit\",\"amount\":10}}' --url {west}"
        )),
        "the examples send a command through west: {text}"
    );

    let (status, body, _) = send_command(
        &east,
        "dev-acc-1",
        Some(&token),
        json!({"type":"Open","owner":"dev"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1, "{body}");
    // West forwards to east, the aggregate's home; the answer says who executed it.
    let (status, body, region) = send_command(
        &west,
        "dev-acc-1",
        Some(&token),
        json!({"type":"Deposit","amount":5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(region.as_deref(), Some("east"));

    dev.interrupt();
    let status = dev
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("meridian dev did not exit after Ctrl-C"));
    assert!(status.success(), "exit status {status}");
    let stderr = dev.stderr_text();
    for stopped in [
        "stopped west-1",
        "stopped east-2",
        "stopped east-1",
        "stopped nats-server west",
        "stopped nats-server east",
        "stopped PostgreSQL",
    ] {
        assert!(stderr.contains(stopped), "no `{stopped}` in:\n{stderr}");
    }
    assert!(!data.exists(), "{} is still there", data.display());
}

/// `scripts/demo.sh 2>&1 | tee demo.log` and Ctrl-C: the interrupt reaches `tee` too,
/// and everything `dev` says while it stops goes to a closed pipe. It used to panic on
/// its first such line, and so kill its hosts undrained and PostgreSQL outright, and
/// leave its data directory behind.
#[tokio::test(flavor = "multi_thread")]
async fn dev_stops_cleanly_when_its_output_is_gone() {
    let mut dev = Dev::start_with(true);
    let banner = dev.banner();
    let data = PathBuf::from(field(&banner, "data"));
    assert!(data.is_dir(), "{}", banner.join("\n"));
    dev.close_stderr();
    dev.interrupt();
    let status = dev
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("meridian dev did not exit after Ctrl-C"));
    assert!(status.success(), "exit status {status}");
    assert!(!data.exists(), "{} is still there", data.display());
}
