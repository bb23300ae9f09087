//! Three regions: `east` is the NATS hub and holds the directory; `west` and `south` are
//! leafnodes of it and reach each other only through it. What two regions cannot show:
//! traffic between two leaves (forwarded commands, JetStream sources, plugin bytes) and
//! a home move that neither starts nor ends in the directory's region.

use serde_json::{Value, json};

use super::harness::{
    Host, HostOptions, TestDb, events_of, eventually, region_metric, send_command, wasm_bytes,
};
use super::nats::NatsServer;

const EAST: &str = "east";
const WEST: &str = "west";
const SOUTH: &str = "south";
const REGIONS: [&str; 3] = [EAST, WEST, SOUTH];

fn options(region: &str, nats: &NatsServer) -> HostOptions {
    let peers: Vec<&str> = REGIONS.into_iter().filter(|r| *r != region).collect();
    HostOptions {
        region: Some(region.into()),
        nats_url: Some(nats.url()),
        env: vec![
            ("MERIDIAN_PEER_REGIONS".into(), peers.join(",")),
            ("MERIDIAN_DIRECTORY_REGION".into(), EAST.into()),
            ("MERIDIAN_PARTITIONS".into(), "16".into()),
        ],
        ..Default::default()
    }
}

/// One aggregate's events as a region's global feed shows them: (version, type,
/// origin region, event id).
async fn history(host: &Host, id: &str) -> Vec<(i64, String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    events_of(host, id)
        .await
        .iter()
        .map(|e| {
            (
                e["version"].as_i64().unwrap_or(-1),
                text(&e["type"]),
                text(&e["metadata"]["origin_region"]),
                text(&e["event_id"]),
            )
        })
        .collect()
}

/// The three regions, one host each; nothing uploaded.
struct ThreeRegions {
    east: Host,
    west: Host,
    south: Host,
    nats: [NatsServer; 3],
    _dbs: [TestDb; 3],
}

impl ThreeRegions {
    async fn start(label: &str) -> Self {
        let east_nats = NatsServer::hub(EAST);
        let west_nats = NatsServer::leaf(WEST, &east_nats);
        let south_nats = NatsServer::leaf(SOUTH, &east_nats);
        let dbs = [
            TestDb::new(&format!("{label}_e")).await,
            TestDb::new(&format!("{label}_w")).await,
            TestDb::new(&format!("{label}_s")).await,
        ];
        let east = Host::start(&dbs[0], options(EAST, &east_nats)).await;
        let west = Host::start(&dbs[1], options(WEST, &west_nats)).await;
        let south = Host::start(&dbs[2], options(SOUTH, &south_nats)).await;
        Self {
            east,
            west,
            south,
            nats: [east_nats, west_nats, south_nats],
            _dbs: dbs,
        }
    }

    fn hosts(&self) -> [&Host; 3] {
        [&self.east, &self.west, &self.south]
    }

    /// Uploads bank-account through `host` and waits until every region runs it.
    async fn upload_in(&self, host: &Host) {
        let (status, body) = host
            .client()
            .upload("bank-account", wasm_bytes("bank-account"))
            .await;
        assert_eq!(status, 201, "upload through {}: {body}", host.node_id);
        for host in self.hosts() {
            eventually(|| async {
                let (_, plugins) = host.client().get("/v1/plugins").await;
                plugins["plugins"]
                    .as_array()?
                    .iter()
                    .any(|p| p["aggregate_type"] == "bank-account" && p["version"] == 1)
                    .then_some(())
            })
            .await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (host, nats) in self.hosts().iter().zip(&self.nats) {
            out.push_str(&format!(
                "\n--- {} ---\n{}\n--- its nats ---\n{}",
                host.node_id,
                host.log_tail(),
                nats.log_tail()
            ));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_regions_share_plugins_commands_and_events_through_one_hub() {
    let r = ThreeRegions::start("three").await;
    let (east, west, south) = (&r.east, &r.west, &r.south);
    let hosts = r.hosts();
    let logs = || r.logs();

    // Uploaded in a leaf: the version number comes from the directory (east), the
    // bytes stay in west's object store, and south fetches them from there.
    r.upload_in(west).await;

    // Created in south, so homed there; west's command reaches it through the hub.
    let (status, body, _) = send_command(
        &south.url,
        "tri-1",
        None,
        json!({"type":"Open","owner":"sam"}),
    )
    .await;
    assert_eq!(status, 200, "{body}{}", logs());
    let (status, body, ran_in) = send_command(
        &west.url,
        "tri-1",
        None,
        json!({"type":"Deposit","amount":30}),
    )
    .await;
    assert_eq!(status, 200, "{body}{}", logs());
    assert_eq!(ran_in.as_deref(), Some(SOUTH), "{body}");

    // Asked in east, the move runs in south and is confirmed by west: three regions,
    // none of them both ends of the move.
    let (status, moved) = east
        .client()
        .post_raw(
            "/v1/aggregates/bank-account/tri-1/move-home",
            json!({"region": WEST}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{moved}{}", logs());
    assert_eq!(
        (&moved["from"], &moved["to"]),
        (&json!(SOUTH), &json!(WEST))
    );
    assert_eq!(moved["target_has_all_events"], true, "{moved}");
    for (host, amount) in [(south, 5), (east, 7), (west, 11)] {
        let (status, body, ran_in) = send_command(
            &host.url,
            "tri-1",
            None,
            json!({"type":"Deposit","amount":amount}),
        )
        .await;
        assert_eq!(status, 200, "via {}: {body}{}", host.node_id, logs());
        // West answers its own commands without the header; the others forward there.
        if host.node_id != west.node_id {
            assert_eq!(
                ran_in.as_deref(),
                Some(WEST),
                "via {}: {body}",
                host.node_id
            );
        }
    }

    // Every region ends with the same history: each event once, in version order,
    // with the same ids, written by south before the move and by west after it.
    let expected: Vec<(i64, &str, &str)> = vec![
        (1, "Opened", SOUTH),
        (2, "Deposited", SOUTH),
        (3, "$meridian.HomeMoved", SOUTH),
        (4, "Deposited", WEST),
        (5, "Deposited", WEST),
        (6, "Deposited", WEST),
    ];
    let mut histories = Vec::new();
    for host in hosts {
        let seen = eventually(|| async {
            let seen = history(host, "tri-1").await;
            (seen.len() >= expected.len()).then_some(seen)
        })
        .await;
        let shape: Vec<(i64, &str, &str)> = seen
            .iter()
            .map(|(v, t, o, _)| (*v, t.as_str(), o.as_str()))
            .collect();
        assert_eq!(shape, expected, "history in {}{}", host.node_id, logs());
        histories.push(seen);
    }
    assert_eq!(histories[0], histories[1], "east and west differ");
    assert_eq!(histories[0], histories[2], "east and south differ");
    for host in hosts {
        let (_, state) = host.client().get("/v1/aggregates/bank-account/tri-1").await;
        assert_eq!(
            state["state"]["balance"], 53,
            "in {}: {state}",
            host.node_id
        );
        let (_, home) = host
            .client()
            .get("/v1/aggregates/bank-account/tri-1/home")
            .await;
        assert_eq!(home["home_region"], WEST, "in {}: {home}", host.node_id);
    }
}

/// Publishes a relayed event (`event_type`, `payload`) into `region`'s events stream,
/// as that region's relay would: the test decides which stream brings which version
/// first.
async fn publish_as(
    nats: &NatsServer,
    region: &str,
    id: &str,
    version: i64,
    event_type: &str,
    payload: Value,
) {
    let js = nats.jetstream().await;
    let event_id = uuid::Uuid::now_v7().to_string();
    let body = json!({
        "region": region,
        "position": 1_000_000 + version,
        "event_id": event_id,
        "aggregate_type": "bank-account",
        "aggregate_id": id,
        "version": version,
        "type": event_type,
        "payload": payload,
        "metadata": {"origin_region": region},
        "recorded_at": chrono::Utc::now(),
    });
    // The region's relay resumes after the position its stream's last message names
    // and chains every publish to that message: the injected one names where the relay
    // already is, as a message of its own would, so the relay carries on after it.
    let stream = format!("meridian-events-{region}");
    let mut info = js.get_stream(&stream).await.expect("the events stream");
    let last = info.info().await.expect("stream info").state.last_sequence;
    let resume_at = if last == 0 {
        "0".to_string()
    } else {
        let message = info.get_raw_message(last).await.expect("the last message");
        message
            .headers
            .get("Meridian-Position")
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| "0".into())
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id.as_str());
    headers.insert("Meridian-Position", resume_at.as_str());
    js.publish_with_headers(
        format!("meridian.events.{region}.bank-account.{id}"),
        headers,
        body.to_string().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stream ack");
}

/// After a move, an aggregate's events reach a third region through two streams, and
/// the new home's can come first. The third region must still store (and so show in
/// its feed) versions in order: here west's version 3 arrives before east's version 2,
/// the move to west.
#[tokio::test(flavor = "multi_thread")]
async fn a_third_region_stores_an_aggregates_events_in_version_order_whichever_stream_is_first() {
    let r = ThreeRegions::start("gap").await;
    r.upload_in(&r.east).await;
    // Version 1 is real: committed in east (its home) and relayed everywhere.
    let (status, body, _) = send_command(
        &r.east.url,
        "gap-1",
        None,
        json!({"type":"Open","owner":"ann"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(|| async { (history(&r.south, "gap-1").await.len() == 1).then_some(()) }).await;

    publish_as(
        &r.nats[1],
        WEST,
        "gap-1",
        3,
        "Deposited",
        json!({"amount": 30}),
    )
    .await;
    eventually(|| async {
        (region_metric(&r.south, "meridian_relay_gap_waits_total", WEST).await > 0.0).then_some(())
    })
    .await;
    assert_eq!(
        history(&r.south, "gap-1").await.len(),
        1,
        "version 3 was stored without version 2{}",
        r.logs()
    );
    publish_as(
        &r.nats[0],
        EAST,
        "gap-1",
        2,
        "$meridian.HomeMoved",
        json!({"from": EAST, "to": WEST, "forced": false}),
    )
    .await;

    let seen = eventually(|| async {
        let seen = history(&r.south, "gap-1").await;
        (seen.len() == 3).then_some(seen)
    })
    .await;
    let order: Vec<(i64, &str)> = seen.iter().map(|(v, _, o, _)| (*v, o.as_str())).collect();
    assert_eq!(
        order,
        [(1, EAST), (2, EAST), (3, WEST)],
        "south's feed order"
    );
    let (_, state) = r
        .south
        .client()
        .get("/v1/aggregates/bank-account/gap-1")
        .await;
    assert_eq!(state["state"]["balance"], 30, "{state}");
    // South's relays carry on after the held event (and east took west's version 3,
    // which contradicts its own history, as divergent rather than holding it).
    let (_, more, _) = send_command(
        &r.east.url,
        "gap-2",
        None,
        json!({"type":"Open","owner":"bob"}),
    )
    .await;
    assert_eq!(more["version"], 1, "{more}");
    eventually(|| async { (history(&r.south, "gap-2").await.len() == 1).then_some(()) }).await;
}

/// Pauses (`until` = Some) or resumes `region`'s relay consumer of `peer`'s events:
/// the link stays up, but nothing from `peer` is stored there meanwhile.
async fn pause_relay(nats: &NatsServer, peer: &str, until: Option<chrono::DateTime<chrono::Utc>>) {
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to NATS");
    let subject = format!("$JS.API.CONSUMER.PAUSE.meridian-from-{peer}.meridian-inbound");
    let body = match until {
        Some(until) => json!({ "pause_until": until }),
        None => json!({}),
    };
    eventually(|| {
        let (client, subject, body) = (client.clone(), subject.clone(), body.to_string());
        async move {
            let answer = client.request(subject, body.into()).await.ok()?;
            let answer: Value = serde_json::from_slice(&answer.payload).ok()?;
            answer.get("error").is_none().then_some(())
        }
    })
    .await;
}

/// A move names its target in the directory before the target has the aggregate's
/// events. A command reaching the target then must wait for them, not run on an empty
/// history (which would give the aggregate a second version 1).
#[tokio::test(flavor = "multi_thread")]
async fn a_target_without_the_aggregates_events_waits_for_them_instead_of_starting_over() {
    let r = ThreeRegions::start("nohist").await;
    r.upload_in(&r.east).await;
    // West receives nothing from east from here on.
    pause_relay(
        &r.nats[1],
        EAST,
        Some(chrono::Utc::now() + chrono::Duration::minutes(5)),
    )
    .await;
    let (status, body, _) = send_command(
        &r.east.url,
        "nh-1",
        None,
        json!({"type":"Open","owner":"cy"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, moved) = r
        .east
        .client()
        .post_raw(
            "/v1/aggregates/bank-account/nh-1/move-home",
            json!({"region": WEST}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{moved}{}", r.logs());
    assert_eq!(moved["target_has_all_events"], false, "{moved}");

    // West is the home now but has no event of nh-1: an Open would succeed on an
    // empty history. It is refused as retryable, and nothing is written.
    let (status, body, _) = send_command(
        &r.west.url,
        "nh-1",
        None,
        json!({"type":"Open","owner":"eve"}),
    )
    .await;
    assert_eq!(status, 503, "{body}{}", r.logs());
    assert_eq!(body["error"]["code"], "home_moving", "{body}");
    assert!(history(&r.west, "nh-1").await.is_empty());

    pause_relay(&r.nats[1], EAST, None).await;
    let (status, body, _) = eventually(|| async {
        let answer = send_command(
            &r.west.url,
            "nh-1",
            None,
            json!({"type":"Deposit","amount":9}),
        )
        .await;
        (answer.0 != 503).then_some(answer)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3, "{body}");
    // The feed shows an event once every older transaction has ended, which under load
    // can be a moment after the command's answer.
    let seen = eventually(|| async {
        let seen = history(&r.west, "nh-1").await;
        (seen.len() >= 3).then_some(seen)
    })
    .await;
    let order: Vec<(i64, &str)> = seen.iter().map(|(v, t, _, _)| (*v, t.as_str())).collect();
    assert_eq!(
        order,
        [(1, "Opened"), (2, "$meridian.HomeMoved"), (3, "Deposited")]
    );
}

/// Two relays of one region store concurrently, one per stream. A relay transaction
/// that took its id first and then waited for an aggregate's stream row, while the
/// other stored version n, must not store n + 1 with its older id: the region's order
/// walks transaction ids, so every feed there would show n + 1 before n. It answers
/// the event as early instead, and a new transaction stores it after its predecessor.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_transaction_older_than_the_predecessors_holds_the_event() {
    use meridian::store::regions::{RelayedEvent, store_remote};
    use sqlx::Connection;
    let db = TestDb::new("txorder").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    let event = |id: &str, version: i64, region: &str| RelayedEvent {
        region: region.into(),
        position: version,
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "bank-account".into(),
        aggregate_id: id.into(),
        version,
        event_type: "Deposited".into(),
        payload: serde_json::value::RawValue::from_string(r#"{"amount":1}"#.into()).unwrap(),
        metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        recorded_at: chrono::Utc::now(),
    };
    // Version 2 moves the account to west, whose stream brings version 3.
    let moved = RelayedEvent {
        event_type: "$meridian.HomeMoved".into(),
        payload: serde_json::value::RawValue::from_string(
            json!({"from": EAST, "to": WEST, "forced": false}).to_string(),
        )
        .unwrap(),
        ..event("m-1", 2, EAST)
    };
    let (v1, v2, v3) = (event("m-1", 1, EAST), moved, event("m-1", 3, WEST));
    let stored = store_remote(&pool, SOUTH, std::slice::from_ref(&v1))
        .await
        .expect("version 1");
    assert_eq!(stored.stored, 1);

    // West's relay: its transaction takes an id by storing another aggregate's event.
    let mut west = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut west).await.unwrap();
    store_remote(&mut west, SOUTH, &[event("other-1", 1, WEST)])
        .await
        .expect("west's first event");
    // East's relay, younger, stores version 2 and holds the stream row until it commits.
    let mut east = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut east).await.unwrap();
    store_remote(&mut east, SOUTH, std::slice::from_ref(&v2))
        .await
        .expect("version 2");
    // West offers version 3: it waits for the row, then finds version 2 there.
    let v3_again = v3.clone();
    let waiting = tokio::spawn(async move {
        let outcome = store_remote(&mut west, SOUTH, std::slice::from_ref(&v3)).await;
        sqlx::query("COMMIT").execute(&mut west).await.unwrap();
        outcome
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::query("COMMIT").execute(&mut east).await.unwrap();
    let outcome = waiting.await.unwrap().expect("version 3 offered");
    let order = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT version FROM events WHERE aggregate_id = 'm-1' ORDER BY tx_id, position",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let versions = order().await;
    assert!(
        versions.is_sorted(),
        "south's order shows m-1's versions as {versions:?}"
    );
    assert_eq!(
        (outcome.stored, outcome.early),
        (0, Some(0)),
        "version 3 was not held"
    );
    // Offered again, as the relay does, it is stored after its predecessor.
    let again = store_remote(&pool, SOUTH, &[v3_again])
        .await
        .expect("version 3 again");
    assert_eq!(again.stored, 1);
    assert_eq!(order().await, [1, 2, 3]);
}

/// A forced move for a lost region: the new home writes on top of versions it received
/// from the lost region's stream. A third region that had not received them yet holds
/// the new home's first event for them; with the lost region gone, its stream never
/// brings them, and every later event of the new home's stream queues behind. It asks
/// the new home for the versions instead, and stores them as they were committed.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_forced_move_a_third_region_gets_the_lost_regions_events_from_the_new_home() {
    let mut r = ThreeRegions::start("forcethird").await;
    r.upload_in(&r.east).await;
    // East's copy of south's stream is read no further: east is the region that had
    // not received south's last events when south was lost.
    pause_relay(
        &r.nats[0],
        SOUTH,
        Some(chrono::Utc::now() + chrono::Duration::minutes(10)),
    )
    .await;
    for command in [
        json!({"type":"Open","owner":"fay"}),
        json!({"type":"Deposit","amount":5}),
    ] {
        let (status, body, _) = send_command(&r.south.url, "ft-1", None, command).await;
        assert_eq!(status, 200, "{body}");
    }
    eventually(|| async { (history(&r.west, "ft-1").await.len() == 2).then_some(()) }).await;

    // South is lost; west takes ft-1 over and goes on writing.
    r.south.kill9();
    r.nats[2].stop();
    let (status, moved) = r
        .west
        .client()
        .post_raw(
            "/v1/aggregates/bank-account/ft-1/move-home",
            json!({"region": WEST, "force": true})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{moved}{}", r.logs());
    let (status, body, _) = send_command(
        &r.west.url,
        "ft-1",
        None,
        json!({"type":"Withdraw","amount":2}),
    )
    .await;
    assert_eq!((status, body["version"].as_i64()), (200, Some(4)), "{body}");
    // Another aggregate, behind ft-1's events in west's stream.
    let (status, body, _) = send_command(
        &r.west.url,
        "ft-2",
        None,
        json!({"type":"Open","owner":"gil"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while history(&r.east, "ft-2").await.len() != 1 || history(&r.east, "ft-1").await.len() != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "east never stored west's events: ft-1 {:?}, ft-2 {:?}{}",
            history(&r.east, "ft-1").await,
            history(&r.east, "ft-2").await,
            r.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let in_east = history(&r.east, "ft-1").await;
    let order: Vec<(i64, &str, &str)> = in_east
        .iter()
        .map(|(v, t, o, _)| (*v, t.as_str(), o.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            (1, "Opened", SOUTH),
            (2, "Deposited", SOUTH),
            (3, "$meridian.HomeMoved", WEST),
            (4, "Withdrawn", WEST)
        ]
    );
    assert_eq!(
        in_east,
        history(&r.west, "ft-1").await,
        "the same events, ids and all"
    );
    assert_eq!(
        region_metric(&r.east, "meridian_relay_fetched_total", WEST).await,
        2.0
    );
}

/// Two transactions storing the same event at once (the gap fetch and the stream task,
/// or two relay leaders overlapping for a moment) both find it absent; the one that
/// waited for the aggregate's stream row then finds it stored by the other. That is a
/// duplicate: counted as divergent, it told operators that histories differ.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_stored_twice_at_once_is_a_duplicate_not_a_divergence() {
    use meridian::store::regions::{RelayedEvent, store_remote};
    use sqlx::Connection;
    let db = TestDb::new("dupstore").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    let event = |version: i64| RelayedEvent {
        region: EAST.into(),
        position: version,
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "bank-account".into(),
        aggregate_id: "d-1".into(),
        version,
        event_type: "Deposited".into(),
        payload: serde_json::value::RawValue::from_string(r#"{"amount":1}"#.into()).unwrap(),
        metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        recorded_at: chrono::Utc::now(),
    };
    let v2 = event(2);
    assert_eq!(
        store_remote(&pool, SOUTH, &[event(1)])
            .await
            .unwrap()
            .stored,
        1
    );
    // Both stores get past their look for the event while a third session holds the
    // aggregate's stream row; then it lets go.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM streams WHERE aggregate_id = 'd-1' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let stores: Vec<_> = (0..2)
        .map(|_| {
            let (url, v2) = (db.url.clone(), v2.clone());
            tokio::spawn(async move {
                let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                store_remote(&mut conn, SOUTH, &[v2]).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let mut outcomes = Vec::new();
    for store in stores {
        let o = store.await.unwrap();
        outcomes.push((o.stored, o.duplicates, o.divergent));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        [(0, 1, 0), (1, 0, 0)],
        "stored, duplicates, divergent"
    );
}

/// A relayed event as a region's relay publishes it, for the store-level tests below.
fn relayed(
    region: &str,
    id: &str,
    version: i64,
    event_type: &str,
    payload: Value,
    metadata: Value,
) -> meridian::store::regions::RelayedEvent {
    let raw = |v: Value| serde_json::value::RawValue::from_string(v.to_string()).unwrap();
    meridian::store::regions::RelayedEvent {
        region: region.into(),
        position: version,
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "bank-account".into(),
        aggregate_id: id.into(),
        version,
        event_type: event_type.into(),
        payload: raw(payload),
        metadata: raw(metadata),
        recorded_at: chrono::Utc::now(),
    }
}

/// `(version, origin region)` of each stored event of `id`, in version order, and the
/// home the stream row names.
async fn stored(pool: &sqlx::PgPool, id: &str) -> (Vec<(i64, String)>, Option<String>) {
    let events = sqlx::query_as(
        "SELECT version, coalesce(metadata->>'origin_region', '') FROM events \
         WHERE aggregate_id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    let home = sqlx::query_scalar("SELECT home_region FROM streams WHERE aggregate_id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap();
    (events, home)
}

/// South, cut off from the other regions but still serving, goes on writing after west
/// took its aggregate over (a forced move). When south is back, east — which had
/// received west's move but none of south's late events — must keep west's history:
/// it stored south's late events after the move as if they were next, and gave the
/// aggregate's home back to south with them.
#[tokio::test(flavor = "multi_thread")]
async fn a_third_region_refuses_the_late_events_of_a_home_forced_away() {
    use meridian::store::regions::store_remote;
    let db = TestDb::new("latehome").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    let from = |region: &str| json!({ "origin_region": region });
    let deposit = |region: &str, version: i64| {
        relayed(
            region,
            "lh-1",
            version,
            "Deposited",
            json!({"amount": 1}),
            from(region),
        )
    };
    let before = store_remote(&pool, EAST, &[deposit(SOUTH, 1), deposit(SOUTH, 2)])
        .await
        .unwrap();
    assert_eq!(before.stored, 2);
    let forced = relayed(
        WEST,
        "lh-1",
        3,
        "$meridian.HomeMoved",
        json!({"from": SOUTH, "to": WEST, "forced": true}),
        from(WEST),
    );
    assert_eq!(
        store_remote(&pool, EAST, &[forced]).await.unwrap().stored,
        1
    );

    // South's versions 3 to 5, committed while it was cut off, then a move of its own.
    let unforced = relayed(
        SOUTH,
        "lh-1",
        6,
        "$meridian.HomeMoved",
        json!({"from": SOUTH, "to": EAST, "forced": false}),
        from(SOUTH),
    );
    // They come in two batches: the second builds on events the first had refused, and
    // is refused too rather than held for them (which would hold south's whole stream).
    let late = [
        deposit(SOUTH, 3),
        deposit(SOUTH, 4),
        deposit(SOUTH, 5),
        unforced,
    ];
    for batch in late.chunks(2) {
        let outcome = store_remote(&pool, EAST, batch).await.unwrap();
        assert_eq!(
            (outcome.stored, outcome.divergent, outcome.early),
            (0, 2, None),
            "{outcome:?}"
        );
    }
    // Kept for an operator to read.
    let kept: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM divergent_events WHERE aggregate_id = 'lh-1' ORDER BY version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(kept, [3, 4, 5, 6]);
    // West's next event follows its move.
    let next = store_remote(&pool, EAST, &[deposit(WEST, 4)])
        .await
        .unwrap();
    assert_eq!(next.stored, 1, "{next:?}");
    let (events, home) = stored(&pool, "lh-1").await;
    let origins: Vec<(i64, &str)> = events.iter().map(|(v, o)| (*v, o.as_str())).collect();
    assert_eq!(origins, [(1, SOUTH), (2, SOUTH), (3, WEST), (4, WEST)]);
    assert_eq!(home.as_deref(), Some(WEST));
}

/// The same late events of a lost home, seen from the new home. South's own move after
/// them (to east, unforced) was stored in west at its free version and gave west's
/// account to east, which had refused that move and still named west: commands were
/// sent back and forth, and west's stream had a hole below the move that other
/// regions' copies waited on for good.
#[tokio::test(flavor = "multi_thread")]
async fn the_new_home_refuses_the_move_a_home_forced_away_made_after() {
    use meridian::store::regions::{move_home, store_remote};
    let db = TestDb::new("latemove").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    let from = |region: &str| json!({ "origin_region": region });
    let deposit = |version: i64| {
        relayed(
            SOUTH,
            "lm-1",
            version,
            "Deposited",
            json!({"amount": 1}),
            from(SOUTH),
        )
    };
    let before = store_remote(&pool, WEST, &[deposit(1), deposit(2)])
        .await
        .unwrap();
    assert_eq!(before.stored, 2);
    // South is lost: west takes the account over.
    let key = meridian::store::AggregateKey {
        aggregate_type: "bank-account".into(),
        aggregate_id: "lm-1".into(),
    };
    let (version, old_home) = move_home(&pool, &key, WEST, WEST, true, &from(WEST))
        .await
        .unwrap();
    assert_eq!((version, old_home.as_str()), (3, SOUTH));

    // South's versions 3 to 5, committed while it was cut off, and then its own move.
    let unforced = relayed(
        SOUTH,
        "lm-1",
        6,
        "$meridian.HomeMoved",
        json!({"from": SOUTH, "to": EAST, "forced": false}),
        from(SOUTH),
    );
    let late = [deposit(3), deposit(4), deposit(5), unforced];
    let outcome = store_remote(&pool, WEST, &late).await.unwrap();
    assert_eq!(
        (outcome.stored, outcome.divergent, outcome.early),
        (0, 4, None),
        "{outcome:?}"
    );
    let (events, home) = stored(&pool, "lm-1").await;
    let origins: Vec<(i64, &str)> = events.iter().map(|(v, o)| (*v, o.as_str())).collect();
    assert_eq!(origins, [(1, SOUTH), (2, SOUTH), (3, WEST)]);
    assert_eq!(home.as_deref(), Some(WEST));
}

/// A client reused one command id for two aggregates in two regions. The relayed
/// event of the other region's aggregate must not change what a retry of this
/// region's command answers: its versions were widened to the other aggregate's, and
/// the retry answered with events the command never decided.
#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_command_id_of_another_aggregate_leaves_a_retry_s_answer_alone() {
    use meridian::store::append::append_batch;
    use meridian::store::regions::store_remote;
    use meridian::store::{AppendOutcome, AppendRequest, CommitterConfig, NewEvent};
    let db = TestDb::new("cmdreuse").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    let config = CommitterConfig {
        region: EAST.into(),
        ..CommitterConfig::default()
    };
    let command_id = uuid::Uuid::now_v7();
    // Each try of the command decides anew: a new event id.
    let request = || AppendRequest {
        aggregate_type: "bank-account".into(),
        aggregate_id: "here-1".into(),
        expected_version: 0,
        events: vec![NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "Opened".into(),
            payload: serde_json::value::RawValue::from_string(r#"{"owner":"o"}"#.into()).unwrap(),
            metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        }],
        command_id: Some(command_id),
        fence: None,
    };
    let first = append_batch(&pool, &config, &[&request()]).await.unwrap();
    assert!(
        matches!(
            first[0],
            Ok(AppendOutcome::Appended {
                first_version: 1,
                last_version: 1
            })
        ),
        "{first:?}"
    );
    // West's aggregate, whose third event was decided under the same command id.
    let theirs: Vec<_> = (1..=3)
        .map(|version| {
            let metadata = if version == 3 {
                json!({"origin_region": WEST, "command_id": command_id})
            } else {
                json!({"origin_region": WEST})
            };
            relayed(
                WEST,
                "there-1",
                version,
                "Deposited",
                json!({"amount": 1}),
                metadata,
            )
        })
        .collect();
    assert_eq!(store_remote(&pool, EAST, &theirs).await.unwrap().stored, 3);
    // The retry is the first command again.
    let again = append_batch(&pool, &config, &[&request()]).await.unwrap();
    assert!(
        matches!(
            again[0],
            Ok(AppendOutcome::Duplicate {
                first_version: 1,
                last_version: 1
            })
        ),
        "{again:?}"
    );
}

/// An append in flight when a relayed forced move gives the aggregate's home away: the
/// append read the home (its fence) before the move committed, then waited for the
/// stream row the move held. It must not be written: this region is no longer the
/// home, and the new home's history does not have it. It was: the version it expected
/// had not changed (the move's own version was taken here already).
#[tokio::test(flavor = "multi_thread")]
async fn an_append_waiting_on_a_forced_move_away_is_not_written() {
    use meridian::store::append::append_batch;
    use meridian::store::regions::store_remote;
    use sqlx::Connection;
    let db = TestDb::new("movefence").await;
    let pool = db.pool().await;
    meridian::store::migrate(&pool).await.expect("migrate");
    // South is the home and has written versions 1 to 3 of the account.
    let config = meridian::store::CommitterConfig {
        region: SOUTH.into(),
        ..meridian::store::CommitterConfig::default()
    };
    let new_event = |event_type: &str, payload: &str| meridian::store::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.into(),
        payload: serde_json::value::RawValue::from_string(payload.into()).unwrap(),
        metadata: serde_json::value::RawValue::from_string(
            json!({ "origin_region": SOUTH }).to_string(),
        )
        .unwrap(),
    };
    let request = |expected_version: i64| meridian::store::AppendRequest {
        aggregate_type: "bank-account".into(),
        aggregate_id: "mf-1".into(),
        expected_version,
        events: vec![if expected_version == 0 {
            new_event("Opened", r#"{"owner":"o"}"#)
        } else {
            new_event("Deposited", r#"{"amount":1}"#)
        }],
        command_id: Some(uuid::Uuid::now_v7()),
        fence: None,
    };
    for expected in 0..3 {
        let outcome = append_batch(&pool, &config, &[&request(expected)])
            .await
            .unwrap();
        assert!(outcome[0].is_ok(), "{outcome:?}");
    }
    // West, which had versions 1 and 2, took the account over at version 3: here that
    // version is south's own, so the move is divergent, but it gives the home to west.
    let mut relay = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut relay).await.unwrap();
    let forced = relayed(
        WEST,
        "mf-1",
        3,
        "$meridian.HomeMoved",
        json!({"from": SOUTH, "to": WEST, "forced": true}),
        json!({ "origin_region": WEST }),
    );
    let outcome = store_remote(&mut relay, SOUTH, &[forced]).await.unwrap();
    assert_eq!(outcome.divergent, 1, "{outcome:?}");
    // A command's append at version 3 meanwhile: it waits for the row the move holds.
    let appending = {
        let (pool, config, request) = (pool.clone(), config.clone(), request(3));
        tokio::spawn(async move { append_batch(&pool, &config, &[&request]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !appending.is_finished(),
        "the append did not wait for the move"
    );
    sqlx::query("COMMIT").execute(&mut relay).await.unwrap();
    let appended = appending.await.unwrap().unwrap();
    // Refused as not the home (to be sent there), not as a version conflict: the
    // version it expected was right.
    assert!(
        matches!(
            appended[0],
            Err(meridian::store::StoreError::NotHome { .. })
        ),
        "{appended:?}"
    );
    let (events, home) = stored(&pool, "mf-1").await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(home.as_deref(), Some(WEST));
    // A retry is refused by the fence: the account is homed in west now.
    let retried = append_batch(&pool, &config, &[&request(3)]).await.unwrap();
    assert!(
        matches!(retried[0], Err(meridian::store::StoreError::NotHome { .. })),
        "{retried:?}"
    );
}
