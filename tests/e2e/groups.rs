//! Consumer groups: `GET /v1/events?group=&member=&members=` splits the region's events
//! by aggregate, and `POST /v1/groups/{group}/members/{i}/ack` stores where a member got.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use meridian::store::groups::member_of;
use serde_json::{Value, json};

use crate::harness::{Api, Host, HostOptions, TestDb, store_events, wasm_bytes};
use crate::subscriptions::SseReader;

/// Opens `count` accounts and deposits into each `deposits` times, interleaved across
/// accounts so that the region's order mixes them.
async fn workload(api: &Api, prefix: &str, count: usize, deposits: usize) {
    for i in 0..count {
        let (status, body) = api
            .command(
                "bank-account",
                &format!("{prefix}-{i}"),
                json!({"command": {"type": "Open", "owner": "o"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for round in 0..deposits {
        for i in 0..count {
            let (status, body) = api
                .command(
                    "bank-account",
                    &format!("{prefix}-{i}"),
                    json!({"command": {"type": "Deposit", "amount": round + 1}}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // The global feed shows an event once no older transaction on the server is still
    // open (other tests' databases included). The commands ran one after another, so
    // once the last one is visible, every earlier one is too.
    let last = format!("{prefix}-{}", count - 1);
    crate::harness::eventually(|| {
        let last = last.clone();
        async move {
            let (_, page) = api
                .get(&format!(
                    "/v1/events?aggregate_type=bank-account&aggregate_id={last}"
                ))
                .await;
            (page["events"].as_array()?.len() == deposits + 1).then_some(())
        }
    })
    .await;
}

/// Every event of the region in tail order.
async fn all_events(api: &Api) -> Vec<Value> {
    let (status, page) = api.get("/v1/events?limit=10000").await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

/// Reads a group member's events as JSON pages of `limit` until `next` stops moving (a
/// group page can be empty and still move on: see
/// `a_group_page_past_other_members_events_moves_on_though_empty`), starting after
/// `after` (or the member's acknowledged position when `None`).
async fn read_pages(api: &Api, query: &str, after: Option<i64>, limit: usize) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = after;
    loop {
        let resume = after.map(|a| format!("&after={a}")).unwrap_or_default();
        let (status, page) = api
            .get(&format!("/v1/events?{query}&limit={limit}{resume}"))
            .await;
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().unwrap().clone();
        assert!(batch.len() <= limit);
        // `next` is the last event scanned, which may be another member's.
        let next = page["next"].as_i64().unwrap();
        if batch.is_empty() && after == Some(next) {
            return events;
        }
        events.extend(batch);
        after = Some(next);
    }
}

fn key(e: &Value) -> (String, String) {
    (
        e["aggregate_type"].as_str().unwrap().to_string(),
        e["aggregate_id"].as_str().unwrap().to_string(),
    )
}

/// Asserts there is no further message on the stream within a short wait.
async fn assert_quiet(stream: &mut SseReader) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(800), stream.next()).await {
        panic!("unexpected extra event {extra:?}");
    }
}

async fn ack(api: &Api, group: &str, member: u32, members: u32, position: i64) -> (u16, Value) {
    api.post_raw(
        &format!("/v1/groups/{group}/members/{member}/ack"),
        json!({"position": position, "members": members})
            .to_string()
            .into_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_members_see_every_event_once_with_each_aggregate_at_one_member_in_order() {
    let db = TestDb::new("groups_split").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    api.upload("bank-account", wasm_bytes("bank-account")).await;
    workload(&api, "acc", 12, 3).await;
    let all = all_events(&api).await;
    assert_eq!(all.len(), 12 * 4);

    // Member 0 reads as a live stream, member 1 as JSON pages of 5.
    let mut stream = SseReader::open(
        &format!("{}/v1/events?group=split&member=0&members=2", host.url),
        None,
    )
    .await;
    let expected_0 = all
        .iter()
        .filter(|e| member_of(&key(e).0, &key(e).1, 2) == 0)
        .count();
    assert!(
        expected_0 > 0 && expected_0 < all.len(),
        "both members have aggregates"
    );
    let mut seen_0 = Vec::new();
    for _ in 0..expected_0 {
        let (id, event) = stream.next().await;
        assert_eq!(
            id,
            format!(
                "{}:{}",
                event["position"],
                event["event_id"].as_str().unwrap()
            )
        );
        seen_0.push(event);
    }
    assert_quiet(&mut stream).await;
    let seen_1 = read_pages(&api, "group=split&member=1&members=2", None, 5).await;

    // Together: every event exactly once.
    let positions_0: HashSet<i64> = seen_0
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    let positions_1: HashSet<i64> = seen_1
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions_0.len(), seen_0.len(), "no repeats at member 0");
    assert_eq!(positions_1.len(), seen_1.len(), "no repeats at member 1");
    assert!(positions_0.is_disjoint(&positions_1), "no event at both");
    let everything: HashSet<i64> = all
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(
        positions_0
            .union(&positions_1)
            .copied()
            .collect::<HashSet<_>>(),
        everything,
        "no event lost"
    );

    // Each aggregate's events all at one member, in version order 1..=4.
    let mut at: BTreeMap<(String, String), (usize, Vec<i64>)> = BTreeMap::new();
    for (member, seen) in [(0, &seen_0), (1, &seen_1)] {
        for e in seen.iter() {
            let entry = at.entry(key(e)).or_insert((member, Vec::new()));
            assert_eq!(entry.0, member, "{:?} is split between members", key(e));
            entry.1.push(e["version"].as_i64().unwrap());
        }
    }
    assert_eq!(at.len(), 12);
    for (aggregate, (_, versions)) in &at {
        assert_eq!(versions, &[1, 2, 3, 4], "{aggregate:?} out of order");
    }

    // Live: new events of member 0's aggregates arrive on its open stream, and only those.
    let mine = at
        .iter()
        .find(|(_, (m, _))| *m == 0)
        .map(|(k, _)| k.1.clone())
        .unwrap();
    let theirs = at
        .iter()
        .find(|(_, (m, _))| *m == 1)
        .map(|(k, _)| k.1.clone())
        .unwrap();
    for id in [&theirs, &mine] {
        let (status, _) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Deposit", "amount": 9}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (_, live) = stream.next().await;
    assert_eq!(
        (live["aggregate_id"].as_str(), live["version"].as_i64()),
        (Some(mine.as_str()), Some(5))
    );
    assert_quiet(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_resumes_after_its_acknowledged_position() {
    let db = TestDb::new("groups_ack").await;
    let mut host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    api.upload("bank-account", wasm_bytes("bank-account")).await;
    workload(&api, "r", 8, 2).await;
    let all = all_events(&api).await;
    let mine: Vec<Value> = all
        .iter()
        .filter(|e| member_of(&key(e).0, &key(e).1, 2) == 1)
        .cloned()
        .collect();
    assert!(
        mine.len() >= 6,
        "member 1 has enough events: {}",
        mine.len()
    );
    let pos = |e: &Value| e["position"].as_i64().unwrap();

    // Nothing acknowledged: the member starts at the beginning.
    let first = read_pages(&api, "group=app&member=1&members=2", None, 1000).await;
    assert_eq!(first, mine);
    // A page that found nothing from the beginning says `next: 0`; acknowledging it, as
    // the README says to acknowledge a page's `next`, stores nothing and is no error.
    let (status, body) = ack(&api, "app", 1, 2, 0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["position"].as_i64(), body["advanced"].as_bool()),
        (Some(0), Some(false))
    );

    // Acknowledge the third of its events; a reconnect (JSON or stream) resumes right
    // after it: the acknowledged ones are not delivered again, nothing later is lost.
    let (status, body) = ack(&api, "app", 1, 2, pos(&mine[2])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["advanced"], true);
    assert_eq!(body["position"], pos(&mine[2]));
    let resumed = read_pages(&api, "group=app&member=1&members=2", None, 2).await;
    assert_eq!(resumed, mine[3..]);
    let mut stream = SseReader::open(
        &format!("{}/v1/events?group=app&member=1&members=2", host.url),
        None,
    )
    .await;
    for expected in &mine[3..] {
        assert_eq!(&stream.next().await.1, expected);
    }
    assert_quiet(&mut stream).await;
    drop(stream);

    // The position lives in PostgreSQL: a restarted host (and member) resumes there.
    let (status, body) = ack(&api, "app", 1, 2, pos(&mine[4])).await;
    assert_eq!((status, body["advanced"].clone()), (200, json!(true)));
    let (status, body) = ack(&api, "app", 1, 2, 0).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["position"].as_i64(), body["advanced"].as_bool()),
        (Some(pos(&mine[4])), Some(false)),
        "an ack of 0 leaves the stored position"
    );
    host.restart().await;
    let api = host.client();
    let resumed = read_pages(&api, "group=app&member=1&members=2", None, 1000).await;
    assert_eq!(resumed, mine[5..]);

    // Acknowledgements only move forward: a late one is ignored, the position stays.
    for stale in [pos(&mine[0]), pos(&mine[4])] {
        let (status, body) = ack(&api, "app", 1, 2, stale).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["advanced"], false, "{body}");
        assert_eq!(body["position"], pos(&mine[4]));
    }
    let (_, group) = api.get("/v1/groups/app").await;
    assert_eq!(
        group["positions"],
        json!([{"members": 2, "member": 1, "position": pos(&mine[4]), "acked_at": group["positions"][0]["acked_at"]}])
    );
    // Acknowledging a position of another member's event is fine: it is a place in the
    // region's order, and everything before it has been scanned.
    let later_other = all
        .iter()
        .skip_while(|e| pos(e) != pos(&mine[4]))
        .find(|e| member_of(&key(e).0, &key(e).1, 2) == 0)
        .cloned();
    if let Some(other) = later_other {
        let (status, body) = ack(&api, "app", 1, 2, pos(&other)).await;
        assert_eq!(
            (status, body["advanced"].clone()),
            (200, json!(true)),
            "{body}"
        );
    }
    // A position that was never delivered is refused.
    let (status, body) = ack(&api, "app", 1, 2, 999_999).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "position_not_delivered");

    // An explicit `after` overrides the stored position (replay).
    let replay = read_pages(&api, "group=app&member=1&members=2", Some(0), 1000).await;
    assert_eq!(replay, mine);

    // A resize. Member 0 of the old layout never acknowledged anything, so its
    // aggregates' events may all be unprocessed: a new layout's member starts from the
    // beginning.
    let of_new_member = |after: i64| -> Vec<Value> {
        all.iter()
            .skip_while(|e| after != 0 && pos(e) != after)
            .skip(usize::from(after != 0))
            .filter(|e| member_of(&key(e).0, &key(e).1, 3) == 2)
            .cloned()
            .collect()
    };
    let resized = read_pages(&api, "group=app&member=2&members=3", None, 1000).await;
    assert_eq!(resized, of_new_member(0));
    // Once every member of the old layout has acknowledged, from the oldest of their
    // positions, so nothing after it is lost.
    let oldest = pos(&all[2]);
    let (status, body) = ack(&api, "app", 0, 2, oldest).await;
    assert_eq!((status, body["advanced"].clone()), (200, json!(true)));
    let resized = read_pages(&api, "group=app&member=2&members=3", None, 1000).await;
    assert_eq!(resized, of_new_member(oldest));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_group_parameters_are_refused_clearly() {
    let db = TestDb::new("groups_bad").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (_, openapi) = api.get("/openapi.json").await;
    for path in [
        "/v1/groups/{group}/members/{member}/ack",
        "/v1/groups/{group}",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} is documented");
    }
    let params = openapi["paths"]["/v1/events"]["get"]["parameters"].to_string();
    assert!(params.contains("\"members\""), "{params}");
    for (query, says) in [
        (
            "group=g&member=2&members=2",
            "`member` must be below `members`",
        ),
        (
            "group=g&member=0&members=0",
            "`members` must be between 1 and",
        ),
        ("group=g&members=2", "needs both `member`"),
        ("group=g&member=0", "needs both `member`"),
        ("member=0&members=2", "need `group`"),
        ("group=g&member=-1&members=2", "whole number"),
        ("group=no%20spaces&member=0&members=2", "invalid group"),
    ] {
        for accept in ["application/json", "text/event-stream"] {
            let r = reqwest::Client::new()
                .get(format!("{}/v1/events?{query}", host.url))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{query} ({accept})");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "bad_request");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{query}: {message}");
        }
    }
    for (path, body, says) in [
        (
            "/v1/groups/g/members/3/ack",
            json!({"position": 1, "members": 2}),
            "below `members`",
        ),
        (
            "/v1/groups/g/members/0/ack",
            json!({"position": 1, "members": 0}),
            "between 1 and",
        ),
        (
            "/v1/groups/g/members/0/ack",
            json!({"position": 1}),
            "malformed acknowledgement",
        ),
        (
            "/v1/groups/g/members/0/ack",
            json!({"position": -1, "members": 1}),
            "a position you received",
        ),
        (
            "/v1/groups/g/members/x/ack",
            json!({"position": 1, "members": 1}),
            "whole number",
        ),
    ] {
        let (status, answer) = api.post_raw(path, body.to_string().into_bytes()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path} {body}: {message}");
    }
    // A refused value is quoted cut short, not echoed whole.
    let long = "g".repeat(5000);
    let (status, answer) = api
        .post_raw(
            &format!("/v1/groups/{long}/members/0/ack"),
            json!({"position": 1, "members": 1})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("invalid group") && message.len() < 300,
        "{message}"
    );
}

type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

async fn next_line(lines: &mut Lines) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a line within 20 s")
        .unwrap()
        .expect("the tail is still running");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_tail_as_a_group_member_acknowledges_and_resumes() {
    let db = TestDb::new("groups_cli").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    api.upload("bank-account", wasm_bytes("bank-account")).await;
    workload(&api, "c", 3, 1).await;
    let all = all_events(&api).await;
    let tail = || {
        let mut child = tokio::process::Command::new(crate::harness::meridian_bin())
            .args([
                "events",
                "tail",
                "--json",
                "--group",
                "cli",
                "--member",
                "0",
                "--members",
                "1",
                "--url",
                &host.url,
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        (
            child,
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        )
    };
    let (child, mut lines) = tail();
    for expected in &all {
        assert_eq!(&next_line(&mut lines).await, expected);
    }
    // It acknowledges what it printed (within half a second).
    let last = all.last().unwrap()["position"].clone();
    crate::harness::eventually(|| {
        let api = api.clone();
        let last = last.clone();
        async move {
            let (_, group) = api.get("/v1/groups/cli").await;
            (group["positions"][0]["position"] == last).then_some(())
        }
    })
    .await;
    drop(lines);
    drop(child);

    // A new tail resumes after it: the next line is a new event, not a repeat.
    let (status, _) = api
        .command(
            "bank-account",
            "c-1",
            json!({"command": {"type": "Deposit", "amount": 4}}),
        )
        .await;
    assert_eq!(status, 200);
    let (_child, mut lines) = tail();
    let first = next_line(&mut lines).await;
    assert_eq!(
        (first["aggregate_id"].as_str(), first["version"].as_i64()),
        (Some("c-1"), Some(3))
    );
}

/// A group page scans at most 20,000 events before it answers, so a member whose
/// aggregates are quiet still gets an answer in bounded time: past that many of other
/// members' events the page is empty, yet its `next` has moved on, and the member's
/// events come on a later page. Reading until a page is empty would stop short; reading
/// until `next` stops moving (what the README says) gets every event.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_page_past_other_members_events_moves_on_though_empty() {
    let db = TestDb::new("group_scan_budget").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let pool = db.pool().await;
    // 25,000 events of member 0's aggregates, then one of member 1's.
    let of = |member: u32| {
        (0..)
            .map(|i| format!("acct-{i}"))
            .find(|id| member_of("bank-account", id, 2) == member)
            .unwrap()
    };
    let (busy, quiet) = (of(0), of(1));
    let deposits = vec![("Deposited", r#"{"amount":1}"#); 1_000];
    for page in 0..25 {
        store_events(&pool, "bank-account", &busy, page * 1_000, &deposits).await;
    }
    store_events(&pool, "bank-account", &quiet, 0, &deposits[..1]).await;
    // Readable once no older transaction on the server is open.
    crate::harness::eventually(|| async {
        let (_, page) = api
            .get(&format!(
                "/v1/events?aggregate_type=bank-account&aggregate_id={quiet}"
            ))
            .await;
        (page["events"].as_array()?.len() == 1).then_some(())
    })
    .await;

    let query = "group=scan&member=1&members=2";
    let (status, first) = api
        .get(&format!("/v1/events?{query}&after=0&limit=10"))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["events"].as_array().unwrap().len(), 0, "{first}");
    assert!(first["next"].as_i64().unwrap() > 0, "{first}");
    let events = read_pages(&api, query, Some(0), 10).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["aggregate_id"], quiet.as_str());
}
