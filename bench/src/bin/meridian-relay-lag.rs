//! `meridian-relay-lag`: how long an event committed in one region takes to be stored in
//! another, at a steady command rate.
//!
//! 1. Opens accounts in the origin region (`--url`), so they are homed there.
//! 2. Measures the origin's maximum rate with the closed-loop generator
//!    (`--max-concurrency` clients for `--max-duration`), unless `--rate` is given.
//! 3. Waits until the other region has every event so far (no backlog at the start).
//! 4. Sends commands open-loop at `--fraction` of that maximum (or `--rate`) for
//!    `--duration`: request *n* is sent at *n* / rate seconds, whether or not earlier
//!    ones were answered.
//! 5. Waits until the other region has stored every event the origin committed in the
//!    window (the run fails if one is missing), then reads the lag per event from the
//!    receiving database: `received_at` (stored there) − `recorded_at` (the origin
//!    transaction's start, `now()`, so the origin's commit is part of the lag).
//!
//! ```text
//! meridian-relay-lag --url http://127.0.0.1:8080 \
//!     --origin-database-url postgres://…/east --receiver-database-url postgres://…/west \
//!     --accounts 2000 --duration 30s --json relay.json
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use meridian_bench::cli::{RunArgs, parse_duration};
use meridian_bench::load::{LevelConfig, Targets, build_client, run_level, send, send_all};
use meridian_bench::stats::{
    Counts, LatencySummary, LevelResult, Outcome, new_histogram, record_us,
};
use meridian_bench::workload::{BankAccountMix, Workload, account_id, open_account_requests};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, sleep_until};

/// Relay lag from commit in one region to stored in another at a steady rate.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of a host in the origin region (commands are sent here).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,

    /// The origin region's database.
    #[arg(long)]
    origin_database_url: String,

    /// The receiving region's database (where the lag is read).
    #[arg(long)]
    receiver_database_url: String,

    /// Accounts opened in the origin and written to.
    #[arg(long, default_value_t = 2_000)]
    accounts: usize,

    /// Clients of the closed-loop run that measures the maximum rate.
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,

    /// Measured time of the maximum-rate run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    max_duration: Duration,

    /// Unmeasured time before the maximum-rate run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    max_warmup: Duration,

    /// Share of the measured maximum to send at.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,

    /// Send at this many commands/s instead of measuring the maximum.
    #[arg(long)]
    rate: Option<f64>,

    /// Length of the steady window.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,

    /// Requests in flight at most during the steady window; a request due when this
    /// many are outstanding is not sent and counted as `skipped`.
    #[arg(long, default_value_t = 1_024)]
    max_in_flight: usize,

    /// How long to wait for the receiving region to catch up, before and after.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    catch_up_timeout: Duration,

    #[command(flatten)]
    run: RunArgs,

    /// Per-request timeout; a request that takes longer counts as failed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

/// The result, as written to `--json`.
#[derive(Debug, Serialize)]
struct RelayLag {
    /// The closed-loop maximum (absent when `--rate` was given).
    max: Option<LevelResult>,
    /// Commands/s the steady window aimed at.
    target_rate: f64,
    /// Commands sent per second of the window.
    sent_rate: f64,
    /// Length of the steady window, in seconds.
    duration_s: f64,
    /// Command outcomes in the steady window.
    ok: u64,
    rejected: u64,
    failed: u64,
    /// Requests not sent because `--max-in-flight` were outstanding.
    skipped: u64,
    /// Command latency in the origin during the steady window.
    command_latency: LatencySummary,
    /// Events committed in the origin during the window.
    committed: i64,
    /// Of those, stored in the receiving region.
    arrived: i64,
    /// Commit in the origin (transaction start) to stored in the receiver.
    lag_p50_ms: f64,
    lag_p90_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    lag_mean_ms: f64,
    /// Seconds from the end of the window until the last event was stored.
    drain_s: f64,
}

const EVENTS_OF_RUN: &str = "aggregate_type = 'bank-account' AND aggregate_id LIKE $1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.accounts == 0 || args.max_concurrency == 0 || args.max_in_flight == 0 {
        bail!("--accounts, --max-concurrency and --max-in-flight must be at least 1");
    }
    if !(args.fraction > 0.0 && args.fraction.is_finite()) {
        bail!("--fraction must be positive");
    }
    let prefix = args.run.prefix().map_err(anyhow::Error::msg)?;
    let like = format!("acc-{prefix}-%");
    let origin = connect(&args.origin_database_url).await?;
    let receiver = connect(&args.receiver_database_url).await?;
    let targets = Targets::new([&args.url])?;
    let client = build_client(args.max_concurrency.max(args.max_in_flight), args.timeout)
        .context("building the HTTP client")?;

    println!(
        "meridian-relay-lag: {} accounts ({}..{}) at {}",
        args.accounts,
        account_id(&prefix, 0),
        account_id(&prefix, args.accounts - 1),
        args.url
    );
    let counts = send_all(
        &client,
        &targets,
        open_account_requests(&prefix, args.accounts),
        64,
        3,
    )
    .await;
    if counts.failed > 0 {
        bail!("{} accounts could not be opened", counts.failed);
    }
    let workload = Arc::new(BankAccountMix::new(&prefix, args.accounts));

    let (max, target_rate) = match args.rate {
        Some(rate) if rate > 0.0 => (None, rate),
        Some(_) => bail!("--rate must be positive"),
        None => {
            let config = LevelConfig {
                concurrency: args.max_concurrency,
                warmup: args.max_warmup,
                duration: args.max_duration,
                seed: args.run.seed,
            };
            let level = run_level(&client, &targets, workload.clone(), config).await;
            println!("maximum (closed loop):\n{}", LevelResult::table_header());
            println!("{}", level.table_row());
            if level.throughput <= 0.0 {
                bail!("no command completed in the maximum-rate run");
            }
            let rate = level.throughput * args.fraction;
            (Some(level), rate)
        }
    };

    // Start from an empty pipe: everything so far has arrived.
    let waited = catch_up(&origin, &receiver, &like, 0.0, args.catch_up_timeout).await?;
    println!("receiver caught up with the setup in {waited:.1}s");

    let window_start = db_epoch(&origin).await?;
    println!(
        "steady: {target_rate:.0} commands/s for {:?}",
        args.duration
    );
    let steady = open_loop(&client, &targets, workload, &args, target_rate).await;
    let window_end = db_epoch(&origin).await?;
    let drain_s = catch_up(
        &origin,
        &receiver,
        &like,
        window_start,
        args.catch_up_timeout,
    )
    .await;
    let (committed, arrived) = counts_since(&origin, &receiver, &like, window_start).await?;
    let drain_s = match drain_s {
        Ok(s) => s,
        Err(error) => bail!("{error:#}: {arrived} of {committed} events arrived"),
    };

    let (p50, p90, p99, max_lag, mean, n): (f64, f64, f64, f64, f64, i64) = sqlx::query_as(
        &format!(
            "SELECT coalesce(q[1], 0), coalesce(q[2], 0), coalesce(q[3], 0), coalesce(mx, 0), \
                    coalesce(mean, 0), n \
             FROM (SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY lag) AS q, \
                          max(lag) AS mx, avg(lag) AS mean, count(*) AS n \
                   FROM (SELECT extract(epoch FROM received_at - recorded_at)::float8 * 1000 AS lag \
                         FROM events \
                         WHERE {EVENTS_OF_RUN} AND received_at IS NOT NULL \
                           AND recorded_at >= to_timestamp($2)) l) s"
        ),
    )
    .bind(&like)
    .bind(window_start)
    .fetch_one(&receiver)
    .await
    .context("reading the lag in the receiving region")?;
    if n != committed {
        bail!("{n} events stored in the receiver, {committed} committed in the origin");
    }

    let duration_s = window_end - window_start;
    let result = RelayLag {
        max,
        target_rate,
        sent_rate: steady.sent as f64 / args.duration.as_secs_f64(),
        duration_s,
        ok: steady.counts.ok,
        rejected: steady.counts.rejected,
        failed: steady.counts.failed,
        skipped: steady.skipped,
        command_latency: LatencySummary::from_histogram(&steady.latencies),
        committed,
        arrived,
        lag_p50_ms: p50,
        lag_p90_ms: p90,
        lag_p99_ms: p99,
        lag_max_ms: max_lag,
        lag_mean_ms: mean,
        drain_s,
    };
    println!(
        "sent {:.0}/s ({} ok, {} rejected, {} failed, {} skipped), command p50 {:.2} ms p99 {:.2} ms",
        result.sent_rate,
        result.ok,
        result.rejected,
        result.failed,
        result.skipped,
        result.command_latency.p50_ms,
        result.command_latency.p99_ms
    );
    println!(
        "relay lag over {committed} events (all arrived): p50 {p50:.1} ms, p90 {p90:.1} ms, \
         p99 {p99:.1} ms, max {max_lag:.1} ms, mean {mean:.1} ms; drained {drain_s:.2}s after the window"
    );
    if let Some(path) = &args.run.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if result.failed > 0 {
        bail!("{} commands failed in the steady window", result.failed);
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The database's clock, as seconds since the epoch (both regions' databases run on
/// this machine, so `recorded_at` and `received_at` share it).
async fn db_epoch(pool: &PgPool) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(pool)
            .await?,
    )
}

/// Events of the run recorded since `since` (epoch seconds): (committed in the origin,
/// stored in the receiver).
async fn counts_since(
    origin: &PgPool,
    receiver: &PgPool,
    like: &str,
    since: f64,
) -> anyhow::Result<(i64, i64)> {
    let sql = |extra: &str| {
        format!(
            "SELECT count(*) FROM events \
             WHERE {EVENTS_OF_RUN} AND recorded_at >= to_timestamp($2){extra}"
        )
    };
    let committed: i64 = sqlx::query_scalar(&sql(""))
        .bind(like)
        .bind(since)
        .fetch_one(origin)
        .await?;
    let arrived: i64 = sqlx::query_scalar(&sql(" AND received_at IS NOT NULL"))
        .bind(like)
        .bind(since)
        .fetch_one(receiver)
        .await?;
    Ok((committed, arrived))
}

/// Waits until the receiver has every event of the run recorded since `since`; returns
/// the seconds it took.
async fn catch_up(
    origin: &PgPool,
    receiver: &PgPool,
    like: &str,
    since: f64,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let (committed, arrived) = counts_since(origin, receiver, like, since).await?;
        if arrived >= committed {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            bail!("the receiving region did not catch up within {timeout:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

struct Steady {
    sent: u64,
    skipped: u64,
    counts: Counts,
    latencies: Histogram<u64>,
}

/// Sends request *n* at start + *n* / rate for the window, each on its own task.
async fn open_loop(
    client: &reqwest::Client,
    targets: &Targets,
    workload: Arc<BankAccountMix>,
    args: &Args,
    rate: f64,
) -> Steady {
    let mut rng = StdRng::seed_from_u64(args.run.seed ^ 0x5eed);
    let slots = Arc::new(Semaphore::new(args.max_in_flight));
    let start = Instant::now();
    let end = start + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let (mut sent, mut skipped) = (0u64, 0u64);
    let mut counts = Counts::default();
    let mut latencies = new_histogram();
    for n in 0u64.. {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if due >= end {
            break;
        }
        sleep_until(due).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let request = workload.next_request(&mut rng);
        let (client, url) = (client.clone(), targets.url(0, &request.path));
        sent += 1;
        tasks.spawn(async move {
            let began = Instant::now();
            let outcome = send(&client, &url, &request.body).await;
            drop(slot);
            (outcome, began.elapsed())
        });
        // Collect finished requests as we go so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            tally(done, &mut counts, &mut latencies);
        }
    }
    while let Some(done) = tasks.join_next().await {
        tally(done, &mut counts, &mut latencies);
    }
    Steady {
        sent,
        skipped,
        counts,
        latencies,
    }
}

fn tally(
    done: Result<(Outcome, Duration), tokio::task::JoinError>,
    counts: &mut Counts,
    latencies: &mut Histogram<u64>,
) {
    let (outcome, elapsed) = done.expect("request task panicked");
    counts.add(outcome);
    if outcome.is_completed() {
        record_us(latencies, elapsed.as_micros() as u64);
    }
}
