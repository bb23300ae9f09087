//! `meridian-raw-insert`: the write ceiling of the event store's Postgres.
//!
//! Several connections insert batches of event rows into a scratch copy of the `events`
//! table, one multi-row `INSERT ... SELECT FROM UNNEST(...)` per transaction with
//! durable commits. No command handling, no version checks, no other tables: the rows/s
//! it reaches is what the host's group commit is compared to.
//!
//! ```text
//! meridian-raw-insert --database-url postgres://postgres@127.0.0.1:5432/scratch \
//!     --clients 8 --batch 100 --duration 10s --json raw.json
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meridian_bench::cli::parse_duration;
use meridian_bench::stats::{LatencySummary, new_histogram, record_us};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// The scratch table; never the real `events`, which may hold a region's data.
const TABLE: &str = "bench_raw_events";

const INSERT: &str = r#"
INSERT INTO bench_raw_events
    (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::jsonb[], $7::jsonb[])
"#;

/// Multi-row INSERT throughput into a scratch copy of the events table.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Postgres to write to; the scratch table is created and dropped in this database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,

    /// Concurrent connections, each inserting one batch at a time.
    #[arg(long, default_value_t = 8)]
    clients: usize,

    /// Rows per INSERT (and per transaction).
    #[arg(long, default_value_t = 100)]
    batch: usize,

    /// How long to insert.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Distinct aggregate ids written to (`acc-0` ..); each belongs to one client.
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,

    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The result, as printed and written with `--json`.
#[derive(Debug, Serialize)]
struct RawInsertResult {
    clients: usize,
    batch: usize,
    duration_s: f64,
    rows: u64,
    commits: u64,
    rows_per_s: f64,
    commits_per_s: f64,
    /// Latency of one INSERT + commit.
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    commit_p999_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.batch == 0 {
        bail!("--clients and --batch must be at least 1");
    }
    if args.aggregates < args.clients {
        bail!("--aggregates must be at least --clients (each client owns its aggregates)");
    }

    let mut admin = PgConnection::connect(&args.database_url)
        .await
        .with_context(|| format!("connecting to {}", args.database_url))?;
    admin
        .execute(format!("DROP TABLE IF EXISTS {TABLE}").as_str())
        .await?;
    admin
        .execute(meridian_bench::events_table_ddl(TABLE).as_str())
        .await?;

    let outcome = match run(&args).await {
        Ok(result) => verify(&mut admin, &result).await.map(|()| result),
        Err(error) => Err(error),
    };

    // Drop the table whatever happened: it is scratch and can be large.
    let dropped = admin
        .execute(format!("DROP TABLE IF EXISTS {TABLE}").as_str())
        .await;
    let result = outcome?;
    dropped.context("dropping the scratch table")?;

    println!(
        "raw insert: {} clients x {} rows/batch for {:.1}s: {} rows in {} commits",
        result.clients, result.batch, result.duration_s, result.rows, result.commits
    );
    println!(
        "  {:.0} rows/s, {:.0} commits/s, commit latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        result.rows_per_s,
        result.commits_per_s,
        result.commit_p50_ms,
        result.commit_p99_ms,
        result.commit_p999_ms
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<RawInsertResult> {
    // Connect every client before the clock starts.
    let mut connections = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        connections.push(PgConnection::connect(&args.database_url).await?);
    }

    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (client, conn) in connections.into_iter().enumerate() {
        let owned: Vec<String> = (client..args.aggregates)
            .step_by(args.clients)
            .map(|n| format!("acc-{n}"))
            .collect();
        tasks.spawn(insert_loop(conn, owned, args.batch, deadline));
    }

    let mut rows = 0u64;
    let mut commits = 0u64;
    let mut latencies = new_histogram();
    while let Some(joined) = tasks.join_next().await {
        let (client_rows, client_commits, client_latencies) = joined??;
        rows += client_rows;
        commits += client_commits;
        latencies.add(&client_latencies)?;
    }
    // The last commits may end a little after the deadline; divide by the real time.
    let elapsed = started.elapsed().as_secs_f64();
    let summary = LatencySummary::from_histogram(&latencies);
    Ok(RawInsertResult {
        clients: args.clients,
        batch: args.batch,
        duration_s: elapsed,
        rows,
        commits,
        rows_per_s: rows as f64 / elapsed,
        commits_per_s: commits as f64 / elapsed,
        commit_p50_ms: summary.p50_ms,
        commit_p99_ms: summary.p99_ms,
        commit_p999_ms: summary.p999_ms,
    })
}

/// Checks, outside the measured time, that every counted row is in the table and that
/// the JSON columns hold objects (not JSON strings), so the number printed is real.
async fn verify(admin: &mut PgConnection, result: &RawInsertResult) -> anyhow::Result<()> {
    let (stored, amount, region): (i64, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT count(*), max((payload->>'amount')::int8), max(metadata->>'origin_region') \
         FROM bench_raw_events",
    )
    .fetch_one(&mut *admin)
    .await?;
    if stored as u64 != result.rows {
        bail!("counted {} rows but the table holds {stored}", result.rows);
    }
    if result.rows > 0 && (amount != Some(42) || region.as_deref() != Some("local")) {
        bail!("stored rows have unexpected payload/metadata: {amount:?}, {region:?}");
    }
    Ok(())
}

/// One client: inserts batches until the deadline, cycling through its own aggregates so
/// versions only ever increase per aggregate and clients never conflict.
async fn insert_loop(
    mut conn: PgConnection,
    aggregates: Vec<String>,
    batch: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
    let mut versions = vec![0i64; aggregates.len()];
    let mut cursor = 0usize;
    let payload = json!({ "amount": 42 });
    let (mut rows, mut commits) = (0u64, 0u64);
    let mut latencies = new_histogram();

    let mut event_ids = Vec::with_capacity(batch);
    let mut aggregate_types = Vec::with_capacity(batch);
    let mut aggregate_ids = Vec::with_capacity(batch);
    let mut event_versions = Vec::with_capacity(batch);
    let mut event_types = Vec::with_capacity(batch);
    let mut payloads: Vec<Value> = Vec::with_capacity(batch);
    let mut metadata: Vec<Value> = Vec::with_capacity(batch);

    while Instant::now() < deadline {
        event_ids.clear();
        aggregate_types.clear();
        aggregate_ids.clear();
        event_versions.clear();
        event_types.clear();
        payloads.clear();
        metadata.clear();
        for _ in 0..batch {
            versions[cursor] += 1;
            event_ids.push(Uuid::new_v4());
            aggregate_types.push("bank-account");
            aggregate_ids.push(aggregates[cursor].as_str());
            event_versions.push(versions[cursor]);
            event_types.push("Deposited");
            payloads.push(payload.clone());
            metadata.push(json!({
                "command_id": Uuid::new_v4(),
                "plugin_version": 1,
                "origin_region": "local",
            }));
            cursor = (cursor + 1) % aggregates.len();
        }

        let sent = Instant::now();
        // A single statement outside BEGIN is its own transaction, committed (and
        // flushed, with the default synchronous_commit) before the reply: the fewest
        // round trips a durable batch can take.
        sqlx::query(INSERT)
            .bind(&event_ids)
            .bind(&aggregate_types)
            .bind(&aggregate_ids)
            .bind(&event_versions)
            .bind(&event_types)
            .bind(&payloads)
            .bind(&metadata)
            .execute(&mut conn)
            .await
            .context("inserting a batch")?;
        record_us(&mut latencies, sent.elapsed().as_micros() as u64);
        rows += batch as u64;
        commits += 1;
    }
    conn.close().await.ok();
    Ok((rows, commits, latencies))
}
