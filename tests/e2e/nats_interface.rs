//! The NATS interface from another language: the example Python consumer
//! (`examples/nats-consumer/consume.py`, nats-py) reads a region's events straight from
//! JetStream, in order, and a durable consumer resumes where it acknowledged.

use std::process::Command;

use serde_json::{Value, json};

use super::harness::{Host, HostOptions, TestDb, wasm_bytes};
use super::nats::NatsServer;

fn consume(nats: &NatsServer, durable: &str, count: usize) -> Vec<Value> {
    consume_at(&nats.url(), durable, count)
}

fn consume_at(url: &str, durable: &str, count: usize) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/nats-consumer/consume.py"
    );
    let output = Command::new("python3")
        .arg(script)
        .args(["--url", url, "--region", "solo", "--durable", durable])
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

/// The relay publishes each event on condition that the region's events stream ends
/// with the one before it. A message lost on the way (a reconnect mid-page) must make
/// the messages after it fail, not leave a hole that they cover: the relay resumes
/// after the stream's last message, so an event missing below it would never be sent.
#[tokio::test(flavor = "multi_thread")]
async fn the_events_stream_refuses_an_event_whose_predecessor_is_missing() {
    use async_nats::jetstream::context::PublishErrorKind;
    use meridian::region::relay::{self, Published};
    let nats = NatsServer::hub("east");
    let js = nats.jetstream().await;
    let stream_name = relay::events_stream_config("east", 1).name;
    js.get_or_create_stream(relay::events_stream_config("east", 1))
        .await
        .expect("create the events stream");
    let event = |version: i64| meridian::store::StoredEvent {
        position: version,
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "bank-account".into(),
        aggregate_id: "chain-1".into(),
        version,
        event_type: "Deposited".into(),
        payload: serde_json::value::RawValue::from_string(r#"{"amount": 1}"#.into()).unwrap(),
        metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        recorded_at: chrono::Utc::now(),
    };
    let events: Vec<_> = (1..=4).map(event).collect();
    let after = relay::publish_page(&js, "east", Published::Sequence(0), events[..1].iter())
        .await
        .expect("publish the first event");
    assert_eq!(after, Published::Event(events[0].event_id));
    // The second event was lost on the way: the third, sent after it, is refused.
    let gap = relay::publish_page(
        &js,
        "east",
        Published::Event(events[1].event_id),
        events[2..3].iter(),
    )
    .await;
    assert_eq!(
        gap.map_err(|e| e.kind()).err(),
        Some(PublishErrorKind::WrongLastMessageId),
        "an event after a missing one was stored"
    );
    // A relay that read the stream before it moved on is refused as well.
    let stale = relay::publish_page(&js, "east", Published::Sequence(0), events[1..2].iter()).await;
    assert_eq!(
        stale.map_err(|e| e.kind()).err(),
        Some(PublishErrorKind::WrongLastSequence),
        "a publish from a stale end was stored"
    );
    // Resumed from where the stream ends, the rest goes in, in order.
    relay::publish_page(&js, "east", after, events[1..].iter())
        .await
        .expect("publish from the end of the stream");
    let mut stream = js.get_stream(&stream_name).await.expect("the stream");
    let state = stream.info().await.expect("stream info").state.clone();
    assert_eq!(state.messages, 4);
    for (sequence, event) in (1u64..).zip(&events) {
        let message = stream
            .get_raw_message(sequence)
            .await
            .expect("a stored message");
        assert_eq!(
            message.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(event.event_id.to_string().as_str()),
            "message {sequence}"
        );
    }
}

/// A region's NATS with users (`deploy/nats/permissions.conf`): the hosts sign in with
/// the user and password in `MERIDIAN_NATS_URL` (the client took none from the URL,
/// so hosts could not use a NATS that asks for them), and a consumer signed in as
/// `reader` reads the events but cannot publish one.
#[tokio::test(flavor = "multi_thread")]
async fn with_nats_users_hosts_sign_in_and_readers_only_read() {
    let nats = NatsServer::hub_with_users("solo");
    let db = TestDb::new("natsusers").await;
    let host = Host::start(
        &db,
        HostOptions {
            region: Some("solo".into()),
            nats_url: Some(nats.url_as("meridian")),
            ..Default::default()
        },
    )
    .await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .command(
            "bank-account",
            "ro-1",
            json!({"command": {"type":"Open","owner":"r"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let read = consume_at(&nats.url_as("reader"), "reader-app", 1);
    assert_eq!(read[0]["event_id"], body["events"][0]["event_id"]);

    // A reader's forged event is refused by the server, and never in the stream.
    let reader = nats.connect_as("reader").await;
    let forged = json!({
        "region": "solo", "position": 99, "event_id": uuid::Uuid::now_v7(),
        "aggregate_type": "bank-account", "aggregate_id": "forged", "version": 1,
        "type": "Opened", "payload": {"owner": "mallory"}, "metadata": {},
        "recorded_at": chrono::Utc::now(),
    });
    let published = async_nats::jetstream::new(reader)
        .publish(
            "meridian.events.solo.bank-account.forged",
            forged.to_string().into(),
        )
        .await;
    let refused = match published {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(refused, "the reader published an event");
    let js = async_nats::jetstream::new(nats.connect_as("meridian").await);
    let mut stream = js.get_stream("meridian-events-solo").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}
