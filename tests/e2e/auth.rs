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

/// A tokens file that holds no token (a secret not filled in yet, a template that
/// rendered only comments) left every route open, with nothing but a missing log line
/// to tell. The host now refuses to start.
#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_file_without_a_token_is_refused_at_start() {
    let db = TestDb::new("auth_empty").await;
    let file = std::env::temp_dir().join(format!("meridian-empty-tokens-{}", std::process::id()));
    std::fs::write(&file, "# filled in at deploy time\n\n").unwrap();
    let (exited, stderr) = tokio::task::spawn_blocking({
        let (url, file) = (db.url.clone(), file.clone());
        move || {
            let mut child = std::process::Command::new(crate::harness::meridian_bin())
                .args(["host", "--http-addr", "127.0.0.1:0"])
                .env("MERIDIAN_DATABASE_URL", url)
                .env("MERIDIAN_TOKENS_FILE", &file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run meridian");
            // A host that started serves until stopped: give it a while, then stop it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let exited = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            };
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            (exited, stderr)
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        exited.is_some_and(|s| !s.success()),
        "a host with no token kept serving: {stderr}"
    );
    assert!(stderr.contains("holds no token"), "{stderr}");
}
