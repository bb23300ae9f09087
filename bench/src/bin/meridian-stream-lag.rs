//! `meridian-stream-lag`: how long a committed event takes to reach open live streams
//! (SSE), and what many open streams cost.
//!
//! 1. Opens `--accounts` accounts through `--url`.
//! 2. Opens `--streams` SSE streams on `--stream-url` (default: `--url`), each from the
//!    region's head, so they carry only what the run sends next.
//! 3. Sends deposits open-loop at `--rate` for `--duration` through `--url`, each with
//!    its own command id, noting when each was sent.
//! 4. Every stream notes when each event arrives and looks its command id up: lag =
//!    arrival − send, so it includes the command's own latency (reported beside it).
//!    The run fails if a stream misses an event that committed.
//!
//! With `--stream-url` on another host of the region, the events reach the streams when
//! the committing host announces its commit (or, while the region is busy, at that
//! host's next read of the commit order); on the same host, right after it commits.
//!
//! ```text
//! meridian-stream-lag --url http://127.0.0.1:8080 --streams 100 --rate 200 --duration 10s
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use meridian_bench::cli::{RunArgs, parse_duration};
use meridian_bench::load::{Targets, build_client, send, send_all};
use meridian_bench::stats::{LatencySummary, Outcome, new_histogram, record_us};
use meridian_bench::workload::{account_id, aggregate_path, open_account_requests};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

/// Live-stream lag: commit to arrival on open SSE streams, at a steady command rate.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of the host commands are sent to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,

    /// Base URL of the host the streams are opened on (default: `--url`).
    #[arg(long)]
    stream_url: Option<String>,

    /// Live streams to open.
    #[arg(long, default_value_t = 100)]
    streams: usize,

    /// Accounts the deposits go to.
    #[arg(long, default_value_t = 100)]
    accounts: usize,

    /// Commands per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,

    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// How long the streams may take to deliver everything after the last command.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,

    #[command(flatten)]
    run: RunArgs,
}

/// The result, as written to `--json`.
#[derive(Debug, Serialize)]
struct StreamLag {
    /// Open streams.
    streams: usize,
    /// Commands/s aimed at, and commands answered 2xx.
    rate: f64,
    ok: u64,
    failed: u64,
    /// Whether the streams were on the host the commands went to.
    same_host: bool,
    /// Command latency (send to answer).
    command_latency: LatencySummary,
    /// Send to arrival on a stream, over every (stream, event) pair.
    stream_lag: LatencySummary,
    /// Events delivered over all streams (each stream should get `ok`).
    delivered: u64,
}

/// Command id → when it was sent.
type Sent = Arc<Mutex<HashMap<Uuid, Instant>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.streams == 0 || args.accounts == 0 || !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--streams and --accounts must be at least 1, --rate positive");
    }
    let prefix = args.run.prefix().map_err(anyhow::Error::msg)?;
    let stream_url = args.stream_url.clone().unwrap_or_else(|| args.url.clone());
    let client = build_client(args.streams + 256, Duration::from_secs(30))?;
    let targets = Targets::new([args.url.as_str()])?;

    eprintln!("opening {} accounts", args.accounts);
    let opened = send_all(
        &client,
        &targets,
        open_account_requests(&prefix, args.accounts),
        32,
        3,
    )
    .await;
    if opened.ok != args.accounts as u64 {
        bail!("could not open the accounts: {opened:?}");
    }

    let head: Value = client
        .get(format!("{stream_url}/v1/events/head"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let head = head["position"].as_i64().context("no head position")?;
    let sent: Sent = Arc::default();
    let (expected_tx, expected_rx) = tokio::sync::watch::channel(None::<u64>);
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..args.streams {
        let response = client
            .get(format!("{stream_url}/v1/events?after={head}"))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await?
            .error_for_status()?;
        streams.spawn(follow(response, sent.clone(), expected_rx.clone()));
    }
    eprintln!(
        "{} streams open; sending {} deposits/s for {:?}",
        args.streams, args.rate, args.duration
    );

    let mut rng = StdRng::seed_from_u64(args.run.seed);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now();
    let mut commands = tokio::task::JoinSet::new();
    let mut n = 0u32;
    while start.elapsed() < args.duration {
        sleep_until(start + interval * n).await;
        n += 1;
        let account = account_id(&prefix, rng.random_range(0..args.accounts));
        let url = targets.url(0, &aggregate_path("bank-account", &account));
        let command_id = Uuid::new_v4();
        let body = json!({
            "command": {"type": "Deposit", "amount": 1},
            "command_id": command_id,
        });
        let (client, sent) = (client.clone(), sent.clone());
        commands.spawn(async move {
            let at = Instant::now();
            sent.lock().expect("sent map").insert(command_id, at);
            (send(&client, &url, &body).await, at.elapsed())
        });
    }
    let mut command_latency = new_histogram();
    let (mut ok, mut failed) = (0u64, 0u64);
    while let Some(result) = commands.join_next().await {
        let (outcome, took) = result?;
        if outcome == Outcome::Ok {
            ok += 1;
            record_us(&mut command_latency, took.as_micros() as u64);
        } else {
            failed += 1;
        }
    }
    expected_tx.send(Some(ok))?;

    let mut lag = new_histogram();
    let mut delivered = 0u64;
    let drained = tokio::time::timeout(args.drain_timeout, async {
        while let Some(result) = streams.join_next().await {
            let (histogram, count) = result??;
            lag.add(&histogram)?;
            delivered += count;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => bail!(
            "the streams had not delivered every event {:?} after the last command",
            args.drain_timeout
        ),
    }
    let result = StreamLag {
        streams: args.streams,
        rate: args.rate,
        ok,
        failed,
        same_host: stream_url == args.url,
        command_latency: LatencySummary::from_histogram(&command_latency),
        stream_lag: LatencySummary::from_histogram(&lag),
        delivered,
    };
    println!(
        "{} streams, {ok} commands ({failed} failed): command p50 {:.1} ms p99 {:.1} ms; \
         send → stream p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({delivered} deliveries)",
        result.streams,
        result.command_latency.p50_ms,
        result.command_latency.p99_ms,
        result.stream_lag.p50_ms,
        result.stream_lag.p99_ms,
        result.stream_lag.max_ms,
    );
    if let Some(path) = &args.run.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Reads one SSE stream until it has as many events as commands succeeded (told at the
/// end of the run), recording each event's lag from its command's send.
async fn follow(
    mut response: reqwest::Response,
    sent: Sent,
    mut expected: tokio::sync::watch::Receiver<Option<u64>>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut histogram = new_histogram();
    let mut count = 0u64;
    let mut buffer = String::new();
    loop {
        if let Some(total) = *expected.borrow_and_update()
            && count >= total
        {
            return Ok((histogram, count));
        }
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk?.context("the stream ended")?,
            changed = expected.changed() => {
                changed?;
                continue;
            }
        };
        let arrived = Instant::now();
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            let Some(data) = message.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue; // a keep-alive comment
            };
            let event: Value = serde_json::from_str(data.trim())?;
            let command_id = event["metadata"]["command_id"]
                .as_str()
                .and_then(|id| id.parse::<Uuid>().ok())
                .context("an event without a command id")?;
            let at = sent.lock().expect("sent map").get(&command_id).copied();
            let at = at.context("an event of a command this run did not send")?;
            record_us(&mut histogram, (arrived - at).as_micros() as u64);
            count += 1;
        }
    }
}
