//! A new plugin version must read the events older versions stored: every command runs
//! the newest version and replays older aggregates through it. An upload that cannot
//! is refused, naming the aggregate and the event, unless forced.

use serde_json::json;

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_cannot_replay_stored_histories_is_refused_unless_forced() {
    let db = TestDb::new("upgrades").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    // Nothing stored yet: nothing to replay.
    assert_eq!(body["history_checked"]["aggregates"], 0, "{body}");
    for id in ["acc-1", "acc-2", "acc-3"] {
        let (status, body) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Open", "owner": id}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Deposit", "amount": 5}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // The same account in JavaScript reads every stored event: accepted, and it says
    // what it replayed.
    let (status, body) = api
        .upload("bank-account", wasm_bytes("bank-account-js"))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(
        body["history_checked"],
        json!({"aggregates": 3, "events": 6, "complete": true}),
        "{body}"
    );

    // Renamed events: refused, with the aggregate, the event and what to do.
    let (status, body) = api
        .upload("bank-account", wasm_bytes("renamed-events"))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "incompatible_with_history", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for says in ["bank-account/acc-1", "event 1 (`Opened`)", "?force=true"] {
        assert!(message.contains(says), "no `{says}` in: {message}");
    }
    // Nothing changed: version 2 still runs every command.
    let (_, plugin) = api.get("/v1/plugins/bank-account").await;
    assert_eq!(plugin["active_version"], 2, "{plugin}");
    let (status, body) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Deposit", "amount": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Forced, it becomes the active version, and the stored aggregates no longer load:
    // what the check is there to prevent.
    let (status, body) = api
        .put_raw(
            "/v1/plugins/bank-account?force=true",
            wasm_bytes("renamed-events"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 3, "{body}");
    assert!(body["history_checked"].is_null(), "{body}");
    let (status, body) = api
        .command(
            "bank-account",
            "acc-2",
            json!({"command": {"type": "Open", "owner": "x"}}),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "plugin_apply_failed", "{body}");
}
