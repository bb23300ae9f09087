//! The regional cluster with real host processes sharing one PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian::cluster::core::{assign, partition_of};
use serde_json::{Value, json};

use crate::harness::{
    Api, Host, HostOptions, TestDb, eventually, upload_and_open, wasm_bytes, with_custom_section,
};
use crate::subscriptions::SseReader;

const PARTITIONS: u32 = 256;

fn options() -> HostOptions {
    HostOptions {
        env: vec![("MERIDIAN_DEAD_AFTER_MS".into(), "3000".into())],
        ..HostOptions::default()
    }
}

async fn start_region(db: &TestDb, n: usize) -> Vec<Host> {
    start_region_with(db, n, options()).await
}

/// [`start_region`] with other host options.
async fn start_region_with(db: &TestDb, n: usize, options: HostOptions) -> Vec<Host> {
    let mut hosts = Vec::new();
    for _ in 0..n {
        hosts.push(Host::start(db, options.clone()).await);
    }
    let (status, body) = hosts[0]
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    wait_balanced(&hosts).await;
    hosts
}

/// Waits until every partition is held by the host rendezvous hashing assigns it to.
async fn wait_balanced(hosts: &[Host]) -> Value {
    let ids: HashSet<String> = hosts.iter().map(|h| h.node_id.clone()).collect();
    let api = hosts[0].client();
    eventually(|| {
        let api = api.clone();
        let ids = ids.clone();
        async move {
            let (_, status) = api.get("/v1/cluster").await;
            let owners = status["partition_owners"].as_array()?;
            // Settled: every partition with the owner rendezvous hashing picks.
            let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
            sorted.sort_unstable();
            let settled = owners.len() == PARTITIONS as usize
                && owners
                    .iter()
                    .enumerate()
                    .all(|(p, o)| o.as_str() == assign(p as u32, &sorted));
            settled.then_some(status)
        }
    })
    .await
}

fn owner_of(status: &Value, id: &str) -> String {
    let p = partition_of("bank-account", id, PARTITIONS);
    status["partition_owners"][p as usize]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Sends a deposit of `amount` to each account through `api`, each on its own task.
fn spawn_deposits(
    api: &Api,
    ids: &[String],
    amount: i64,
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    ids.iter()
        .map(|id| {
            let (api, id) = (api.clone(), id.clone());
            tokio::spawn(async move {
                api.command(
                    "bank-account",
                    &id,
                    json!({"command": {"type": "Deposit", "amount": amount}}),
                )
                .await
            })
        })
        .collect()
}

async fn open_accounts(hosts: &[Host], n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    let apis: Vec<Api> = hosts.iter().map(|h| h.client()).collect();
    futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let api = apis[i % apis.len()].clone();
        async move {
            let (status, body) = api
                .command(
                    "bank-account",
                    id,
                    json!({"command": {"type": "Open", "owner": "o"}}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }))
    .await;
    ids
}

/// A host hears of the other hosts' commits and plugin uploads as they are made
/// (PostgreSQL `NOTIFY`), not at its next poll. These hosts look for both only every
/// ten minutes, so nothing but the announcements can bring a commit made on one host
/// to a live stream on the other, or make the other run a version uploaded through
/// the first. An upload is answered once every live host runs the new version, or
/// after the rollout timeout, naming the hosts that do not yet.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_hears_of_the_other_hosts_commits_and_uploads_without_polling() {
    let db = TestDb::new("c_changes").await;
    let options = HostOptions {
        env: vec![
            ("MERIDIAN_TAIL_POLL_MS".into(), "600000".into()),
            ("MERIDIAN_PLUGIN_REFRESH_MS".into(), "600000".into()),
            // A paused host still counts as live (below) for 10 s.
            ("MERIDIAN_DEAD_AFTER_MS".into(), "10000".into()),
            ("MERIDIAN_PLUGIN_ROLLOUT_TIMEOUT_MS".into(), "2000".into()),
        ],
        ..HostOptions::default()
    };
    let (first, second) = (
        Host::start(&db, options.clone()).await,
        Host::start(&db, options).await,
    );
    let hosts = [first, second];
    let (status, body) = hosts[0]
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    let status = wait_balanced(&hosts).await;
    let owned_by = |host: &Host| {
        (0..)
            .map(|i| format!("acct-{i}"))
            .find(|id| owner_of(&status, id) == host.node_id)
            .unwrap()
    };
    let (on_first, on_second) = (owned_by(&hosts[0]), owned_by(&hosts[1]));
    let open = json!({"command": {"type": "Open", "owner": "o"}});

    // A live stream on the second host, past its catch-up: it has delivered an event
    // committed there, and its host has had time to read the commit order again and
    // find nothing more.
    let mut stream = SseReader::open(&format!("{}/v1/events", hosts[1].url), None).await;
    let (code, body) = hosts[1]
        .client()
        .command("bank-account", &on_second, open.clone())
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(stream.next().await.1["aggregate_id"], on_second.as_str());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Committed by the first host: the second host's stream has it.
    let (code, body) = hosts[0]
        .client()
        .command("bank-account", &on_first, open)
        .await;
    assert_eq!(code, 200, "{body}");
    let (_, event) = stream.next().await;
    assert_eq!(event["aggregate_id"], on_first.as_str(), "{event}");

    // Version 2 uploaded through the first host: answered once both hosts run it, so
    // the next command on the second host's aggregate runs it.
    let deposit = || async {
        let (code, body) = hosts[1]
            .client()
            .command(
                "bank-account",
                &on_second,
                json!({"command": {"type": "Deposit", "amount": 1}}),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        // The aggregate's own events, by version: the global feed may not show a
        // commit yet while another transaction on the server is open.
        let (code, page) = hosts[1]
            .client()
            .get(&format!("/v1/aggregates/bank-account/{on_second}/events"))
            .await;
        assert_eq!(code, 200, "{page}");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        let deposited = events
            .iter()
            .find(|e| e["version"] == body["version"])
            .unwrap_or_else(|| panic!("no event at version {}: {page}", body["version"]));
        deposited["metadata"]["plugin_version"].clone()
    };
    let (status, body) = hosts[0]
        .client()
        .upload("bank-account", with_custom_section(b"v2"))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(
        body["rollout"],
        json!({"hosts_running": 2, "hosts_pending": []}),
        "{body}"
    );
    assert_eq!(deposit().await, 2);

    // The second host paused: version 3 is answered after the rollout timeout, naming
    // it; resumed, it hears of the version and runs it.
    hosts[1].signal("STOP");
    let (status, body) = hosts[0]
        .client()
        .upload("bank-account", with_custom_section(b"v3"))
        .await;
    hosts[1].signal("CONT");
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["rollout"],
        json!({"hosts_running": 1, "hosts_pending": [hosts[1].node_id]}),
        "{body}"
    );
    eventually(|| async { (deposit().await == 3).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn any_node_accepts_commands_and_the_owner_executes_them() {
    let db = TestDb::new("c_route").await;
    let hosts = start_region(&db, 3).await;
    let status = wait_balanced(&hosts).await;
    let accounts = open_accounts(&hosts, 210).await;
    for (i, id) in accounts.iter().enumerate() {
        // Deliberately sent to a node chosen by index, not by ownership.
        let api = hosts[(i * 7 + 1) % 3].client();
        let (code, result) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Deposit", "amount": 5}}),
            )
            .await;
        assert_eq!(code, 200, "{result}");
        assert_eq!(
            result["executed_by"].as_str().unwrap(),
            owner_of(&status, id),
            "{id} ran off its owner"
        );
        assert_eq!(result["version"], 2);
    }
    // Reads are served by any node too, and agree.
    let (_, a) = hosts[0]
        .client()
        .get("/v1/aggregates/bank-account/acct-3")
        .await;
    let (_, b) = hosts[2]
        .client()
        .get("/v1/aggregates/bank-account/acct-3")
        .await;
    assert_eq!(a["state"], b["state"]);
    assert_eq!(a["state"]["balance"], 5);
    // The CLI shows the same, for people and for scripts.
    let url = hosts[1].url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::meridian_bin())
            .args(["cluster", "status", "--url", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    for host in &hosts {
        assert!(text.contains(&host.node_id), "{text}");
    }
    assert!(text.contains("partition map"), "{text}");
    assert!(
        text.contains("0 of 2048 commands in flight, 0 event streams open"),
        "{text}"
    );
    let url = hosts[1].url.clone();
    let json = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::meridian_bin())
            .args(["cluster", "status", "--json", "--url", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let parsed: Value = serde_json::from_slice(&json.stdout).expect("--json prints JSON");
    assert_eq!(parsed["partitions"], PARTITIONS);
    let forwarded = status["members"].as_array().unwrap();
    assert_eq!(forwarded.len(), 3);
    assert!(
        forwarded
            .iter()
            .all(|m| m["state"] == "ready" && m["alive"] == true),
        "{status}"
    );
}

/// Background load: `workers` clients sending Deposits to random accounts via the
/// given nodes, with command ids; records every outcome.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    targets: Arc<Mutex<Vec<Api>>>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: Vec<Api>, accounts: Vec<String>, workers: usize, retry: bool) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let accounts = Arc::new(accounts);
        let tasks = (0..workers)
            .map(|w| {
                let (stop, targets, acked, failures, accounts) =
                    (stop.clone(), targets.clone(), acked.clone(), failures.clone(), accounts.clone());
                tokio::spawn(async move {
                    let mut n = w;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 7919;
                        let id = accounts[n % accounts.len()].clone();
                        let command_id = uuid::Uuid::new_v4().to_string();
                        let body = json!({"command": {"type": "Deposit", "amount": 1}, "command_id": command_id});
                        let mut attempt = 0;
                        loop {
                            attempt += 1;
                            let api = {
                                let t = targets.lock().unwrap();
                                t[(n + attempt) % t.len()].clone()
                            };
                            let response = api
                                .http
                                .post(format!("{}/v1/aggregates/bank-account/{id}", api.base))
                                .json(&body)
                                .send()
                                .await;
                            match response {
                                Ok(r) if r.status() == 200 => {
                                    acked.lock().unwrap().push((id.clone(), command_id.clone()));
                                    break;
                                }
                                other => {
                                    let what = match other {
                                        Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                                        Err(e) => format!("transport: {e}"),
                                    };
                                    if !retry || attempt > 20 {
                                        failures.lock().unwrap().push(format!("{id}: {what}"));
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            targets,
            acked,
            failures,
            tasks,
        }
    }

    async fn stop(self) -> (Vec<(String, String)>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (acked, failures)
    }
}

/// Every acknowledged command is stored exactly once and versions are contiguous.
async fn check_history(db: &TestDb, acked: &[(String, String)]) {
    let pool = db.pool().await;
    let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT aggregate_id, version, metadata->>'command_id' FROM events ORDER BY aggregate_id, version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut by_command: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (aggregate, version, command) in &rows {
        let previous = last.insert(aggregate.clone(), *version).unwrap_or(0);
        assert_eq!(
            *version,
            previous + 1,
            "{aggregate}: versions not contiguous"
        );
        if let Some(command) = command {
            *by_command.entry(command.clone()).or_default() += 1;
        }
    }
    for (aggregate, command) in acked {
        assert_eq!(
            by_command.get(command).copied(),
            Some(1),
            "acknowledged command {command} on {aggregate}"
        );
    }
    assert!(
        by_command.values().all(|n| *n == 1),
        "a command was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_host_under_load_loses_nothing() {
    let db = TestDb::new("c_kill").await;
    let mut hosts = start_region(&db, 3).await;
    let accounts = open_accounts(&hosts, 200).await;
    let survivors: Vec<Api> = hosts[..2].iter().map(|h| h.client()).collect();
    let load = Load::start(survivors.clone(), accounts.clone(), 16, true);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let victim = hosts[2].node_id.clone();
    hosts[2].kill9();
    let killed = Instant::now();
    // Every account serves again: a command to each, sent to the survivors.
    let probes = futures::future::join_all(accounts.iter().enumerate().map(|(i, id)| {
        let api = survivors[i % 2].clone();
        async move {
            let (status, body) = api
                .command(
                    "bank-account",
                    id,
                    json!({"command": {"type": "Deposit", "amount": 1}}),
                )
                .await;
            (status, body, killed.elapsed())
        }
    }))
    .await;
    let slowest = probes.iter().map(|(_, _, t)| *t).max().unwrap();
    for (status, body, _) in &probes {
        assert_eq!(*status, 200, "{body}");
        assert_ne!(body["executed_by"].as_str(), Some(victim.as_str()));
    }
    // The heartbeat timeout is 3 s; the issue's bound is timeout + 2 s.
    assert!(
        slowest < Duration::from_secs(5),
        "accounts served again only after {slowest:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(acked.len() > 100, "too little load: {}", acked.len());
    let mut all = acked.clone();
    all.extend(
        probes
            .iter()
            .map(|(_, b, _)| {
                (
                    b["aggregate_id"].as_str().unwrap().to_string(),
                    String::new(),
                )
            })
            .filter(|(_, c)| !c.is_empty()),
    );
    check_history(&db, &all).await;
    let status = wait_balanced(&hosts[..2]).await;
    let victim_row = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == victim.as_str())
        .cloned();
    assert!(victim_row.is_none_or(|m| m["alive"] == false));
}

/// A host's database sessions end a transaction left idle for 10 s. A host paused
/// between two statements of its heartbeat held its member row locked until it resumed,
/// so the other hosts' liveness check waited on it and no one was ever declared dead
/// (seen once in `a_paused_host_is_fenced_and_rejoins`, when the pause landed inside
/// that transaction); the server now ends such a session.
#[tokio::test(flavor = "multi_thread")]
async fn a_hosts_sessions_end_transactions_left_idle() {
    let db = TestDb::new("c_idle").await;
    let pool = meridian::store::connect(&meridian::store::DatabaseConfig {
        url: db.url.clone(),
        max_connections: 2,
    })
    .await
    .unwrap();
    let timeout: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timeout, "10s");
}

/// A database too slow to serve the command path never makes a live host look dead.
/// Here commands for the first host's partitions wait on a lock the test holds on
/// `events` for three times the dead-after time, more of them than the host has shared
/// connections. While the heartbeat took its connection from that pool it waited
/// behind them, the other host declared the first dead and took its partitions, on
/// top of the slowness.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_database_makes_no_host_look_dead() {
    let db = TestDb::new("c_busy").await;
    let quick = HostOptions {
        env: vec![
            ("MERIDIAN_DEAD_AFTER_MS".into(), "1500".into()),
            ("MERIDIAN_HEARTBEAT_MS".into(), "250".into()),
        ],
        ..HostOptions::default()
    };
    let hosts = start_region_with(&db, 2, quick).await;
    let cluster = wait_balanced(&hosts).await;
    open_accounts(&hosts, 2).await;

    let pool = db.pool().await;
    let epoch = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT value FROM region_settings WHERE key = 'membership_epoch'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = epoch().await;

    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    // Fresh aggregates of the first host: each command loads its history, so each
    // holds one of that host's shared connections while it waits on the lock.
    let ids: Vec<String> = (0..)
        .map(|i| format!("busy-{i}"))
        .filter(|id| owner_of(&cluster, id) == hosts[0].node_id)
        .take(16)
        .collect();
    let commands: Vec<_> = ids
        .iter()
        .map(|id| {
            let (api, id) = (hosts[0].client(), id.clone());
            tokio::spawn(async move {
                api.command(
                    "bank-account",
                    &id,
                    json!({"command": {"type": "Open", "owner": "o"}}),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    lock.rollback().await.unwrap();
    for command in commands {
        command.await.unwrap();
    }

    let dead: Vec<String> = sqlx::query_scalar("SELECT node_id FROM members WHERE dead")
        .fetch_all(&pool)
        .await
        .unwrap();
    let after = epoch().await;
    assert!(
        dead.is_empty() && after == before,
        "a host was declared dead while the database was slow: {dead:?}, membership epoch {before} -> {after}\n{}",
        hosts[1].log_tail()
    );
    // And the region serves again at once.
    for api in hosts.iter().map(Host::client) {
        let (status, body) = api
            .command(
                "bank-account",
                "acct-0",
                json!({"command": {"type": "Deposit", "amount": 1}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// A 503 the owner gives a forwarded command reaches the client with `Retry-After`, as
/// every 503 does; passed on from the owner it came without one.
#[tokio::test(flavor = "multi_thread")]
async fn a_503_passed_on_from_the_owner_says_when_to_retry() {
    let db = TestDb::new("c_retry").await;
    let mut full = options();
    full.env
        .push(("MERIDIAN_MAX_COMMANDS_IN_FLIGHT".into(), "1".into()));
    let hosts = vec![
        Host::start(&db, options()).await,
        Host::start(&db, full).await,
    ];
    let api = hosts[0].client();
    for plugin in ["bank-account", "spin-loop"] {
        let (status, body) = api.upload(plugin, wasm_bytes(plugin)).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(
        api.put_limits("spin-loop", json!({"deadline_ms": 5000}))
            .await,
        200
    );
    let cluster = wait_balanced(&hosts).await;
    let owned_by_second = |aggregate_type: &'static str| {
        let cluster = cluster.clone();
        let owner = hosts[1].node_id.clone();
        (0..).map(|i| format!("r-{i}")).find(move |id| {
            let p = partition_of(aggregate_type, id, PARTITIONS);
            cluster["partition_owners"][p as usize].as_str() == Some(owner.as_str())
        })
    };
    // A command that spins until its deadline takes the second host's one place.
    let spin_id = owned_by_second("spin-loop").unwrap();
    let busy = {
        let api = hosts[1].client();
        tokio::spawn(async move {
            api.command("spin-loop", &spin_id, json!({"command": {"type": "Go"}}))
                .await
        })
    };
    eventually(|| async {
        let (_, status) = hosts[1].client().get("/v1/cluster").await;
        (status["load"]["commands_in_flight"] == 1).then_some(())
    })
    .await;
    let id = owned_by_second("bank-account").unwrap();
    let answer = api
        .http
        .post(format!("{}/v1/aggregates/bank-account/{id}", api.base))
        .json(&json!({"command": {"type": "Open", "owner": "o"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(
        answer
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    busy.abort();
}

/// Limits set through one host hold on every host of the region: lowered to stop a
/// misbehaving plugin, they must not stop it on one host only.
#[tokio::test(flavor = "multi_thread")]
async fn limits_set_through_one_host_hold_on_every_host() {
    let db = TestDb::new("c_limits").await;
    let hosts = start_region(&db, 2).await;
    let status = wait_balanced(&hosts).await;
    // New aggregates the other host runs (a refused Open leaves its id unused, but an
    // accepted one does not).
    let owned_by_other = |attempt: u32| -> Vec<String> {
        (0..)
            .map(|i| format!("lim-{attempt}-{i}"))
            .filter(|id| owner_of(&status, id) == hosts[1].node_id)
            .take(5)
            .collect()
    };
    let api = hosts[0].client();
    assert_eq!(
        api.put_limits("bank-account", json!({"max_output_bytes": 1024}))
            .await,
        200
    );
    // An Open whose event is over 1 KiB, for aggregates the other host runs: refused
    // there too once it has taken the new limits (at once, on the change notice).
    let owner = "o".repeat(2_000);
    let mut attempt = 0;
    eventually(|| {
        attempt += 1;
        let (api, owner, ids) = (api.clone(), owner.clone(), owned_by_other(attempt));
        async move {
            for id in ids {
                let (status, body) = api
                    .command(
                        "bank-account",
                        &id,
                        json!({"command": {"type": "Open", "owner": owner}}),
                    )
                    .await;
                if status != 500 || body["error"]["code"] != "plugin_invalid_output" {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

/// A command another host forwards to an owner that hangs (here: paused, its sockets
/// open) is routed again once the owner's partitions move, instead of waiting out the
/// HTTP timeout and failing although a new owner serves the partition.
#[tokio::test(flavor = "multi_thread")]
async fn commands_forwarded_to_a_hung_owner_run_at_its_successor() {
    let db = TestDb::new("c_hung").await;
    let hosts = start_region(&db, 3).await;
    let accounts = open_accounts(&hosts, 60).await;
    let status = wait_balanced(&hosts).await;
    let hung = &hosts[1];
    let mine: Vec<String> = accounts
        .iter()
        .filter(|id| owner_of(&status, id) == hung.node_id)
        .take(10)
        .cloned()
        .collect();
    assert!(!mine.is_empty());

    hung.signal("STOP");
    let sent = spawn_deposits(&hosts[0].client(), &mine, 3);
    // Answered while the owner is still paused (the HTTP timeout is 30 s).
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(25),
        futures::future::join_all(sent),
    )
    .await;
    hung.signal("CONT");
    let answers = answers.expect("commands forwarded to the paused owner were not answered");
    for answer in answers {
        let (status, body) = answer.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["executed_by"], hung.node_id.as_str(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_host_is_fenced_and_rejoins() {
    let db = TestDb::new("c_pause").await;
    let hosts = start_region(&db, 3).await;
    let accounts = open_accounts(&hosts, 120).await;
    let status = wait_balanced(&hosts).await;
    let paused = &hosts[1];
    let mine: Vec<String> = accounts
        .iter()
        .filter(|id| owner_of(&status, id) == paused.node_id)
        .cloned()
        .collect();
    assert!(!mine.is_empty());
    let epochs_before: HashMap<u32, u64> = (0..PARTITIONS)
        .filter(|p| status["partition_owners"][*p as usize] == paused.node_id.as_str())
        .map(|p| (p, status["partition_epochs"][p as usize].as_u64().unwrap()))
        .collect();

    paused.signal("STOP");
    // Commands sent to the paused host now sit in its socket until it resumes.
    let stuck = spawn_deposits(&paused.client(), &mine[..mine.len().min(20)], 2);
    // Wait until the others took its partitions over.
    let others = [&hosts[0], &hosts[2]];
    let moved = eventually(|| async {
        let (_, s) = others[0].client().get("/v1/cluster").await;
        let owners = s["partition_owners"].as_array()?;
        let gone = owners
            .iter()
            .all(|o| o.as_str().is_some_and(|o| o != paused.node_id));
        (gone && owners.iter().all(|o| o.is_string())).then_some(s)
    })
    .await;
    for (p, epoch) in &epochs_before {
        assert!(moved["partition_epochs"][*p as usize].as_u64().unwrap() > *epoch);
    }
    paused.signal("CONT");
    for task in stuck {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // Nothing was written by the paused host at an epoch it had lost.
    let pool = db.pool().await;
    let rows: Vec<(Option<i32>, Option<i64>)> = sqlx::query_as(
        "SELECT (metadata->>'partition')::int, (metadata->>'partition_epoch')::bigint FROM events \
         WHERE metadata->>'node_id' = $1",
    )
    .bind(&paused.node_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    for (partition, epoch) in rows {
        let (Some(p), Some(e)) = (partition, epoch) else {
            continue;
        };
        if let Some(before) = epochs_before.get(&(p as u32)) {
            let current = moved["partition_epochs"][p as usize].as_u64().unwrap();
            assert!(
                e as u64 <= *before || e as u64 > current,
                "a stale-epoch append was accepted on partition {p}"
            );
        }
    }
    // It rejoins cleanly: back to ready, owning partitions and executing commands.
    let status = wait_balanced(&hosts).await;
    let back = accounts
        .iter()
        .find(|id| owner_of(&status, id) == paused.node_id)
        .unwrap();
    let (code, result) = hosts[0]
        .client()
        .command(
            "bank-account",
            back,
            json!({"command": {"type": "Deposit", "amount": 1}}),
        )
        .await;
    assert_eq!(code, 200, "{result}");
    assert_eq!(
        result["executed_by"].as_str(),
        Some(paused.node_id.as_str())
    );
    check_history(&db, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_and_draining_under_load_fail_no_command() {
    let db = TestDb::new("c_drain").await;
    let mut hosts = start_region(&db, 3).await;
    let accounts = open_accounts(&hosts, 200).await;
    let load = Load::start(
        hosts.iter().map(|h| h.client()).collect(),
        accounts,
        16,
        false,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A fourth host joins; partitions move to it under load.
    let fourth = Host::start(&db, options()).await;
    load.targets.lock().unwrap().push(fourth.client());
    hosts.push(fourth);
    wait_balanced(&hosts).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // SIGTERM one: clients stop picking it once /readyz says so (as a load balancer
    // would); it hands its partitions over and exits 0.
    let leaving = hosts.remove(1);
    leaving.signal("TERM");
    eventually(|| async {
        let r = reqwest::get(format!("{}/readyz", leaving.url)).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    load.targets
        .lock()
        .unwrap()
        .retain(|api| api.base != leaving.url);
    let mut leaving = leaving;
    let code = tokio::task::spawn_blocking(move || {
        let code = leaving.wait_exit(Duration::from_secs(30));
        (code, leaving)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "drained host did not exit 0");
    // It left no trace in the membership, nor in what uploads wait for.
    let pool = db.pool().await;
    let (members, running): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM members WHERE node_id = $1), \
                (SELECT count(*) FROM plugins_running WHERE node_id = $1)",
    )
    .bind(&code.1.node_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((members, running), (0, 0));
    wait_balanced(&hosts).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed commands: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(acked.len() > 100);
    check_history(&db, &acked).await;
}

/// A load balancer goes on sending a draining host new connections until its next
/// probe of `/readyz`. For its drain grace the host accepts them, although it holds no
/// partition any more, and passes their commands to the new owners.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_host_accepts_commands_for_its_grace_after_handing_over() {
    let db = TestDb::new("c_grace").await;
    let staying = Host::start(&db, options()).await;
    let mut with_grace = options();
    with_grace
        .env
        .push(("MERIDIAN_DRAIN_GRACE_MS".into(), "5000".into()));
    let mut leaving = Host::start(&db, with_grace).await;
    let (status, body) = staying
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    let hosts = [staying, leaving];
    wait_balanced(&hosts).await;
    let [staying, l] = hosts;
    leaving = l;

    leaving.signal("TERM");
    eventually(|| async {
        let r = reqwest::get(format!("{}/readyz", leaving.url)).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    eventually(|| async {
        let (_, s) = staying.client().get("/v1/cluster").await;
        s["partition_owners"]
            .as_array()?
            .iter()
            .all(|o| o.as_str() == Some(staying.node_id.as_str()))
            .then_some(())
    })
    .await;
    // A new live stream would end at once: the host says to go elsewhere instead.
    let stream = reqwest::Client::new()
        .get(format!("{}/v1/events", leaving.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 503, "a draining host opened a live stream");
    assert_eq!(stream.headers()["retry-after"], "1");
    let body: Value = stream.json().await.unwrap();
    assert_eq!(body["error"]["code"], "draining", "{body}");
    // Handed over; a client that has not noticed sends it commands all the same.
    let api = leaving.client();
    for i in 0..5 {
        let (status, body) = api
            .command(
                "bank-account",
                &format!("grace-{i}"),
                json!({"command": {"type": "Open", "owner": "o"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["executed_by"], staying.node_id.as_str(), "{body}");
    }
    let code = tokio::task::spawn_blocking(move || leaving.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "the drained host did not exit 0");
}

/// `MERIDIAN_DRAIN_TIMEOUT_SECS` is one budget for the whole drain, as an orchestrator
/// gives one between SIGTERM and SIGKILL. A command that never finishes holds both the
/// hand-over of its partition and the server's drain; the host must still exit within
/// the budget (not once per phase), and with a failure status, since it abandoned a
/// request.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_held_up_by_a_command_ends_within_its_timeout_and_fails() {
    const BUDGET_SECS: u64 = 5;
    let db = TestDb::new("c_drain_budget").await;
    let mut opts = options();
    opts.env.extend([
        (
            "MERIDIAN_DRAIN_TIMEOUT_SECS".into(),
            BUDGET_SECS.to_string(),
        ),
        ("MERIDIAN_DRAIN_GRACE_MS".into(), "0".into()),
    ]);
    let host = Host::start(&db, opts).await;
    let api = host.client();
    let (status, body) = api.upload("spin-loop", wasm_bytes("spin-loop")).await;
    assert_eq!(status, 201, "{body}");
    // The longest deadline there is: the command spins for a minute.
    assert_eq!(
        api.put_limits("spin-loop", json!({"deadline_ms": 60_000}))
            .await,
        200
    );
    let spinning = tokio::spawn({
        let api = api.clone();
        async move {
            api.command("spin-loop", "s1", json!({"command": {"type": "Go"}}))
                .await
        }
    });
    eventually(|| async {
        let (_, cluster) = api.get("/v1/cluster").await;
        (cluster["load"]["commands_in_flight"].as_u64()? >= 1).then_some(())
    })
    .await;

    let signalled = Instant::now();
    host.signal("TERM");
    let (code, log) = host.exit_and_log().await;
    let took = signalled.elapsed();
    spinning.abort();
    assert!(
        code.is_some_and(|c| c != 0),
        "a drain that abandoned a command exited {code:?}: {log}"
    );
    assert!(log.contains("drain timed out"), "{log}");
    // Once per phase it took twice the budget.
    assert!(
        took < Duration::from_secs(BUDGET_SECS * 2 - 1),
        "the drain took {took:?} with a budget of {BUDGET_SECS} s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_partition_count_is_refused_at_start() {
    let db = TestDb::new("c_parts").await;
    let _first = Host::start(&db, options()).await;
    let output = std::process::Command::new(crate::harness::meridian_bin())
        .arg("host")
        .env("MERIDIAN_DATABASE_URL", &db.url)
        .env(
            "MERIDIAN_HTTP_ADDR",
            format!("127.0.0.1:{}", crate::harness::free_port()),
        )
        .env("MERIDIAN_PARTITIONS", "128")
        .env_remove("MERIDIAN_NATS_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("created with 256 partitions") && stderr.contains("--partitions 256"),
        "{stderr}"
    );
}

/// Settings a host would otherwise start with and then fail on, later and less clearly:
/// no commit worker (a panic once the store started), a directory region it cannot
/// reach (ready, then refusing every new aggregate and upload).
#[tokio::test(flavor = "multi_thread")]
async fn settings_that_would_fail_later_are_refused_at_start() {
    let db = TestDb::new("c_settings").await;
    let refused = |env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(crate::harness::meridian_bin());
        command
            .arg("host")
            .env("MERIDIAN_DATABASE_URL", &db.url)
            .env(
                "MERIDIAN_HTTP_ADDR",
                format!("127.0.0.1:{}", crate::harness::free_port()),
            )
            .env_remove("MERIDIAN_NATS_URL");
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{env:?} was accepted");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let stderr = refused(&[("MERIDIAN_COMMIT_WORKERS", "0")]);
    assert!(stderr.contains("--commit-workers"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stderr = refused(&[
        ("MERIDIAN_REGION", "east"),
        ("MERIDIAN_PEER_REGIONS", "west"),
        ("MERIDIAN_DIRECTORY_REGION", "eats"),
    ]);
    assert!(
        stderr.contains("--directory-region `eats` is neither this region"),
        "{stderr}"
    );
    let stderr = refused(&[("MERIDIAN_DIRECTORY_REGION", "East")]);
    assert!(stderr.contains("invalid region name `East`"), "{stderr}");
    // Without tokens every route is open: allowed, and said at start.
    let open = Host::start(&db, options()).await;
    let log = std::fs::read_to_string(&open.log).unwrap();
    assert!(log.contains("authentication is off"), "{log}");
}

/// Hosts asked to listen on any free port (0) take their default node id from the
/// port they got: two on one machine are two members, not one id taken twice.
#[tokio::test(flavor = "multi_thread")]
async fn hosts_on_any_free_port_get_node_ids_of_their_own() {
    let db = TestDb::new("c_port0").await;
    let spawn = || {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new(crate::harness::meridian_bin())
            .arg("host")
            .env("MERIDIAN_DATABASE_URL", &db.url)
            .env("MERIDIAN_HTTP_ADDR", "127.0.0.1:0")
            .env("MERIDIAN_DB_CONNECTIONS", "6")
            .env("MERIDIAN_COMMIT_WORKERS", "3")
            .env_remove("MERIDIAN_NODE_ID")
            .env_remove("MERIDIAN_NATS_URL")
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        (KillOnDrop(child), log)
    };
    let mut first = spawn();
    let mut second = spawn();
    let pool = db.pool().await;
    let ids: Vec<String> = eventually(|| async {
        // An error until the first host has made the tables.
        let ids: Vec<String> = sqlx::query_scalar("SELECT node_id FROM members ORDER BY node_id")
            .fetch_all(&pool)
            .await
            .ok()?;
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert!(ids.iter().all(|id| !id.ends_with("-0")), "{ids:?}");
    for (child, log) in [&mut first, &mut second] {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "a host stopped: {}",
            std::fs::read_to_string(log.path()).unwrap()
        );
    }
}

/// Kills the process when dropped, as a test's hosts are.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_correlation_id_follows_a_forwarded_command_and_metrics_count_it() {
    let db = TestDb::new("c_trace").await;
    let hosts = start_region(&db, 2).await;
    let status = wait_balanced(&hosts).await;
    // An account the second host owns, sent to the first.
    let id = (0..)
        .map(|i| format!("traced-{i}"))
        .find(|id| owner_of(&status, id) == hosts[1].node_id)
        .unwrap();
    let correlation = format!("trace-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new()
        .post(format!("{}/v1/aggregates/bank-account/{id}", hosts[0].url))
        .header("x-correlation-id", &correlation)
        .json(&json!({"command": {"type": "Open", "owner": "t"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(
        result["executed_by"].as_str(),
        Some(hosts[1].node_id.as_str())
    );
    // A client's own `x-meridian-forwarded-by` (copied by a proxy, say) naming no
    // member is not taken for a forward: the command is still forwarded to its owner,
    // where it was answered `not_owner` on every try.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/aggregates/bank-account/{id}", hosts[0].url))
        .header("x-meridian-forwarded-by", "edge-proxy")
        .json(&json!({"command": {"type": "Deposit", "amount": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(
        result["executed_by"].as_str(),
        Some(hosts[1].node_id.as_str()),
        "{result}"
    );
    // Both hosts' logs carry it, and so does the event.
    eventually(|| async {
        let both = hosts.iter().all(|h| {
            std::fs::read_to_string(&h.log)
                .unwrap_or_default()
                .contains(&correlation)
        });
        both.then_some(())
    })
    .await;
    let (_, events) = hosts[0]
        .client()
        .get(&format!("/v1/aggregates/bank-account/{id}/events"))
        .await;
    assert_eq!(
        events["events"][0]["metadata"]["correlation_id"],
        correlation.as_str()
    );

    let metrics = reqwest::get(format!("{}/metrics", hosts[1].url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "meridian_commands_total",
        "meridian_command_seconds_bucket",
        "meridian_append_batch_size_bucket",
        "meridian_partitions_owned",
        "meridian_plugin_seconds_bucket",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"aggregate_type="bank-account",outcome="ok""#),
        "{metrics}"
    );
}

/// A host forwards a command to the partition's owner with the id it gave it added to
/// the body. A command just under the limit must still run there, not be refused by
/// the owner as over it.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_just_under_the_limit_runs_when_forwarded_to_its_owner() {
    let db = TestDb::new("c_limit").await;
    let mut options = options();
    options
        .env
        .push(("MERIDIAN_MAX_COMMAND_BYTES".into(), "2000".into()));
    let hosts = vec![
        Host::start(&db, options.clone()).await,
        Host::start(&db, options).await,
    ];
    let (status, body) = hosts[0]
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    let cluster = wait_balanced(&hosts).await;
    let api = hosts[0].client();
    let mut forwarded = 0;
    for i in 0..16 {
        let id = format!("lim-{i}");
        let frame = r#"{"command":{"type":"Open","owner":""}}"#.len();
        let raw = format!(
            r#"{{"command":{{"type":"Open","owner":"{}"}}}}"#,
            "o".repeat(2000 - frame)
        );
        assert_eq!(raw.len(), 2000);
        let (status, result) = api
            .post_raw(
                &format!("/v1/aggregates/bank-account/{id}"),
                raw.into_bytes(),
            )
            .await;
        assert_eq!(status, 200, "{id}: {result}");
        if owner_of(&cluster, &id) != hosts[0].node_id {
            forwarded += 1;
        }
    }
    assert!(forwarded > 0, "no command was forwarded");
    // One byte over is still refused, in the API's error shape.
    let raw = format!(
        r#"{{"command":{{"type":"Open","owner":"{}"}}}}"#,
        "o".repeat(2001 - r#"{"command":{"type":"Open","owner":""}}"#.len())
    );
    let (status, error) = api
        .post_raw("/v1/aggregates/bank-account/lim-over", raw.into_bytes())
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{error}"
    );
    // A forward from a host not observed yet (one that joined a moment ago) keeps its
    // allowance for the id the first host added: it was refused as over the limit.
    let with_id = format!(
        r#"{{"command":{{"type":"Open","owner":"{}"}},"command_id":"{}"}}"#,
        "o".repeat(2000 - r#"{"command":{"type":"Open","owner":""}}"#.len()),
        uuid::Uuid::new_v4()
    );
    assert!(with_id.len() > 2000);
    let answer = reqwest::Client::new()
        .post(format!(
            "{}/v1/aggregates/bank-account/lim-new",
            hosts[0].url
        ))
        .header("content-type", "application/json")
        .header("x-meridian-forwarded-by", "joined-a-moment-ago")
        .body(with_id)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
}

/// A host paused inside its heartbeat's transaction (a VM freeze, SIGSTOP) keeps its
/// member row locked until it resumes or the server ends its session. The other hosts'
/// liveness check waited on that row, and with it every observation and hand-over in
/// the region; it now steps over it. Here the test locks the row of a long-dead member
/// for two seconds, and the host beside it must go on observing the membership (its
/// own heartbeat, as it reads it, moves on).
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_member_row_holds_up_no_other_host() {
    let db = TestDb::new("locked_member").await;
    let hosts = start_region(&db, 1).await;
    let api = hosts[0].client();
    let pool = db.pool().await;
    sqlx::query(
        "INSERT INTO members (node_id, address, state, last_heartbeat) \
         VALUES ('paused', 'http://127.0.0.1:1', 'ready', now() - interval '1 minute')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The host's own heartbeat as its last observation of the membership shows it.
    let observed = || {
        let api = api.clone();
        let me = hosts[0].node_id.clone();
        async move {
            let (_, status) = api.get("/v1/cluster").await;
            status["members"]
                .as_array()
                .and_then(|members| members.iter().find(|m| m["id"] == me.as_str()))
                .map(|m| m["last_heartbeat"].clone())
                .unwrap()
        }
    };
    let mut paused = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM members WHERE node_id = 'paused' FOR UPDATE")
        .execute(&mut *paused)
        .await
        .unwrap();
    // An observation that started before the lock may still end after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = observed().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = observed().await;
    paused.rollback().await.unwrap();
    assert_ne!(
        before, after,
        "the host stopped observing the membership while a dead member's row was locked"
    );
}

/// A host cut off from the region's database is most likely declared dead by the
/// others, who take its partitions and write on. It used to stay ready and answer reads
/// from its cache, stale, for as long as the outage lasted; past `dead_after` without
/// reading the membership it now answers `/readyz` with 503 and reads go to the store
/// (503 while it is away), until it is back in touch.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_cut_off_from_the_database_turns_unready_and_serves_no_stale_state() {
    use crate::harness::TcpProxy;

    let db = TestDb::new("cut_off").await;
    let proxy = TcpProxy::start(&db).await;
    let host = Host::spawn(&proxy.url, options());
    host.wait_ready(Duration::from_secs(60)).await;
    let api = host.client();
    upload_and_open(&api, "cut-1").await;
    let (status, _) = api.get("/v1/aggregates/bank-account/cut-1").await;
    assert_eq!(status, 200);

    proxy.cut();
    eventually(|| {
        let api = api.clone();
        async move { (api.get("/readyz").await.0 == 503).then_some(()) }
    })
    .await;
    let (status, body) = api.get("/v1/aggregates/bank-account/cut-1").await;
    assert_eq!(status, 503, "a state read while cut off: {body}");

    proxy.restore();
    eventually(|| {
        let api = api.clone();
        async move { (api.get("/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let (status, body) = api.get("/v1/aggregates/bank-account/cut-1").await;
    assert_eq!((status, body["version"].as_i64()), (200, Some(1)), "{body}");
}

/// A host paused past `dead_after` loses its partitions and another host writes on.
/// Back, its first heartbeat makes it ready again before its next read of the leases
/// tells it what it lost: meanwhile it still took itself for the owner and answered
/// state reads from its cache, older than a version already acknowledged. Here the
/// leases are held locked, so that window stays open for the read.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_back_from_a_pause_answers_no_state_older_than_the_store() {
    let db = TestDb::new("c_stale").await;
    let hosts = start_region(&db, 2).await;
    let accounts = open_accounts(&hosts, 40).await;
    let status = wait_balanced(&hosts).await;
    let (other, paused) = (&hosts[0], &hosts[1]);
    let id = accounts
        .iter()
        .find(|id| owner_of(&status, id) == paused.node_id)
        .expect("an account of the host to pause");
    let path = format!("/v1/aggregates/bank-account/{id}");
    // In the paused host's cache.
    let (code, before) = paused.client().get(&path).await;
    assert_eq!(
        (code, before["version"].as_i64()),
        (200, Some(1)),
        "{before}"
    );

    paused.signal("STOP");
    eventually(|| async {
        let (_, s) = other.client().get("/v1/cluster").await;
        let owners = s["partition_owners"].as_array()?;
        owners
            .iter()
            .all(|o| o.as_str() == Some(other.node_id.as_str()))
            .then_some(())
    })
    .await;
    let (code, body) = other
        .client()
        .command(
            "bank-account",
            id,
            json!({"command": {"type": "Deposit", "amount": 5}}),
        )
        .await;
    assert_eq!((code, body["version"].as_i64()), (200, Some(2)), "{body}");

    let pool = db.pool().await;
    let mut leases = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE partition_leases IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *leases)
        .await
        .unwrap();
    paused.signal("CONT");
    eventually(|| {
        let api = paused.client();
        async move { (api.get("/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let (code, after) = paused.client().get(&path).await;
    leases.rollback().await.unwrap();
    assert_eq!(code, 200, "{after}");
    assert_eq!(
        after["version"].as_i64(),
        Some(2),
        "a ready host answered a state older than an acknowledged command: {after}"
    );
}

/// A host decides to take a dead member's leases on an observation that can be seconds
/// old when its statement runs (a slow database, a queue of acquisitions behind it).
/// If the member came back meanwhile, the lease moved away from a live owner and then
/// back again: two moves no membership change called for (the simulator's stability
/// check found it). The store now hands another node's lease over only while that node
/// is dead by its own clock.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_is_taken_from_another_node_only_while_it_is_dead() {
    use meridian::cluster::core::MemberState;
    use meridian::store::{self, cluster};

    let db = TestDb::new("takeover").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let dead_after = Duration::from_secs(3);
    let incarnation = uuid::Uuid::new_v4();
    cluster::heartbeat(&mut conn, "a", "http://a", MemberState::Ready, incarnation)
        .await
        .unwrap();
    let epoch = cluster::acquire(&mut conn, 0, "a", None, 0, dead_after)
        .await
        .unwrap();
    assert_eq!(epoch, Some(1));

    // "a" heartbeats: its lease stays its own, whatever "b" last saw.
    let taken = cluster::acquire(&mut conn, 0, "b", Some("a"), 1, dead_after)
        .await
        .unwrap();
    assert_eq!(taken, None, "the lease of a live node was taken");
    // Its own process (a replacement under its id) takes it back at any time.
    let again = cluster::acquire(&mut conn, 0, "a", Some("a"), 1, dead_after)
        .await
        .unwrap();
    assert_eq!(again, Some(2));

    // Silent past `dead_after`: now "b" takes it over.
    sqlx::query("UPDATE members SET last_heartbeat = now() - interval '10 seconds'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let taken = cluster::acquire(&mut conn, 0, "b", Some("a"), 2, dead_after)
        .await
        .unwrap();
    assert_eq!(taken, Some(3));
}

/// The database's connections going silent (no answer and no reset: a failover to
/// another address, a firewall or NAT dropping a flow it forgot) froze the host's
/// heartbeat and membership reads until the kernel gave up on the sockets, about a
/// quarter of an hour: the region counted the host dead and moved its partitions, and
/// the host could not come back, nor see that it had lost them. Each membership call
/// now has `dead_after` to answer, and a connection that did not is dropped, not put
/// back in the pool: the host heartbeats again on a new one within seconds.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_whose_database_connections_go_silent_is_back_on_new_ones() {
    use crate::harness::TcpProxy;

    let db = TestDb::new("silent_members").await;
    // A slow database, so that the silence finds calls on their way: an idle
    // connection gone silent is caught by the pool's check before it is lent out.
    let proxy = TcpProxy::start_slow(&db, Duration::from_millis(20)).await;
    let mut through_proxy = options();
    through_proxy
        .env
        .push(("MERIDIAN_APPEND_TIMEOUT_MS".into(), "2000".into()));
    let silenced = Host::spawn(&proxy.url, through_proxy);
    silenced.wait_ready(Duration::from_secs(60)).await;
    let other = Host::start(&db, options()).await;
    let hosts = [silenced, other];
    wait_balanced(&hosts).await;
    let (status, body) = hosts[1]
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    let ids = open_accounts(&hosts, 8).await;

    proxy.silence();
    let silenced_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    // Seen from the other host: a heartbeat written after the silence, so on a new
    // connection, and the region balanced over both again.
    let api = hosts[1].client();
    let node = hosts[0].node_id.clone();
    eventually(|| {
        let (api, node) = (api.clone(), node.clone());
        async move {
            let (_, status) = api.get("/v1/cluster").await;
            let member = status["members"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == node.as_str())?
                .clone();
            let at =
                chrono::DateTime::parse_from_rfc3339(member["last_heartbeat"].as_str()?).ok()?;
            (member["alive"] == true && at > silenced_at + chrono::Duration::seconds(1))
                .then_some(())
        }
    })
    .await;
    // Commands through it run again, once its partitions are back (taking each is a
    // few round trips of that slow database). Until then, and for the first ones to
    // meet a silent connection of its command pool, they get 503 (retryable).
    let api = hosts[0].client();
    futures::future::join_all(ids.iter().map(|id| {
        let api = api.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let (status, body) = api
                    .command(
                        "bank-account",
                        id,
                        json!({"command": {"type": "Deposit", "amount": 1}}),
                    )
                    .await;
                if status == 200 {
                    return;
                }
                assert!(
                    status == 503 && Instant::now() < deadline,
                    "{id}: {status} {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }))
    .await;
}

/// A host listening on every interface without an advertise URL advertises an address
/// no other host can reach (connecting to 0.0.0.0 reaches the connecting host itself,
/// so forwards would come back to their sender). Alone it runs; it joins no region with
/// other hosts, and no host joins a region where it runs — each refusing to start with
/// a message naming what to set.
#[tokio::test(flavor = "multi_thread")]
async fn an_address_other_hosts_cannot_reach_runs_only_alone() {
    let db = TestDb::new("unspecified").await;
    let everywhere = |port: u16| HostOptions {
        port: Some(port),
        env: vec![("MERIDIAN_HTTP_ADDR".into(), format!("0.0.0.0:{port}"))],
        ..options()
    };
    let mut alone = Host::start(&db, everywhere(crate::harness::free_port())).await;
    let (status, _) = alone.client().get("/v1/cluster").await;
    assert_eq!(status, 200);

    for (options, says) in [
        (options(), "advertises http://0.0.0.0:"),
        (everywhere(crate::harness::free_port()), "--advertise-url"),
    ] {
        let refused = Host::spawn(&db.url, options);
        let (code, log) = refused.exit_and_log().await;
        assert!(
            matches!(code, Some(c) if c != 0) && log.contains(says),
            "exit {code:?}: {log}"
        );
    }
    // Given an advertise URL, it is reachable, and a second host joins. (Stopped
    // cleanly, its member row goes at once.)
    alone.signal("TERM");
    let code = tokio::task::spawn_blocking(move || alone.wait_exit(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let port = crate::harness::free_port();
    let mut fixed = everywhere(port);
    fixed.env.push((
        "MERIDIAN_ADVERTISE_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    let first = Host::start(&db, fixed).await;
    let second = Host::start(&db, options()).await;
    let (status, body) = first
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    wait_balanced(&[first, second]).await;
}

/// Two processes given one node id shared one member row and took each other's
/// partitions back and forth. A host now refuses to start while another process
/// heartbeats as its node id, naming the setting to change — after waiting out a row
/// that is only its own predecessor's, killed a moment ago (the restart below).
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_a_node_id_in_use_refuses_to_start() {
    let db = TestDb::new("twin").await;
    let twin = || HostOptions {
        node_id: Some("twin".into()),
        ..options()
    };
    let mut first = Host::start(&db, twin()).await;
    let second = Host::spawn(&db.url, twin());
    let (code, log) = second.exit_and_log().await;
    assert!(
        matches!(code, Some(c) if c != 0)
            && log.contains("another process runs as node twin")
            && log.contains("MERIDIAN_NODE_ID"),
        "exit {code:?}: {log}"
    );
    let (status, body) = first
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "{body}");
    // Killed and started again at once, the same node waits for its old row to go
    // quiet, then takes it.
    first.restart().await;
    let (status, body) = first
        .client()
        .command(
            "bank-account",
            "twin-1",
            json!({"command": {"type": "Open", "owner": "t"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// On a database slow enough that one poll of the membership takes longer than the
/// poll interval, the driver's tick was ready again each time a poll ended, and being
/// first in its loop it always won: the host's own inputs (caught up, drain, a
/// partition gone idle) waited behind it for ever. Such a host never became ready, and
/// a SIGTERM never drained it.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_on_a_slow_database_becomes_ready_and_drains() {
    use crate::harness::TcpProxy;

    let db = TestDb::new("slow_db").await;
    // About ten round trips a poll: half a second each, against a 200 ms interval.
    let proxy = TcpProxy::start_slow(&db, Duration::from_millis(50)).await;
    let mut slow = options();
    slow.env.extend([
        ("MERIDIAN_PARTITIONS".to_string(), "8".to_string()),
        ("MERIDIAN_DRAIN_TIMEOUT_SECS".to_string(), "30".to_string()),
    ]);
    let host = Host::spawn(&proxy.url, slow);
    host.wait_ready(Duration::from_secs(60)).await;
    upload_and_open(&host.client(), "slow-1").await;
    host.signal("TERM");
    let (code, log) = host.exit_and_log().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A host paused for longer than the region waits for a heartbeat is declared dead,
/// and its supervisor may start a replacement under the same node id, which takes the
/// id's partitions. Resumed, the old process found its heartbeat refused but went on
/// deciding in that id's name: it took the replacement's leases back, which took them
/// back again, and so on until someone killed it. Now it stops at once, failing, and
/// the replacement keeps every partition and runs every command.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_host_replaced_under_its_node_id_stops_when_it_resumes() {
    let db = TestDb::new("superseded").await;
    let named = || HostOptions {
        node_id: Some("solo".into()),
        ..options()
    };
    let mut hosts = start_region_with(&db, 1, named()).await;
    let old = hosts.remove(0);
    let ids = open_accounts(std::slice::from_ref(&old), 8).await;
    let (_, before) = old.client().get("/v1/cluster").await;
    old.signal("STOP");
    // The replacement waits out the old row (dead after 3 s), then takes the id. The
    // leases already name the id, so "balanced" alone would be true before the
    // replacement took any: wait until it holds every one under a newer epoch.
    let replacement = Host::start(&db, named()).await;
    wait_balanced(std::slice::from_ref(&replacement)).await;
    let api = replacement.client();
    let epochs = eventually(|| {
        let (api, before) = (api.clone(), before.clone());
        async move {
            let (_, status) = api.get("/v1/cluster").await;
            let epochs = status["partition_epochs"].as_array()?.clone();
            let taken = (0..PARTITIONS as usize).all(|p| {
                status["partition_owners"][p] == "solo"
                    && epochs[p].as_u64() > before["partition_epochs"][p].as_u64()
            });
            taken.then_some(Value::Array(epochs))
        }
    })
    .await;
    old.signal("CONT");
    let (code, log) = old.exit_and_log().await;
    assert!(
        matches!(code, Some(c) if c != 0) && log.contains("another process took node id solo over"),
        "exit {code:?}: {log}"
    );
    // The replacement's leases stayed where they were: nobody took them back and forth.
    let (_, now) = replacement.client().get("/v1/cluster").await;
    assert_eq!(
        now["partition_epochs"], epochs,
        "partitions moved after the old process resumed"
    );
    for id in &ids {
        let (status, body) = replacement
            .client()
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Deposit", "amount": 1}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    check_history(&db, &[]).await;
}

/// A host restarted under its node id while the member row is locked: its predecessor
/// froze inside its heartbeat's transaction, which the server ends only after 10 s.
/// The new process judged the row by the clock of before that wait, found the
/// predecessor's heartbeat current, took it for another live process, and refused to
/// start.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_waited_on_its_predecessors_locked_row_starts() {
    let db = TestDb::new("claim_wait").await;
    let named = || HostOptions {
        node_id: Some("solo".into()),
        ..options()
    };
    let mut first = Host::start(&db, named()).await;
    let pool = db.pool().await;
    first.signal("KILL");
    tokio::task::spawn_blocking(move || first.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    // The row as a frozen heartbeat would hold it, with its last heartbeat current.
    let mut frozen = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM members WHERE node_id = 'solo' FOR UPDATE")
        .execute(&mut *frozen)
        .await
        .unwrap();
    let next = Host::spawn(&db.url, named());
    // Past twice the 3 s a heartbeat may be late, as the server's 10 s would be.
    tokio::time::sleep(Duration::from_secs(7)).await;
    frozen.rollback().await.unwrap();
    next.wait_ready(Duration::from_secs(60)).await;
}

/// The same while the host is still catching up (compiling plugins) when it pauses:
/// it never became ready, and it waited to for good, up (`/healthz`) but unready,
/// where a supervisor would neither restart it nor see it fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_replaced_under_its_node_id_while_catching_up_stops_when_it_resumes() {
    let db = TestDb::new("superseded_sync").await;
    let named = || HostOptions {
        node_id: Some("solo".into()),
        ..options()
    };
    // A Python component: compiling it, as every host does at start with its own
    // empty compile cache, takes seconds.
    {
        let first = Host::start(&db, named()).await;
        let (status, body) = first
            .client()
            .upload("bank-account", wasm_bytes("bank-account-py"))
            .await;
        assert_eq!(status, 201, "{body}");
        first.signal("TERM");
        let (code, log) = first.exit_and_log().await;
        assert_eq!(code, Some(0), "{log}");
    }
    let old = Host::spawn(&db.url, named());
    eventually(|| async { old.log_tail().contains("listening").then_some(()) }).await;
    old.signal("STOP");
    assert!(
        !old.log_tail().contains("caught up"),
        "caught up before it paused: this test proves nothing\n{}",
        old.log_tail()
    );
    // The replacement waits out the old row (dead after 3 s), then takes the id.
    let replacement = Host::start(&db, named()).await;
    old.signal("CONT");
    let (code, log) = old.exit_and_log().await;
    assert!(
        matches!(code, Some(c) if c != 0) && log.contains("another process took node id solo over"),
        "exit {code:?}: {log}"
    );
    let (status, body) = replacement
        .client()
        .command(
            "bank-account",
            "after-sync",
            json!({"command": {"type": "Open", "owner": "o"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
