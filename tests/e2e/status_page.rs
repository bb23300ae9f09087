//! The status page at `/`, driven in headless Chromium.
//!
//! Chromium is controlled over the DevTools protocol on `--remote-debugging-pipe`
//! (JSON messages ending in NUL on file descriptors 3 and 4, wired to two FIFOs by `sh`),
//! so the test can wait for live events rather than take one snapshot of the page.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

const ADMIN: &str = "status-admin-0123456789";
const READER: &str = "status-reader-0123456789";

/// The Chromium binary: `MERIDIAN_CHROMIUM`, or `chromium` / `chromium-browser` on PATH.
fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("MERIDIAN_CHROMIUM") {
        assert!(
            Path::new(&path).is_file(),
            "MERIDIAN_CHROMIUM={path} does not exist; install Chromium with `bash scripts/install-deps.sh`"
        );
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        });
        if let Some(path) = found {
            return path;
        }
    }
    panic!(
        "headless Chromium is needed for the status page test but `chromium` is not on PATH: \
         run `bash scripts/install-deps.sh` (apt-get install chromium) or set MERIDIAN_CHROMIUM"
    );
}

/// A headless Chromium and one page in it, spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    to_browser: std::fs::File,
    from_browser: mpsc::Receiver<Value>,
    session: String,
    next_id: u64,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and opens `url` in a new page.
    fn open(url: &str) -> Browser {
        let binary = chromium();
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("to-browser");
        let from = dir.path().join("from-browser");
        for fifo in [&to, &from] {
            let status = Command::new("mkfifo").arg(fifo).status().unwrap();
            assert!(status.success(), "mkfifo {}", fifo.display());
        }
        let log = dir.path().join("chromium.log");
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" --headless --no-sandbox --disable-gpu --no-first-run --remote-debugging-pipe --user-data-dir="$1" about:blank 3<"$2" 4>"$3""#)
            .arg(&binary)
            .arg(dir.path().join("profile"))
            .arg(&to)
            .arg(&from)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // The shell opens fd 3 (reading) first, then fd 4 (writing); each open waits for
        // the other end, so open ours in the same order.
        let to_browser = std::fs::OpenOptions::new().write(true).open(&to).unwrap();
        let reader = std::fs::File::open(&from).unwrap();
        let (sender, from_browser) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).unwrap_or(0) > 0 {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && sender.send(value).is_err()
                {
                    return;
                }
                message.clear();
            }
        });
        let mut browser = Browser {
            child,
            to_browser,
            from_browser,
            session: String::new(),
            next_id: 0,
            log,
            _dir: dir,
        };
        let target = browser.call("Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends one command (to the page's session once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self.from_browser.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no answer from Chromium to {method}; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
            if answer["id"] == json!(id) {
                assert!(answer.get("error").is_none(), "{method} failed: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "`{expression}` threw: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true (at most 30 s); panics with the page's DOM.
    /// An exception counts as false: the page may not have loaded yet.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (_) {{ return false; }} }})()"
        );
        while self.eval(&guarded) != json!(true) {
            if Instant::now() > deadline {
                let dom = self.eval("document.documentElement.outerHTML");
                panic!(
                    "the status page never showed {what} (`{expression}`); its DOM:\n{}",
                    dom.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn send(host: &Host, token: &str, id: &str, command: Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/aggregates/bank-account/{id}", host.url))
        .bearer_auth(token)
        .json(&json!({ "command": command }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

fn wasm_upload(host: &Host) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .put(format!("{}/v1/plugins/bank-account", host.url))
        .bearer_auth(ADMIN)
        .body(wasm_bytes("bank-account"))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_draws_the_partition_map_and_shows_live_events() {
    // Fails here, clearly, when Chromium is missing, before anything else starts.
    chromium();
    let db = TestDb::new("status_page").await;
    let host = Host::start(
        &db,
        HostOptions {
            env: vec![
                (
                    "MERIDIAN_TOKENS".into(),
                    format!("{ADMIN}:admin,{READER}:read"),
                ),
                ("MERIDIAN_PARTITIONS".into(), "64".into()),
            ],
            ..HostOptions::default()
        },
    )
    .await;
    let status = wasm_upload(&host).send().await.unwrap().status();
    assert_eq!(status, 201);
    send(
        &host,
        ADMIN,
        "before-1",
        json!({"type": "Open", "owner": "a"}),
    )
    .await;

    // The page is static and served without a token; the data behind it is not.
    let page = reqwest::get(format!("{}/", host.url)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("Partition map"));
    let cluster = reqwest::get(format!("{}/v1/cluster", host.url))
        .await
        .unwrap();
    assert_eq!(cluster.status(), 401);

    let url = format!("{}/", host.url);
    let mut browser = tokio::task::block_in_place(|| Browser::open(&url));

    // Without a token the page says it needs one; with a read token it loads.
    browser
        .wait_for(
            "that it needs a token",
            "document.body.dataset.stream === 'denied'",
        )
        .await;
    assert!(
        browser
            .eval("document.getElementById('notice').textContent")
            .as_str()
            .unwrap()
            .contains("token")
    );
    browser.eval(&format!(
        "document.getElementById('token').value = '{READER}'; \
         document.getElementById('token-form').requestSubmit(); true"
    ));
    browser
        .wait_for("the live stream", "document.body.dataset.stream === 'live'")
        .await;

    // The partition grid: one cell per partition, each coloured by its owner.
    browser
        .wait_for(
            "a full partition grid owned by the host",
            &format!(
                "(() => {{ const cells = [...document.querySelectorAll('#grid [data-partition]')]; \
                 return cells.length === 64 && cells.every(c => c.dataset.owner === '{}' && c.style.background !== ''); }})()",
                host.node_id
            ),
        )
        .await;
    browser
        .wait_for(
            "the member, the plugin and the region",
            &format!(
                "!!document.querySelector('[data-member=\"{}\"]') \
                 && document.querySelector('[data-plugin=\"bank-account\"]')?.textContent.includes('1') \
                 && !!document.querySelector('[data-single-region], [data-region]')",
                host.node_id
            ),
        )
        .await;

    // Live events: sent now, they appear in the tail without a reload.
    send(
        &host,
        ADMIN,
        "live-1",
        json!({"type": "Open", "owner": "b"}),
    )
    .await;
    send(
        &host,
        ADMIN,
        "live-2",
        json!({"type": "Open", "owner": "c"}),
    )
    .await;
    send(
        &host,
        ADMIN,
        "live-1",
        json!({"type": "Deposit", "amount": 3}),
    )
    .await;
    browser
        .wait_for(
            "the live events",
            "(() => { const rows = [...document.querySelectorAll('#events li.event')]\
                 .map(li => li.dataset.aggregateId + ':' + li.textContent); \
             return rows.length === 3 \
                 && rows.some(r => r.startsWith('live-1:') && r.includes('Deposited')) \
                 && rows.some(r => r.startsWith('live-2:') && r.includes('Opened')); })()",
        )
        .await;
    // The tail starts at the head: the event from before the page opened is not in it.
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#events [data-aggregate-id=\"before-1\"]').length"),
        json!(0)
    );
    // Newest first.
    assert_eq!(
        browser.eval("document.querySelector('#events li.event').dataset.aggregateId"),
        json!("live-1")
    );
}

/// During a database outage the plugins cannot be listed, and the page used to redraw
/// nothing: the member table and the partition map stayed as they were when the
/// database went, just when an operator opens the page to see which hosts are alive.
/// Each part is now drawn on its own.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_keeps_drawing_the_cluster_while_the_database_is_away() {
    use crate::harness::TcpProxy;

    chromium();
    let db = TestDb::new("status_page_outage").await;
    let proxy = TcpProxy::start(&db).await;
    let host = Host::spawn(&proxy.url, HostOptions::default());
    host.wait_ready(Duration::from_secs(60)).await;
    let url = format!("{}/", host.url);
    let mut browser = tokio::task::block_in_place(|| Browser::open(&url));
    browser
        .wait_for("the cluster", "document.body.dataset.cluster === 'loaded'")
        .await;
    // Every draw of the cluster replaces the member table's rows.
    browser.eval(
        "window.draws = 0; new MutationObserver(() => window.draws++)\
             .observe(document.getElementById('members'), { childList: true }); true",
    );

    proxy.cut();
    browser
        .wait_for(
            "that the plugins cannot be loaded",
            "document.getElementById('notice').textContent.startsWith('Cannot load the status')",
        )
        .await;
    let draws = browser.eval("window.draws");
    let draws = draws.as_f64().expect("a count of draws");
    browser
        .wait_for(
            "the cluster redrawn while the database is away",
            &format!(
                "window.draws >= {} \
                 && document.getElementById('notice').classList.contains('shown') \
                 && document.querySelectorAll('#members tr[data-member]').length === 1",
                draws + 2.0
            ),
        )
        .await;

    proxy.restore();
    browser
        .wait_for(
            "the notice gone once the database is back",
            "!document.getElementById('notice').classList.contains('shown')",
        )
        .await;
}

/// The live tail resumes after the last event it showed. When the store behind the
/// address no longer has that event (restored from a backup, or the address reaches
/// another region now), every resume was refused with 400 and the tail stayed
/// "reconnecting" until the page was reloaded. It now starts again at the head.
#[tokio::test(flavor = "multi_thread")]
async fn the_live_tail_starts_again_at_the_head_when_its_position_is_gone() {
    chromium();
    let port = crate::harness::free_port();
    let at_port = || HostOptions {
        port: Some(port),
        ..HostOptions::default()
    };
    let first_db = TestDb::new("status_page_first").await;
    let mut first = Host::start(&first_db, at_port()).await;
    assert_eq!(wasm_upload(&first).send().await.unwrap().status(), 201);
    let url = format!("{}/", first.url);
    let mut browser = tokio::task::block_in_place(|| Browser::open(&url));
    browser
        .wait_for("the live stream", "document.body.dataset.stream === 'live'")
        .await;
    for id in ["first-1", "first-2"] {
        send(&first, ADMIN, id, json!({"type": "Open", "owner": "a"})).await;
    }
    let shown = |id: &str| {
        format!(
            "[...document.querySelectorAll('#events li.event')].some(li => li.dataset.aggregateId === '{id}')"
        )
    };
    browser
        .wait_for("the first store's events", &shown("first-2"))
        .await;

    // Another store behind the same address, whose events have other positions.
    first.signal("TERM");
    let code = tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let second_db = TestDb::new("status_page_second").await;
    let second = Host::start(&second_db, at_port()).await;
    assert_eq!(wasm_upload(&second).send().await.unwrap().status(), 201);
    browser
        .wait_for(
            "the live stream again",
            "document.body.dataset.stream === 'live'",
        )
        .await;
    send(
        &second,
        ADMIN,
        "second-1",
        json!({"type": "Open", "owner": "b"}),
    )
    .await;
    browser
        .wait_for("the second store's event", &shown("second-1"))
        .await;
}
