//! Live event streams (SSE): catch-up, then live, resumable by `Last-Event-ID`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Host, HostOptions, TestDb, wasm_bytes};

/// Reads SSE messages from a response: (id, data as JSON).
pub(crate) struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub(crate) async fn open(url: &str, last_event_id: Option<&str>) -> SseReader {
        let mut request = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    pub(crate) async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let message: String = self.buffer.drain(..end + 2).collect();
                    let id = message
                        .lines()
                        .find_map(|l| l.strip_prefix("id:"))
                        .map(|s| s.trim().to_string());
                    let data = message
                        .lines()
                        .find_map(|l| l.strip_prefix("data:"))
                        .map(|s| s.trim().to_string());
                    if let (Some(id), Some(data)) = (id, data) {
                        return (id, serde_json::from_str(&data).unwrap());
                    }
                    continue;
                }
                let chunk = self.body.next().await.expect("stream ended").unwrap();
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("no event within 20 s")
    }
}

impl SseReader {
    /// Whether the server ends the stream within `timeout` (events still arriving are
    /// read and dropped).
    pub(crate) async fn ends_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            while let Some(chunk) = self.body.next().await {
                if chunk.is_err() {
                    break;
                }
            }
        })
        .await
        .is_ok()
    }
}

/// `meridian events tail --json --id <id>` against `host`: the process (killed when
/// dropped) and its output lines.
fn cli_tail(
    host: &Host,
    id: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    let mut tail = tokio::process::Command::new(crate::harness::meridian_bin())
        .args(["events", "tail", "--json", "--id", id, "--url", &host.url])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    (tail, lines)
}

/// Asserts a command's answer is a success: a stream waiting for its events would
/// otherwise fail with "no event", not the command's error.
fn committed((status, body): (u16, Value)) {
    assert_eq!(status, 200, "{body}");
}

/// A host on a database of its own with bank-account uploaded and account `id` opened.
async fn host_with_account(label: &str, options: HostOptions, id: &str) -> (TestDb, Host) {
    let db = TestDb::new(label).await;
    let host = Host::start(&db, options).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    committed(
        api.command(
            "bank-account",
            id,
            json!({"command": {"type": "Open", "owner": "a"}}),
        )
        .await,
    );
    (db, host)
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_catches_up_then_goes_live_and_resumes_without_gaps() {
    let (_db, host) = host_with_account("sse", HostOptions::default(), "s-1").await;
    let api = host.client();
    committed(
        api.command(
            "bank-account",
            "s-2",
            json!({"command": {"type": "Open", "owner": "b"}}),
        )
        .await,
    );
    committed(
        api.command(
            "bank-account",
            "s-1",
            json!({"command": {"type": "Deposit", "amount": 5}}),
        )
        .await,
    );

    let url = format!("{}/v1/events?after=0", host.url);
    let mut stream = SseReader::open(&url, None).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(stream.next().await);
    }
    assert_eq!(seen[0].1["type"], "Opened");
    assert_eq!(seen[2].1["type"], "Deposited");
    for (id, event) in &seen {
        assert_eq!(
            id,
            &format!(
                "{}:{}",
                event["position"],
                event["event_id"].as_str().unwrap()
            ),
            "the SSE id is the position and the event's id"
        );
    }
    // Live: new commits arrive on the open stream.
    committed(
        api.command(
            "bank-account",
            "s-2",
            json!({"command": {"type": "Deposit", "amount": 7}}),
        )
        .await,
    );
    committed(
        api.command(
            "bank-account",
            "s-2",
            json!({"command": {"type": "Withdraw", "amount": 2}}),
        )
        .await,
    );
    let live = [stream.next().await, stream.next().await];
    assert_eq!(live[0].1["payload"], json!({"amount": 7}));
    assert_eq!(live[1].1["type"], "Withdrawn");
    drop(stream);

    // A reconnect with Last-Event-ID resumes right after it: no gap, no repeat.
    let mut resumed = SseReader::open(&format!("{}/v1/events", host.url), Some(&seen[2].0)).await;
    let again = [resumed.next().await, resumed.next().await];
    assert_eq!(again[0].0, live[0].0);
    assert_eq!(again[1].0, live[1].0);

    // A resume point whose position holds another event here (read from another
    // region, or from a store since restored) is refused, not resumed after that event.
    let position = seen[2].0.split_once(':').unwrap().0;
    let elsewhere = format!("{position}:{}", uuid::Uuid::now_v7());
    let refused = reqwest::Client::new()
        .get(format!("{}/v1/events", host.url))
        .header("accept", "text/event-stream")
        .header("last-event-id", &elsewhere)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_position", "{body}");
    // So is a page's, when the reader names the event it received there.
    let page = |event_id: String| {
        let api = api.clone();
        async move {
            api.get(&format!(
                "/v1/events?after={position}&after_event_id={event_id}"
            ))
            .await
        }
    };
    let (status, body) = page(uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_position")),
        "{body}"
    );
    let (status, body) = page(seen[2].1["event_id"].as_str().unwrap().to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["event_id"], live[0].1["event_id"]);
    // No event is numbered 0: one "received" there is a broken resume point, refused
    // rather than answered with the whole history again.
    let (status, body) = api
        .get(&format!(
            "/v1/events?after=0&after_event_id={}",
            seen[0].1["event_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_position")),
        "{body}"
    );
    let refused = reqwest::Client::new()
        .get(format!("{}/v1/events", host.url))
        .header("accept", "text/event-stream")
        .header("last-event-id", format!("0:{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    // Filters: one aggregate only.
    let mut one = SseReader::open(
        &format!(
            "{}/v1/events?aggregate_type=bank-account&aggregate_id=s-2",
            host.url
        ),
        None,
    )
    .await;
    let versions: Vec<i64> = [one.next().await, one.next().await, one.next().await]
        .iter()
        .map(|(_, e)| {
            assert_eq!(e["aggregate_id"], "s-2");
            e["version"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 2, 3]);

    // A resume point that does not exist is a clear 400, not an empty stream.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/events?after=999999", host.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // `meridian events tail --json` follows the same stream.
    let (_tail, mut lines) = cli_tail(&host, "s-1");
    let first: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (first["aggregate_id"].as_str(), first["version"].as_i64()),
        (Some("s-1"), Some(1))
    );
    api.command(
        "bank-account",
        "s-1",
        json!({"command": {"type": "Deposit", "amount": 1}}),
    )
    .await;
    let second: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(second["version"], 2);
    let third: Value = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .map(|l| serde_json::from_str(&l).unwrap())
        .unwrap();
    assert_eq!(third["version"], 3);
}

/// `meridian events tail` prints each event as the host sent it. A large one reaches
/// it in many network chunks, and a chunk can end inside a multi-byte character.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_tail_prints_large_non_ascii_events_intact() {
    let (_db, host) = host_with_account("sse_utf8", HostOptions::default(), "u-0").await;
    // 300,000 characters of two, three and four bytes: 900 KB.
    let owner = "é€😀".repeat(100_000);
    let (status, body) = host
        .client()
        .command(
            "bank-account",
            "u-1",
            json!({"command": {"type": "Open", "owner": owner}}),
        )
        .await;
    assert_eq!(
        status,
        200,
        "{}",
        &body.to_string()[..200.min(body.to_string().len())]
    );
    let (_tail, mut lines) = cli_tail(&host, "u-1");
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    let printed = event["payload"]["owner"].as_str().unwrap_or_default();
    assert!(
        printed == owner,
        "the owner came out altered: {} of {} characters, {} replaced",
        printed.chars().count(),
        owner.chars().count(),
        printed.chars().filter(|&c| c == '\u{fffd}').count()
    );
}

/// A transaction writing in another database of the same PostgreSQL server (a
/// migration, a batch job of another application) does not hold the region's streams
/// and reads: they stopped at the oldest transaction running anywhere on the server,
/// and delivered nothing newer for as long as it ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_write_in_another_database_of_the_server_holds_no_stream() {
    let (_db, host) = host_with_account("other_db_write", HostOptions::default(), "w-1").await;
    let other = TestDb::new("other_db_writer").await;
    let other = other.pool().await;
    let mut writer = other.begin().await.unwrap();
    // Takes a transaction id, as any write does, and keeps it until the test ends.
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *writer)
        .await
        .unwrap();
    let mut stream =
        SseReader::open(&format!("{}/v1/events?aggregate_id=w-1", host.url), None).await;
    assert_eq!(stream.next().await.1["version"], 1);
    committed(
        host.client()
            .command(
                "bank-account",
                "w-1",
                json!({"command": {"type": "Deposit", "amount": 5}}),
            )
            .await,
    );
    let (_, event) = stream.next().await;
    assert_eq!(
        (event["version"].as_i64(), event["type"].as_str()),
        (Some(2), Some("Deposited"))
    );
    let (_, page) = host.client().get("/v1/events?after=0").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(2), "{page}");
    writer.rollback().await.unwrap();
}

/// A host with account `id` at version 2, whose second event the feed has not passed:
/// a transaction older than it (returned, to end) is still running. The event's
/// position comes from the aggregate's history, which waits for no one.
async fn undelivered_position(
    label: &str,
    options: HostOptions,
    id: &str,
) -> (
    TestDb,
    Host,
    sqlx::Transaction<'static, sqlx::Postgres>,
    i64,
) {
    let (db, host) = host_with_account(label, options, id).await;
    let mut older = db.pool().await.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .unwrap();
    let api = host.client();
    committed(
        api.command(
            "bank-account",
            id,
            json!({"command": {"type": "Deposit", "amount": 5}}),
        )
        .await,
    );
    let (_, history) = api
        .get(&format!("/v1/aggregates/bank-account/{id}/events"))
        .await;
    let position = history["events"][1]["position"].as_i64().unwrap();
    (db, host, older, position)
}

/// A resume position the feed has not passed yet — read from an aggregate's history,
/// which waits for no other transaction — is waited for, then refused with a 503 to
/// retry, while a transaction older than it still runs: read after, it would never
/// have delivered an event that transaction commits.
#[tokio::test(flavor = "multi_thread")]
async fn a_position_the_feed_has_not_passed_is_not_resumed_after() {
    let (_db, host, older, position) =
        undelivered_position("undelivered", HostOptions::default(), "p-1").await;
    let api = host.client();
    let (status, body) = api.get(&format!("/v1/events?after={position}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("position_not_delivered")),
        "{body}"
    );
    let response = reqwest::Client::new()
        .get(format!("{}/v1/events?after={position}", host.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");

    older.rollback().await.unwrap();
    let (status, body) = api.get(&format!("/v1/events?after={position}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "{body}");
}

/// A stream whose resume position was waited for while the host began to drain is
/// turned away with 503 `draining`, as any stream asked of a draining host: it was
/// opened, and ended at once with a 200 and no events, which clients retry in a loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_waiting_for_its_position_while_the_host_drains_is_turned_away() {
    let options = HostOptions {
        env: vec![("MERIDIAN_DRAIN_TIMEOUT_SECS".into(), "60".into())],
        ..HostOptions::default()
    };
    let (_db, host, older, position) =
        undelivered_position("undelivered_drain", options, "d-1").await;
    let stream = tokio::spawn(
        reqwest::Client::new()
            .get(format!("{}/v1/events?after={position}", host.url))
            .header("accept", "text/event-stream")
            .send(),
    );
    // The host waits for the feed to pass the position (up to 3 s) ...
    tokio::time::sleep(Duration::from_millis(1000)).await;
    host.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... which it does once the older transaction ends, the host draining by then.
    older.rollback().await.unwrap();
    let answer = stream.await.unwrap().unwrap();
    let status = answer.status();
    let body = answer.text().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
}

/// `meridian events tail` waits for a host that goes away under it and resumes after
/// the last event it printed when the host is back; it exited instead, unable to
/// reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_tail_waits_out_a_host_restart_and_resumes() {
    let (_db, mut host) = host_with_account("tail_restart", HostOptions::default(), "t-1").await;
    let (mut tail, mut lines) = cli_tail(&host, "t-1");
    let next = async |lines: &mut tokio::io::Lines<_>| -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the tail printed nothing")
            .unwrap()
            .expect("the tail exited");
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next(&mut lines).await["version"], 1);

    host.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tail.try_wait().unwrap().is_none(),
        "the tail exited while the host was away"
    );
    host.restart().await;
    let (status, body) = host
        .client()
        .command(
            "bank-account",
            "t-1",
            json!({"command": {"type": "Deposit", "amount": 5}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let event = next(&mut lines).await;
    assert_eq!(
        (event["version"].as_i64(), event["type"].as_str()),
        (Some(2), Some("Deposited"))
    );
}

/// Index and table scans of `events` so far, as PostgreSQL counts them. (Backends
/// report these at most once a second, so this lags by about that much.)
async fn events_scans(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) FROM pg_stat_user_tables \
         WHERE relname = 'events'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Open live streams that have nothing new to send do not each read the database: the
/// host reads the commit order once for all of them. Forty idle streams that each looked
/// for new events every 100 ms would scan `events` thousands of times in the five
/// seconds measured here; one shared reader, about fifty times.
#[tokio::test(flavor = "multi_thread")]
async fn idle_streams_share_one_reader_of_the_database() {
    const STREAMS: usize = 40;
    let (db, host) = host_with_account("sse_idle", HostOptions::default(), "idle-1").await;
    let api = host.client();
    let url = format!("{}/v1/events?after=0", host.url);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut stream = SseReader::open(&url, None).await;
        assert_eq!(stream.next().await.1["type"], "Opened");
        streams.push(stream);
    }
    let pool = db.pool().await;
    // Let the catch-up reads' counts reach the statistics first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = events_scans(&pool).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let scans = events_scans(&pool).await - before;
    eprintln!("{STREAMS} idle streams: {scans} scans of `events` in 5 s");
    assert!(
        scans < 5 * STREAMS as i64,
        "{STREAMS} idle streams scanned `events` {scans} times in 5 s: more than one read \
         per stream per second"
    );
    // The host counts them where an operator looks.
    let (_, cluster) = api.get("/v1/cluster").await;
    assert_eq!(cluster["load"]["event_streams_open"], STREAMS, "{cluster}");
    // Still live: the next commit reaches every stream.
    api.command(
        "bank-account",
        "idle-1",
        json!({"command": {"type": "Deposit", "amount": 3}}),
    )
    .await;
    for stream in &mut streams {
        let (_, event) = stream.next().await;
        assert_eq!(event["type"], "Deposited");
    }
}

/// SIGTERM ends the host's open event streams, so draining does not wait on them until
/// its timeout: the host exits 0 soon after, and a client (the CLI's `events tail`,
/// the status page) reconnects from its last position to another host.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_open_streams_and_the_host_exits() {
    let options = HostOptions {
        env: vec![("MERIDIAN_DRAIN_TIMEOUT_SECS".into(), "120".into())],
        ..HostOptions::default()
    };
    let (_db, mut host) = host_with_account("sse_drain", options, "drain-1").await;
    let mut stream = SseReader::open(&format!("{}/v1/events?after=0", host.url), None).await;
    assert_eq!(stream.next().await.1["type"], "Opened");

    host.signal("TERM");
    assert!(
        stream.ends_within(Duration::from_secs(30)).await,
        "the stream stayed open after SIGTERM"
    );
    let code = tokio::task::spawn_blocking(move || host.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(
        code,
        Some(0),
        "the host had not exited 30 s after SIGTERM (drain timeout: 120 s)"
    );
}

/// A client that stops reading its stream (paused, or its machine gone without closing
/// the connection): once the socket's buffers are full the server writes to it no more,
/// so the stream never sees the drain that ends it, and the host waited for it until
/// the drain timeout and exited 1, as if a request had been abandoned.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_client_stopped_reading_does_not_hold_a_drain() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new("sse_stuck").await;
    let mut host = Host::start(
        &db,
        HostOptions {
            env: vec![
                ("MERIDIAN_DRAIN_TIMEOUT_SECS".into(), "20".into()),
                ("MERIDIAN_DRAIN_GRACE_MS".into(), "0".into()),
            ],
            ..HostOptions::default()
        },
    )
    .await;
    let api = host.client();
    let (status, body) = api.upload("bad-output", wasm_bytes("bad-output")).await;
    assert_eq!(status, 201, "{body}");

    let address = host.url.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(address.parse().unwrap()).await.unwrap();
    reader
        .write_all(
            format!(
                "GET /v1/events?after=0 HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // About 24 MB of events, far past what the sockets and the server buffer; the
    // client reads none of it.
    let text = "x".repeat(8000);
    for i in 0..30 {
        let (status, body) = api
            .command(
                "bad-output",
                &format!("big-{i}"),
                json!({"command": {"type": "Repeat", "text": text, "count": 100}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    host.signal("TERM");
    let (code, host) = tokio::task::spawn_blocking(move || {
        let code = host.wait_exit(Duration::from_secs(60));
        (code, host)
    })
    .await
    .unwrap();
    assert_eq!(
        code,
        Some(0),
        "the drain ended as if requests had been abandoned (drain timeout: 20 s): {}",
        host.log_tail()
    );
    drop(reader);
}

/// A host serves a bounded number of live streams: each one catching up holds a page
/// of events and reads through the connections commands use. Past the bound a new
/// stream is a 503 `overloaded` that says to retry, commands keep running, and a
/// stream that ends gives its place back.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_at_its_stream_limit_turns_new_streams_away_and_keeps_running_commands() {
    let db = TestDb::new("stream_limit").await;
    let host = Host::start(
        &db,
        HostOptions {
            env: vec![("MERIDIAN_MAX_EVENT_STREAMS".into(), "2".into())],
            ..HostOptions::default()
        },
    )
    .await;
    let api = host.client();
    api.upload("bank-account", wasm_bytes("bank-account")).await;
    let open = |id: &'static str| {
        api.command(
            "bank-account",
            id,
            json!({"command": {"type": "Open", "owner": "o"}}),
        )
    };
    assert_eq!(open("sl-1").await.0, 200);
    let url = format!("{}/v1/events", host.url);
    let mut first = SseReader::open(&url, None).await;
    let second = SseReader::open(&url, None).await;
    assert_eq!(first.next().await.1["aggregate_id"], "sl-1");

    let refused = reqwest::Client::new()
        .get(&url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MERIDIAN_MAX_EVENT_STREAMS"),
        "{body}"
    );
    // Pages are not streams: they are still served, and commands still run.
    let (status, _) = api.get("/v1/events?limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(open("sl-2").await.0, 200);
    assert_eq!(first.next().await.1["aggregate_id"], "sl-2");
    let (_, cluster) = api.get("/v1/cluster").await;
    assert_eq!(cluster["load"]["max_event_streams"], 2, "{cluster}");

    // A client that goes away gives its place back.
    drop(second);
    // (The host notices the closed connection when it next writes to it: at the
    // latest, the keep-alive comment every 15 s.)
    let mut again = None;
    for _ in 0..250 {
        let response = reqwest::Client::new()
            .get(&url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            again = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the closed stream's place never came back");
}
