//! The NATS interface from another language: the example Python consumer
//! (`examples/nats-consumer/consume.py`, nats-py) reads a region's events straight from
//! JetStream, in order, and a durable consumer resumes where it acknowledged.

use std::process::Command;

use serde_json::{Value, json};

use super::harness::{Host, HostOptions, TestDb, wasm_bytes};
use super::nats::NatsServer;

fn consume(nats: &NatsServer, durable: &str, count: usize) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/nats-consumer/consume.py"
    );
    let output = Command::new("python3")
        .arg(script)
        .args([
            "--url",
            &nats.url(),
            "--region",
            "solo",
            "--durable",
            durable,
        ])
        .args(["--count", &count.to_string(), "--timeout", "20"])
        .output()
        .expect("run python3 (scripts/install-deps.sh installs nats-py)");
    assert!(
        output.status.success(),
        "consumer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_consumer_reads_events_from_jetstream_and_resumes() {
    let nats = NatsServer::hub("solo");
    let db = TestDb::new("natsif").await;
    let host = Host::start(
        &db,
        HostOptions {
            region: Some("solo".into()),
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )
    .await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    let mut sent = Vec::new();
    for command in [
        json!({"type":"Open","owner":"py"}),
        json!({"type":"Deposit","amount":10}),
        json!({"type":"Withdraw","amount":3}),
    ] {
        let (status, body) = api
            .command("bank-account", "py.1", json!({ "command": command }))
            .await;
        assert_eq!(status, 200, "{body}");
        sent.push(body["events"][0]["event_id"].clone());
    }
    // A blocking child process; the host runs in its own process, so this is fine.
    let first = consume(&nats, "py-app", 3);
    let ids: Vec<&Value> = first.iter().map(|e| &e["event_id"]).collect();
    assert_eq!(ids, sent.iter().collect::<Vec<_>>());
    assert_eq!(first[0]["type"], "Opened");
    assert_eq!(first[0]["payload"]["owner"], "py");
    assert_eq!(
        first[0]["aggregate_id"], "py.1",
        "the id with a dot arrives intact"
    );
    assert_eq!(first[0]["region"], "solo");
    assert_eq!(first[2]["version"], 3);

    // Acknowledged events are not delivered to the same durable consumer again.
    let (status, body) = api
        .command(
            "bank-account",
            "py.1",
            json!({"command": {"type":"Deposit","amount":1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let next = consume(&nats, "py-app", 1);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0]["event_id"], body["events"][0]["event_id"]);
    assert_eq!(next[0]["version"], 4);
}
