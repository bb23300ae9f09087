//! Two regions on one machine: two nats-servers as two JetStream domains linked by a
//! leafnode connection, two databases, two hosts in `east` and one in `west`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{
    Host, HostOptions, TcpProxy, TestDb, events_of, eventually, meridian_bin, region_metric,
    send_command, wasm_bytes, with_custom_section,
};
use super::nats::NatsServer;

const EAST: &str = "east";
const WEST: &str = "west";

struct TwoRegions {
    east_nats: NatsServer,
    west_nats: NatsServer,
    east: Vec<Host>,
    west: Vec<Host>,
    _east_db: TestDb,
    west_db: TestDb,
    /// Between west's host and west's nats-server, when asked for.
    west_proxy: Option<TcpProxy>,
}

fn options(region: &str, peer: &str, nats: &NatsServer) -> HostOptions {
    HostOptions {
        region: Some(region.into()),
        nats_url: Some(nats.url()),
        env: vec![
            ("MERIDIAN_PEER_REGIONS".into(), peer.into()),
            ("MERIDIAN_DIRECTORY_REGION".into(), EAST.into()),
            ("MERIDIAN_PARTITIONS".into(), "16".into()),
        ],
        ..Default::default()
    }
}

impl TwoRegions {
    /// Both regions up, the bank-account plugin uploaded in `east` only.
    async fn start(label: &str) -> Self {
        Self::start_with_tokens(label, None).await
    }

    /// With `tokens` = (east's MERIDIAN_TOKENS, west's), every request needs a token;
    /// both must give [`ADMIN`] the admin scope.
    async fn start_with_tokens(label: &str, tokens: Option<(&str, &str)>) -> Self {
        let env = |t: Option<&str>| {
            t.map(|t| vec![("MERIDIAN_TOKENS".to_string(), t.to_string())])
                .unwrap_or_default()
        };
        Self::start_with_env(
            label,
            env(tokens.map(|t| t.0)),
            env(tokens.map(|t| t.1)),
            tokens.is_some(),
        )
        .await
    }

    /// With more environment for east's hosts and west's; `authed`: send [`ADMIN`].
    async fn start_with_env(
        label: &str,
        east_env: Vec<(String, String)>,
        west_env: Vec<(String, String)>,
        authed: bool,
    ) -> Self {
        Self::start_full(label, east_env, west_env, authed, false).await
    }

    /// West's host reaching its nats-server through [`TwoRegions::west_proxy`].
    async fn start_with_west_proxy(label: &str) -> Self {
        Self::start_full(label, vec![], vec![], false, true).await
    }

    async fn start_full(
        label: &str,
        east_env: Vec<(String, String)>,
        west_env: Vec<(String, String)>,
        authed: bool,
        west_proxied: bool,
    ) -> Self {
        let east_nats = NatsServer::hub(EAST);
        let west_nats = NatsServer::leaf(WEST, &east_nats);
        let west_proxy = match west_proxied {
            true => Some(TcpProxy::start_nats(&west_nats).await),
            false => None,
        };
        let mut west_options = options(WEST, EAST, &west_nats);
        if let Some(proxy) = &west_proxy {
            west_options.nats_url = Some(proxy.url.clone());
        }
        let east_db = TestDb::new(&format!("{label}_e")).await;
        let west_db = TestDb::new(&format!("{label}_w")).await;
        let with_env = |mut o: HostOptions, env: &[(String, String)]| {
            o.env.extend_from_slice(env);
            o
        };
        let east = vec![
            Host::start(
                &east_db,
                with_env(options(EAST, WEST, &east_nats), &east_env),
            )
            .await,
            Host::start(
                &east_db,
                with_env(options(EAST, WEST, &east_nats), &east_env),
            )
            .await,
        ];
        let west = vec![Host::start(&west_db, with_env(west_options, &west_env)).await];
        let regions = Self {
            east_nats,
            west_nats,
            east,
            west,
            _east_db: east_db,
            west_db,
            west_proxy,
        };
        regions.upload("bank-account", authed).await;
        regions
    }

    /// Uploads plugin `name` in east and waits until west has it too.
    async fn upload(&self, name: &str, authed: bool) {
        let (status, body) = admin(&self.east[0], authed)
            .upload(name, wasm_bytes(name))
            .await;
        assert_eq!(status, 201, "upload of {name} in east: {body}");
        // The plugin reaches west through the directory and east's object store.
        let west = admin(&self.west[0], authed);
        eventually(|| {
            let west = west.clone();
            async move {
                let (_, plugins) = west.get("/v1/plugins").await;
                let found = plugins["plugins"]
                    .as_array()?
                    .iter()
                    .any(|p| p["aggregate_type"] == name && p["version"] == 1);
                found.then_some(())
            }
        })
        .await;
    }

    /// Waits up to 20 s for west to hold `n` events of account `id`; fails with every
    /// host's and server's log otherwise.
    async fn wait_until_west_holds(&self, id: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while events_of(&self.west[0], id).await.len() != n {
            assert!(
                Instant::now() < deadline,
                "west never stored {n} events of {id}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, hosts) in [("east", &self.east), ("west", &self.west)] {
            for h in hosts.iter() {
                out.push_str(&format!("\n--- {name} {} ---\n{}", h.node_id, h.log_tail()));
            }
        }
        out.push_str(&format!(
            "\n--- east nats ---\n{}",
            self.east_nats.log_tail()
        ));
        out.push_str(&format!(
            "\n--- west nats ---\n{}",
            self.west_nats.log_tail()
        ));
        out
    }
}

/// A token both regions' token lists give the admin scope in the auth test.
const ADMIN: &str = "admin-token-both-regions";

fn admin(host: &Host, authed: bool) -> super::harness::Api {
    let mut headers = reqwest::header::HeaderMap::new();
    if authed {
        headers.insert(
            "authorization",
            format!("Bearer {ADMIN}").parse().expect("header value"),
        );
    }
    super::harness::Api {
        base: host.url.clone(),
        http: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client"),
    }
}

/// Sends a command and returns (status, body, the region header of the answer).
async fn send(host: &Host, id: &str, command: Value) -> (u16, Value, Option<String>) {
    send_command(&host.url, id, None, command).await
}

fn origin(event: &Value) -> &str {
    event["metadata"]["origin_region"].as_str().unwrap_or("")
}

/// The OpenAPI conformance run of `conformance.rs` against a `west` host: commands
/// forwarded to their home region, moves between real regions, homes, relay status.
#[tokio::test(flavor = "multi_thread")]
async fn every_answer_of_a_two_region_host_matches_the_openapi_document() {
    let regions = TwoRegions::start("conformance").await;
    let west = &regions.west[0];
    // Homed in east, so west forwards what they are sent, and moves have work to do.
    super::conformance::open_accounts(&regions.east[0].url, None).await;
    use super::conformance::{ServerErrors, assert_conforms};
    assert_conforms(&west.url, None, ServerErrors::RetryableOnly, || {
        regions.logs()
    })
    .await;
    let (status, _) = west.client().get("/v1/cluster").await;
    assert_eq!(status, 200);
}

/// The relay's progress is read from the database, the members and partitions from
/// the host's memory. A database outage used to make all of `/v1/cluster` a 503; the
/// host's own view is still given, with why the relay's is missing.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_status_outlives_a_database_outage() {
    let r = TwoRegions::start("status_cut").await;
    let proxy = TcpProxy::start(&r.west_db).await;
    let host = Host::spawn(&proxy.url, options(WEST, EAST, &r.west_nats));
    host.wait_ready(Duration::from_secs(60)).await;
    let api = host.client();
    let (status, body) = api.get("/v1/cluster").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("regions_error").is_none(), "{body}");

    proxy.cut();
    let (status, body) = api.get("/v1/cluster").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["regions_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be read")),
        "{body}"
    );
    assert_eq!(body["members"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["region"], WEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_in_east_is_visible_in_west() {
    let r = TwoRegions::start("vis").await;
    let (status, body, _) = send(&r.east[0], "vis-1", json!({"type":"Open","owner":"alice"})).await;
    assert_eq!(status, 200, "{body}");
    let event_id = body["events"][0]["event_id"].clone();
    let west = &r.west[0];
    let seen = eventually(|| async {
        let events = events_of(west, "vis-1").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["event_id"], event_id);
    assert_eq!(seen[0]["type"], "Opened");
    assert_eq!(origin(&seen[0]), EAST);
    // West records where the aggregate lives, and shows the relay in /v1/cluster.
    let (_, home) = west
        .client()
        .get("/v1/aggregates/bank-account/vis-1/home")
        .await;
    assert_eq!(home["home_region"], EAST, "{home}");
    let (_, cluster) = west.client().get("/v1/cluster").await;
    assert_eq!(cluster["region"], WEST);
    assert_eq!(cluster["regions"][0]["region"], EAST, "{cluster}");
    assert!(
        cluster["regions"][0]["events_received"].as_i64() >= Some(1),
        "{cluster}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_sent_to_west_for_an_east_aggregate_runs_in_east() {
    let r = TwoRegions::start("fwd").await;
    let (status, body, _) = send(&r.east[1], "fwd-1", json!({"type":"Open","owner":"bob"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    // Sent to west before west has seen any of its events: the directory knows.
    let (status, body, region) =
        send(&r.west[0], "fwd-1", json!({"type":"Deposit","amount":30})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(region.as_deref(), Some(EAST));
    let (status, body, _) = send(&r.west[0], "fwd-1", json!({"type":"Withdraw","amount":50})).await;
    assert_eq!(status, 422, "the rejection comes back unchanged: {body}");
    let (status, body, _) = send(&r.west[0], "fwd-1", json!({"type":"Withdraw","amount":10})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    // Every event was written in east, and west receives them all.
    // (The global feed shows an event once no older transaction on the server is open.)
    let east = &r.east[0];
    let east_events =
        eventually(|| async { Some(events_of(east, "fwd-1").await).filter(|e| e.len() == 3) })
            .await;
    assert!(east_events.iter().all(|e| origin(e) == EAST));
    let west = &r.west[0];
    eventually(|| async { (events_of(west, "fwd-1").await.len() == 3).then_some(()) }).await;
    // A deposit through west, with these request headers.
    let deposit_with = async |headers: &[(&str, &str)]| {
        let mut request = reqwest::Client::new()
            .post(format!(
                "{}/v1/aggregates/bank-account/fwd-1",
                r.west[0].url
            ))
            .json(&json!({"command": {"type":"Deposit","amount":1}}));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    };
    // The caller's correlation id crosses the region boundary (NATS headers) into the
    // events written at home.
    let response = deposit_with(&[("x-correlation-id", "trace-across-regions")]).await;
    assert_eq!(response.status().as_u16(), 200);
    let east = &r.east[0];
    let traced = eventually(|| async {
        events_of(east, "fwd-1")
            .await
            .into_iter()
            .find(|e| e["version"] == 4)
    })
    .await;
    assert_eq!(traced["metadata"]["correlation_id"], "trace-across-regions");
    assert_eq!(origin(&traced), EAST);
    let (_, state) = r.east[0]
        .client()
        .get("/v1/aggregates/bank-account/fwd-1")
        .await;
    assert_eq!(state["state"]["balance"], 21, "{state}");

    // A client posing as a region that forwarded the command to west as to its home is
    // not believed: west forwards it to east at once, as any other command, rather
    // than waiting for a move that is not happening.
    let response = deposit_with(&[
        ("x-meridian-home", WEST),
        ("x-meridian-home-version", "9223372036854775807"),
    ])
    .await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-meridian-region"], EAST);

    // A request that already went round the regions three times (views of a moving home
    // that disagree) is not forwarded again: a retryable 503 naming its path, and
    // nothing is written.
    let response = deposit_with(&[
        ("x-meridian-region-hops", "3"),
        ("x-meridian-via", "west,east,west"),
    ])
    .await;
    assert_eq!(response.status().as_u16(), 503);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "too_many_hops", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("west → east → west → west"),
        "the refusal names the path: {message}"
    );
    let (_, state) = r.east[0]
        .client()
        .get("/v1/aggregates/bank-account/fwd-1")
        .await;
    assert_eq!(state["version"], 5, "{state}");
}

#[tokio::test(flavor = "multi_thread")]
async fn both_regions_racing_to_create_one_id_give_it_one_home_and_one_history() {
    let r = TwoRegions::start("race").await;
    for i in 0..8 {
        let id = format!("race-{i}");
        let (a, b) = tokio::join!(
            send(&r.east[0], &id, json!({"type":"Open","owner":"east"})),
            send(&r.west[0], &id, json!({"type":"Open","owner":"west"})),
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        // Exactly one Open wins; the other is judged by the same home and rejected.
        assert_eq!(
            statuses,
            [200, 422],
            "east: {} west: {}{}",
            a.1,
            b.1,
            r.logs()
        );
        let winner = if a.0 == 200 { &a.1 } else { &b.1 };
        let west_events = {
            let west = &r.west[0];
            let id = id.clone();
            eventually(|| {
                let id = id.clone();
                async move {
                    let e = events_of(west, &id).await;
                    (!e.is_empty()).then_some(e)
                }
            })
            .await
        };
        let east_view = eventually(|| {
            let id = id.clone();
            let east = &r.east[0];
            async move {
                let e = events_of(east, &id).await;
                (!e.is_empty()).then_some(e)
            }
        })
        .await;
        assert_eq!(east_view.len(), 1, "{east_view:?}");
        assert_eq!(west_events.len(), 1, "{west_events:?}");
        assert_eq!(east_view[0]["event_id"], west_events[0]["event_id"]);
        assert_eq!(east_view[0]["event_id"], winner["events"][0]["event_id"]);
        let (_, he) = r.east[0]
            .client()
            .get(&format!("/v1/aggregates/bank-account/{id}/home"))
            .await;
        let (_, hw) = r.west[0]
            .client()
            .get(&format!("/v1/aggregates/bank-account/{id}/home"))
            .await;
        assert_eq!(he["home_region"], hw["home_region"], "{he} {hw}");
        assert_eq!(he["home_region"].as_str(), Some(origin(&east_view[0])));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn west_nats_down_for_20s_loses_nothing_and_east_never_fails() {
    let mut r = TwoRegions::start("outage").await;
    let ids: Vec<String> = (0..4).map(|i| format!("out-{i}")).collect();
    for id in &ids {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"o"})).await;
        assert_eq!(status, 200, "{body}");
    }
    r.west_nats.stop();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut round = 0usize;
    let mut last_version: HashMap<String, i64> = HashMap::new();
    while started.elapsed() < Duration::from_secs(22) {
        for (i, id) in ids.iter().enumerate() {
            let host = &r.east[(round + i) % 2];
            let (status, body, _) = send(host, id, json!({"type":"Deposit","amount":1})).await;
            last_version.insert(id.clone(), body["version"].as_i64().unwrap_or(0));
            assert_eq!(
                status, 200,
                "east failed a command while west's NATS was down: {body}"
            );
            sent += 1;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.west_nats.restart();
    let west = &r.west[0];
    let east = &r.east[0];
    for id in &ids {
        // Read east's feed once it shows the last acknowledged version.
        let want = last_version[id] as usize;
        let expected =
            eventually(|| async { Some(events_of(east, id).await).filter(|e| e.len() == want) })
                .await;
        assert!(expected.len() > 1);
        let got = eventually(|| async {
            let got = events_of(west, id).await;
            (got.len() >= expected.len()).then_some(got)
        })
        .await;
        // Exactly once, same ids, same per-aggregate order.
        let expected_ids: Vec<&Value> = expected.iter().map(|e| &e["event_id"]).collect();
        let got_ids: Vec<&Value> = got.iter().map(|e| &e["event_id"]).collect();
        assert_eq!(got_ids, expected_ids, "{id}");
        let versions: Vec<i64> = got.iter().map(|e| e["version"].as_i64().unwrap()).collect();
        assert_eq!(versions, (1..=got.len() as i64).collect::<Vec<_>>());
    }
    assert!(sent > 100, "the load kept going ({sent} commands)");
    // No duplicates anywhere in west's feed either.
    let (_, all) = west.client().get("/v1/events?limit=10000").await;
    let mut seen = HashMap::new();
    for e in all["events"].as_array().unwrap() {
        *seen.entry(e["event_id"].to_string()).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "an event was stored twice in west"
    );

    // East's own NATS down: commands on existing aggregates still commit (publishing is
    // off the command path), and the relay catches up once it is back.
    r.east_nats.stop();
    for id in &ids {
        let (status, body, _) = send(&r.east[1], id, json!({"type":"Deposit","amount":2})).await;
        assert_eq!(
            status, 200,
            "east failed a command while its own NATS was down: {body}"
        );
        last_version.insert(id.clone(), body["version"].as_i64().unwrap_or(0));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.east_nats.restart();
    for id in &ids {
        let want = last_version[id] as usize;
        let expected =
            eventually(|| async { Some(events_of(east, id).await).filter(|e| e.len() == want) })
                .await;
        let got = eventually(|| async {
            let got = events_of(west, id).await;
            (got.len() >= want).then_some(got)
        })
        .await;
        assert_eq!(got.len(), want, "{id}: exactly once");
        assert_eq!(
            got.last().unwrap()["event_id"],
            expected.last().unwrap()["event_id"]
        );
    }
}

/// Makes `db` refuse every event insert for which `condition` (over `NEW`) holds, with
/// the error "refused for the test", until `DROP TRIGGER {name} ON events`: a relay
/// whose store fails, seen from the region storing.
async fn refuse_inserts(db: &sqlx::PgPool, name: &str, condition: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
         CREATE TRIGGER {name} BEFORE INSERT ON events FOR EACH ROW
           WHEN ({condition}) EXECUTE FUNCTION {name}();"
    ))
    .execute(db)
    .await
    .expect("install the refusing trigger");
}

/// West's database refuses a batch of east's events for a while (a failover, a full
/// disk): the relay fails and restarts, and later events arrive meanwhile. Every event
/// of the refused batch must still be stored once the database takes them again —
/// JetStream's acknowledgements are cumulative, so a restarted relay that stored and
/// acknowledged the later events first would have acknowledged the refused ones away.
#[tokio::test(flavor = "multi_thread")]
async fn events_whose_store_failed_are_stored_after_the_relay_restarts() {
    let r = TwoRegions::start("redo").await;
    let west_db = r.west_db.pool().await;
    refuse_inserts(&west_db, "refuse_redo", "NEW.aggregate_id LIKE 'redo-a-%'").await;
    let refused: Vec<String> = (0..5).map(|i| format!("redo-a-{i}")).collect();
    for id in &refused {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"a"})).await;
        assert_eq!(status, 200, "{body}");
    }
    // West's relay took the batch and failed to store it.
    eventually(|| async {
        r.west[0]
            .log_tail()
            .contains("refused for the test")
            .then_some(())
    })
    .await;
    sqlx::raw_sql("DROP TRIGGER refuse_redo ON events")
        .execute(&west_db)
        .await
        .expect("drop the trigger");
    let later: Vec<String> = (0..5).map(|i| format!("redo-b-{i}")).collect();
    for id in &later {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"b"})).await;
        assert_eq!(status, 200, "{body}");
    }
    for id in later.iter().chain(&refused) {
        r.wait_until_west_holds(id, 1).await;
    }
}

/// West's connection to its nats-server drops while the relay's pull is being
/// answered: what the server sent into the dying connection never arrives, yet
/// JetStream counts it delivered, and the client pulls again on reconnecting without
/// telling the relay. Acknowledgements are cumulative, so the relay's next one would
/// cover the lost events and west would never store them.
#[tokio::test(flavor = "multi_thread")]
async fn events_lost_with_the_nats_connection_are_delivered_again() {
    let r = TwoRegions::start_with_west_proxy("lostconn").await;
    let proxy = r.west_proxy.as_ref().expect("proxied");
    // The relay is receiving (its pull is waiting at the server).
    let (status, body, _) = send(&r.east[0], "conn-0", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("conn-0", 1).await;
    // West's connection goes silent; east's events are delivered into it.
    proxy.silence();
    let lost: Vec<String> = (0..10).map(|i| format!("conn-lost-{i}")).collect();
    for id in &lost {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"o"})).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The connection drops; the host connects again, and more events follow.
    proxy.cut();
    proxy.restore();
    let later: Vec<String> = (0..3).map(|i| format!("conn-later-{i}")).collect();
    for id in &later {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"o"})).await;
        assert_eq!(status, 200, "{body}");
    }
    for id in later.iter().chain(&lost) {
        r.wait_until_west_holds(id, 1).await;
    }
}

/// A plugin version the directory lists but whose bytes cannot be had (its region's
/// object store lost them, or that region is gone) must not hold back the versions
/// uploaded after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_version_that_cannot_be_imported_does_not_hold_back_the_next() {
    let r = TwoRegions::start("ghost").await;
    let east_js = r.east_nats.jetstream().await;
    let directory = east_js
        .get_key_value("meridian_plugins")
        .await
        .expect("the plugin directory");
    let ghost = json!({
        "sha256": "0".repeat(64),
        "size_bytes": 10,
        "schema_version": 1,
        "region": EAST,
    });
    directory
        .put("ghost.1", ghost.to_string().into())
        .await
        .expect("list a version whose bytes are nowhere");
    let (status, body) = admin(&r.east[0], false)
        .upload("bank-account", with_custom_section(b"v2"))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, plugins) = r.west[0].client().get("/v1/plugins").await;
        let imported = plugins["plugins"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["aggregate_type"] == "bank-account" && p["version"] == 2)
        });
        if imported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never imported version 2: {plugins}{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An upload in a region that has not imported the newest version yet is numbered
/// after the directory's newest, so the bytes uploaded are what runs. West, whose
/// newest was version 1, answered a second upload of version 1's bytes "unchanged",
/// then imported version 2 and ran that instead.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_in_a_region_behind_the_directory_is_what_runs() {
    use sha2::Digest;
    let r = TwoRegions::start("behind").await;
    let v1 = wasm_bytes("bank-account");
    let v2 = with_custom_section(b"second");
    let sha = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    // Version 2 is listed in the directory before its bytes are anywhere: west cannot
    // import it yet.
    let directory = r
        .east_nats
        .jetstream()
        .await
        .get_key_value("meridian_plugins")
        .await
        .expect("the plugin directory");
    let entry = json!({
        "sha256": sha(&v2),
        "size_bytes": v2.len(),
        "schema_version": 1,
        "region": EAST,
    });
    directory
        .put("bank-account.2", entry.to_string().into())
        .await
        .expect("list version 2");

    // A dry run says the number the upload will get; both check the bytes against
    // the stored histories, as for any version that is not already the newest.
    let (status, body) = admin(&r.west[0], false)
        .put_raw("/v1/plugins/bank-account?dry_run=true", v1.clone())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3, "{body}");
    assert!(body["history_checked"].is_object(), "{body}");
    let (status, body) = admin(&r.west[0], false)
        .upload("bank-account", v1.clone())
        .await;
    assert!(status == 200 || status == 201, "{body}");
    assert_eq!(
        body["version"], 3,
        "numbered after the directory's newest: {body}"
    );
    assert!(body["history_checked"].is_object(), "{body}");
    // Version 2's bytes arrive; west imports it, and still runs what it was sent.
    let objects = r
        .east_nats
        .jetstream()
        .await
        .get_object_store("meridian_plugins")
        .await
        .expect("east's plugin objects");
    objects
        .put(sha(&v2).as_str(), &mut v2.as_slice())
        .await
        .expect("version 2's bytes");
    let west_pool = r.west_db.pool().await;
    eventually(|| async {
        let versions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM plugins WHERE aggregate_type = 'bank-account'",
        )
        .fetch_one(&west_pool)
        .await
        .ok()?;
        (versions == 3).then_some(())
    })
    .await;
    let (_, plugins) = r.west[0].client().get("/v1/plugins").await;
    let running = plugins["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["aggregate_type"] == "bank-account"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (running["version"].as_i64(), running["sha256"].as_str()),
        (Some(3), Some(sha(&v1).as_str())),
        "{plugins}"
    );
}

/// A forward to the home region waits as long as `MERIDIAN_FORWARD_TIMEOUT_MS` says,
/// also past 10 s: the NATS client's own request timeout cut it off at 10 s, as a 503
/// naming the configured timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_forward_waits_its_configured_timeout_past_ten_seconds() {
    let forward = vec![(
        "MERIDIAN_FORWARD_TIMEOUT_MS".to_string(),
        "30000".to_string(),
    )];
    let r = TwoRegions::start_with_env("fwdwait", vec![], forward, false).await;
    // Limits stored before the upload: every host loads the plugin with them.
    assert_eq!(
        r.east[0]
            .client()
            .put_limits("spin-loop", json!({"deadline_ms": 12000}))
            .await,
        200
    );
    r.upload("spin-loop", false).await;
    // Homed in east (its directory entry made by hand: a first command through east
    // would spin for as long), so west forwards it; it spins there until its 12 s
    // deadline, then east answers.
    let js = r.east_nats.jetstream().await;
    let homes = match js.get_key_value("meridian_homes").await {
        Ok(homes) => homes,
        Err(_) => js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "meridian_homes".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .expect("the homes directory"),
    };
    // The key is `<type>.<unpadded base64url of the id>`.
    homes
        .put("spin-loop.c2xvdy0x", EAST.into())
        .await
        .expect("home slow-1 in east");
    let started = Instant::now();
    let (status, body) = r.west[0]
        .client()
        .command("spin-loop", "slow-1", json!({"command": {"type": "Go"}}))
        .await;
    assert_ne!(
        body["error"]["code"],
        "home_region_timeout",
        "after {:?}: {body}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(12),
        "east answered before the plugin's deadline: {body}"
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("plugin_deadline_exceeded")),
        "east's answer, passed on: {body}"
    );
}

/// A command for a type no plugin is uploaded for is a 404 in every region, and leaves
/// nothing behind: no home is claimed in the directory for an aggregate that cannot
/// exist.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_for_an_unknown_type_claims_no_home() {
    let r = TwoRegions::start("nohome").await;
    // One real aggregate, so the directory holds a home to see.
    let (status, body, _) = send(&r.west[0], "real-1", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    for host in [&r.east[0], &r.west[0]] {
        let (status, body) = host
            .client()
            .command(
                "no-such-type",
                "x-1",
                json!({"command": {"type": "Open", "owner": "o"}}),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("unknown_aggregate_type")),
            "{body}"
        );
    }
    let east_js = r.east_nats.jetstream().await;
    let homes = east_js
        .get_key_value("meridian_homes")
        .await
        .expect("the homes directory");
    use futures::StreamExt;
    let keys: Vec<String> = homes
        .keys()
        .await
        .expect("list homes")
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    assert!(
        keys.iter().any(|k| k.starts_with("bank-account.")),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.starts_with("no-such-type.")),
        "a home was claimed: {keys:?}"
    );
}

/// A command for an aggregate homed elsewhere travels there as one NATS message. One
/// within this host's command limit but too large for a message is a 413 that says
/// where to send it, not a 503 inviting retries that can never succeed.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_too_large_to_forward_is_a_413_naming_the_home() {
    let r = TwoRegions::start("fwdsize").await;
    let (status, body, _) = send(&r.east[0], "fs-1", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("fs-1", 1).await;
    // 1 MiB is both the command limit and NATS's default message size: the body fits
    // the one, and with the forward's fields and headers no longer the other.
    let note = "n".repeat(1_048_450);
    let raw = format!(r#"{{"command":{{"type":"Deposit","amount":1,"note":"{note}"}}}}"#);
    assert!(raw.len() <= 1_048_576);
    let (status, error) = r.west[0]
        .client()
        .post_raw("/v1/aggregates/bank-account/fs-1", raw.into_bytes())
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (413, Some("too_large_to_forward")),
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("region east")),
        "{error}"
    );
    assert_eq!(events_of(&r.east[0], "fs-1").await.len(), 1);
}

/// The home region runs a forwarded command whatever the size of its answer; an answer
/// too large for one NATS message to bring back is a 502 that says the command ran and
/// how to get its result, not a timeout that invites a retry elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_too_large_to_come_back_is_a_502_and_the_command_ran() {
    let r = TwoRegions::start("answer").await;
    r.upload("bad-output", false).await;
    let (east, west) = (admin(&r.east[0], false), admin(&r.west[0], false));
    let (status, body) = east
        .command(
            "bad-output",
            "ans",
            json!({"command": {"type": "Write", "text": "home here"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // 1,000 events of 1 KB: within the plugin's caps, and with each event's id,
    // version and type the answer is over NATS's 1 MiB.
    let command_id = uuid::Uuid::now_v7();
    let request = json!({
        "command": {"type": "Repeat", "text": "t".repeat(1_000), "count": 1_000},
        "command_id": command_id,
    });
    let (status, body) = west.command("bad-output", "ans", request.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("answer_too_large")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("same command_id")),
        "{body}"
    );
    // It ran once, and east gives its answer for the same command id.
    let (status, body) = east.command("bad-output", "ans", request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["duplicate"].as_bool(), body["version"].as_i64()),
        (Some(true), Some(1_001)),
        "{}",
        &body.to_string()[..300.min(body.to_string().len())]
    );
}

/// An event travels to the other regions as one NATS message (1 MiB by default). One
/// that cannot must be refused when decided: stored, the relay could never publish it
/// and no later event of the region would reach the others.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_to_relay_is_refused_and_the_relay_keeps_going() {
    let r = TwoRegions::start("big").await;
    // Within the command and plugin-output caps (1 MiB each), over a message with the
    // relay's envelope.
    let owner = "x".repeat(1_048_200);
    let (status, body, _) =
        send(&r.east[0], "big-1", json!({"type": "Open", "owner": owner})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("event_too_large")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_payload")),
        "{body}"
    );
    // Small as the plugin writes it (24 KB of 1e300), over the limit as the relay
    // would read it back from PostgreSQL, which prints every digit (1.04 MB).
    r.upload("bad-output", false).await;
    let api = admin(&r.east[0], false);
    let (status, body) = api
        .command(
            "bad-output",
            "big-3",
            json!({"command": {"type": "Huge", "count": 3440}}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("event_too_large")),
        "{}",
        &body.to_string()[..300.min(body.to_string().len())]
    );
    let (status, body, _) = send(&r.east[0], "big-2", json!({"type": "Open", "owner": "o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("big-2", 1).await;
    assert!(events_of(&r.east[0], "big-1").await.is_empty());
    let (status, _) = api.get("/v1/aggregates/bad-output/big-3").await;
    assert_eq!(status, 404, "the refused event was written");
}

/// A message some other client publishes on the events stream's subjects is stepped
/// over: the relay goes on publishing after it, with nothing sent twice. It used to
/// restart from the first event (the foreign message has no position), send again what
/// the stream held, and stop at the first event still in the duplicate window.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_message_on_the_events_stream_neither_stops_nor_repeats_the_relay() {
    let r = TwoRegions::start("foreign").await;
    let (status, body, _) = send(
        &r.east[0],
        "foreign-1",
        json!({"type": "Open", "owner": "o"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("foreign-1", 1).await;

    let js = r.east_nats.jetstream().await;
    js.publish(
        "meridian.events.east.bank-account.junk",
        "not an event".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored in the events stream");
    // The next publish finds the stream no longer ends with the event before it, and
    // the relay starts again from where the stream ends: the foreign message.
    for amount in 1..=3 {
        let (status, body, _) = send(
            &r.east[0],
            "foreign-1",
            json!({"type": "Deposit", "amount": amount}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    r.wait_until_west_holds("foreign-1", 4).await;

    let mut stream = js.get_stream("meridian-events-east").await.expect("stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        5,
        "four events and the foreign message, once each{}",
        r.logs()
    );
}

/// A copy of one of the relay's old messages, published again with its headers (as
/// replay tooling does) after JetStream's duplicate window, made the relay's restart
/// take it for its checkpoint: the cursor went back to the old event and every event
/// since was published again. A message counts as the checkpoint only if it carries
/// the event at the position it names.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_an_old_message_does_not_send_the_relay_back() {
    let r = TwoRegions::start("copy").await;
    let (status, body, _) = send(&r.east[0], "copy-1", json!({"type": "Open", "owner": "o"})).await;
    assert_eq!(status, 200, "{body}");
    for amount in 1..=2 {
        let (status, body, _) = send(
            &r.east[0],
            "copy-1",
            json!({"type": "Deposit", "amount": amount}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    r.wait_until_west_holds("copy-1", 3).await;
    let js = r.east_nats.jetstream().await;
    let stream = js.get_stream("meridian-events-east").await.expect("stream");
    // A short duplicate window, so the copy is not dropped as a duplicate.
    let mut config = stream.cached_info().config.clone();
    config.duplicate_window = Duration::from_millis(500);
    js.update_stream(config)
        .await
        .expect("shorten the duplicate window");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = stream.get_raw_message(1).await.expect("the first message");
    let mut headers = async_nats::HeaderMap::new();
    for name in ["Meridian-Region", "Meridian-Position"] {
        let value = first
            .headers
            .get(name)
            .expect("relay header")
            .as_str()
            .to_string();
        headers.insert(name, value.as_str());
    }
    headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
    js.publish_with_headers(first.subject.to_string(), headers, first.payload.clone())
        .await
        .expect("publish")
        .await
        .expect("stored in the events stream");
    // The next publish finds the copy at the stream's end and the relay starts again.
    let (status, body, _) = send(
        &r.east[0],
        "copy-1",
        json!({"type": "Deposit", "amount": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("copy-1", 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stream = js.get_stream("meridian-events-east").await.expect("stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        5,
        "four events once each, and the copy{}",
        r.logs()
    );
}

/// After the peer region's NATS restarts, nats-server leaves the source of the local
/// copy silent for 10–30 s; the relay restarts it. And if the source is gone from the
/// stream's configuration (a restart cut off half-way), the relay puts it back. Either
/// way the local copy (`meridian-from-east`, part of the NATS interface) holds every
/// one of east's events exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_restarts_a_stalled_source_and_the_local_copy_has_every_event_once() {
    let mut r = TwoRegions::start("stall").await;
    let west = &r.west[0];
    let mut want = 0;
    let deposit_all = async |r: &TwoRegions, want: &mut usize| {
        for id in ["stall-1", "stall-2"] {
            let command = if *want == 0 {
                json!({"type":"Open","owner":"o"})
            } else {
                json!({"type":"Deposit","amount":1})
            };
            let (status, body, _) = send(&r.east[0], id, command).await;
            assert_eq!(status, 200, "{body}");
        }
        *want += 1;
    };
    let arrived = async |want: usize| {
        eventually(|| async {
            let a = events_of(west, "stall-1").await.len();
            let b = events_of(west, "stall-2").await.len();
            (a == want && b == want).then_some(())
        })
        .await
    };
    deposit_all(&r, &mut want).await;
    arrived(want).await;

    // West says how long it has not heard from east, idle or not: the gauge to alert on.
    let silent = || region_metric(west, "meridian_relay_source_silent_seconds", EAST);
    eventually(|| async {
        let s = silent().await;
        (s > 0.0 && s < 2.0).then_some(())
    })
    .await;
    r.east_nats.stop();
    eventually(|| async { (silent().await >= 2.0).then_some(()) }).await;

    // East's NATS back: west's source stays silent until nats-server's own check finds
    // it silent for more than 10 s; the relay restarts it after 3 s.
    r.east_nats.restart();
    for _ in 0..3 {
        deposit_all(&r, &mut want).await;
    }
    arrived(want).await;
    let restarts = region_metric(west, "meridian_relay_source_restarts_total", EAST).await;
    assert!(
        restarts >= 1.0,
        "west's relay never restarted the silent source{}",
        r.logs()
    );

    // The source removed from the stream's configuration: the relay adds it back.
    let west_js = r.west_nats.jetstream().await;
    let mut config = west_js
        .get_stream("meridian-from-east")
        .await
        .expect("west's copy of east's events")
        .cached_info()
        .config
        .clone();
    config.sources = None;
    west_js
        .update_stream(&config)
        .await
        .expect("remove the source");
    deposit_all(&r, &mut want).await;
    arrived(want).await;

    // The local copy: each of east's events once, none missing.
    let east_js = r.east_nats.jetstream().await;
    let published = east_js
        .get_stream("meridian-events-east")
        .await
        .expect("east's stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    let inbound = eventually(|| async {
        let inbound = west_js.get_stream("meridian-from-east").await.ok()?;
        (inbound.cached_info().state.messages >= published).then_some(inbound)
    })
    .await;
    let state = inbound.cached_info().state.clone();
    let mut ids = std::collections::HashSet::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = inbound.get_raw_message(seq).await.expect("message");
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .expect("every relayed message carries its event id");
        assert!(ids.insert(id.clone()), "event {id} twice in west's copy");
    }
    assert_eq!(
        ids.len() as u64,
        published,
        "west's copy holds every event of east"
    );
}

/// An aggregate that moves away and back finds its old home's cached state stale: the
/// events written meanwhile reached the store through the relay, around the cache. A
/// command refused on that state (nothing appended, so no conflict to notice) would be
/// refused wrongly, and again on every retry.
#[tokio::test(flavor = "multi_thread")]
async fn after_moving_away_and_back_commands_are_decided_on_the_current_state() {
    let r = TwoRegions::start("backhome").await;
    for command in [
        json!({"type":"Open","owner":"ivy"}),
        json!({"type":"Deposit","amount":10}),
    ] {
        let (status, body, _) = send(&r.east[0], "bh-1", command).await;
        assert_eq!(status, 200, "{body}");
    }
    let move_to = |host: &Host, region: &str| {
        let api = host.client();
        let body = json!({ "region": region }).to_string().into_bytes();
        async move {
            api.post_raw("/v1/aggregates/bank-account/bh-1/move-home", body)
                .await
        }
    };
    let (status, moved) = move_to(&r.west[0], WEST).await;
    assert_eq!(status, 200, "{moved}");
    let (status, body, _) = send(&r.west[0], "bh-1", json!({"type":"Deposit","amount":100})).await;
    assert_eq!(status, 200, "{body}");
    let (status, moved) = move_to(&r.west[0], EAST).await;
    assert_eq!(status, 200, "{moved}{}", r.logs());
    // Balance 110 in fact, 10 in east's cache.
    let (status, body, _) = eventually(|| async {
        let answer = send(&r.east[0], "bh-1", json!({"type":"Withdraw","amount":50})).await;
        (answer.0 != 503).then_some(answer)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 6, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn move_home_to_west_then_commands_through_either_region_run_in_west() {
    let r = TwoRegions::start("move").await;
    // Moving an aggregate that does not exist is a 404 and leaves no trace: the
    // region asked does not become its home, so it is created where it is first sent.
    let (status, body) = r.east[0]
        .client()
        .post_raw(
            "/v1/aggregates/bank-account/mv-0/move-home",
            json!({"region": WEST}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("has no events"),
        "{body}"
    );
    let (status, body, ran_in) =
        send(&r.west[0], "mv-0", json!({"type":"Open","owner":"dan"})).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(
        ran_in.as_deref(),
        Some(EAST),
        "the failed move claimed east as its home"
    );
    let (status, body, _) = send(&r.east[0], "mv-1", json!({"type":"Open","owner":"carol"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = send(&r.east[0], "mv-1", json!({"type":"Deposit","amount":100})).await;
    assert_eq!(status, 200);
    // Through the CLI, from a west host: it is forwarded to the home (east).
    let output = std::process::Command::new(meridian_bin())
        .args([
            "aggregate",
            "move-home",
            "bank-account",
            "mv-1",
            WEST,
            "--json",
        ])
        .env("MERIDIAN_URL", &r.west[0].url)
        .output()
        .expect("run meridian aggregate move-home");
    assert!(
        output.status.success(),
        "move-home failed: {}{}",
        String::from_utf8_lossy(&output.stderr),
        r.logs()
    );
    let moved: Value = serde_json::from_slice(&output.stdout).expect("JSON output");
    assert_eq!(moved["from"], EAST);
    assert_eq!(moved["to"], WEST);
    assert_eq!(moved["version"], 3);
    assert_eq!(moved["target_has_all_events"], true, "{moved}");
    // Whichever host takes them, they run in west: its events say so below. The CLI
    // says where a forwarded command ran.
    let output = std::process::Command::new(meridian_bin())
        .args([
            "command",
            "bank-account",
            "mv-1",
            r#"{"type":"Deposit","amount":5}"#,
        ])
        .env("MERIDIAN_URL", &r.east[1].url)
        .output()
        .expect("run meridian command");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}{}",
        String::from_utf8_lossy(&output.stderr),
        r.logs()
    );
    assert!(
        stdout.contains("bank-account/mv-1 is now at version 4 (run in its home region, west)"),
        "{stdout}"
    );
    for (host, amount, version) in [(&r.west[0], 7, 5), (&r.east[0], 1, 6)] {
        let (status, body, _) = send(host, "mv-1", json!({"type":"Deposit","amount":amount})).await;
        assert_eq!(status, 200, "{body}{}", r.logs());
        assert_eq!(body["version"], version, "{body}");
    }
    let west = &r.west[0];
    let west_events =
        eventually(|| async { Some(events_of(west, "mv-1").await).filter(|e| e.len() == 6) }).await;
    let origins: Vec<&str> = west_events.iter().map(origin).collect();
    assert_eq!(origins, [EAST, EAST, EAST, WEST, WEST, WEST]);
    assert_eq!(west_events[2]["type"], "$meridian.HomeMoved");
    let (_, state) = r.west[0]
        .client()
        .get("/v1/aggregates/bank-account/mv-1")
        .await;
    assert_eq!(state["state"]["balance"], 113, "{state}");
    // East never writes it again, whatever it is sent.
    let east = &r.east[0];
    eventually(|| async { (events_of(east, "mv-1").await.len() == 6).then_some(()) }).await;
    let (_, home) = east
        .client()
        .get("/v1/aggregates/bank-account/mv-1/home")
        .await;
    assert_eq!(home["home_region"], WEST);
}

/// Hosts remember homes. A move sent to a host that still remembers its own region as
/// the home after another host moved the aggregate away is passed on to the home the
/// stream names, which runs it; a move to the current home says it is there already,
/// also when sent to a host that remembers another home: passed on, it comes back to a
/// region that reads its stream row rather than its hosts' memories.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_sent_to_a_host_with_a_stale_view_of_the_home_is_passed_on_to_the_home() {
    let r = TwoRegions::start("stalemove").await;
    let move_via = async |host: &Host, region: &str| {
        host.client()
            .post_raw(
                "/v1/aggregates/bank-account/sm-1/move-home",
                json!({ "region": region }).to_string().into_bytes(),
            )
            .await
    };
    let (status, body, _) = send(&r.east[0], "sm-1", json!({"type":"Open","owner":"eve"})).await;
    assert_eq!(status, 200, "{body}");
    // Both east hosts learn that east is the home.
    let (status, body, _) = send(&r.east[1], "sm-1", json!({"type":"Deposit","amount":3})).await;
    assert_eq!(status, 200, "{body}");

    // East's first host moves it to west; the second still remembers east.
    let (status, body) = move_via(&r.east[0], WEST).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(body["to"], WEST, "{body}");
    let (status, body) = move_via(&r.east[1], EAST).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(
        (&body["from"], &body["to"]),
        (&json!(WEST), &json!(EAST)),
        "{body}"
    );
    // East's first host still remembers west: a move to east through it goes to west,
    // which sends it back to whichever east host NATS picks — each time.
    for _ in 0..6 {
        let (status, body) = move_via(&r.east[0], EAST).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "already_home", "{body}");
    }
    let (status, body, region) =
        send(&r.west[0], "sm-1", json!({"type":"Deposit","amount":1})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(region.as_deref(), Some(EAST), "{body}");
    assert_eq!(body["version"], 5, "{body}");

    let (status, body) = move_via(&r.east[0], EAST).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_home", "{body}");
}

/// A move whose events have not reached the target yet: a move request sent to the
/// target meanwhile must not leave its host believing it holds the aggregate. It did:
/// the host took the directory's word that its region was the home, answered 404 "no
/// events in this region", and then ran the aggregate's commands on an empty state,
/// starting a second history that the move's events, once there, could not join.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_still_waiting_for_a_move_s_events_runs_no_command_before_them() {
    let r = TwoRegions::start("early").await;
    // West's database refuses east's events of the account for now (its relay lags).
    let west_db = r.west_db.pool().await;
    refuse_inserts(
        &west_db,
        "refuse_early",
        "NEW.aggregate_id = 'early-1' AND NEW.metadata->>'origin_region' = 'east'",
    )
    .await;
    let (status, body, _) = send(&r.east[0], "early-1", json!({"type":"Open","owner":"ann"})).await;
    assert_eq!(status, 200, "{body}");
    let move_via = async |host: &Host, region: &str| {
        host.client()
            .post_raw(
                "/v1/aggregates/bank-account/early-1/move-home",
                json!({ "region": region }).to_string().into_bytes(),
            )
            .await
    };
    let (status, body) = move_via(&r.east[0], WEST).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(body["target_has_all_events"], false, "{body}");

    // A move sent to west meanwhile: the move is on its way there, not a missing aggregate.
    let (status, body) = move_via(&r.west[0], EAST).await;
    assert_eq!(status, 503, "{body}{}", r.logs());
    assert_eq!(body["error"]["code"], "home_moving", "{body}");
    // Nor does west run a command on the state it does not have yet.
    let (status, body, _) = send(&r.west[0], "early-1", json!({"type":"Open","owner":"bob"})).await;
    assert_eq!(status, 503, "{body}{}", r.logs());
    assert_eq!(body["error"]["code"], "home_moving", "{body}");

    // Once east's events are in, west runs the account from its whole history.
    sqlx::raw_sql("DROP TRIGGER refuse_early ON events")
        .execute(&west_db)
        .await
        .expect("drop the trigger");
    r.wait_until_west_holds("early-1", 2).await;
    let (status, body, region) =
        send(&r.west[0], "early-1", json!({"type":"Deposit","amount":4})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(region, None, "run in west itself");
    assert_eq!(body["version"], 3, "{body}");
    // The feed shows an event once every older transaction has ended.
    let west = &r.west[0];
    let events =
        eventually(|| async { Some(events_of(west, "early-1").await).filter(|e| e.len() == 3) })
            .await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["Opened", "$meridian.HomeMoved", "Deposited"]);
    let (_, state) = r.west[0]
        .client()
        .get("/v1/aggregates/bank-account/early-1")
        .await;
    assert_eq!(state["state"]["owner"], "ann", "{state}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_uploaded_in_east_runs_in_west_and_an_unreachable_home_is_a_503() {
    let mut r = TwoRegions::start("plug").await;
    // `start` uploaded only in east; a new aggregate created through west lives there.
    let (status, body, region) =
        send(&r.west[0], "pl-1", json!({"type":"Open","owner":"dan"})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(region, None, "executed in west itself");
    let west = &r.west[0];
    let events =
        eventually(|| async { Some(events_of(west, "pl-1").await).filter(|e| !e.is_empty()) })
            .await;
    assert_eq!(origin(&events[0]), WEST);
    let (_, plugins) = r.west[0].client().get("/v1/plugins").await;
    let (_, east_plugins) = r.east[0].client().get("/v1/plugins").await;
    assert_eq!(
        plugins["plugins"][0]["sha256"],
        east_plugins["plugins"][0]["sha256"]
    );
    assert_eq!(plugins["plugins"][0]["version"], 1);

    // Both regions upload different bytes at once: never two different "version 2"s.
    // One that was checked against version 1 while the other took version 2 is
    // refused (its check says nothing about version 2's histories); sent again, it
    // is checked against version 2 and becomes version 3.
    let (east_bytes, west_bytes) = (with_custom_section(b"east"), with_custom_section(b"west"));
    let (east_client, west_client) = (r.east[0].client(), r.west[0].client());
    let (east_answer, west_answer) = tokio::join!(
        east_client.upload("bank-account", east_bytes.clone()),
        west_client.upload("bank-account", west_bytes.clone()),
    );
    let mut answers = Vec::new();
    for (client, bytes, (status, body)) in [
        (&east_client, east_bytes, east_answer),
        (&west_client, west_bytes, west_answer),
    ] {
        let body = if status == 409 {
            assert_eq!(body["error"]["code"], "plugin_changed", "{body}");
            let (status, body) = client.upload("bank-account", bytes).await;
            assert_eq!(status, 201, "{body}");
            body
        } else {
            assert_eq!(status, 201, "{body}");
            body
        };
        answers.push(body);
    }
    let (be, bw) = (answers[0].clone(), answers[1].clone());
    let mut versions = [
        be["version"].as_i64().unwrap(),
        bw["version"].as_i64().unwrap(),
    ];
    versions.sort();
    assert_eq!(versions, [2, 3], "{be} {bw}");
    for host in [&r.east[0], &r.west[0]] {
        let client = host.client();
        eventually(|| {
            let client = client.clone();
            let (be, bw) = (be.clone(), bw.clone());
            async move {
                let (_, detail) = client.get("/v1/plugins/bank-account").await;
                let versions = detail["versions"].as_array()?.clone();
                let sha_of = |v: &Value| {
                    versions
                        .iter()
                        .find(|x| x["version"] == v["version"])
                        .map(|x| x["sha256"].clone())
                };
                (sha_of(&be) == Some(be["sha256"].clone())
                    && sha_of(&bw) == Some(bw["sha256"].clone()))
                .then_some(())
            }
        })
        .await;
    }

    let (status, body, _) = send(&r.east[0], "pe-1", json!({"type":"Open","owner":"eve"})).await;
    assert_eq!(status, 200, "{body}");
    let west = &r.west[0];
    eventually(|| async { (!events_of(west, "pe-1").await.is_empty()).then_some(()) }).await;
    // East's hosts gone: west answers 503 naming east, and writes nothing.
    for host in r.east.iter_mut() {
        host.kill9();
    }
    // NATS learns a moment after they die that nobody in east listens; a request sent
    // before then goes out and times out. Every answer is a 503 naming east, and once
    // NATS knows, west says at once that east is unavailable.
    eventually(|| async {
        let (status, body, _) = send(west, "pe-1", json!({"type":"Deposit","amount":5})).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("east"),
            "{body}"
        );
        (body["error"]["code"] == "home_region_unavailable").then_some(())
    })
    .await;
    let pool = r.west_db.pool().await;
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = 'pe-1' AND metadata->>'origin_region' = 'west'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(written, 0);
    // A new version cannot be registered without the directory, and whether the claim
    // was made cannot be told: the answer says how to find out.
    let (status, body) = west
        .client()
        .upload(
            "bank-account",
            with_custom_section(b"uploaded-while-east-is-away"),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("directory_unavailable")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("send the same bytes again"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_forwarded_between_regions_is_authenticated_again_at_home() {
    // `writer-token-west-only` may write in west but is unknown in east.
    let east_tokens = format!("{ADMIN}:admin,writer-token-both-regions:write");
    let west_tokens =
        format!("{ADMIN}:admin,writer-token-both-regions:write,writer-token-west-only:write");
    let r = TwoRegions::start_with_tokens("auth", Some((&east_tokens, &west_tokens))).await;
    let post = |host: &Host, token: &str, id: &str, command: Value| {
        reqwest::Client::new()
            .post(format!("{}/v1/aggregates/bank-account/{id}", host.url))
            .bearer_auth(token)
            .json(&json!({ "command": command }))
            .send()
    };
    let response = post(
        &r.east[0],
        "writer-token-both-regions",
        "au-1",
        json!({"type":"Open","owner":"f"}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = post(
        &r.west[0],
        "writer-token-both-regions",
        "au-1",
        json!({"type":"Deposit","amount":2}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200, "a token both regions know");
    // West accepts the token, forwards, and east refuses it: the home decides.
    let response = post(
        &r.west[0],
        "writer-token-west-only",
        "au-1",
        json!({"type":"Deposit","amount":3}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(
        response
            .headers()
            .get("x-meridian-region")
            .and_then(|v| v.to_str().ok()),
        Some(EAST)
    );
    let east = &r.east[0];
    let (_, state) = admin(east, true)
        .get("/v1/aggregates/bank-account/au-1")
        .await;
    assert_eq!(
        state["version"], 2,
        "the refused command wrote nothing: {state}"
    );
    // A move sent to west runs in east (the home), which then asks west whether it has
    // every event: that question carries the caller's token too. Without it west
    // refused the question, the move waited out its confirmation, and west answered
    // the caller that east timed out although the move had happened.
    let (status, moved) = admin(&r.west[0], true)
        .post_raw(
            "/v1/aggregates/bank-account/au-1/move-home",
            json!({"region": WEST}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{moved}{}", r.logs());
    assert_eq!(moved["from"], EAST, "{moved}");
    assert_eq!(moved["target_has_all_events"], true, "{moved}");
    let (status, body, ran_in) = send_command(
        &r.east[0].url,
        "au-1",
        Some(ADMIN),
        json!({"type":"Deposit","amount":4}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ran_in.as_deref(), Some(WEST), "{body}");
}

/// After a forced move away from a lost region, every host of the new home runs the
/// aggregate's commands, not only the host the move went through. The others
/// remembered the old home and sent each command there (503) until restarted.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_forced_move_every_host_of_the_new_home_runs_its_commands() {
    let mut r = TwoRegions::start("forcedall").await;
    let (status, body, _) = send(&r.west[0], "fa-1", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    // Both east hosts send a command to west, and so remember west as the home.
    for host in &r.east {
        let (status, body, ran_in) = send(host, "fa-1", json!({"type":"Deposit","amount":1})).await;
        assert_eq!((status, ran_in.as_deref()), (200, Some(WEST)), "{body}");
    }
    eventually(|| async { (events_of(&r.east[0], "fa-1").await.len() == 3).then_some(()) }).await;

    // West is lost.
    r.west[0].kill9();
    r.west_nats.stop();
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/aggregates/bank-account/fa-1/move-home",
            r.east[0].url
        ))
        .json(&json!({"region": EAST, "force": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", r.logs());

    for host in &r.east {
        let (status, body, ran_in) = send(host, "fa-1", json!({"type":"Deposit","amount":1})).await;
        assert_eq!(status, 200, "through {}: {body}{}", host.node_id, r.logs());
        assert_eq!(ran_in, None, "ran in east itself: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_move_takes_an_aggregate_over_from_a_lost_region_which_then_defers() {
    let mut r = TwoRegions::start("force").await;
    let (status, body, _) = send(&r.east[0], "fo-1", json!({"type":"Open","owner":"gus"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = send(&r.east[0], "fo-1", json!({"type":"Deposit","amount":40})).await;
    assert_eq!(status, 200);
    let west = &r.west[0];
    eventually(|| async { (events_of(west, "fo-1").await.len() == 2).then_some(()) }).await;
    // East commits one more event that never leaves it: the forced move's data-loss
    // window.
    r.east_nats.stop();
    let (status, body, _) = send(&r.east[0], "fo-1", json!({"type":"Deposit","amount":7})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    for host in r.east.iter_mut() {
        host.kill9();
    }
    let move_home = |force: bool| {
        reqwest::Client::new()
            .post(format!(
                "{}/v1/aggregates/bank-account/fo-1/move-home",
                r.west[0].url
            ))
            .json(&json!({"region": WEST, "force": force}))
            .send()
    };
    // Unforced, the move must run at the home, which is gone.
    let response = move_home(false).await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1"),
        "a 503 says when to retry"
    );
    let response = move_home(true).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let moved: Value = response.json().await.unwrap();
    assert_eq!(
        (moved["from"].as_str(), moved["to"].as_str()),
        (Some(EAST), Some(WEST))
    );
    assert_eq!(moved["version"], 3);
    let (status, body, region) =
        send(&r.west[0], "fo-1", json!({"type":"Withdraw","amount":15})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(body["version"], 4);
    assert_eq!(region, None, "executed in west itself");

    // East comes back, learns of the move from west's events, and never writes fo-1.
    // Its unrelayed deposit reaches west and is refused as divergent, not applied.
    r.east_nats.restart();
    r.east[0].restart().await;
    let metrics_url = format!("{}/metrics", r.west[0].url);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .lines()
            .any(|l| l.starts_with("meridian_relay_divergent_events_total{region=\"east\"} 1"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never refused east's unrelayed event: {}{}",
            text.lines()
                .filter(|l| l.contains("relay"))
                .collect::<Vec<_>>()
                .join("\n"),
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let east = &r.east[0];
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, home) = east
            .client()
            .get("/v1/aggregates/bank-account/fo-1/home")
            .await;
        if home["home_region"] == WEST {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east never learnt of the move: {home}{}",
            r.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body, region) =
        send(&r.east[0], "fo-1", json!({"type":"Deposit","amount":1})).await;
    assert_eq!(status, 200, "{body}{}", r.logs());
    assert_eq!(body["version"], 5);
    assert_eq!(region.as_deref(), Some(WEST));
    let (_, state) = r.west[0]
        .client()
        .get("/v1/aggregates/bank-account/fo-1")
        .await;
    assert_eq!(state["state"]["balance"], 26, "{state}");
}

/// A host of the home region drained while other regions forward commands to it over
/// NATS loses none of them. Its share of the region's queue group used to stop at once
/// at SIGTERM: requests already delivered to it and not yet read were dropped, and the
/// sending region waited out its forward timeout (503 `home_region_timeout`) for a
/// command that may have run. It now leaves the queue group by draining and answers
/// what it was given. A request on the wire as it leaves can still go unanswered
/// (async-nats forgets the subscription once its UNSUB is written), so the clients here
/// do what a 503 tells them — send the same command id again — and every deposit must
/// end up applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn draining_a_home_host_fails_no_command_forwarded_from_another_region() {
    let r = TwoRegions::start("drain_rpc").await;
    let ids: Vec<String> = (0..16).map(|i| format!("dr-{i}")).collect();
    for id in &ids {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"o"})).await;
        assert_eq!(status, 200, "{body}");
    }
    // Sixteen clients deposit through west, each into its own east account, until told
    // to stop, retrying a 503 with the same command id; each counts its deposits and
    // what failed for good.
    let stop = tokio_util::sync::CancellationToken::new();
    let west = r.west[0].url.clone();
    let clients: Vec<_> = ids
        .iter()
        .map(|id| {
            let (stop, west, id) = (stop.clone(), west.clone(), id.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (mut sent, mut retried, mut failed) = (0, 0, Vec::new());
                while !stop.is_cancelled() {
                    let body = json!({
                        "command": {"type": "Deposit", "amount": 1},
                        "command_id": uuid::Uuid::now_v7(),
                    });
                    let mut tries = 0;
                    loop {
                        let response = http
                            .post(format!("{west}/v1/aggregates/bank-account/{id}"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        let status = response.status().as_u16();
                        if status == 200 {
                            break;
                        }
                        let answer: Value = response.json().await.unwrap_or(Value::Null);
                        tries += 1;
                        if status != 503 || tries == 5 {
                            failed.push(format!("{status} {answer}"));
                            break;
                        }
                        retried += 1;
                    }
                    sent += 1;
                }
                (id, sent, retried, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut r = r;
    let leaving = r.east.remove(1);
    leaving.signal("TERM");
    let (code, log) = leaving.exit_and_log().await;
    assert_eq!(code, Some(0), "the drained host did not exit 0: {log}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let (mut sent, mut retried, mut failed, mut deposited) = (0, 0, Vec::new(), Vec::new());
    for client in clients {
        let (id, s, r, f) = client.await.unwrap();
        sent += s;
        retried += r;
        failed.extend(f);
        deposited.push((id, s));
    }
    assert!(sent > 100, "only {sent} commands sent");
    assert!(
        failed.is_empty(),
        "{} of {sent} commands failed while an east host drained ({retried} retried): {:?}{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        r.logs()
    );
    // Each deposit applied once, retried or not.
    for (id, deposits) in deposited {
        let (status, state) = r.east[0]
            .client()
            .get(&format!("/v1/aggregates/bank-account/{id}"))
            .await;
        assert_eq!(status, 200, "{state}");
        assert_eq!(
            state["state"]["balance"].as_i64(),
            Some(deposits as i64),
            "{id}: {state}"
        );
    }
}

/// A relay leader that stops without its process ending (a frozen VM, SIGSTOP, a host
/// cut off) keeps its database connection, and with it the leader lock, open as far as
/// the server can tell. The server must end that session once it goes silent, so that
/// the region's other host takes the relay over: east's events keep reaching west.
/// Resumed, the old leader finds its session gone and gives the leadership up.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_relay_leader_is_replaced_and_events_keep_reaching_the_other_region() {
    let r = TwoRegions::start("frozen_leader").await;
    let (status, body, _) = send(&r.east[0], "fl-0", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("fl-0", 1).await;
    const LEADS: &str = "this host is the region's relay leader";
    let leads = |h: &Host| {
        std::fs::read_to_string(&h.log)
            .unwrap_or_default()
            .matches(LEADS)
            .count()
    };
    // The leader: the host whose latest word on the relay is that it leads.
    let leading = |h: &Host| {
        let log = std::fs::read_to_string(&h.log).unwrap_or_default();
        log.rfind(LEADS) > log.rfind("relay leadership")
    };
    let leader = (0..2)
        .find(|&i| leading(&r.east[i]))
        .unwrap_or_else(|| panic!("no east host leads the relay{}", r.logs()));
    let other = &r.east[1 - leader];
    let frozen = &r.east[leader];
    let led_before = leads(other);
    frozen.signal("STOP");
    // The frozen host may own the account's partition until the other host declares it
    // dead: a 503 then says to retry with the same command id.
    let request =
        json!({"command": {"type":"Open","owner":"o"}, "command_id": uuid::Uuid::now_v7()});
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    eventually(|| {
        let sent = http
            .post(format!("{}/v1/aggregates/bank-account/fl-1", other.url))
            .json(&request)
            .send();
        async move { sent.await.ok().filter(|r| r.status() == 200).map(drop) }
    })
    .await;
    r.wait_until_west_holds("fl-1", 1).await;
    assert!(
        leads(other) > led_before,
        "the other east host leads now{}",
        r.logs()
    );

    frozen.signal("CONT");
    eventually(|| async {
        let log = std::fs::read_to_string(&frozen.log).unwrap_or_default();
        log.contains("relay leadership lost").then_some(())
    })
    .await;
    let (status, body, _) = send(other, "fl-2", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("fl-2", 1).await;
    for id in ["fl-0", "fl-1", "fl-2"] {
        assert_eq!(
            events_of(&r.west[0], id).await.len(),
            1,
            "{id} stored once in west"
        );
    }
}

/// The relay replaces a peer's inbound consumer at every start: it deletes the old one
/// and creates a new one at the old one's acknowledgement floor. If the new one never
/// got created (a JetStream timeout during a NATS restart, the host dying in between),
/// the next start found no consumer and had the peer's whole stream delivered again.
/// The floor is kept in PostgreSQL before the delete, and a missing consumer resumes
/// there.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_inbound_consumer_resumes_at_the_last_floor_not_the_start() {
    let mut r = TwoRegions::start("resume_floor").await;
    let ids: Vec<String> = (0..20).map(|i| format!("rf-{i}")).collect();
    for id in &ids {
        let (status, body, _) = send(&r.east[0], id, json!({"type":"Open","owner":"o"})).await;
        assert_eq!(status, 200, "{body}");
    }
    for id in &ids {
        r.wait_until_west_holds(id, 1).await;
    }
    // A restart replaces the consumer, keeping its floor; then the consumer is lost.
    r.west[0].restart().await;
    let receiving = |h: &Host| {
        std::fs::read_to_string(&h.log)
            .unwrap_or_default()
            .contains("receiving events")
    };
    eventually(|| async { receiving(&r.west[0]).then_some(()) }).await;
    let js = r.west_nats.jetstream().await;
    let inbound = js
        .get_stream("meridian-from-east")
        .await
        .expect("inbound stream");
    inbound
        .delete_consumer("meridian-inbound")
        .await
        .expect("delete the consumer");
    r.west[0].restart().await;
    eventually(|| async { receiving(&r.west[0]).then_some(()) }).await;
    let (status, body, _) = send(&r.east[0], "rf-new", json!({"type":"Open","owner":"o"})).await;
    assert_eq!(status, 200, "{body}");
    r.wait_until_west_holds("rf-new", 1).await;
    let inbound = js
        .get_stream("meridian-from-east")
        .await
        .expect("inbound stream");
    let info = inbound
        .consumer_info("meridian-inbound")
        .await
        .expect("the relay made a consumer again");
    // The new event, and at most an old one or two whose acknowledgement the first
    // restart's kill -9 may have cut off; not the twenty again.
    assert!(
        info.delivered.consumer_sequence <= 3,
        "the new consumer delivered {} messages: the peer's old events again{}",
        info.delivered.consumer_sequence,
        r.logs()
    );
    for id in &ids {
        assert_eq!(events_of(&r.west[0], id).await.len(), 1, "{id} stored once");
    }
}

/// `MERIDIAN_NATS_REPLICAS` is what the streams and buckets Meridian creates are made
/// with. A single server keeps one copy and refuses more, so a region set to three on
/// one server cannot store a plugin's bytes, and says why: proof that the setting
/// reaches JetStream (on a cluster of three it keeps each one on three servers).
#[tokio::test(flavor = "multi_thread")]
async fn the_replicas_setting_is_what_jetstream_is_asked_for() {
    let nats = NatsServer::hub(EAST);
    let db = TestDb::new("replicas").await;
    let mut opts = options(EAST, WEST, &nats);
    opts.env.push(("MERIDIAN_NATS_REPLICAS".into(), "3".into()));
    let host = Host::start(&db, opts).await;
    let (status, body) = host
        .client()
        .upload("bank-account", wasm_bytes("bank-account"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("nats_unavailable")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("replicas"), "{body}");
    // Nothing was stored: the plugin is not there.
    let (status, _) = host.client().get("/v1/plugins/bank-account").await;
    assert_eq!(status, 404);

    // Out of range is refused at start, naming the setting.
    let refused = Host::spawn(
        &db.url,
        HostOptions {
            env: vec![("MERIDIAN_NATS_REPLICAS".into(), "0".into())],
            ..options(EAST, WEST, &nats)
        },
    );
    let (code, log) = refused.exit_and_log().await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("nats-replicas") || log.contains("NATS_REPLICAS"),
        "{log}"
    );
}
