//! JSON that PostgreSQL's `jsonb` refuses (U+0000 in a string, an unpaired surrogate
//! escape, a number past `numeric`'s range) fails only the command it is in, with a
//! message that says what to change. Appends are batched across aggregates, so without
//! that care one such event would fail every command sharing its batch, and each would
//! be told to retry a command that can never succeed.

use std::time::Duration;

use futures::future::join_all;
use meridian::store::{
    self, AppendRequest, Changes, Committer, CommitterConfig, NewEvent, StoreError,
};
use serde_json::json;
use serde_json::value::RawValue;

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

#[tokio::test(flavor = "multi_thread")]
async fn json_postgres_cannot_store_fails_only_its_own_command() {
    let db = TestDb::new("unstorable").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    for name in ["bank-account", "bad-output"] {
        let (status, body) = api.upload(name, wasm_bytes(name)).await;
        assert_eq!(status, 201, "{name}: {body}");
    }

    // In the command: refused at the door, before the plugin runs.
    for (id, command, says) in [
        (
            "nul",
            r#"{"command":{"type":"Open","owner":"a\u0000b"}}"#,
            "U+0000",
        ),
        (
            "surrogate",
            r#"{"command":{"type":"Open","owner":"\ud800"}}"#,
            "unpaired surrogate",
        ),
        (
            "number",
            r#"{"command":{"type":"Open","owner":"x","note":1e200000}}"#,
            "out of PostgreSQL's range",
        ),
    ] {
        let (status, body) = api
            .post_raw(
                &format!("/v1/aggregates/bank-account/{id}"),
                command.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(status, 400, "{id}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{id}: {body}");
        let (status, _) = api.get(&format!("/v1/aggregates/bank-account/{id}")).await;
        assert_eq!(status, 404, "{id}: a refused command wrote something");
    }

    // Decided by the plugin from a clean command: many commands at once, so the bad
    // ones share append batches with good ones.
    let results = join_all((0..60).map(|i| {
        let api = api.clone();
        async move {
            let nul = i % 5 == 0;
            let command =
                json!({"command": {"type": "Write", "text": format!("note {i}"), "nul": nul}});
            (
                i,
                nul,
                api.command("bad-output", &format!("n{i}"), command).await,
            )
        }
    }))
    .await;
    for (i, nul, (status, body)) in results {
        if nul {
            assert_eq!(status, 500, "n{i}: {body}");
            assert_eq!(
                body["error"]["code"], "plugin_invalid_output",
                "n{i}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("bad-output@v1") && message.contains("U+0000"),
                "n{i}: {body}"
            );
            let (status, _) = api.get(&format!("/v1/aggregates/bad-output/n{i}")).await;
            assert_eq!(status, 404, "n{i}: a failed command wrote something");
        } else {
            assert_eq!(status, 200, "n{i} failed beside a bad command: {body}");
            let (status, state) = api.get(&format!("/v1/aggregates/bad-output/n{i}")).await;
            assert_eq!(
                (status, state["version"].as_i64()),
                (200, Some(1)),
                "n{i}: {state}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_type_with_a_line_break_fails_its_command_and_nothing_else() {
    let db = TestDb::new("event_type").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");

    let (status, body) = api
        .command(
            "bad-output",
            "lb",
            json!({"command": {"type": "BreakLine"}}),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "plugin_invalid_output", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("control character"), "{body}");
    let (status, _) = api.get("/v1/aggregates/bad-output/lb").await;
    assert_eq!(status, 404, "the refused event was written");

    let (status, body) = api
        .command(
            "bad-output",
            "lb",
            json!({"command": {"type": "Write", "text": "fine"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The committer's own guard, for what no check before it knows of: a batch PostgreSQL
/// refuses for its data is sent again request by request, so the request at fault
/// fails alone, told it cannot be stored rather than to retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_postgres_refuses_for_its_data_fails_only_the_request_at_fault() {
    let db = TestDb::new("unstorable_batch").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    // One worker and a long linger: the requests queue up behind the first batch and
    // go in together.
    let committer = Committer::start(
        pool,
        CommitterConfig {
            workers: 1,
            min_batch: 64,
            linger: Duration::from_millis(200),
            ..CommitterConfig::default()
        },
        Changes::default(),
    );
    let raw = |text: &str| RawValue::from_string(text.to_string()).unwrap();
    let results = join_all((0..64).map(|i| {
        let committer = committer.clone();
        let payload = if i == 32 {
            raw(r#"{"text":"x\u0000"}"#)
        } else {
            raw(r#"{"text":"x"}"#)
        };
        async move {
            let request = AppendRequest {
                aggregate_type: "t".into(),
                aggregate_id: format!("a{i}"),
                expected_version: 0,
                events: vec![NewEvent {
                    event_id: uuid::Uuid::now_v7(),
                    event_type: "Written".into(),
                    payload,
                    metadata: raw("{}"),
                }],
                command_id: Some(uuid::Uuid::now_v7()),
                fence: None,
            };
            (i, committer.append(request).await)
        }
    }))
    .await;
    for (i, result) in results {
        if i == 32 {
            assert!(
                matches!(&result, Err(StoreError::Unstorable(_))),
                "a{i}: {result:?}"
            );
        } else {
            assert!(
                result.is_ok(),
                "a{i} failed beside the bad request: {result:?}"
            );
        }
    }
}
