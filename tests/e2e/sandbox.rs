//! Hostile plugins are contained: each fails only its own command, within its limits,
//! and the host keeps serving everyone else.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Api, Host, HostOptions, TestDb, wasm_bytes};

async fn upload_all(api: &Api) {
    for name in [
        "bank-account",
        "spin-loop",
        "memory-bomb",
        "panicker",
        "file-reader",
        "clock-reader",
        "socket-opener",
        "sleeper",
    ] {
        let (status, body) = api.upload(name, wasm_bytes(name)).await;
        assert_eq!(status, 201, "{name}: {body}");
    }
}

async fn still_serves(api: &Api, id: &str) {
    let (status, body) = api
        .command(
            "bank-account",
            id,
            json!({"command": {"type": "Open", "owner": "z"}}),
        )
        .await;
    assert_eq!(
        status, 200,
        "host stopped serving after a hostile plugin: {body}"
    );
}

/// Sends a command to `plugin` and checks it failed with a 500 whose code is `code` and
/// whose message names the plugin and says `says`; returns the message.
async fn fails_with(api: &Api, plugin: &str, id: &str, code: &str, says: &str) -> String {
    let (status, body) = api
        .command(plugin, id, json!({"command": {"type": "Go"}}))
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{plugin}@v1")), "{body}");
    assert!(message.contains(says), "{body}");
    message.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_plugins_are_contained() {
    let db = TestDb::new("sandbox").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    upload_all(&api).await;

    // An infinite loop is interrupted at the deadline (100 ms by default).
    let started = Instant::now();
    fails_with(
        &api,
        "spin-loop",
        "s1",
        "plugin_deadline_exceeded",
        "100 ms",
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "the loop was not interrupted: {elapsed:?}"
    );
    still_serves(&api, "a1").await;

    // Lower the deadline for that type: limits are per aggregate type.
    assert_eq!(
        api.put_limits("spin-loop", json!({"deadline_ms": 20}))
            .await,
        200
    );
    fails_with(&api, "spin-loop", "s1", "plugin_deadline_exceeded", "20 ms").await;

    // Time never passes in the sandbox: an hour's sleep ends at once (a real one would
    // hold the aggregate, since a sleeping guest runs no code for the deadline to stop)...
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(60),
        api.command("sleeper", "z0", json!({"command": {"type": "Nap"}})),
    )
    .await
    .expect("a plugin's sleep waited on a real timer");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["type"], "Woke", "{body}");
    // ...so sleeping forever is a busy loop, and the deadline stops it.
    fails_with(
        &api,
        "sleeper",
        "z1",
        "plugin_deadline_exceeded",
        "deadline",
    )
    .await;
    still_serves(&api, "a1b").await;

    // A memory bomb hits the 64 MiB cap. Its deadline is longer than the default:
    // deadlines run on the wall clock, and on a loaded machine (tests run side by side)
    // filling 64 MiB can outlast 100 ms.
    let status = api
        .put_limits("memory-bomb", json!({"deadline_ms": 5000}))
        .await;
    assert_eq!(status, 200);
    fails_with(
        &api,
        "memory-bomb",
        "m1",
        "plugin_out_of_memory",
        "out of memory",
    )
    .await;
    still_serves(&api, "a2").await;

    // A panic is a trap that fails the command.
    fails_with(
        &api,
        "panicker",
        "p1",
        "plugin_trapped",
        "boom: plugin panicked on purpose",
    )
    .await;
    still_serves(&api, "a3").await;

    // Files and environment are not there.
    let (status, body) = api
        .command("file-reader", "f1", json!({"command": {"type": "Go"}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let probe = &body["events"][0]["payload"];
    assert!(
        probe["file"].as_str().unwrap().starts_with("error"),
        "the plugin read a file: {probe}"
    );
    assert!(
        !probe["file"].as_str().unwrap().contains("root:"),
        "{probe}"
    );
    assert_eq!(probe["env_count"], 0, "{probe}");

    // Sockets are linked (interpreters such as componentize-py's CPython import them)
    // but every operation is refused: no connection reaches a listener on this very
    // machine, no socket binds, no name resolves.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (status, body) = api
        .command(
            "socket-opener",
            "n1",
            json!({"command": {"type": "Go", "addr": addr}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let probe = &body["events"][0]["payload"];
    for field in ["tcp", "udp", "dns"] {
        assert!(
            probe[field].as_str().unwrap().starts_with("error"),
            "the plugin used the network ({field}): {probe}"
        );
    }
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "a connection from the plugin arrived"
    );

    // Clocks and randomness are fixed: two calls see the same values.
    let (_, first) = api
        .command("clock-reader", "c1", json!({"command": {"type": "Go"}}))
        .await;
    let (_, second) = api
        .command("clock-reader", "c2", json!({"command": {"type": "Go"}}))
        .await;
    let a = &first["events"][0]["payload"];
    let b = &second["events"][0]["payload"];
    assert!(a.is_object(), "{first}");
    assert_eq!(a, b, "clock or randomness differs between calls");
    let nanos = a["system_time_nanos"].as_u64().unwrap();
    assert_eq!(
        nanos / 1_000_000_000,
        meridian::runtime::FIXED_WALL_CLOCK_SECS,
        "{a}"
    );

    // Hostile plugins failed often; the region is still fine and nothing they failed
    // was written.
    let pool = db.pool().await;
    let written: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT aggregate_type FROM events ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        written,
        [
            "bank-account",
            "clock-reader",
            "file-reader",
            "sleeper",
            "socket-opener"
        ]
    );
    let slept: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM events WHERE aggregate_type = 'sleeper'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(slept, ["z0"], "only the nap that ended decided an event");
    still_serves(&api, "a4").await;
}

/// An aggregate with a large state keeps taking commands: every call carries the whole
/// state in and out, and the components' allocator left each such call's memory behind
/// (it passes its 1 MiB rebase size on the way), so after about fifteen calls on one
/// instance a command failed with `plugin_out_of_memory` under the 64 MiB cap.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregate_with_a_large_state_keeps_taking_commands() {
    let db = TestDb::new("large_state").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    let owner = "x".repeat(450_000);
    let (status, body) = api
        .command(
            "bank-account",
            "large-1",
            json!({"command": {"type": "Open", "owner": owner}}),
        )
        .await;
    assert_eq!(
        status,
        200,
        "{}",
        &body.to_string()[..200.min(body.to_string().len())]
    );
    for deposit in 1..=60 {
        let (status, body) = api
            .command(
                "bank-account",
                "large-1",
                json!({"command": {"type": "Deposit", "amount": 1}}),
            )
            .await;
        assert_eq!(status, 200, "deposit {deposit}: {body}");
    }
}

/// A plugin that keeps memory from call to call (a leak, or things kept in `static`s)
/// fails no command for it: an instance past half its memory cap is not reused. Here
/// each command keeps 8 MiB; on one reused instance the eighth ran out of the 64 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_leaks_memory_fails_no_command() {
    let db = TestDb::new("leak").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");
    // Under the default cap of 64 MiB.
    for n in 1..=24 {
        let (status, body) = api
            .command(
                "bad-output",
                "leak-1",
                json!({"command": {"type": "Leak", "megabytes": 8}}),
            )
            .await;
        assert_eq!(status, 200, "command {n}: {body}");
    }
}

/// The same leak in `apply`, on a replay: a replay makes one call per event through one
/// instance, which is replaced within it once past half its memory, as between
/// commands. Otherwise an aggregate whose history leaks more than the cap failed to
/// load at the same event every time, and every command on it failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_through_a_plugin_that_leaks_memory_completes() {
    let db = TestDb::new("replayleak").await;
    let mut host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");
    let leak = json!({"command": {"type": "LeakOnApply", "megabytes": 8}});
    for n in 1..=12 {
        let (status, body) = api.command("bad-output", "leak-2", leak.clone()).await;
        assert_eq!(status, 200, "command {n}: {body}");
    }
    // Restarted, the host has no state cached: the next command replays 12 events
    // that keep 96 MiB between them, over the 64 MiB cap.
    host.restart().await;
    let api = host.client();
    let (status, body) = api.command("bad-output", "leak-2", leak).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 13, "{body}");
}

/// A plugin cannot make the host build a large random draw for it. wasmtime-wasi builds
/// the bytes in host memory, one at a time and outside the CPU deadline, and by default
/// serves up to 64 MiB a call; a 32 MiB draw fits the plugin's 64 MiB of memory, so
/// without the host's 1 MiB cap it was served.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_cannot_draw_a_huge_random_buffer() {
    let db = TestDb::new("random_draw").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("clock-reader", wasm_bytes("clock-reader")).await;
    assert_eq!(status, 201, "{body}");
    let draw = |id: &'static str, bytes: u64| {
        let api = api.clone();
        async move {
            api.command(
                "clock-reader",
                id,
                json!({"command": {"random_bytes": bytes}}),
            )
            .await
        }
    };
    let (status, body) = draw("r1", 64).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["payload"]["bytes"], 64, "{body}");

    let (status, body) = draw("r2", 32 << 20).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("plugin_trapped")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("clock-reader@v1") && message.contains("exceeds limit 1048576"),
        "{body}"
    );
    // Nothing was written for it, and the plugin keeps serving.
    let (status, body) = draw("r3", 1 << 20).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["payload"]["bytes"], 1 << 20, "{body}");
    let (status, _) = api.get("/v1/aggregates/clock-reader/r2").await;
    assert_eq!(status, 404);
}

/// A plugin cannot make the host copy much more than its output caps allow before the
/// caps are checked: what crosses from the plugin to the host in one call is bounded
/// (wasmtime's "hostcall fuel"), and a call past it fails as invalid output, naming the
/// caps. Here 1,000 events of 10 kB each, 10 MB against a 1 MiB cap.
#[tokio::test(flavor = "multi_thread")]
async fn output_far_over_the_caps_fails_before_it_is_copied() {
    let db = TestDb::new("hostcall_fuel").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");
    // Building 10 MB of events can take the guest longer than the default 100 ms on a
    // busy machine; the deadline is not what this is about.
    assert_eq!(
        api.put_limits("bad-output", json!({"deadline_ms": 10_000}))
            .await,
        200
    );
    let (status, body) = api
        .command(
            "bad-output",
            "many",
            json!({"command": {"type": "Repeat", "text": "t".repeat(10_000), "count": 1_000}}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("plugin_invalid_output")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("bad-output@v1")
            && message.contains("more than")
            && message.contains("1048576 bytes of output"),
        "{body}"
    );
    // Within the caps, the same plugin serves.
    let (status, body) = api
        .command(
            "bad-output",
            "many",
            json!({"command": {"type": "Repeat", "text": "t".repeat(100), "count": 1_000}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Limits within their ranges that the type's component cannot run under are refused
/// when they are set, naming the limit, and nothing changes: accepted, every command of
/// the type failed from then on.
#[tokio::test(flavor = "multi_thread")]
async fn limits_the_plugin_cannot_run_under_are_refused() {
    let db = TestDb::new("tight_limits").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    // A Rust component's start-up alone takes more than 1 MiB (its stack).
    let (status, body) = api
        .put_raw(
            "/v1/plugins/bank-account/limits",
            json!({"memory_bytes": 1_048_576}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("limits_too_tight")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("version 1 of `bank-account`") && message.contains("ran out of memory"),
        "{body}"
    );
    // Nothing changed: the defaults hold and commands run.
    let (_, limits) = api.get("/v1/plugins/bank-account/limits").await;
    assert_eq!(limits["memory_bytes"], 64 * 1024 * 1024, "{limits}");
    still_serves(&api, "after-tight").await;
    // Limits it runs under are taken.
    assert_eq!(
        api.put_limits("bank-account", json!({"memory_bytes": 16 * 1024 * 1024}))
            .await,
        200
    );
    still_serves(&api, "after-loose").await;
}

/// Limits a stored aggregate cannot run under (its state is over `max_output_bytes`)
/// were taken with a 200, and from then on every command and read of that aggregate
/// was a 500. Its history is now replayed under them first: refused, naming it, unless
/// forced.
#[tokio::test(flavor = "multi_thread")]
async fn limits_a_stored_aggregate_cannot_run_under_are_refused_unless_forced() {
    let db = TestDb::new("history_limits").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .command(
            "bank-account",
            "big-1",
            json!({"command": {"type": "Open", "owner": "o".repeat(2_000)}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let tight = json!({"max_output_bytes": 1024}).to_string().into_bytes();
    let (status, body) = api
        .put_raw("/v1/plugins/bank-account/limits", tight.clone())
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("limits_too_tight_for_history")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bank-account/big-1")),
        "{body}"
    );
    // Nothing changed: the aggregate still takes commands.
    let (status, body) = api
        .command(
            "bank-account",
            "big-1",
            json!({"command": {"type": "Deposit", "amount": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Forced, they are taken (to stop a plugin misbehaving, whatever it costs).
    let (status, body) = api
        .put_raw("/v1/plugins/bank-account/limits?force=true", tight)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["max_output_bytes"], 1024, "{body}");
}

/// A plugin cannot make the host hold an unbounded number of resources for it: they
/// live in host memory, outside the memory cap, and survive from call to call on a
/// reused instance. Past 100,000 the call fails and the instance is dropped; wasmtime's
/// own limit is a million per instance.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_cannot_hoard_host_resources() {
    let db = TestDb::new("hoard").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("clock-reader", wasm_bytes("clock-reader")).await;
    assert_eq!(status, 201, "{body}");
    // Making 150,000 takes longer than the default 100 ms deadline.
    assert_eq!(
        api.put_limits("clock-reader", json!({"deadline_ms": 10_000}))
            .await,
        200
    );
    let hold = |id: &'static str, pollables: u32| {
        let api = api.clone();
        async move {
            api.command(
                "clock-reader",
                id,
                json!({"command": {"pollables": pollables}}),
            )
            .await
        }
    };
    let (status, body) = hold("p1", 100).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = hold("p2", 150_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("plugin_trapped")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("clock-reader@v1") && m.contains("resource table")),
        "{body}"
    );
    // The plugin serves on, on a fresh instance.
    let (status, body) = hold("p3", 100).await;
    assert_eq!(status, 200, "{body}");
}
