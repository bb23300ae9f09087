//! The OpenAPI document (`GET /openapi.json`) is what clients are generated from, so it
//! must say what the host really answers. Schemathesis derives a few thousand requests
//! from it, valid and deliberately invalid, sends them to a real host and checks every
//! answer against the document: no 5xx, only documented status codes, content types
//! and headers, bodies that match their schemas, and every request the document rules
//! out refused. Its settings, and why each is there: `schemathesis.toml` beside this
//! file. The same run against a host of a two-region cluster is in `regions.rs`.

use std::path::{Path, PathBuf};

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

const ADMIN: &str = "conformance-admin-token-0123";

/// Schemathesis from `scripts/install-deps.sh --tests`, or `MERIDIAN_SCHEMATHESIS`.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("MERIDIAN_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/schemathesis/bin/st")
        });
    assert!(
        path.exists(),
        "no Schemathesis at {}: run `bash scripts/install-deps.sh --tests`",
        path.display()
    );
    path
}

/// Opens the accounts `schemathesis.toml` names (`acc-1`..`acc-3`), so reads of state
/// and home moves reach real aggregates rather than stopping at a 404.
pub async fn open_accounts(url: &str, token: Option<&str>) {
    let client = reqwest::Client::new();
    for id in ["acc-1", "acc-2", "acc-3"] {
        for command in [
            serde_json::json!({"type": "Open", "owner": id}),
            serde_json::json!({"type": "Deposit", "amount": 10}),
        ] {
            let mut request = client
                .post(format!("{url}/v1/aggregates/bank-account/{id}"))
                .json(&serde_json::json!({ "command": command }));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let answer = request.send().await.unwrap();
            assert_eq!(
                answer.status(),
                200,
                "{id}: {}",
                answer.text().await.unwrap()
            );
        }
    }
}

/// What the run may answer besides 2xx–4xx.
pub enum ServerErrors {
    /// None: one host, a healthy database; any 5xx is a fault.
    None,
    /// 503 with `Retry-After`, as documented, and no other 5xx: in a two-region cluster
    /// whose homes Schemathesis moves back and forth faster than the relay carries the
    /// moves, a request can meet an aggregate whose move has not arrived yet
    /// (`home_moving`) or bounce between regions whose views differ (`too_many_hops`).
    /// Both say to retry, and both end once the relay catches up.
    RetryableOnly,
}

/// Runs Schemathesis against the host at `url` (with the bank-account plugin uploaded)
/// and fails, with every finding and `logs()`, unless every answer matches the
/// document.
pub async fn assert_conforms(
    url: &str,
    token: Option<&str>,
    server_errors: ServerErrors,
    logs: impl Fn() -> String,
) {
    let st = schemathesis();
    // Schemathesis keeps a cache in its working directory: not in the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let mut settings = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/schemathesis.toml"),
    )
    .unwrap();
    if let ServerErrors::RetryableOnly = server_errors {
        settings.push_str(
            "\n[checks.not_a_server_error]\nexpected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"503\"]\n",
        );
    }
    // A move between regions waits (up to 10 s) for the target to confirm it, so the
    // two-region run takes fewer examples to stay within a minute or two.
    let examples = match server_errors {
        ServerErrors::None => "200",
        ServerErrors::RetryableOnly => "20",
    };
    let config = scratch.path().join("schemathesis.toml");
    std::fs::write(&config, settings).unwrap();
    let mut command = tokio::process::Command::new(&st);
    command
        .current_dir(scratch.path())
        .arg("--config-file")
        .arg(&config)
        .args(["--no-color", "run", &format!("{url}/openapi.json")])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        // One worker: Python 3.11's parser is not thread-safe enough for Hypothesis'
        // source inspection across threads ("AST constructor recursion depth mismatch").
        // A fixed seed makes a failure repeat with the same requests.
        .args(["--workers", "1", "--seed", "1"])
        .args(["--max-examples", examples]);
    if let Some(token) = token {
        command.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.output().await.expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "answers that break the OpenAPI document (reproduce with the curl lines):\n{stdout}\n{}\nlogs:\n{}",
        String::from_utf8_lossy(&output.stderr),
        logs()
    );
    // It really ran: every operation but the upload (see schemathesis.toml).
    assert!(stdout.contains("Tested: 16"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_matches_the_openapi_document() {
    let db = TestDb::new("conformance").await;
    let host = Host::start(
        &db,
        HostOptions {
            env: vec![("MERIDIAN_TOKENS".into(), format!("{ADMIN}:admin"))],
            ..HostOptions::default()
        },
    )
    .await;
    let upload = reqwest::Client::new()
        .put(format!("{}/v1/plugins/bank-account", host.url))
        .bearer_auth(ADMIN)
        .body(wasm_bytes("bank-account"))
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 201);
    open_accounts(&host.url, Some(ADMIN)).await;

    assert_conforms(&host.url, Some(ADMIN), ServerErrors::None, || {
        host.log_tail()
    })
    .await;

    // A few thousand requests later the host still serves, and every 5xx would have
    // failed the run above.
    let state = reqwest::Client::new()
        .get(format!("{}/v1/plugins/bank-account", host.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(state.status(), 200);
}
