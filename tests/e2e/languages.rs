//! One bank-account behaviour, three languages: the same suite runs against the Rust
//! (`plugins/bank-account`), Python (`plugins/bank-account-py`, componentize-py) and
//! JavaScript (`plugins/bank-account-js`, componentize-js) components through a real
//! host, and a history written by one language must replay in the others.
//!
//! The rejection messages of business rules are compared exactly; a malformed command
//! must be rejected with `invalid command: ` and the reason (serde's wording in Rust,
//! the same words without serde's line/column position elsewhere).

use serde_json::{Value, json};

use crate::harness::{Api, Host, HostOptions, TestDb, wasm_bytes};

/// The aggregate type every variant is uploaded as.
const TYPE: &str = "bank-account";

/// The three components, by the name `plugins/build.sh` gives their file.
const RUST: &str = "bank-account";
const PYTHON: &str = "bank-account-py";
const JAVASCRIPT: &str = "bank-account-js";

/// The Rust SDK builds the current contract, whose `execute` runs a command in one
/// call; the Python and JavaScript examples implement 0.1.0 (`handle`, then `apply` per
/// event), so this suite also proves the host still runs components built against it.
const CURRENT: &str = "meridian:aggregate@0.2.0";
const V0_1: &str = "meridian:aggregate@0.1.0";

#[tokio::test(flavor = "multi_thread")]
async fn rust_bank_account_follows_the_contract() {
    bank_account_suite(RUST, CURRENT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_bank_account_follows_the_contract() {
    bank_account_suite(PYTHON, V0_1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_bank_account_follows_the_contract() {
    bank_account_suite(JAVASCRIPT, V0_1).await;
}

/// Sends `command` to account `id` and returns the status and body.
async fn send(api: &Api, id: &str, command: Value) -> (u16, Value) {
    api.command(TYPE, id, json!({ "command": command })).await
}

/// Sends `command` and expects it accepted with exactly `events` (type, payload).
async fn accepted(api: &Api, plugin: &str, id: &str, command: Value, events: &[(&str, Value)]) {
    let (status, body) = send(api, id, command.clone()).await;
    assert_eq!(status, 200, "{plugin}: {command} → {body}");
    let got: Vec<(String, Value)> = body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{plugin}: no events in {body}"))
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["payload"].clone()))
        .collect();
    let want: Vec<(String, Value)> = events
        .iter()
        .map(|(t, p)| ((*t).to_owned(), p.clone()))
        .collect();
    assert_eq!(got, want, "{plugin}: {command}");
}

/// Sends `command` and expects a 422 rejection whose message is exactly `message`.
async fn rejected(api: &Api, plugin: &str, id: &str, command: Value, message: &str) {
    let got = rejection(api, plugin, id, command.clone()).await;
    assert_eq!(got, message, "{plugin}: {command}");
}

/// Sends `command` and expects a 422 rejection; returns its message.
async fn rejection(api: &Api, plugin: &str, id: &str, command: Value) -> String {
    let (status, body) = send(api, id, command.clone()).await;
    assert_eq!(status, 422, "{plugin}: {command} → {body}");
    assert_eq!(body["error"]["code"], "rejected", "{plugin}: {body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Sends a malformed `command`: rejected as `invalid command: …` containing `reason`.
async fn invalid(api: &Api, plugin: &str, id: &str, command: Value, reason: &str) {
    let message = rejection(api, plugin, id, command.clone()).await;
    assert!(
        message.starts_with("invalid command: ") && message.contains(reason),
        "{plugin}: {command} → {message:?}, want `invalid command: …{reason}…`"
    );
}

/// The state of account `id` exactly as the host returns it: the plugin's own bytes.
async fn raw_state(api: &Api, id: &str) -> String {
    let response = api
        .http
        .get(format!("{}/v1/aggregates/{TYPE}/{id}", api.base))
        .send()
        .await
        .expect("get state");
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let start = body.find(r#""state":"#).expect("a state field") + r#""state":"#.len();
    let end = start + body[start..].find('}').expect("state ends") + 1;
    body[start..end].to_owned()
}

/// Host options with a compile cache shared by every test of this module and kept
/// across runs (under the target directory): compiling a Python or JavaScript component
/// takes seconds of both cores, which would slow the timing-sensitive tests running
/// beside these ones. The cache is keyed by the component's sha256, so a rebuilt plugin
/// is compiled afresh.
fn options() -> HostOptions {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let cache = target.join("e2e-plugin-cache");
    HostOptions {
        env: vec![("MERIDIAN_CACHE_DIR".into(), cache.display().to_string())],
        ..HostOptions::default()
    }
}

async fn host_with(plugin: &str, label: &str, contract: &str) -> (TestDb, Host) {
    let db = TestDb::new(label).await;
    let host = Host::start(&db, options()).await;
    let (status, body) = host.client().upload(TYPE, wasm_bytes(plugin)).await;
    assert_eq!(status, 201, "{plugin}: upload: {body}");
    assert_eq!(body["aggregate_type"], TYPE, "{plugin}");
    assert_eq!(body["contract"], contract, "{plugin}");
    (db, host)
}

/// The whole behaviour of the bank account, run once per component.
async fn bank_account_suite(plugin: &str, contract: &str) {
    let label = plugin.replace('-', "_");
    let (_db, mut host) = host_with(plugin, &label, contract).await;
    let api = host.client();
    let p = plugin;

    // Nothing but Open before the account is open.
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 10}),
        "account is not open",
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": 1}),
        "account is not open",
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Open", "owner": ""}),
        "owner must not be empty",
    )
    .await;
    // Blank in Unicode's sense (Rust's `char::is_whitespace`), not only ASCII spaces.
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Open", "owner": " \t\u{3000}\u{2028}"}),
        "owner must not be empty",
    )
    .await;

    accepted(
        &api,
        p,
        "a",
        json!({"type": "Open", "owner": "alice"}),
        &[("Opened", json!({"owner": "alice"}))],
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Open", "owner": "bob"}),
        "account is already open",
    )
    .await;
    assert_eq!(
        raw_state(&api, "a").await,
        r#"{"owner":"alice","balance":0,"open":true}"#,
        "{p}"
    );

    // Amounts must be positive; a rule is checked after "open", before the balance.
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 0}),
        "amount must be positive, got 0",
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": -3}),
        "amount must be positive, got -3",
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": 0}),
        "amount must be positive, got 0",
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": -1}),
        "amount must be positive, got -1",
    )
    .await;

    accepted(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 10}),
        &[("Deposited", json!({"amount": 10}))],
    )
    .await;
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": 4}),
        &[("Withdrawn", json!({"amount": 4}))],
    )
    .await;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": 7}),
        "insufficient funds: balance 6, withdrawal 7",
    )
    .await;
    // Fields the command does not know are ignored, as serde does by default.
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": 6, "note": "all of it"}),
        &[("Withdrawn", json!({"amount": 6}))],
    )
    .await;
    assert_eq!(
        raw_state(&api, "a").await,
        r#"{"owner":"alice","balance":0,"open":true}"#,
        "{p}"
    );

    // Amounts are 64-bit integers, exact beyond a double's 2^53, with overflow refused.
    let big: i64 = (1 << 53) + 1;
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": big}),
        &[("Deposited", json!({"amount": big}))],
    )
    .await;
    let headroom = i64::MAX - big;
    rejected(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": headroom + 1}),
        &format!(
            "balance would overflow: balance {big}, deposit {}",
            headroom + 1
        ),
    )
    .await;
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": headroom}),
        &[("Deposited", json!({"amount": headroom}))],
    )
    .await;
    assert_eq!(
        raw_state(&api, "a").await,
        format!(r#"{{"owner":"alice","balance":{},"open":true}}"#, i64::MAX),
        "{p}"
    );
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Withdraw", "amount": i64::MAX}),
        &[("Withdrawn", json!({"amount": i64::MAX}))],
    )
    .await;

    // Malformed commands never reach the rules.
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Teleport"}),
        "unknown variant `Teleport`",
    )
    .await;
    invalid(&api, p, "a", json!({"amount": 5}), "missing field `type`").await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Open"}),
        "missing field `owner`",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit"}),
        "missing field `amount`",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": "ten"}),
        "invalid type: string \"ten\", expected i64",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 1.5}),
        "invalid type: floating point `1.5`, expected i64",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 10.0}),
        "expected i64",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 9_223_372_036_854_775_808u64}),
        "expected i64",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": true}),
        "invalid type: boolean `true`, expected i64",
    )
    .await;
    invalid(
        &api,
        p,
        "a",
        json!({"type": "Open", "owner": 7}),
        "invalid type: integer `7`, expected a string",
    )
    .await;
    invalid(&api, p, "a", json!({"type": null}), "invalid type: null").await;
    let (status, body) = api
        .post_raw(
            &format!("/v1/aggregates/{TYPE}/a"),
            br#"{"command": {"type": "Deposit", "amount": 1, "amount": 2}}"#.to_vec(),
        )
        .await;
    // The host itself may refuse a repeated key (400) or pass it on; a plugin must not
    // silently pick one of the two amounts.
    assert!(
        status == 400 || status == 422,
        "{p}: repeated key accepted: {body}"
    );

    // Strings go through unchanged: non-ASCII, quotes, control characters.
    let owner = "Zoë \"Z\" Ñandú\n🚀";
    accepted(
        &api,
        p,
        "u",
        json!({"type": "Open", "owner": owner}),
        &[("Opened", json!({"owner": owner}))],
    )
    .await;
    assert_eq!(
        raw_state(&api, "u").await,
        r#"{"owner":"Zoë \"Z\" Ñandú\n🚀","balance":0,"open":true}"#,
        "{p}"
    );

    // The history replays to the same state after a restart (no cache, no snapshot:
    // fewer events than the snapshot interval).
    let before_a = raw_state(&api, "a").await;
    let before_u = raw_state(&api, "u").await;
    host.restart().await;
    let api = host.client();
    assert_eq!(raw_state(&api, "a").await, before_a, "{p}: replay of a");
    assert_eq!(raw_state(&api, "u").await, before_u, "{p}: replay of u");
    accepted(
        &api,
        p,
        "a",
        json!({"type": "Deposit", "amount": 5}),
        &[("Deposited", json!({"amount": 5}))],
    )
    .await;
    assert_eq!(
        raw_state(&api, "a").await,
        r#"{"owner":"alice","balance":5,"open":true}"#,
        "{p}"
    );
}

/// Events are the contract, not the language: a history written by the Rust component
/// is replayed by the Python one, extended, and replayed by the JavaScript one, with
/// the same state bytes at every step.
#[tokio::test(flavor = "multi_thread")]
async fn histories_written_in_one_language_replay_in_the_others() {
    let (_db, host) = host_with(RUST, "languages_mixed", CURRENT).await;
    let api = host.client();
    let p = "mixed";
    accepted(
        &api,
        p,
        "m",
        json!({"type": "Open", "owner": "mia"}),
        &[("Opened", json!({"owner": "mia"}))],
    )
    .await;
    accepted(
        &api,
        p,
        "m",
        json!({"type": "Deposit", "amount": 30}),
        &[("Deposited", json!({"amount": 30}))],
    )
    .await;

    let mut expected_balance = 30;
    for (version, plugin, amount) in [(2, PYTHON, 7), (3, JAVASCRIPT, 11)] {
        let (status, body) = api.upload(TYPE, wasm_bytes(plugin)).await;
        assert_eq!(status, 201, "{plugin}: {body}");
        assert_eq!(body["version"], version, "{plugin}: {body}");
        // The uploading host switches at once; the cached state of the older version is
        // dropped and the history replayed through the new one.
        let state = raw_state(&api, "m").await;
        assert_eq!(
            state,
            format!(r#"{{"owner":"mia","balance":{expected_balance},"open":true}}"#),
            "{plugin}"
        );
        accepted(
            &api,
            plugin,
            "m",
            json!({"type": "Withdraw", "amount": amount}),
            &[("Withdrawn", json!({"amount": amount}))],
        )
        .await;
        expected_balance -= amount;
        rejected(
            &api,
            plugin,
            "m",
            json!({"type": "Withdraw", "amount": 100}),
            &format!("insufficient funds: balance {expected_balance}, withdrawal 100"),
        )
        .await;
    }
    // Each event's metadata names the plugin version that decided it.
    let (_, events) = api.get(&format!("/v1/aggregates/{TYPE}/m/events")).await;
    let versions: Vec<i64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["plugin_version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 1, 2, 3]);
}
