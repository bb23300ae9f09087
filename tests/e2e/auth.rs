//! Bearer tokens with scopes, across forwarding.

use serde_json::{Value, json};

use crate::harness::{Host, HostOptions, TestDb, eventually, wasm_bytes};

const ADMIN: &str = "admin-token-0123456789";
const WRITER: &str = "write-token-0123456789";
const READER: &str = "read-token-01234567890";

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_scope_opens_exactly_its_routes_and_forwarding_keeps_the_token() {
    let db = TestDb::new("auth").await;
    let options = HostOptions {
        env: vec![(
            "MERIDIAN_TOKENS".into(),
            format!("{ADMIN}:admin,{WRITER}:write+read,{READER}:read"),
        )],
        ..HostOptions::default()
    };
    let a = Host::start(&db, options.clone()).await;
    let b = Host::start(&db, options).await;
    use reqwest::Method;

    // Probes stay open; everything else needs a token.
    assert_eq!(
        reqwest::get(format!("{}/healthz", a.url))
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, body) = call(Method::GET, format!("{}/v1/events", a.url), None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    let (status, _) = call(
        Method::GET,
        format!("{}/v1/events", a.url),
        Some("not-a-real-token-at-all"),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Uploading a plugin is admin's.
    let upload = |token: &'static str| {
        let url = format!("{}/v1/plugins/bank-account", a.url);
        async move {
            let r = reqwest::Client::new()
                .put(url)
                .bearer_auth(token)
                .body(wasm_bytes("bank-account"))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(upload(WRITER).await, 403);
    assert_eq!(upload(READER).await, 403);
    assert_eq!(upload(ADMIN).await, 201);

    // Commands need write; reads need read.
    let open = json!({"command": {"type": "Open", "owner": "zed"}});
    let (status, body) = call(
        Method::POST,
        format!("{}/v1/aggregates/bank-account/z-1", a.url),
        Some(READER),
        Some(open.clone()),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // Moving a home (forced or not) decides where an aggregate may be written: admin's,
    // as the README says, not every writer's.
    let (status, body) = call(
        Method::POST,
        format!("{}/v1/aggregates/bank-account/z-1/move-home", a.url),
        Some(WRITER),
        Some(json!({"region": "elsewhere", "force": true})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("admin")),
        "{body}"
    );
    let (status, _) = call(
        Method::GET,
        format!("{}/v1/plugins", a.url),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // Wait until both hosts own partitions, then send commands for many accounts to
    // one host: some are forwarded to the other, which checks the same token.
    eventually(|| async {
        let (_, s) = call(
            Method::GET,
            format!("{}/v1/cluster", a.url),
            Some(READER),
            None,
        )
        .await;
        let owners = s["partition_owners"].as_array()?;
        let both = [&a.node_id, &b.node_id]
            .iter()
            .all(|id| owners.iter().any(|o| o.as_str() == Some(id.as_str())));
        (both && owners.iter().all(|o| o.is_string())).then_some(())
    })
    .await;
    let mut executed_by = std::collections::HashSet::new();
    for i in 0..20 {
        let (status, body) = call(
            Method::POST,
            format!("{}/v1/aggregates/bank-account/z-{i}", a.url),
            Some(WRITER),
            Some(open.clone()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        executed_by.insert(body["executed_by"].as_str().unwrap().to_string());
    }
    assert!(
        executed_by.contains(&b.node_id),
        "no command was forwarded: {executed_by:?}"
    );
    let (status, state) = call(
        Method::GET,
        format!("{}/v1/aggregates/bank-account/z-3", b.url),
        Some(READER),
        None,
    )
    .await;
    assert_eq!((status, state["version"].as_i64()), (200, Some(1)));

    // The CLI sends its token from MERIDIAN_TOKEN.
    let url = a.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::meridian_bin())
            .args(["plugin", "list", "--url", &url])
            .env("MERIDIAN_TOKEN", READER)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bank-account"));
}

/// `--help` shows where each setting comes from, and clap prints an environment
/// variable's value beside its name: the database's and NATS's URLs carry passwords,
/// and help output lands in terminals, tickets and CI logs.
#[test]
fn help_never_shows_the_passwords_in_the_environment() {
    for command in [
        &["host", "--help"][..],
        &["migrate", "--help"],
        &["dev", "--help"],
    ] {
        let output = std::process::Command::new(crate::harness::meridian_bin())
            .args(command)
            .env(
                "MERIDIAN_DATABASE_URL",
                "postgres://app:s3cret-db@db.internal/events",
            )
            .env(
                "MERIDIAN_NATS_URL",
                "nats://app:s3cret-nats@nats.internal:4222",
            )
            .env("MERIDIAN_TOKENS", "s3cret-token-0123456789:admin")
            .output()
            .expect("run meridian");
        assert!(output.status.success(), "{command:?}");
        let shown = String::from_utf8_lossy(&output.stdout);
        assert!(
            shown.contains("MERIDIAN_DATABASE_URL"),
            "{command:?}: {shown}"
        );
        assert!(
            !shown.contains("s3cret"),
            "{command:?} shows a secret: {shown}"
        );
    }
}
