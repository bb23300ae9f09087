//! The global tail never skips an event that commits late.
//!
//! Eight writers append concurrently and hold their transactions open for a random
//! time before committing, so commits land out of position order. A reader tails with
//! `read_all` the whole time. It must see every event exactly once and each
//! aggregate's versions in order. The same run also tails naively by position alone
//! and checks that this does skip events: proof the schedule exercises the bug.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use meridian::store::{
    self, AppendRequest, Changes, CommitterConfig, EventFilter, NewEvent, OrderKey, Tail,
    TailConfig,
};
use rand::Rng;
use serde_json::value::RawValue;

use crate::harness::TestDb;

const WRITERS: usize = 8;
const COMMITS_PER_WRITER: usize = 40;

#[tokio::test(flavor = "multi_thread")]
async fn tail_sees_every_event_once_despite_late_commits() {
    let db = TestDb::new("tail").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();

    let writers = spawn_late_committing_writers(&pool);

    let mut after = 0i64;
    let mut seen: HashSet<i64> = HashSet::new();
    let mut versions: HashMap<String, i64> = HashMap::new();
    let mut naive_after = 0i64;
    let mut naive_seen: HashSet<i64> = HashSet::new();
    // The number of events the writers committed, once they all finished.
    let mut written: Option<i64> = None;
    let mut writers = writers;
    let mut totals = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = store::read::read_all(&pool, after, 500, &EventFilter::default())
            .await
            .unwrap();
        for event in &page {
            assert!(
                seen.insert(event.position),
                "event at position {} delivered twice",
                event.position
            );
            let last = versions.entry(event.aggregate_id.clone()).or_insert(0);
            assert_eq!(
                event.version,
                *last + 1,
                "{} out of order",
                event.aggregate_id
            );
            *last = event.version;
            after = event.position;
        }
        // The naive reader: "position > last seen", no regard for open transactions.
        let naive: Vec<i64> =
            sqlx::query_scalar("SELECT position FROM events WHERE position > $1 ORDER BY position")
                .bind(naive_after)
                .fetch_all(&pool)
                .await
                .unwrap();
        for p in naive {
            naive_seen.insert(p);
            naive_after = p;
        }
        // The tail stops below the oldest transaction of the whole server, and other
        // tests' transactions run beside this one: an empty page is not the end, the
        // count of what was written is.
        if page.is_empty() && written.is_some_and(|n| n == seen.len() as i64) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tail missed events: {} of {written:?} after 60 s",
            seen.len()
        );
        if written.is_none() && writers.iter().all(|w| w.is_finished()) {
            for writer in writers.drain(..) {
                totals.push(writer.await.unwrap());
            }
            written = Some(totals.iter().sum());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut total = 0;
    for (w, version) in totals.into_iter().enumerate() {
        assert_eq!(
            versions.get(&format!("w{w}")).copied().unwrap_or(0),
            version,
            "writer {w}"
        );
        total += version;
    }
    assert_eq!(seen.len() as i64, total, "the tail missed events");
    assert!(
        (naive_seen.len() as i64) < total,
        "the naive position reader missed nothing; the schedule did not produce late commits"
    );
}

/// Starts the writers: each appends to its own aggregate (`w0`, `w1`, ...) and holds
/// every transaction open for a random time before committing, so commits land out of
/// position order. Each returns the version its aggregate reached.
fn spawn_late_committing_writers(pool: &sqlx::PgPool) -> Vec<tokio::task::JoinHandle<i64>> {
    (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let config = CommitterConfig::default();
                let mut version = 0i64;
                for _ in 0..COMMITS_PER_WRITER {
                    let (events, delay) = {
                        let mut rng = rand::rng();
                        (rng.random_range(1..4usize), rng.random_range(0..30u64))
                    };
                    let request = AppendRequest {
                        aggregate_type: "t".into(),
                        aggregate_id: format!("w{w}"),
                        expected_version: version,
                        events: (0..events)
                            .map(|_| NewEvent {
                                event_id: uuid::Uuid::now_v7(),
                                event_type: "E".into(),
                                payload: RawValue::from_string("{}".into()).unwrap(),
                                metadata: RawValue::from_string("{}".into()).unwrap(),
                            })
                            .collect(),
                        command_id: None,
                        fence: None,
                    };
                    let mut tx = pool.begin().await.unwrap();
                    let result = store::append::append_batch(&mut *tx, &config, &[&request])
                        .await
                        .unwrap();
                    assert!(result[0].is_ok(), "{:?}", result[0]);
                    // Hold the transaction open: its positions are taken, its commit is late.
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    tx.commit().await.unwrap();
                    version += events as i64;
                }
                version
            })
        })
        .collect()
}

/// Live subscriptions sharing one [`Tail`] see every event once, in commit order, while
/// commits land late, with a filter, and when they fall behind the broadcast. The tail
/// here keeps two pages of seven events, so a subscriber that pauses misses pages and
/// must read the gap from the database; one that took the next page as if it followed
/// on would lose events.
#[tokio::test(flavor = "multi_thread")]
async fn shared_tail_subscribers_see_every_event_once() {
    subscribers_see_every_event_once("shared_tail", usize::MAX).await;
}

/// The same with reads cut by bytes before they reach seven events: a gap read cut
/// short by its byte budget is not the whole gap, and taking it for the whole gap
/// would lose the events after it.
#[tokio::test(flavor = "multi_thread")]
async fn shared_tail_subscribers_see_every_event_once_when_reads_are_cut_by_bytes() {
    // Each event weighs 4 bytes (`{}` and `{}`): three to a read.
    subscribers_see_every_event_once("shared_tail_bytes", 12).await;
}

async fn subscribers_see_every_event_once(label: &str, page_bytes: usize) {
    let db = TestDb::new(label).await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let tail = Tail::start(
        pool.clone(),
        TailConfig {
            page: 7,
            page_bytes,
            capacity: 2,
            poll: Duration::from_millis(5),
            busy_poll: Duration::from_millis(5),
            min_interval: Duration::from_millis(1),
        },
        Changes::default(),
    );
    let writers = spawn_late_committing_writers(&pool);
    // Subscribers: (filter, pause every N events), collecting positions until they reach
    // the last one they should see, which they are told once every writer is done.
    let only_w3 = EventFilter {
        aggregate_id: Some("w3".into()),
        ..EventFilter::default()
    };
    let subscribers: Vec<_> = [
        (EventFilter::default(), None),
        (EventFilter::default(), Some(5)),
        (only_w3.clone(), None),
        (only_w3.clone(), Some(3)),
    ]
    .into_iter()
    .map(|(filter, pause_every)| {
        let mut subscription = tail.subscribe(OrderKey::START, filter);
        let (last_tx, mut last_rx) = tokio::sync::watch::channel(None::<i64>);
        let task = tokio::spawn(async move {
            let mut positions = Vec::new();
            loop {
                if let Some(last) = *last_rx.borrow_and_update()
                    && positions.last() == Some(&last)
                {
                    return positions;
                }
                tokio::select! {
                    event = subscription.next() => {
                        positions.push(event.unwrap().position);
                        if pause_every.is_some_and(|n| positions.len() % n == 0) {
                            tokio::time::sleep(Duration::from_millis(40)).await;
                        }
                    }
                    _ = last_rx.changed() => {}
                }
            }
        });
        (last_tx, task)
    })
    .collect();
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    // Every writer has committed: the full order is now final. It is readable once no
    // older transaction anywhere on the server is open (other tests run beside this
    // one), so read until it holds everything written.
    let mut all = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (all.len() as i64) < written {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {written} events readable",
            all.len()
        );
        let after = all.last().map_or(0, |e: &store::StoredEvent| e.position);
        let page = store::read::read_all(&pool, after, 1000, &EventFilter::default())
            .await
            .unwrap();
        if page.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        all.extend(page);
    }
    let every: Vec<i64> = all.iter().map(|e| e.position).collect();
    let of_w3: Vec<i64> = all
        .iter()
        .filter(|e| e.aggregate_id == "w3")
        .map(|e| e.position)
        .collect();
    for (i, (last, task)) in subscribers.into_iter().enumerate() {
        let expected = if i < 2 { &every } else { &of_w3 };
        last.send(expected.last().copied()).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("subscriber {i} stalled"))
            .unwrap();
        if &seen != expected {
            let at = seen
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(seen.len().min(expected.len()));
            panic!(
                "subscriber {i} saw {} events where {} were expected; first difference at \
                 index {at}: saw {:?}, expected {:?}",
                seen.len(),
                expected.len(),
                &seen[at..(at + 5).min(seen.len())],
                &expected[at..(at + 5).min(expected.len())],
            );
        }
    }
}

/// One request's conflict in a batch fails only that request; a duplicate command id
/// returns the first result; the rest of the batch is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_judges_each_request_on_its_own() {
    let db = TestDb::new("batch").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let config = CommitterConfig::default();
    let event = || NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "E".into(),
        payload: RawValue::from_string("{\"n\":1}".into()).unwrap(),
        metadata: RawValue::from_string("{}".into()).unwrap(),
    };
    let request = |id: &str, expected: i64, command: Option<uuid::Uuid>| AppendRequest {
        aggregate_type: "t".into(),
        aggregate_id: id.into(),
        expected_version: expected,
        events: vec![event(), event()],
        command_id: command,
        fence: None,
    };
    let first = uuid::Uuid::new_v4();
    let setup = store::append::append_batch(
        &pool,
        &config,
        &[&request("a", 0, Some(first)), &request("b", 0, None)],
    )
    .await
    .unwrap();
    assert!(setup.iter().all(|r| r.is_ok()), "{setup:?}");

    // "a" is at version 2: expecting 0 conflicts. "b" goes on from 2. "c" is new.
    // The first command id again is a duplicate. All in one batch.
    let batch = [
        &request("a", 0, None),
        &request("b", 2, None),
        &request("c", 0, Some(uuid::Uuid::new_v4())),
        &request("a", 2, Some(first)),
    ];
    let results = store::append::append_batch(&pool, &config, &batch)
        .await
        .unwrap();
    assert!(
        matches!(
            results[0],
            Err(store::StoreError::Conflict {
                expected: 0,
                actual: 2,
                ..
            })
        ),
        "{:?}",
        results[0]
    );
    assert_eq!(
        results[1].as_ref().unwrap(),
        &store::AppendOutcome::Appended {
            first_version: 3,
            last_version: 4
        }
    );
    assert_eq!(
        results[2].as_ref().unwrap(),
        &store::AppendOutcome::Appended {
            first_version: 1,
            last_version: 2
        }
    );
    assert_eq!(
        results[3].as_ref().unwrap(),
        &store::AppendOutcome::Duplicate {
            first_version: 1,
            last_version: 2
        }
    );
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, count(*) FROM events GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        counts,
        [
            ("a".to_string(), 2),
            ("b".to_string(), 4),
            ("c".to_string(), 2)
        ]
    );
}

/// A region's database restored onto another PostgreSQL server keeps the old server's
/// transaction ids, which the commit order is walked by, while the new server counts
/// from far lower: every feed would silently leave the old events out and put new ones
/// before them. A host refuses to start on it, saying what to run;
/// `meridian migrate --rekey-transaction-ids` renumbers the ids in the same order, and
/// the feed then holds the old events, in their order, and the new ones after them.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_restored_onto_another_server_is_refused_until_renumbered() {
    use crate::harness::{Host, HostOptions, meridian_bin, wasm_bytes};
    use serde_json::json;

    let db = TestDb::new("restored").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    for (id, command) in [
        ("r-1", json!({"type": "Open", "owner": "a"})),
        ("r-2", json!({"type": "Open", "owner": "b"})),
        ("r-1", json!({"type": "Deposit", "amount": 5})),
    ] {
        let (status, body) = api
            .command("bank-account", id, json!({"command": command}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let feed = |api: crate::harness::Api| async move {
        let (status, page) = api.get("/v1/events?limit=100").await;
        assert_eq!(status, 200, "{page}");
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // The feed shows an event once no older transaction on the server is open (other
    // tests run beside this one).
    let until_it_holds = |api: crate::harness::Api, n: usize| async move {
        crate::harness::eventually(|| {
            let api = api.clone();
            async move { Some(feed(api).await).filter(|events| events.len() == n) }
        })
        .await
    };
    let before = until_it_holds(api.clone(), 3).await;
    drop(host);

    // What a dump of a server a billion transactions older looks like restored here.
    let pool = db.pool().await;
    sqlx::query("UPDATE events SET tx_id = (tx_id::text::bigint + 1000000000)::text::xid8")
        .execute(&pool)
        .await
        .unwrap();
    let (code, log) = Host::spawn(&db.url, HostOptions::default())
        .exit_and_log()
        .await;
    assert!(
        matches!(code, Some(c) if c != 0) && log.contains("--rekey-transaction-ids"),
        "exit {code:?}: {log}"
    );

    let output = std::process::Command::new(meridian_bin())
        .args(["migrate", "--rekey-transaction-ids"])
        .env("MERIDIAN_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    assert_eq!(until_it_holds(api.clone(), 3).await, before);
    let (status, body) = api
        .command(
            "bank-account",
            "r-2",
            json!({"command": {"type": "Deposit", "amount": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let after = until_it_holds(api, 4).await;
    assert_eq!(after[..3], before[..]);
}
