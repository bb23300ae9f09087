//! The single-node command path through a real host process.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

async fn host_with_bank_account(label: &str) -> (TestDb, Host) {
    host_with(label, HostOptions::default()).await
}

async fn host_with(label: &str, options: HostOptions) -> (TestDb, Host) {
    let db = TestDb::new(label).await;
    let host = Host::start(&db, options).await;
    let (status, body) = host
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(status, 201, "upload: {body}");
    (db, host)
}

/// Opens account `id` for `owner`.
async fn open(api: &crate::harness::Api, id: &str, owner: &str) -> (u16, Value) {
    api.command(
        "bank-account",
        id,
        json!({"command": {"type": "Open", "owner": owner}}),
    )
    .await
}

/// Sends a Deposit of `amount` to `id`.
async fn deposit(api: &crate::harness::Api, id: &str, amount: i64) -> (u16, Value) {
    api.command(
        "bank-account",
        id,
        json!({"command": {"type": "Deposit", "amount": amount}}),
    )
    .await
}

async fn event_count(db: &TestDb) -> i64 {
    let pool = db.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// An append of one `Noted` event with `payload` to aggregate `t/<id>`, decided at
/// `expected_version`, under a fresh command id: for tests of the committer alone.
fn noted(id: &str, expected_version: i64, payload: &str) -> meridian::store::AppendRequest {
    use serde_json::value::RawValue;
    meridian::store::AppendRequest {
        aggregate_type: "t".into(),
        aggregate_id: id.into(),
        expected_version,
        events: vec![meridian::store::NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "Noted".into(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
        }],
        command_id: Some(uuid::Uuid::now_v7()),
        fence: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_run_through_the_plugin_and_are_stored() {
    let db = TestDb::new("path").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();

    let (status, first) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["aggregate_type"], "bank-account");
    assert_eq!(first["version"], 1);
    assert_eq!(first["sha256"].as_str().unwrap().len(), 64);
    let (status, again) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 200, "same bytes again: {again}");
    assert_eq!(again["version"], 1);
    assert_eq!(again["sha256"], first["sha256"]);

    let (status, listed) = api.get("/v1/plugins").await;
    assert_eq!(status, 200);
    assert_eq!(listed["plugins"][0]["aggregate_type"], "bank-account");
    let (status, detail) = api.get("/v1/plugins/bank-account").await;
    assert_eq!(status, 200);
    assert_eq!(detail["active_version"], 1);
    assert_eq!(detail["limits"]["deadline_ms"], 100);

    let (status, opened) = open(&api, "acc-1", "alice").await;
    assert_eq!(status, 200, "{opened}");
    assert_eq!(opened["aggregate_type"], "bank-account");
    assert_eq!(opened["aggregate_id"], "acc-1");
    assert_eq!(opened["version"], 1);
    assert_eq!(opened["events"][0]["type"], "Opened");
    assert_eq!(opened["events"][0]["payload"], json!({"owner": "alice"}));
    assert_eq!(opened["events"][0]["version"], 1);
    assert!(opened["events"][0]["event_id"].as_str().unwrap().len() == 36);

    let (status, deposited) = deposit(&api, "acc-1", 10).await;
    assert_eq!(status, 200, "{deposited}");
    assert_eq!(deposited["version"], 2);
    assert_eq!(deposited["events"][0]["payload"], json!({"amount": 10}));
    let (status, withdrawn) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Withdraw", "amount": 5}}),
        )
        .await;
    assert_eq!(status, 200, "{withdrawn}");
    assert_eq!(withdrawn["version"], 3);
    assert_eq!(withdrawn["events"][0]["type"], "Withdrawn");

    let (status, state) = api.get("/v1/aggregates/bank-account/acc-1").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["version"], 3);
    assert_eq!(state["state"]["owner"], "alice");
    assert_eq!(state["state"]["balance"], 5);
    assert_eq!(state["state"]["open"], true);

    let (status, events) = api.get("/v1/aggregates/bank-account/acc-1/events").await;
    assert_eq!(status, 200);
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Opened", "Deposited", "Withdrawn"]);
    let meta = &events["events"][0]["metadata"];
    assert_eq!(meta["plugin_version"], 1);
    assert_eq!(meta["origin_region"], "local");
    assert_eq!(meta["node_id"], host.node_id.as_str());

    // The tail only shows events below the oldest running transaction of the whole
    // PostgreSQL cluster (other tests' included), so it may trail by a moment.
    let global = crate::harness::eventually(|| async {
        let (status, global) = api.get("/v1/events?after=0&limit=2").await;
        assert_eq!(status, 200);
        (global["events"].as_array().unwrap().len() == 2).then_some(global)
    })
    .await;
    let next = global["next"].as_i64().unwrap();
    let rest = crate::harness::eventually(|| async {
        let (_, rest) = api.get(&format!("/v1/events?after={next}")).await;
        (!rest["events"].as_array().unwrap().is_empty()).then_some(rest)
    })
    .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    assert_eq!(rest["events"][0]["type"], "Withdrawn");

    let (status, missing) = api.get("/v1/aggregates/bank-account/nobody").await;
    assert_eq!(status, 404, "{missing}");
    let (status, openapi) = api.get("/openapi.json").await;
    assert_eq!(status, 200);
    let execute = &openapi["paths"]["/v1/aggregates/{aggregate_type}/{aggregate_id}"]["post"];
    assert!(execute.is_object(), "{openapi}");
    assert!(
        execute["responses"]["503"]["headers"]["Retry-After"].is_object(),
        "the 503's Retry-After is documented: {execute}"
    );
    // Reading a state replays it through the plugin, which can fail like a command.
    let read = &openapi["paths"]["/v1/aggregates/{aggregate_type}/{aggregate_id}"]["get"];
    assert!(read["responses"]["500"].is_object(), "{read}");
    // A payload or state is whatever JSON the plugin wrote: a unit variant (`Closed`)
    // is `null`, a newtype one a string. A schema saying "object" would make generated
    // clients refuse such answers.
    let schemas = &openapi["components"]["schemas"];
    for (schema, field) in [
        ("StoredEvent", "payload"),
        ("ResultEvent", "payload"),
        ("StateBody", "state"),
    ] {
        let property = &schemas[schema]["properties"][field];
        assert!(property.is_object(), "{schema}.{field}: {schemas}");
        assert!(
            property.get("type").is_none(),
            "{schema}.{field} must admit any JSON value: {property}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let (db, host) = host_with_bank_account("bad").await;
    let api = host.client();
    let (status, _) = open(&api, "acc-1", "bob").await;
    assert_eq!(status, 200);
    let before = event_count(&db).await;

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/aggregates/bank-account/acc-1",
            b"{not json".to_vec(),
            400,
            "bad_request",
        ),
        // Deeper than PostgreSQL's jsonb parser goes, had the plugin copied it on.
        (
            "/v1/aggregates/bank-account/acc-1",
            format!(
                r#"{{"command": {{"type": "Deposit", "amount": 1, "note": {}{}}}}}"#,
                "[".repeat(20_000),
                "]".repeat(20_000)
            )
            .into_bytes(),
            400,
            "bad_request",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": 5}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"cmd": {}}"#.to_vec(),
            400,
            "bad_request",
        ),
        // The body's fields as an array, which serde alone would take in order.
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"[{"type": "Deposit", "amount": 1}, null, null]"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Deposit", "amount": 1}, "command_id": "nope"}"#.to_vec(),
            400,
            "bad_request",
        ),
        // The id a client left at its default: it would make every later command sent
        // so a repeat of this one.
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Deposit", "amount": 1}, "command_id": "00000000-0000-0000-0000-000000000000"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/v1/aggregates/no-such-type/acc-1",
            br#"{"command": {"type": "Open"}}"#.to_vec(),
            404,
            "unknown_aggregate_type",
        ),
        (
            "/v1/aggregates/Bad Type!/acc-1",
            br#"{"command": {}}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Withdraw", "amount": 1000}}"#.to_vec(),
            422,
            "rejected",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Teleport"}}"#.to_vec(),
            422,
            "rejected",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Deposit", "amount": 0}}"#.to_vec(),
            422,
            "rejected",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Open", "owner": "again"}}"#.to_vec(),
            422,
            "rejected",
        ),
        (
            "/v1/aggregates/bank-account/acc-1",
            br#"{"command": {"type": "Deposit", "amount": 1}, "expected_version": 7}"#.to_vec(),
            409,
            "version_conflict",
        ),
    ];
    for (path, body, want_status, want_code) in cases {
        let shown = String::from_utf8_lossy(&body).to_string();
        let (status, error) = api.post_raw(path.replace(' ', "%20").as_str(), body).await;
        assert_eq!(status, want_status, "{path} {shown}: {error}");
        assert_eq!(error["error"]["code"], want_code, "{path} {shown}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    // A filter no aggregate could match is the caller's mistake, not the store being
    // down (PostgreSQL refuses a NUL byte in a parameter): 400, never a retryable 503.
    for query in [
        "aggregate_type=%00",
        "aggregate_id=acc%001",
        "aggregate_type=Bank%20Account",
    ] {
        let (status, error) = api.get(&format!("/v1/events?{query}")).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{query}: {error}"
        );
    }
    // `+` in a query string is a space once decoded: the refusal says how to send one.
    let (status, error) = api.get("/v1/events?aggregate_id=user+1@x").await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("%2B"),
        "{error}"
    );
    // A correlation id is an identifier, copied into every event: not a payload, nor
    // anything but printable ASCII (which used to be replaced without a word).
    let long = reqwest::header::HeaderValue::from_str(&"c".repeat(129)).unwrap();
    let accented = reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
    for (value, says) in [(long, "x-correlation-id"), (accented, "printable ASCII")] {
        let answer = api
            .http
            .post(format!("{}/v1/aggregates/bank-account/acc-1", api.base))
            .header("x-correlation-id", value)
            .json(&json!({"command": {"type": "Deposit", "amount": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
        let error: serde_json::Value = answer.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    let (_, rejected) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Withdraw", "amount": 1000}}),
        )
        .await;
    assert!(
        rejected["error"]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "{rejected}"
    );

    // Too large: over the 1 MiB command cap.
    let huge = format!(
        r#"{{"command": {{"type": "Open", "owner": "{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // Its own client: the host answers 413 without reading the body and then closes
    // that connection, which a pooled client could otherwise pick for the next request.
    // The close can also land while the client is still writing the body, and then the
    // client reports the broken pipe rather than the answer; only that is retried.
    let mut attempts = 0;
    let status = loop {
        attempts += 1;
        let sent = reqwest::Client::new()
            .post(format!("{}/v1/aggregates/bank-account/acc-2", api.base))
            .header("content-type", "application/json")
            .body(huge.clone().into_bytes())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                break (status, response.json::<Value>().await.unwrap_or_default());
            }
            Err(error) if error.is_request() && attempts < 5 => continue,
            Err(error) => panic!("no answer to an oversized command: {error:?}"),
        }
    };
    // In the API's error shape, naming the limit and its setting.
    assert_eq!(
        (status.0, status.1["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{}",
        status.1
    );
    assert!(
        status.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("MERIDIAN_MAX_COMMAND_BYTES")),
        "{}",
        status.1
    );

    // Broken uploads.
    let (status, error) = api
        .upload("bank-account", b"definitely not wasm".to_vec())
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("not_a_component")),
        "{error}"
    );
    let (status, error) = api
        .upload("forbidden-import", wasm_bytes("forbidden-import"))
        .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "forbidden_import");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("evil:escape/network"),
        "{error}"
    );
    // A schema version the contract's u32 allows but the catalogue cannot hold: refused,
    // not listed with a wrapped, negative number.
    let (status, error) = api
        .upload("far-schema-version", wasm_bytes("far-schema-version"))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("plugin_invalid")),
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("schema version 2147483648 is above 2147483647"),
        "{error}"
    );
    let (status, versions) = api.get("/v1/plugins/far-schema-version").await;
    assert_eq!(status, 404, "nothing stored: {versions}");
    let (status, error) = api.upload("savings", wasm_bytes("bank-account")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("type_mismatch")),
        "{error}"
    );
    let (status, error) = api.upload("bank-account", Vec::new()).await;
    assert_eq!(status, 400, "{error}");
    let (status, error) = api.upload("tiny", wasm_bytes("bank-account")).await;
    assert_eq!(status, 400, "{error}");
    // A per-type size cap smaller than the component: 413.
    assert_eq!(
        api.put_limits("bank-account", json!({"max_component_bytes": 1000}))
            .await,
        200
    );
    let (status, error) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (413, Some("component_too_large")),
        "{error}"
    );
    assert_eq!(
        api.put_limits("bank-account", json!({"deadline_ms": 0}))
            .await,
        400
    );

    // A misspelt query parameter is named, not ignored: ignored, `dry-run` stored the
    // component and made it the running version, and `type` read every event.
    let (status, error) = api
        .put_raw(
            "/v1/plugins/bank-account?dry-run=true",
            crate::harness::with_custom_section(b"typo"),
        )
        .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("dry-run"),
        "{error}"
    );
    // Refused before its body was read, the request's connection cannot carry another
    // one: the answer says so, and the client's next request does not meet a
    // connection the host is closing.
    let refused = api
        .http
        .put(format!("{}/v1/plugins/bank-account?dry-run=true", api.base))
        .body(crate::harness::with_custom_section(b"typo"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(
        refused.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    // A refusal after the body was read keeps the connection.
    let read = api
        .http
        .post(format!("{}/v1/aggregates/bank-account/acc-1", api.base))
        .json(&json!({"command": {"type": "Withdraw", "amount": 1_000_000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 422);
    assert_eq!(read.headers().get("connection"), None);
    let (status, error) = api.get("/v1/events?type=Deposited").await;
    assert_eq!(status, 400, "{error}");
    // A resume point that cannot be read is refused, not taken as "from the start".
    for last_event_id in ["soon", "-5"] {
        let answer = api
            .http
            .get(format!("{}/v1/events", api.base))
            .header("accept", "text/event-stream")
            .header("last-event-id", last_event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "Last-Event-ID {last_event_id}");
    }
    // A page size out of range, whether the answer would be a page or a stream.
    for accept in ["application/json", "text/event-stream"] {
        for limit in ["0", "-5", "10001"] {
            let answer = api
                .http
                .get(format!("{}/v1/events?limit={limit}", api.base))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "limit={limit} ({accept})");
            let body: Value = answer.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("limit"), "limit={limit}: {body}");
        }
    }
    // An id URL parsers resolve away: a raw request, since clients resolve it first.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", host.port))
            .await
            .unwrap();
        let body = r#"{"command": {"type": "Open", "owner": "o"}}"#;
        tcp.write_all(
            format!(
                "POST /v1/aggregates/bank-account/.. HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("invalid aggregate id"), "{answer}");
    }
    // A body that cannot be read (a chunk size that is not hex) is answered in the
    // API's JSON error shape too, not in the framework's plain text.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", host.port))
            .await
            .unwrap();
        tcp.write_all(
            b"POST /v1/aggregates/bank-account/acc-1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
            .await
            .expect("no answer to a broken body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(answer.starts_with("http/1.1 400"), "{answer}");
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    }

    assert_eq!(event_count(&db).await, before, "bad input wrote events");
    let (status, plugins) = api.get("/v1/plugins").await;
    assert_eq!(status, 200);
    assert_eq!(
        plugins["plugins"].as_array().unwrap().len(),
        1,
        "a refused upload was stored: {plugins}"
    );
    assert_eq!(
        plugins["plugins"][0]["version"], 1,
        "a refused upload was stored: {plugins}"
    );
    // The host keeps serving.
    let (status, ok) = deposit(&api, "acc-1", 3).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["version"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_command_id_returns_the_first_result_and_writes_nothing() {
    let (db, host) = host_with_bank_account("idem").await;
    let api = host.client();
    open(&api, "acc-1", "carol").await;
    let id = uuid::Uuid::new_v4();
    let body = json!({"command": {"type": "Deposit", "amount": 7}, "command_id": id});
    let (status, first) = api.command("bank-account", "acc-1", body.clone()).await;
    assert_eq!(status, 200);
    let (status, second) = api.command("bank-account", "acc-1", body.clone()).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["events"], first["events"],
        "a retry must return the first result"
    );
    assert_eq!(second["version"], 2);
    assert_eq!(second["duplicate"], true);

    // The same id sent many times at once still applies once.
    let id = uuid::Uuid::new_v4();
    let body = json!({"command": {"type": "Deposit", "amount": 1}, "command_id": id});
    let results = futures::future::join_all(
        (0..8).map(|_| api.command("bank-account", "acc-1", body.clone())),
    )
    .await;
    for (status, result) in &results {
        assert_eq!(*status, 200, "{result}");
        assert_eq!(
            result["events"][0]["event_id"],
            results[0].1["events"][0]["event_id"]
        );
    }
    // With a stale expected_version, a retry still gets its first result, not a 409.
    let body = json!({"command": {"type": "Deposit", "amount": 1}, "command_id": id, "expected_version": 2});
    let (status, result) = api.command("bank-account", "acc-1", body).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["version"], 3);
    // The same id for another aggregate is refused.
    open(&api, "acc-2", "dan").await;
    let (status, result) = api
        .command(
            "bank-account",
            "acc-2",
            json!({"command": {"type": "Deposit", "amount": 1}, "command_id": id}),
        )
        .await;
    assert_eq!(
        (status, result["error"]["code"].as_str()),
        (409, Some("command_id_reused")),
        "{result}"
    );

    // A retry the aggregate would now refuse because of its own first run (an Open
    // again: "already open"; withdrawing the whole balance again) still gets its first
    // result.
    let id = uuid::Uuid::new_v4();
    let body = json!({"command": {"type": "Open", "owner": "erin"}, "command_id": id});
    let (status, first) = api.command("bank-account", "acc-3", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = api.command("bank-account", "acc-3", body).await;
    assert_eq!(
        status, 200,
        "a retried Open was refused by its own effect: {again}"
    );
    assert_eq!(again["events"], first["events"]);
    assert_eq!(again["duplicate"], true);
    let id = uuid::Uuid::new_v4();
    let body = json!({"command": {"type": "Withdraw", "amount": 8}, "command_id": id});
    let (status, first) = api.command("bank-account", "acc-1", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = api.command("bank-account", "acc-1", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["events"], first["events"]);
    // A new id is judged on its own: the account is empty now.
    let (status, refused) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Withdraw", "amount": 8}, "command_id": uuid::Uuid::new_v4()}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");

    let (_, state) = api.get("/v1/aggregates/bank-account/acc-1").await;
    assert_eq!(state["state"]["balance"], 0);
    assert_eq!(event_count(&db).await, 6);

    // The type's plugin no longer loads on a restarted host (its stored bytes were
    // damaged): a retry of a command that ran still gets its first result.
    sqlx::query(
        "UPDATE plugins SET component = 'not a component' WHERE aggregate_type = 'bank-account'",
    )
    .execute(&db.pool().await)
    .await
    .unwrap();
    let mut host = host;
    host.restart().await;
    let api = host.client();
    let body = json!({"command": {"type": "Withdraw", "amount": 8}, "command_id": id});
    let (status, again) = api.command("bank-account", "acc-1", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["events"], first["events"]);
    assert_eq!(again["duplicate"], true);
    // A new command cannot run, and the answer says the host is at fault, not the
    // request.
    let (status, refused) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Deposit", "amount": 1}}),
        )
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (500, Some("plugin_unloadable")),
        "{refused}"
    );
    // Nor can limits be checked against it, for the same reason.
    let answer = api
        .http
        .put(format!("{}/v1/plugins/bank-account/limits", api.base))
        .json(&json!({"deadline_ms": 100}))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let refused: Value = answer.json().await.unwrap();
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (500, Some("plugin_unloadable")),
        "{refused}"
    );
    assert_eq!(event_count(&db).await, 6);
}

/// A command's first run can commit without its host seeing the outcome: the committer
/// resends a batch whose answer was lost, or the caller hangs up and retries while the
/// first append is still on its way. The retry is answered with the first result; the
/// host's state of the aggregate must then not stay at the version before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_answered_with_a_first_run_the_host_missed_leaves_no_stale_state() {
    let (db, host) = host_with_bank_account("missed").await;
    let api = host.client();
    let (status, _) = open(&api, "acc-1", "fay").await;
    assert_eq!(status, 200);
    let (_, state) = api.get("/v1/aggregates/bank-account/acc-1").await;
    assert_eq!(state["version"], 1, "{state}");
    // The first run of `id`, committed where this host's cache did not see it.
    let id = uuid::Uuid::new_v4();
    let pool = db.pool().await;
    sqlx::raw_sql(&format!(
        "BEGIN;
         INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata)
           VALUES ('{event}', 'bank-account', 'acc-1', 2, 'Deposited', '{{\"amount\": 5}}',
                   '{{\"command_id\": \"{id}\", \"plugin_version\": 1}}');
         UPDATE streams SET version = 2 WHERE aggregate_type = 'bank-account' AND aggregate_id = 'acc-1';
         INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_version, last_version)
           VALUES ('{id}', 'bank-account', 'acc-1', 2, 2);
         COMMIT;",
        event = uuid::Uuid::now_v7(),
    ))
    .execute(&pool)
    .await
    .expect("commit the first run behind the host's back");
    pool.close().await;
    let (status, retry) = api
        .command(
            "bank-account",
            "acc-1",
            json!({"command": {"type": "Deposit", "amount": 5}, "command_id": id}),
        )
        .await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(
        (retry["version"].as_i64(), retry["duplicate"].as_bool()),
        (Some(2), Some(true)),
        "{retry}"
    );
    let (_, state) = api.get("/v1/aggregates/bank-account/acc-1").await;
    assert_eq!(
        (
            state["version"].as_i64(),
            state["state"]["balance"].as_i64()
        ),
        (Some(2), Some(5)),
        "the host kept the state from before the retried command: {state}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn state_and_idempotency_survive_kill_9() {
    let (db, mut host) = host_with_bank_account("kill").await;
    let api = host.client();
    open(&api, "acc-9", "erin").await;
    let id = uuid::Uuid::new_v4();
    let body = json!({"command": {"type": "Deposit", "amount": 42}, "command_id": id});
    let (_, first) = api.command("bank-account", "acc-9", body.clone()).await;
    for _ in 0..5 {
        api.command(
            "bank-account",
            "acc-9",
            json!({"command": {"type": "Withdraw", "amount": 2}}),
        )
        .await;
    }
    let (_, before) = api.get("/v1/aggregates/bank-account/acc-9").await;

    host.restart().await;
    let api = host.client();
    let (status, after) = api.get("/v1/aggregates/bank-account/acc-9").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["state"], before["state"]);
    assert_eq!(after["version"], 7);
    assert_eq!(after["state"]["balance"], 32);
    let (status, retried) = api.command("bank-account", "acc-9", body).await;
    assert_eq!(status, 200);
    assert_eq!(retried["events"], first["events"]);
    assert_eq!(
        event_count(&db).await,
        7,
        "the retried command wrote again after a restart"
    );
    let (status, next) = deposit(&api, "acc-9", 1).await;
    assert_eq!((status, next["version"].as_i64()), (200, Some(8)));
}

/// The server closing every connection the host holds (a PostgreSQL restart or
/// failover, an operator's `pg_terminate_backend`) costs no command: the committer keeps
/// its connections from batch to batch without testing them, so an append may go out on
/// a dead one, and the host must then send it again on a fresh connection rather than
/// fail it.
#[tokio::test(flavor = "multi_thread")]
async fn commands_keep_succeeding_when_the_database_drops_the_hosts_connections() {
    let (db, host) = host_with_bank_account("dropconn").await;
    let api = host.client();
    let (status, body) = open(&api, "acc-d", "dana").await;
    assert_eq!(status, 200, "{body}");
    let admin = db.pool().await;
    let mut balance = 0;
    for round in 0..5 {
        // Commands first, so a commit worker holds its kept connection when the
        // sessions are dropped.
        for _ in 0..5 {
            let (status, body) = deposit(&api, "acc-d", 1).await;
            assert_eq!(status, 200, "round {round}, before: {body}");
            balance += 1;
        }
        let terminated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'meridian') t",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert!(terminated > 0, "the host held no connections to terminate");
        for i in 0..5 {
            let (status, body) = deposit(&api, "acc-d", 1).await;
            assert_eq!(
                status, 200,
                "round {round}, command {i} after the connections were dropped: {body}"
            );
            balance += 1;
        }
    }
    let (status, state) = api.get("/v1/aggregates/bank-account/acc-d").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["state"]["balance"], balance);
    assert_eq!(state["version"], balance + 1);
    admin.close().await;
    assert_eq!(event_count(&db).await, balance + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_shorten_loads_and_other_plugin_versions_ignore_them() {
    let options = HostOptions {
        env: vec![("MERIDIAN_SNAPSHOT_EVERY".into(), "5".into())],
        ..HostOptions::default()
    };
    let (db, mut host) = host_with("snap", options).await;
    let api = host.client();
    open(&api, "acc-s", "fay").await;
    for _ in 0..11 {
        let (status, _) = deposit(&api, "acc-s", 1).await;
        assert_eq!(status, 200);
    }
    let pool = db.pool().await;
    let mut snapshot = None;
    for _ in 0..100 {
        snapshot = sqlx::query_as::<_, (i64, i32)>(
            "SELECT version, plugin_version FROM snapshots WHERE aggregate_id = 'acc-s'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if snapshot.is_some_and(|(v, _)| v == 10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(snapshot, Some((10, 1)), "a snapshot every 5 events");

    // Prove loads use the snapshot: doctor it, restart, and see the doctored balance.
    let doctored = br#"{"owner":"fay","balance":1000,"open":true}"#.to_vec();
    sqlx::query("UPDATE snapshots SET state = $1 WHERE aggregate_id = 'acc-s'")
        .bind(&doctored)
        .execute(&pool)
        .await
        .unwrap();
    host.restart().await;
    let (_, state) = host.client().get("/v1/aggregates/bank-account/acc-s").await;
    assert_eq!(state["version"], 12);
    assert_eq!(
        state["state"]["balance"], 1002,
        "load did not start from the snapshot: {state}"
    );

    // A snapshot from another plugin version is ignored: replay from the events.
    sqlx::query("UPDATE snapshots SET plugin_version = 99 WHERE aggregate_id = 'acc-s'")
        .execute(&pool)
        .await
        .unwrap();
    host.restart().await;
    let (_, state) = host.client().get("/v1/aggregates/bank-account/acc-s").await;
    assert_eq!(state["version"], 12);
    assert_eq!(
        state["state"]["balance"], 11,
        "a foreign snapshot was used: {state}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commands_on_many_aggregates_keep_contiguous_versions() {
    let (db, host) = host_with_bank_account("conc").await;
    let api = host.client();
    let accounts = 40;
    let per_account = 10;
    futures::future::join_all((0..accounts).map(|i| {
        let api = api.clone();
        async move {
            let (s, b) = api
                .command(
                    "bank-account",
                    &format!("c-{i}"),
                    json!({"command": {"type": "Open", "owner": "o"}}),
                )
                .await;
            assert_eq!(s, 200, "{b}");
        }
    }))
    .await;
    // Every account gets `per_account` deposits, all sent at once.
    let sends = (0..accounts)
        .flat_map(|i| (0..per_account).map(move |_| i))
        .map(|i| {
            let api = api.clone();
            async move {
                let (s, b) = api
                    .command(
                        "bank-account",
                        &format!("c-{i}"),
                        json!({"command": {"type": "Deposit", "amount": 1}}),
                    )
                    .await;
                assert_eq!(s, 200, "{b}");
            }
        });
    futures::future::join_all(sends).await;
    let pool = db.pool().await;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*), min(version), max(version) FROM events GROUP BY aggregate_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), accounts);
    for (id, count, min, max) in rows {
        assert_eq!(
            (count, min, max),
            (per_account as i64 + 1, 1, per_account as i64 + 1),
            "{id}"
        );
    }
    let (_, state) = api.get("/v1/aggregates/bank-account/c-3").await;
    assert_eq!(state["state"]["balance"], per_account);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_services_fail_start_with_one_clear_line() {
    let db = TestDb::new("start").await;
    let cases = [
        (
            "postgres://postgres@127.0.0.1:1/nothing".to_string(),
            None,
            "cannot connect to PostgreSQL",
        ),
        (
            db.url.clone(),
            Some("nats://127.0.0.1:1"),
            "cannot connect to NATS",
        ),
    ];
    for (db_url, nats, expected) in cases {
        let mut command = std::process::Command::new(crate::harness::meridian_bin());
        command
            .arg("host")
            .env("MERIDIAN_DATABASE_URL", &db_url)
            .env(
                "MERIDIAN_HTTP_ADDR",
                format!("127.0.0.1:{}", crate::harness::free_port()),
            )
            .env_remove("MERIDIAN_NATS_URL");
        if let Some(nats) = nats {
            command.env("MERIDIAN_NATS_URL", nats);
        }
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = std::process::Command::new(crate::harness::meridian_bin())
        .arg("host")
        .env_remove("MERIDIAN_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("database-url"));
    let _: Value = Value::Null;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_uploads_commands_and_pages_events() {
    let db = TestDb::new("cli").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let url = host.url.clone();
    let wasm = crate::harness::wasm("bank-account");
    let run = move |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(crate::harness::meridian_bin())
                    .args(&args)
                    .env("MERIDIAN_URL", url)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(vec![
        "plugin".into(),
        "upload".into(),
        "bank-account".into(),
        wasm.display().to_string(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("version 1") && text.contains("sha256") && text.contains("bytes"),
        "{text}"
    );

    let out = run(vec![
        "command".into(),
        "bank-account".into(),
        "cli-1".into(),
        r#"{"type":"Open","owner":"gus"}"#.into(),
    ])
    .await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 1"));
    // An id with `#` in it is that id, refused by the host; the CLI sent the command to
    // `cli-1` (the rest read as a URL fragment), where it ran.
    let out = run(vec![
        "command".into(),
        "bank-account".into(),
        "cli-1#2".into(),
        r#"{"type":"Deposit","amount":1}"#.into(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("invalid aggregate id `cli-1#2`"),
        "{stderr}"
    );
    // A token that cannot go in a header is refused, not left out, and not shown:
    // the error lands in terminals and CI logs.
    let out = run(vec![
        "cluster".into(),
        "status".into(),
        "--token".into(),
        "secret-part-of-a-token\r".into(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("trailing newline"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret-part"),
        "the token was printed: {stderr}"
    );
    let out = run(vec![
        "command".into(),
        "--json".into(),
        "bank-account".into(),
        "cli-1".into(),
        r#"{"type":"Deposit","amount":4}"#.into(),
    ])
    .await;
    let result: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(result["version"], 2);
    // A rejection: exit code 1 and the plugin's message on one line.
    let out = run(vec![
        "command".into(),
        "bank-account".into(),
        "cli-1".into(),
        r#"{"type":"Withdraw","amount":400}"#.into(),
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("422 rejected") && stderr.contains("insufficient funds"),
        "{stderr}"
    );

    let events = crate::harness::eventually(|| {
        let run = run.clone();
        async move {
            let out = run(vec![
                "events".into(),
                "--json".into(),
                "--all".into(),
                "--limit".into(),
                "1".into(),
            ])
            .await;
            let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (lines.len() == 2).then_some(lines)
        }
    })
    .await;
    assert_eq!(events[1]["type"], "Deposited");
    let out = run(vec!["plugin".into(), "list".into()]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("bank-account"));

    // Piped into a reader that is gone before the output comes (`| head -1` after its
    // line): each command stops quietly with 0, not a panic's 101.
    for args in [
        &["plugin", "list"][..],
        &["cluster", "status"],
        &["events", "--all"],
    ] {
        let url = host.url.clone();
        let status = tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new(crate::harness::meridian_bin())
                .args(args)
                .env("MERIDIAN_URL", url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            child.wait().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(status.code(), Some(0), "{args:?} with its reader gone");
    }

    // A host that is not there: one clear line saying what to do.
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(crate::harness::meridian_bin())
            .args(["plugin", "list", "--url", "http://127.0.0.1:1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach a Meridian host"));
}

/// A host already working on its limit of commands (`MERIDIAN_MAX_COMMANDS_IN_FLIGHT`)
/// answers the next one at once with 503 `overloaded` and `Retry-After`, and writes
/// nothing for it; sent again with the same command id once there is room, it runs
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_at_its_command_limit_turns_commands_away_and_writes_nothing() {
    let options = HostOptions {
        env: vec![("MERIDIAN_MAX_COMMANDS_IN_FLIGHT".into(), "2".into())],
        ..HostOptions::default()
    };
    let (db, host) = host_with("overload", options).await;
    let api = host.client();
    let (status, body) = api.upload("spin-loop", wasm_bytes("spin-loop")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        api.put_limits("spin-loop", json!({"deadline_ms": 5000}))
            .await,
        200
    );

    // Two commands that spin until their 5 s deadline take both places.
    let busy: Vec<_> = (0..2)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.command(
                    "spin-loop",
                    &format!("busy-{i}"),
                    json!({"command": {"type": "Go"}}),
                )
                .await
            })
        })
        .collect();
    // Both are running once the host says so, in its metrics and in its status.
    crate::harness::eventually(|| async {
        let text = reqwest::get(format!("{}/metrics", api.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| l == "meridian_commands_in_flight 2")
            .then_some(())
    })
    .await;
    let (_, cluster) = api.get("/v1/cluster").await;
    assert_eq!(
        (
            &cluster["load"]["commands_in_flight"],
            &cluster["load"]["max_commands_in_flight"]
        ),
        (&json!(2), &json!(2)),
        "{cluster}"
    );

    let id = uuid::Uuid::new_v4();
    let open = json!({"command": {"type": "Open", "owner": "o"}, "command_id": id});
    let turned_away = api
        .http
        .post(format!("{}/v1/aggregates/bank-account/over-1", api.base))
        .json(&open)
        .send()
        .await
        .unwrap();
    assert_eq!(turned_away.status(), 503);
    assert_eq!(
        turned_away
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = turned_away.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MERIDIAN_MAX_COMMANDS_IN_FLIGHT"),
        "{body}"
    );
    assert_eq!(
        event_count(&db).await,
        0,
        "a command turned away wrote events"
    );

    // The CLI waits as Retry-After says and sends the command again until it runs.
    let url = api.base.clone();
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::meridian_bin())
            .args([
                "command",
                "bank-account",
                "over-2",
                r#"{"type":"Open","owner":"p"}"#,
            ])
            .args(["--retries", "30", "--url", &url])
            .output()
            .unwrap()
    });

    for task in busy {
        let (status, body) = task.await.unwrap();
        assert_eq!(
            body["error"]["code"], "plugin_deadline_exceeded",
            "{status} {body}"
        );
    }
    let (status, body) = api.command("bank-account", "over-1", open.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1, "{body}");
    let (status, again) = api.command("bank-account", "over-1", open).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["version"], 1,
        "the retried command id ran twice: {again}"
    );

    let out = cli.await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout} {stderr}");
    assert!(stdout.contains("version 1"), "{stdout}");
    assert!(
        stderr.contains("503 overloaded; sending the command again in 1 s"),
        "the CLI did not meet the full host: {stderr}"
    );
    assert_eq!(event_count(&db).await, 2);
}

/// Optimistic concurrency is the store's last line of defence, for a command that
/// decided no events too: its decision was taken on a state at some version, and stands
/// only if the aggregate is still there. At version 0 that was not checked, so a host
/// deciding on a stale, empty state was told it had succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_deciding_no_events_on_a_stale_empty_state_is_a_conflict() {
    use meridian::store::{self, AppendRequest, Changes, Committer, NewEvent, StoreError};
    use serde_json::value::RawValue;

    let db = TestDb::new("zero_events").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let committer = Committer::start(pool, Default::default(), Changes::default());
    let request = |id: &str, expected_version: i64, events: usize| AppendRequest {
        aggregate_type: "t".into(),
        aggregate_id: id.into(),
        expected_version,
        events: (0..events)
            .map(|_| NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event_type: "Noted".into(),
                payload: RawValue::from_string("{}".into()).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
            })
            .collect(),
        command_id: Some(uuid::Uuid::now_v7()),
        fence: None,
    };
    committer.append(request("a", 0, 2)).await.unwrap();

    let stale = committer.append(request("a", 0, 0)).await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 0,
                actual: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    // On the current state, or on an aggregate that is new, nothing to refuse.
    for (id, expected) in [("a", 2), ("new", 0)] {
        let result = committer.append(request(id, expected, 0)).await;
        assert!(result.is_ok(), "{id} at {expected}: {result:?}");
    }
    let result = committer.append(request("a", 1, 0)).await;
    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "{result:?}"
    );
}

/// Metrics are labelled with the aggregate type only for types the host knows: every
/// label value is a series kept for the life of the process, so types taken as sent
/// would let any caller grow `/metrics` and the host's memory without bound.
#[tokio::test(flavor = "multi_thread")]
async fn commands_for_unknown_types_do_not_add_metric_series() {
    let (_db, host) = host_with_bank_account("metric_labels").await;
    let api = host.client();
    let (status, _) = open(&api, "ml-1", "ann").await;
    assert_eq!(status, 200);
    for i in 0..20 {
        let (status, body) = api
            .command(
                &format!("no-such-type-{i}"),
                "x",
                json!({"command": {"type": "Open", "owner": "a"}}),
            )
            .await;
        assert_eq!(status, 404, "{body}");
    }
    let metrics = reqwest::get(format!("{}/metrics", host.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("no-such-type"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("no-such-type"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metrics.contains(r#"aggregate_type="bank-account""#));
    assert!(metrics.contains(r#"aggregate_type="(unknown)""#));
}

/// What PostgreSQL refuses for its data is refused to the command at fault alone, as a
/// refusal (`Unstorable`, a 422), whether it came alone or in a batch. JSON nested past
/// the `jsonb` parser's stack was taken for an outage: alone it was a 503, in a batch
/// it failed every command of the batch, on every retry.
#[tokio::test(flavor = "multi_thread")]
async fn json_postgres_cannot_parse_fails_only_its_own_command() {
    use meridian::store::{self, Changes, Committer, StoreError};

    let db = TestDb::new("deep_json").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let committer = Committer::start(pool, Default::default(), Changes::default());
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let request = |id: &str, payload: &str| noted(id, 0, payload);
    let alone = committer.append(request("deep-alone", &deep)).await;
    assert!(matches!(alone, Err(StoreError::Unstorable(_))), "{alone:?}");
    // Side by side: however they are batched, the plain one is stored.
    for round in 0..5 {
        let (deep_one, plain) = tokio::join!(
            committer.append(request(&format!("deep-{round}"), &deep)),
            committer.append(request(&format!("plain-{round}"), "{}")),
        );
        assert!(
            matches!(deep_one, Err(StoreError::Unstorable(_))),
            "{deep_one:?}"
        );
        assert!(plain.is_ok(), "{plain:?}");
    }
}

/// A request that has to wait for the next batch (its aggregate or command id is in
/// this one: a retry queued behind an abandoned first attempt) is committed right
/// after it, not when some other request happens to arrive. It waited while an idle
/// worker held the queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_held_for_the_next_batch_does_not_wait_for_other_traffic() {
    use meridian::store::{self, Changes, Committer};

    let db = TestDb::new("carry").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let committer = Committer::start(pool, Default::default(), Changes::default());
    let request = |id: &str, expected_version: i64| noted(id, expected_version, "{}");
    for round in 0..20 {
        let id = format!("agg-{round}");
        // Queued together: the second is held back from the first one's batch.
        let both = tokio::time::timeout(
            Duration::from_secs(10),
            futures::future::join(
                committer.append(request(&id, 0)),
                committer.append(request(&id, 1)),
            ),
        )
        .await;
        let (first, second) = both.unwrap_or_else(|_| {
            panic!("round {round}: an append was not answered while nothing else arrived")
        });
        assert!(first.is_ok() || second.is_ok(), "{first:?} {second:?}");
    }
}

/// A read whose connection goes silent mid-call (no answer and no reset) waited until
/// the kernel gave up on it, about a quarter of an hour: a command loading its
/// aggregate held its partition (no hand-over, no drain) for that long, and the
/// connection kept its place in the pool. Reads now have `MERIDIAN_READ_TIMEOUT_MS` to
/// answer: past it they fail (503, retryable), the connection is dropped, and the
/// host reads on new ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_on_a_connection_gone_silent_fails_in_time_and_reads_go_on() {
    use crate::harness::upload_and_open;

    // Slow, so that reads are on their way when the silence comes. The commit workers
    // keep connections of their own, which go silent too.
    let (_db, proxy, host) = host_behind_a_slow_proxy(
        "silent_reads",
        20,
        &[
            ("MERIDIAN_READ_TIMEOUT_MS", "2000"),
            ("MERIDIAN_APPEND_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    let api = host.client();
    upload_and_open(&api, "silent-read").await;

    // Readers of the account's events (each read goes to the store), in a loop.
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (api, stop) = (api.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.is_cancelled() {
                    let read = api.get("/v1/aggregates/bank-account/silent-read/events");
                    let answer = tokio::time::timeout(Duration::from_secs(20), read).await;
                    let (status, body) = answer.expect("a read waited on a silent connection");
                    answers.push((status, body));
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.silence();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let mut unavailable = 0;
    for reader in readers {
        for (status, body) in reader.await.unwrap() {
            match status {
                200 => assert_eq!(body["events"].as_array().map(Vec::len), Some(1), "{body}"),
                503 => {
                    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
                    unavailable += 1;
                }
                _ => panic!("{status}: {body}"),
            }
        }
    }
    // The silence caught reads on their way (else this test proves nothing).
    assert!(unavailable > 0, "no read met the silence");
    // And the host reads on, and runs commands, on new connections.
    crate::harness::eventually(|| {
        let api = api.clone();
        async move {
            let (status, _) = api
                .get("/v1/aggregates/bank-account/silent-read/events")
                .await;
            (status == 200).then_some(())
        }
    })
    .await;
    // A commit worker's batch on a silent connection is sent again on a new one; a
    // command can still meet a silent read first (503, retryable).
    crate::harness::eventually(|| {
        let api = api.clone();
        async move {
            let (status, body) = deposit(&api, "silent-read", 5).await;
            assert!(status == 200 || status == 503, "{status}: {body}");
            (status == 200).then_some(())
        }
    })
    .await;
}

/// A ready host whose database answers through a proxy after `delay_ms` each time, with
/// `env` more; 8 partitions, since taking each one is a round trip of that slow
/// database.
async fn host_behind_a_slow_proxy(
    label: &str,
    delay_ms: u64,
    env: &[(&str, &str)],
) -> (TestDb, crate::harness::TcpProxy, Host) {
    let db = TestDb::new(label).await;
    let proxy = crate::harness::TcpProxy::start_slow(&db, Duration::from_millis(delay_ms)).await;
    let mut options = HostOptions::default();
    options.env.push(("MERIDIAN_PARTITIONS".into(), "8".into()));
    options
        .env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let host = Host::spawn(&proxy.url, options);
    host.wait_ready(Duration::from_secs(60)).await;
    (db, proxy, host)
}

/// The registry's and the consumer groups' calls have the same limit as a command's
/// reads: a plugin list, a type's limits, a group's positions or an ack on a connection
/// gone silent answers 503 in time instead of holding its request (and its pool slot) until the kernel gives
/// up on the socket.
#[tokio::test(flavor = "multi_thread")]
async fn registry_and_group_calls_on_a_connection_gone_silent_fail_in_time() {
    use crate::harness::upload_and_open;

    let (_db, proxy, host) = host_behind_a_slow_proxy(
        "silent_registry",
        20,
        &[("MERIDIAN_READ_TIMEOUT_MS", "2000")],
    )
    .await;
    let api = host.client();
    upload_and_open(&api, "silent-registry").await;
    let (status, head) = api.get("/v1/events/head").await;
    assert_eq!(status, 200, "{head}");
    let position = head["position"].as_i64().expect("a head position");
    let ack = serde_json::json!({"position": position, "members": 1}).to_string();

    // Two readers per call, each sending it back to back, so that every call has one
    // on its way when the silence comes.
    let calls: [(&str, Option<String>); 5] = [
        ("/v1/plugins", None),
        ("/v1/plugins/bank-account", None),
        ("/v1/plugins/bank-account/limits", None),
        ("/v1/groups/silent", None),
        ("/v1/groups/silent/members/0/ack", Some(ack)),
    ];
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = (0..calls.len() * 2)
        .map(|i| {
            let (api, stop) = (api.clone(), stop.clone());
            let (path, body) = calls[i % calls.len()].clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.is_cancelled() {
                    let call = async {
                        match &body {
                            Some(body) => api.post_raw(path, body.clone().into_bytes()).await,
                            None => api.get(path).await,
                        }
                    };
                    let answer = tokio::time::timeout(Duration::from_secs(20), call).await;
                    let (status, body) =
                        answer.unwrap_or_else(|_| panic!("{path} waited on a silent connection"));
                    answers.push((path, status, body));
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.silence();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let mut unavailable = 0;
    for reader in readers {
        for (path, status, body) in reader.await.unwrap() {
            match status {
                200 => {}
                503 => {
                    assert_eq!(body["error"]["code"], "store_unavailable", "{path}: {body}");
                    unavailable += 1;
                }
                _ => panic!("{path}: {status}: {body}"),
            }
        }
    }
    assert!(unavailable > 0, "no call met the silence");
    // The host goes on over new connections.
    for (path, _) in &calls[..4] {
        crate::harness::eventually(|| {
            let api = api.clone();
            async move { (api.get(path).await.0 == 200).then_some(()) }
        })
        .await;
    }
}

/// With a slow database, snapshots due faster than they are written are skipped
/// rather than queued without bound (each queued one holds a copy of a state and waits
/// for the connections commands read through); every command still runs, and an
/// aggregate reloaded from whatever snapshot was written has its whole state.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_due_faster_than_a_slow_database_writes_them_are_skipped() {
    use crate::harness::metric;

    let (_db, _proxy, mut host) =
        host_behind_a_slow_proxy("snapshot_backlog", 50, &[("MERIDIAN_SNAPSHOT_EVERY", "1")]).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    let accounts: Vec<String> = (0..24).map(|i| format!("snap-{i}")).collect();
    let clients: Vec<_> = accounts
        .iter()
        .map(|id| {
            let (api, id) = (api.clone(), id.clone());
            tokio::spawn(async move {
                let (status, body) = open(&api, &id, "o").await;
                assert_eq!(status, 200, "{id}: {body}");
                for _ in 0..5 {
                    let (status, body) = deposit(&api, &id, 2).await;
                    assert_eq!(status, 200, "{id}: {body}");
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        metric(&host, "meridian_snapshots_skipped_total").await > 0.0,
        "no snapshot was skipped: they were all queued"
    );
    // Reloaded from the store (no cache after a restart), every account is whole.
    host.restart().await;
    let api = host.client();
    for id in &accounts {
        let (status, state) = api.get(&format!("/v1/aggregates/bank-account/{id}")).await;
        assert_eq!(status, 200, "{state}");
        assert_eq!(state["state"]["balance"], 10, "{id}: {state}");
        assert_eq!(state["version"], 6, "{id}: {state}");
    }
}

/// A database connection that goes silent mid-batch (no answer and no reset: a
/// failover, a network dropping packets) holds a batch for the committer's batch
/// timeout, not until the kernel gives up on it a quarter of an hour later; the batch
/// then goes again on a new connection. Here a proxy between the committer and
/// PostgreSQL stops passing anything on for the connections it already has.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_on_a_connection_gone_silent_commits_on_a_new_one() {
    use meridian::store::{self, Changes, Committer, CommitterConfig};

    use crate::harness::TcpProxy;

    let db = TestDb::new("silent").await;
    store::migrate(&db.pool().await).await.unwrap();
    let proxy = TcpProxy::start(&db).await;
    let pool = store::connect(&store::DatabaseConfig {
        url: proxy.url.clone(),
        max_connections: 2,
    })
    .await
    .unwrap();
    let committer = Committer::start(
        pool,
        CommitterConfig {
            workers: 1,
            batch_timeout: Duration::from_secs(1),
            ..CommitterConfig::default()
        },
        Changes::default(),
    );
    let request = |id: &str| noted(id, 0, "{}");
    committer.append(request("before")).await.unwrap();

    proxy.silence();
    let answer = tokio::time::timeout(Duration::from_secs(30), committer.append(request("during")))
        .await
        .expect("the append waited on the silent connection");
    assert!(answer.is_ok(), "{answer:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    assert_eq!(stored, 2);
}

/// A migrated database's pool, and a group committer with one worker on it whose
/// batches time out after `batch_timeout`.
async fn one_worker_committer(
    db: &TestDb,
    batch_timeout: Duration,
) -> (sqlx::PgPool, meridian::store::Committer) {
    use meridian::store::{self, Changes, Committer, CommitterConfig};
    let admin = db.pool().await;
    store::migrate(&admin).await.unwrap();
    let pool = store::connect(&store::DatabaseConfig {
        url: db.url.clone(),
        max_connections: 4,
    })
    .await
    .unwrap();
    let committer = Committer::start(
        pool,
        CommitterConfig {
            workers: 1,
            batch_timeout,
            ..CommitterConfig::default()
        },
        Changes::default(),
    );
    (admin, committer)
}

/// A batch that times out waiting on a lock (a row an operator's session holds, DDL on
/// the events table) must not leave its session waiting on the server: that session
/// keeps every lock the batch took, and each retry would leave another. The committer
/// ends the sessions of its timed-out batches; the batch fails, writes nothing, and
/// the aggregate takes appends again once the lock is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_times_out_on_a_lock_leaves_no_session_holding_locks() {
    let db = TestDb::new("lock_timeout").await;
    let (admin, committer) = one_worker_committer(&db, Duration::from_millis(800)).await;
    committer.append(noted("locked", 0, "{}")).await.unwrap();
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'meridian' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&admin)
        .await
        .unwrap()
    };

    // Held briefly: an open transaction holds back every test's global feed.
    let mut holder = admin.begin().await.unwrap();
    sqlx::query("SELECT version FROM streams WHERE aggregate_id = 'locked' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let answer = committer.append(noted("locked", 1, "{}")).await;
    assert!(
        answer.is_err(),
        "the batch waited on the lock past its timeout: {answer:?}"
    );
    let mut left = waiting().await;
    for _ in 0..40 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = waiting().await;
    }
    assert_eq!(
        left, 0,
        "sessions of timed-out batches still wait on the lock"
    );
    holder.rollback().await.unwrap();

    committer.append(noted("locked", 1, "{}")).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM events WHERE aggregate_id = 'locked' ORDER BY version",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(versions, [1, 2], "the timed-out batch wrote nothing");
}

/// One request of a batch that breaks a constraint the SQL function does not judge per
/// request (an event id stored already) fails the batch's one statement; the batch is
/// then sent again request by request, so only that request fails and every other
/// command of the batch commits.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_breaking_a_constraint_fails_alone_in_its_batch() {
    let db = TestDb::new("batch_culprit").await;
    // One worker: while it commits the first request, the rest queue into one batch.
    let (admin, committer) =
        one_worker_committer(&db, meridian::store::DEFAULT_BATCH_TIMEOUT).await;
    let stored = noted("first", 0, "{}");
    let reused = stored.events[0].event_id;
    committer.append(stored).await.unwrap();
    let mut culprit = noted("culprit", 0, "{}");
    culprit.events[0].event_id = reused;
    let mut requests: Vec<_> = (0..30)
        .map(|i| noted(&format!("ok-{i}"), 0, "{}"))
        .collect();
    requests.insert(10, culprit);
    let answers =
        futures::future::join_all(requests.into_iter().map(|r| committer.append(r))).await;
    let failed: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        failed,
        [10],
        "only the request reusing an event id fails: {answers:?}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(count, 31);
}

/// A page of events stops once its events reach 16 MiB, however many `limit` allows,
/// and `next` reads on from there with nothing skipped or repeated: a page of 10,000
/// large events was read into the host's memory, and sent, whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_of_large_events_stops_at_its_byte_budget_and_reads_on() {
    let (db, host) = host_with_bank_account("big_pages").await;
    let api = host.client();
    // 40 events of 450 KB: 18 MB.
    let owner = "x".repeat(450_000);
    for i in 0..40 {
        let (status, body) = open(&api, &format!("big-{i}"), &owner).await;
        assert_eq!(
            status,
            200,
            "account {i}: {}",
            &body.to_string()[..300.min(body.to_string().len())]
        );
    }
    // A page also stops where an older transaction of the database is still running
    // (the host's own bookkeeping): read once all 40 are behind every one of them.
    let pool = db.pool().await;
    crate::harness::eventually(|| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let horizon = meridian::store::read::horizon(&mut conn).await.unwrap();
            let readable: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tx_id < $1::text::xid8")
                    .bind(horizon.to_string())
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
            (readable == 40).then_some(())
        }
    })
    .await;
    let mut after = 0;
    let mut pages = Vec::new();
    let mut positions = Vec::new();
    loop {
        let (status, page) = api
            .get(&format!("/v1/events?after={after}&limit=1000"))
            .await;
        assert_eq!(status, 200);
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        pages.push(events.len());
        positions.extend(events.iter().map(|e| e["position"].as_i64().unwrap()));
        after = page["next"].as_i64().unwrap();
    }
    // 16 MiB is 37.3 events of 450 KB: the 38th reaches it.
    assert_eq!(pages, vec![38, 2], "events per page");
    let mut unique = positions.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!((positions.len(), unique.len()), (40, 40), "{positions:?}");
}

/// An aggregate whose history outweighs one page of reads (16 MiB) loads whole. The
/// load reads its history in pages of at most that many bytes; a page cut short by
/// its byte budget once looked like the end of the history, so after a restart the
/// aggregate came back at the version where the first page stopped.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregate_with_a_history_over_a_page_of_bytes_loads_whole() {
    let db = TestDb::new("heavy_history").await;
    let mut host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");
    // 20 notes of 900 kB: 18 MB of events.
    let text = "x".repeat(900_000);
    for n in 1..=20 {
        let (status, body) = api
            .command(
                "bad-output",
                "heavy-1",
                json!({"command": {"type": "Write", "text": text}}),
            )
            .await;
        assert_eq!(
            status,
            200,
            "note {n}: {}",
            body.to_string().chars().take(200).collect::<String>()
        );
    }

    host.restart().await;
    let api = host.client();
    let (status, state) = api.get("/v1/aggregates/bad-output/heavy-1").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["version"], 20, "loaded part of the history: {state}");
    assert_eq!(state["state"]["notes"], 20, "{state}");
    let (status, body) = api
        .command(
            "bad-output",
            "heavy-1",
            json!({"command": {"type": "Write", "text": "one more"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 21, "{body}");
}

/// Every answer to a command names the id it ran under (`x-meridian-command-id`), the
/// caller's or the one the host gave it, errors included: a caller that sent none can
/// still settle a lost or unclear answer by sending the command again under that id,
/// which applies it once. In a cluster the answer passed on from the owner names it too.
#[tokio::test(flavor = "multi_thread")]
async fn every_answer_names_the_command_id() {
    let (_db, host) = host_with_bank_account("command_id_header").await;
    let api = host.client();
    let send = |body: Value| {
        let api = api.clone();
        async move {
            let response = api
                .http
                .post(format!("{}/v1/aggregates/bank-account/acc-h", api.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            let id = response
                .headers()
                .get("x-meridian-command-id")
                .map(|v| v.to_str().unwrap().parse::<uuid::Uuid>().unwrap());
            let status = response.status().as_u16();
            (status, id, response.json::<Value>().await.unwrap())
        }
    };
    // No id sent: the host's comes back, and sending again under it applies nothing new.
    let open = json!({"command": {"type": "Open", "owner": "hal"}});
    let (status, id, first) = send(open.clone()).await;
    assert_eq!(status, 200, "{first}");
    let id = id.expect("the answer names the command id");
    let mut again = open.clone();
    again["command_id"] = json!(id);
    let (status, same, second) = send(again).await;
    assert_eq!((status, same), (200, Some(id)), "{second}");
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["version"], 1, "{second}");
    // A rejection names it too.
    let (status, id, body) = send(json!({"command": {"type": "Withdraw", "amount": 99}})).await;
    assert_eq!(status, 422, "{body}");
    assert!(id.is_some(), "{body}");
    // The caller's own id is the one named.
    let mine = uuid::Uuid::now_v7();
    let (status, id, body) = send(json!({
        "command": {"type": "Deposit", "amount": 1},
        "command_id": mine,
    }))
    .await;
    assert_eq!((status, id), (200, Some(mine)), "{body}");
    // A request refused before it has an id (malformed) names none.
    let (status, id, body) = send(json!({"command": "not an object", "nope": 1})).await;
    assert_eq!((status, id), (400, None), "{body}");
}

/// The compile cache keeps what stored versions load, and loses the rest when a host
/// starts: components of dry runs and refused uploads, files an older engine wrote,
/// writes a crash cut short. It only grew before. Other files stay.
#[tokio::test(flavor = "multi_thread")]
async fn a_starting_host_prunes_the_compile_cache_to_stored_versions() {
    let cache = tempfile::tempdir().unwrap();
    let options = HostOptions {
        env: vec![(
            "MERIDIAN_CACHE_DIR".into(),
            cache.path().display().to_string(),
        )],
        ..HostOptions::default()
    };
    let (_db, mut host) = host_with("cache_prune", options).await;
    let api = host.client();
    let (status, body) = api
        .put_raw(
            "/v1/plugins/bank-account?dry_run=true",
            crate::harness::with_custom_section(b"dry"),
        )
        .await;
    assert!(status < 300, "dry run: {status} {body}");
    let (status, body) = api
        .upload("file-reader", wasm_bytes("forbidden-import"))
        .await;
    assert_eq!(status, 400, "{body}");
    let sha = |bytes: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    let stored = sha(&wasm_bytes("bank-account"));
    let old_engine = format!("{stored}-0123456789abcdef.cwasm");
    let torn = format!("{stored}-0123456789abcdef.tmp4242");
    for name in [&old_engine, &torn, &"notes.txt".to_string()] {
        std::fs::write(cache.path().join(name), b"x").unwrap();
    }
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let cwasm = |names: &[String]| names.iter().filter(|n| n.ends_with(".cwasm")).count();
    assert!(cwasm(&names()) >= 3, "{:?}", names());

    host.restart().await;
    let left = names();
    assert_eq!(cwasm(&left), 1, "{left:?}");
    assert!(
        left.iter()
            .any(|n| n.starts_with(&stored) && n.ends_with(".cwasm") && *n != old_engine),
        "the stored version's component stays: {left:?}"
    );
    assert!(
        left.contains(&"notes.txt".to_string()) && !left.contains(&torn),
        "{left:?}"
    );
    let (status, body) = open(&host.client(), "cached-1", "o").await;
    assert_eq!(status, 200, "{body}");
}

/// Managed PostgreSQL services often refuse connections without TLS (RDS from
/// PostgreSQL 15 on, Azure): `sslmode=require` in the URL must work, and the host's
/// sessions must then be encrypted. (The test server is Debian's, with TLS on.)
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_requires_tls_is_reached_over_tls() {
    let db = TestDb::new("tls").await;
    let pool = db.pool().await;
    let enabled: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(enabled, "on", "the test server has TLS off: turn `ssl` on");
    let host = Host::spawn(
        &format!("{}?sslmode=require", db.url),
        HostOptions::default(),
    );
    host.wait_ready(Duration::from_secs(60)).await;
    crate::harness::upload_and_open(&host.client(), "tls-1").await;
    // Every session on this database is encrypted: the host's, required, and the
    // test's own, which `sslmode=prefer` (the default) encrypts where it can.
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.backend_type = 'client backend'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(encrypted > 1, "{encrypted} encrypted sessions");
    assert_eq!(plain, 0, "sessions without TLS");
}

/// A stand-in for a proxy in front of the region that answers every request with
/// `status` (e.g. `502 Bad Gateway`), `content_type` and `body`: its URL, and a count
/// of the requests it got.
async fn fake_proxy(
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", proxy.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let requests = requests.clone();
        async move {
            while let Ok((mut tcp, _)) = proxy.accept().await {
                requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let _ = tcp
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        }
    });
    (url, requests)
}

/// Runs the CLI with `args`, for at most 30 s.
async fn cli(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(crate::harness::meridian_bin())
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("the CLI did not end within 30 s")
        .unwrap()
}

/// A proxy in front of the region answering 502 or 504 (the host's answer lost on its
/// way back, the command perhaps run): `meridian command` sends it again under the same
/// id, and when it gives up, names the id to send it with. It stopped at the first such
/// answer without the id, and running it again made a new one: the command twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_retries_a_proxys_bad_gateway_and_names_the_command_id() {
    let (url, requests) = fake_proxy(
        "502 Bad Gateway",
        "text/html",
        "<html><body>502 Bad Gateway</body></html>",
    )
    .await;
    let out = cli(&[
        "command",
        "bank-account",
        "b-1",
        r#"{"type":"Deposit","amount":1}"#,
        "--retries",
        "1",
        "--url",
        url.as_str(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "not sent again: {stderr}"
    );
    assert!(
        stderr.contains("502 bad gateway; sending the command again"),
        "{stderr}"
    );
    assert!(
        stderr.contains("send it again with --command-id "),
        "the command's id is not named: {stderr}"
    );
}

/// A 502 in the API's own error shape is the host's, and final (an answer too large to
/// come back from the home region is as large the next time): the CLI does not send
/// the command again, and says why it stopped.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_does_not_retry_the_hosts_own_bad_gateway() {
    let (url, requests) = fake_proxy(
        "502 Bad Gateway",
        "application/json",
        r#"{"error": {"code": "answer_too_large", "message": "the answer is too large"}}"#,
    )
    .await;
    let out = cli(&[
        "command",
        "bank-account",
        "b-1",
        r#"{"type":"Deposit","amount":1}"#,
        "--url",
        url.as_str(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("502 answer_too_large"), "{stderr}");
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sent again: {stderr}"
    );
}

/// `meridian events tail` through a proxy that drops `Accept: text/event-stream` gets
/// a page of JSON, not a stream: it says so and stops, where it reconnected every
/// second forever, printing nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_tail_given_no_stream_says_so() {
    let (url, _) = fake_proxy("200 OK", "application/json", r#"{"events": [], "next": 0}"#).await;
    let out = cli(&["events", "tail", "--json", "--url", url.as_str()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("without an event stream"),
        "{stderr}"
    );
}
