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
use serde_json::value::RawValue;
use serde_json::{Value, json};

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

/// On a fresh host with `bad-output`, `command` fails with a 500 `code` whose message
/// holds `says`, nothing is written, and the next command of the aggregate runs.
async fn fails_alone(label: &str, command: Value, code: &str, says: &str) {
    let db = TestDb::new(label).await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");

    let (status, body) = api
        .command("bad-output", label, json!({ "command": command }))
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{body}");
    let (status, _) = api.get(&format!("/v1/aggregates/bad-output/{label}")).await;
    assert_eq!(status, 404, "the refused event was written");

    let (status, body) = api
        .command(
            "bad-output",
            label,
            json!({"command": {"type": "Write", "text": "fine"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_type_with_a_line_break_fails_its_command_and_nothing_else() {
    fails_alone(
        "event_type",
        json!({"type": "BreakLine"}),
        "plugin_invalid_output",
        "control character",
    )
    .await;
}

/// An event the aggregate decided that does not read back from its JSON (a NaN, written
/// as `null`) is the aggregate's bug: the component traps, as the contract says, and
/// the caller gets a plugin fault. It used to be told the command was refused on its
/// merits (422 `rejected`), and plugin-fault alerts never heard of it.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_does_not_read_back_is_a_plugin_fault_not_a_rejection() {
    fails_alone(
        "not_a_number",
        json!({"type": "NotANumber"}),
        "plugin_trapped",
        "aggregate bug: a decided event does not read back",
    )
    .await;
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

/// `jsonb` prints a number back with every digit, so 1e300 (six bytes as the plugin
/// wrote it) is read back as 301. The output cap holds an event to its size as read
/// back: a few kilobytes of such numbers would otherwise come back as megabytes (and a
/// plugin writing `1e131000` as gigabytes) to every reader of the feed.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_postgres_would_print_over_the_output_cap_is_refused() {
    let db = TestDb::new("printed").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    // The accepted event is 1.2 MB: show the start of a body a check fails on.
    let short = |v: &serde_json::Value| v.to_string().chars().take(300).collect::<String>();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{}", short(&body));

    // 24 KB as written, 1.2 MB as read back; the cap is 1 MiB.
    let (status, body) = api
        .command(
            "bad-output",
            "huge",
            json!({"command": {"type": "Huge", "count": 4000}}),
        )
        .await;
    assert_eq!(status, 500, "{}", short(&body));
    assert_eq!(
        body["error"]["code"],
        "plugin_invalid_output",
        "{}",
        short(&body)
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("as PostgreSQL prints them") && message.contains("1e300"),
        "{}",
        short(&body)
    );
    let (status, _) = api.get("/v1/aggregates/bad-output/huge").await;
    assert_eq!(status, 404, "the refused event was written");

    // The same numbers, fewer of them, are stored and read back in full.
    let (status, body) = api
        .command(
            "bad-output",
            "huge",
            json!({"command": {"type": "Huge", "count": 3}}),
        )
        .await;
    assert_eq!(status, 200, "{}", short(&body));
    let (status, events) = api.get("/v1/aggregates/bad-output/huge/events").await;
    assert_eq!(status, 200, "{}", short(&events));
    assert_eq!(
        events["events"][0]["payload"]["values"],
        json!([1e300, 1e300, 1e300]),
        "{}",
        short(&events)
    );
}

/// What [`store::jsonb::check`] says a number grows by, against what PostgreSQL prints:
/// never less, so no size check based on it can be fooled, and at most the one byte of
/// a `-0`'s sign more, so it refuses nothing that fits.
#[tokio::test(flavor = "multi_thread")]
async fn the_printed_size_of_numbers_matches_postgres() {
    let db = TestDb::new("printed_numbers").await;
    let pool = db.pool().await;
    // A small seeded generator: every shape of number JSON allows, exponents both ways.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut numbers = vec!["0".to_string(), "-0".into(), "0.0e-3".into(), "1e0".into()];
    for _ in 0..2000 {
        let digits = |count: u64, next: &mut dyn FnMut(u64) -> u64| -> String {
            (0..count)
                .map(|_| char::from(b'0' + next(10) as u8))
                .collect()
        };
        let mut n = String::new();
        if next(2) == 0 {
            n.push('-');
        }
        // JSON allows no leading zero except a lone `0`.
        if next(4) == 0 {
            n.push('0');
        } else {
            n.push(char::from(b'1' + next(9) as u8));
            let more = next(6);
            n += &digits(more, &mut next);
        }
        if next(2) == 0 {
            n.push('.');
            let count = 1 + next(8);
            n += &digits(count, &mut next);
        }
        if next(3) != 0 {
            n.push(['e', 'E'][next(2) as usize]);
            n += ["", "+", "-"][next(3) as usize];
            n += &(next(400)).to_string();
        }
        numbers.push(n);
    }
    for number in &numbers {
        let printed: String = sqlx::query_scalar("SELECT ($1::jsonb)::text")
            .bind(number)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{number}: {e}"));
        let growth = store::jsonb::check(number).unwrap_or_else(|e| panic!("{number}: {e}"));
        let bound = number.len() + growth;
        assert!(
            printed.len() <= bound,
            "{number} prints as {} bytes, over the {bound} bytes counted",
            printed.len()
        );
        if growth > 0 {
            assert!(
                bound - printed.len() <= 1,
                "{number} prints as {} bytes, counted as {bound}",
                printed.len()
            );
        }
    }
}
