//! `meridian-cache-memory`: memory per cached aggregate in a host's state cache.
//!
//! Bulk-loads N bank accounts straight into the host's database (one `Opened` event per
//! account, with the rows the host itself writes for an `Open`: the `streams` row, the
//! `commands` row and the event with the same metadata), warms the host up on a few
//! other accounts, reads its RSS, then reads every account's state through the host
//! (`GET /v1/aggregates/bank-account/{id}`) so that it loads and caches all N, and reads
//! the RSS again. (RSS after − RSS before) / N is the memory per cached aggregate.
//!
//! ```text
//! meridian-cache-memory --url http://127.0.0.1:8080 --pid 12345 \
//!     --database-url postgres://postgres@127.0.0.1/meridian --aggregates 1000000 \
//!     --json out/cache.json
//! ```
//!
//! The host must be the only member of its region (it must own every partition, or it
//! would answer for the others' aggregates from the store, uncached) and its
//! `MERIDIAN_CACHE_CAPACITY` must exceed the warm-up plus N accounts.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use meridian::cluster::core::partition_of;
use meridian_bench::cli::parse_duration;
use meridian_bench::load::{build_client, send};
use meridian_bench::stats::Outcome;
use meridian_bench::workload::{
    BANK_ACCOUNT, account_id, aggregate_path, is_valid_prefix, open_account_request,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// Memory per cached aggregate of a Meridian host.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of the host.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,

    /// The host's process id (its RSS is read from /proc/<pid>/status).
    #[arg(long)]
    pid: u32,

    /// The host's database.
    #[arg(long)]
    database_url: String,

    /// Accounts loaded and cached while measuring.
    #[arg(long, default_value_t = 1_000_000)]
    aggregates: usize,

    /// Accounts loaded and cached before the first RSS reading, so that connections,
    /// threads, plugin instances and the allocator's arenas exist already.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,

    /// Concurrent GETs.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// Accounts inserted per transaction while bulk-loading.
    #[arg(long, default_value_t = 50_000)]
    chunk: usize,

    /// Run id put into account ids (`acc-<prefix>-<n>`); random by default.
    #[arg(long)]
    prefix: Option<String>,

    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// How long to wait for the host to own every partition.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ownership_timeout: Duration,

    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What `GET /v1/cluster` says (the parts used here).
#[derive(Debug, Deserialize)]
struct ClusterView {
    node_id: String,
    region: String,
    partitions: u32,
    partition_owners: Vec<Option<String>>,
    partition_epochs: Vec<i64>,
}

/// What `GET /v1/aggregates/{type}/{id}` answers (the parts checked here).
#[derive(Debug, Deserialize)]
struct StateView {
    version: i64,
    state: Value,
}

/// The host's memory, from /proc/<pid>/status, in KiB.
#[derive(Debug, Clone, Copy, Serialize)]
struct Memory {
    rss_kb: u64,
    rss_anon_kb: u64,
    hwm_kb: u64,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok(Memory {
        rss_kb: field("VmRSS:")?,
        rss_anon_kb: field("RssAnon:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// Sizes of the state JSON the host returned, in bytes.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Sizes {
    min: usize,
    max: usize,
    mean: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    aggregates: usize,
    warmup: usize,
    concurrency: usize,
    /// Bulk load of warm-up + measured accounts with SQL.
    insert_s: f64,
    insert_per_s: f64,
    /// The measured GETs: every account loaded from the store and cached.
    load_s: f64,
    load_per_s: f64,
    before: Memory,
    after: Memory,
    /// (RSS after − RSS before) / aggregates.
    bytes_per_aggregate: f64,
    /// The same for anonymous memory only (heap; no mapped files).
    anon_bytes_per_aggregate: f64,
    /// Loads the host counted during the measured GETs (must be ≥ aggregates).
    host_loads: u64,
    /// A sample read again afterwards: all must be cache hits (no new loads).
    resampled: usize,
    resample_loads: u64,
    state_bytes: Sizes,
    /// A sample aggregate id and its length.
    sample_id: String,
    sample_state: Value,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.aggregates > 0, "--aggregates must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.chunk > 0, "--chunk must be at least 1");
    let prefix = match &args.prefix {
        Some(prefix) if is_valid_prefix(prefix) => prefix.clone(),
        Some(prefix) => bail!("--prefix {prefix:?} may only contain letters, digits, - and _"),
        None => uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    };
    let base = args.url.trim_end_matches('/').to_owned();
    let client = build_client(args.concurrency, args.timeout)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await
        .context("connecting to the host's database")?;
    memory(args.pid)?;

    let cluster = wait_for_ownership(&client, &base, args.ownership_timeout).await?;
    println!(
        "meridian-cache-memory: host {} (pid {}, region {}) owns all {} partitions; \
         {} accounts acc-{prefix}-*, {} warm-up, concurrency {}",
        cluster.node_id,
        args.pid,
        cluster.region,
        cluster.partitions,
        args.aggregates,
        args.warmup,
        args.concurrency
    );

    // One real Open through the host: the template for the bulk rows.
    let template = Template::from_host(&client, &base, &pool, &prefix, &cluster).await?;
    println!(
        "template event: {} {} metadata {}",
        template.event_type, template.payload, template.metadata
    );

    // Accounts 0..warmup are the warm-up, warmup..warmup+aggregates the measured ones.
    let total = args.warmup + args.aggregates;
    let started = Instant::now();
    let mut done = 0;
    while done < total {
        let n = args.chunk.min(total - done);
        template
            .insert(&pool, &prefix, done, n, &cluster)
            .await
            .with_context(|| format!("inserting accounts {done}..{}", done + n))?;
        done += n;
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "bulk load: {done} / {total} accounts ({:.0}/s)",
            done as f64 / elapsed
        );
    }
    sqlx::query("ANALYZE streams, events, commands")
        .execute(&pool)
        .await?;
    let insert_s = started.elapsed().as_secs_f64();
    println!("bulk load: {total} accounts in {insert_s:.1}s");
    template.check_bulk_row(&pool, &prefix, 0).await?;

    // Warm-up: the same path (misses: load, replay, cache) on other accounts.
    let ids: Vec<String> = (0..total).map(|n| account_id(&prefix, n)).collect();
    let ids = Arc::new(ids);
    if args.warmup > 0 {
        let (_, sizes) = get_all(
            &client,
            &base,
            ids.clone(),
            0..args.warmup,
            args.concurrency,
            "warm-up",
            args.pid,
        )
        .await?;
        println!("warm-up: {} accounts, state {:?}", args.warmup, sizes);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = memory(args.pid)?;
    let loads_before = loads_total(&client, &base).await?;
    println!(
        "before: RSS {} KiB (anon {} KiB), peak {} KiB",
        before.rss_kb, before.rss_anon_kb, before.hwm_kb
    );

    let started = Instant::now();
    let (load_s, state_bytes) = get_all(
        &client,
        &base,
        ids.clone(),
        args.warmup..total,
        args.concurrency,
        "load",
        args.pid,
    )
    .await?;
    let load_per_s = args.aggregates as f64 / load_s;
    println!(
        "load: {} accounts in {:.1}s ({:.0}/s)",
        args.aggregates,
        started.elapsed().as_secs_f64(),
        load_per_s
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = memory(args.pid)?;
    let loads_after = loads_total(&client, &base).await?;
    let host_loads = loads_after - loads_before;
    ensure!(
        host_loads >= args.aggregates as u64,
        "the host counted {host_loads} loads for {} accounts: were they cached already?",
        args.aggregates
    );

    // Everything must still be cached: a random sample read again loads nothing.
    let resampled = args.aggregates.min(2_000);
    let mut rng = rand::rng();
    let sample: Vec<String> = (0..resampled)
        .map(|_| ids[rng.random_range(args.warmup..total)].clone())
        .collect();
    let sample_len = sample.len();
    get_all(
        &client,
        &base,
        Arc::new(sample),
        0..sample_len,
        args.concurrency,
        "re-read",
        args.pid,
    )
    .await?;
    let resample_loads = loads_total(&client, &base).await? - loads_after;

    let delta = |a: u64, b: u64| (a as f64 - b as f64) * 1024.0 / args.aggregates as f64;
    let sample_id = ids[args.warmup].clone();
    let sample_state = get_state(&client, &base, &sample_id).await?.state;
    let report = Report {
        aggregates: args.aggregates,
        warmup: args.warmup,
        concurrency: args.concurrency,
        insert_s,
        insert_per_s: total as f64 / insert_s,
        load_s,
        load_per_s,
        before,
        after,
        bytes_per_aggregate: delta(after.rss_kb, before.rss_kb),
        anon_bytes_per_aggregate: delta(after.rss_anon_kb, before.rss_anon_kb),
        host_loads,
        resampled,
        resample_loads,
        state_bytes,
        sample_id,
        sample_state,
    };
    println!(
        "after: RSS {} KiB (anon {} KiB), peak {} KiB",
        after.rss_kb, after.rss_anon_kb, after.hwm_kb
    );
    println!(
        "memory per cached aggregate: {:.0} bytes (anonymous: {:.0}); state JSON {}..{} bytes \
         (mean {:.1}); {} of {} re-read aggregates had to be loaded again",
        report.bytes_per_aggregate,
        report.anon_bytes_per_aggregate,
        state_bytes.min,
        state_bytes.max,
        state_bytes.mean,
        resample_loads,
        resampled
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    ensure!(
        resample_loads == 0,
        "{resample_loads} re-read aggregates were not cached any more: is MERIDIAN_CACHE_CAPACITY above {total}?"
    );
    Ok(())
}

/// Waits until the host at `base` owns every partition of its region.
async fn wait_for_ownership(
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> anyhow::Result<ClusterView> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = async {
            let response = client.get(format!("{base}/v1/cluster")).send().await?;
            anyhow::Ok(response.error_for_status()?.json::<ClusterView>().await?)
        }
        .await;
        match view {
            Ok(view)
                if view
                    .partition_owners
                    .iter()
                    .all(|o| o.as_deref() == Some(view.node_id.as_str())) =>
            {
                return Ok(view);
            }
            Ok(view) if Instant::now() >= deadline => bail!(
                "{base} owns {} of {} partitions after {timeout:?}; the benchmark needs a single host",
                view.partition_owners
                    .iter()
                    .filter(|o| o.as_deref() == Some(view.node_id.as_str()))
                    .count(),
                view.partitions
            ),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("reading {base}/v1/cluster")));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The rows the host wrote for one `Open`, used as the pattern for the bulk rows.
struct Template {
    event_type: String,
    payload: Value,
    metadata: Value,
    home_region: String,
}

impl Template {
    async fn from_host(
        client: &reqwest::Client,
        base: &str,
        pool: &PgPool,
        prefix: &str,
        cluster: &ClusterView,
    ) -> anyhow::Result<Self> {
        let id = format!("acc-{prefix}-template");
        let request = open_account_request(&id, "owner-template");
        let outcome = send(client, &format!("{base}{}", request.path), &request.body).await;
        ensure!(
            matches!(outcome, Outcome::Ok),
            "opening {id} through the host failed: {outcome:?}"
        );
        let row = sqlx::query(
            "SELECT e.event_type, e.payload, e.metadata, e.version, s.version AS stream_version,
                    s.home_region,
                    (SELECT count(*) FROM commands c
                      WHERE c.aggregate_id = e.aggregate_id AND c.aggregate_type = e.aggregate_type
                        AND c.first_version = 1 AND c.last_version = 1) AS commands
               FROM events e
               JOIN streams s USING (aggregate_type, aggregate_id)
              WHERE e.aggregate_type = $1 AND e.aggregate_id = $2",
        )
        .bind(BANK_ACCOUNT)
        .bind(&id)
        .fetch_one(pool)
        .await
        .with_context(|| format!("reading the rows the host wrote for {id}"))?;
        let template = Template {
            event_type: row.try_get("event_type")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            home_region: row.try_get("home_region")?,
        };
        let (version, stream_version, commands): (i64, i64, i64) = (
            row.try_get("version")?,
            row.try_get("stream_version")?,
            row.try_get("commands")?,
        );
        ensure!(
            version == 1 && stream_version == 1 && commands == 1,
            "the host wrote an Open as event version {version}, stream version \
             {stream_version}, {commands} command rows; expected 1, 1, 1"
        );
        ensure!(
            template.payload == serde_json::json!({ "owner": "owner-template" }),
            "unexpected payload of an Open: {}",
            template.payload
        );
        let meta = template
            .metadata
            .as_object()
            .context("the event metadata is not an object")?;
        for key in [
            "command_id",
            "causation_id",
            "origin_region",
            "plugin_version",
            "node_id",
            "partition",
            "partition_epoch",
        ] {
            ensure!(
                meta.contains_key(key),
                "the host's metadata has no {key}: {}",
                template.metadata
            );
        }
        ensure!(
            meta["origin_region"] == cluster.region.as_str()
                && template.home_region == cluster.region,
            "the host wrote origin_region {} and home_region {}, but its region is {}",
            meta["origin_region"],
            template.home_region,
            cluster.region
        );
        if let Some(partition) = meta["partition"].as_u64() {
            ensure!(
                meta["partition_epoch"].as_i64()
                    == cluster.partition_epochs.get(partition as usize).copied(),
                "the host wrote partition epoch {} for partition {partition}, but /v1/cluster says {:?}",
                meta["partition_epoch"],
                cluster.partition_epochs.get(partition as usize)
            );
        }
        Ok(template)
    }

    /// Inserts accounts `first..first + n` in one transaction: per account the stream row
    /// (version 1, home here), the command id and the `Opened` event, whose metadata is
    /// the template's with this account's command id, partition and lease epoch.
    async fn insert(
        &self,
        pool: &PgPool,
        prefix: &str,
        first: usize,
        n: usize,
        cluster: &ClusterView,
    ) -> anyhow::Result<()> {
        let fenced = !self.metadata["partition"].is_null();
        // The metadata fields that carry the command id (the correlation id defaults
        // to it when the caller sent none).
        let id_keys: Vec<&str> = self
            .metadata
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| **v == self.metadata["command_id"])
            .map(|(k, _)| k.as_str())
            .collect();
        let partitions: Vec<Option<i32>> = (first..first + n)
            .map(|i| {
                fenced.then(|| {
                    partition_of(BANK_ACCOUNT, &account_id(prefix, i), cluster.partitions) as i32
                })
            })
            .collect();
        // Event ids are UUID v7, as the host's (Uuid::now_v7): the millisecond clock in
        // the first 48 bits, version 7.
        sqlx::query(
            "WITH src AS MATERIALIZED (
                 SELECT g, 'acc-' || $1 || '-' || g AS id, gen_random_uuid() AS cid,
                        ($4::int[])[g - $2 + 1] AS part
                   FROM generate_series($2::bigint, $3::bigint) AS g
             ), s AS (
                 INSERT INTO streams (aggregate_type, aggregate_id, version, home_region)
                 SELECT $5, id, 1, $6 FROM src
             ), c AS (
                 INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_version, last_version)
                 SELECT cid, $5, id, 1, 1 FROM src
             )
             INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata)
             SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid,
                    $5, id, 1, $7, jsonb_build_object('owner', 'owner-' || g),
                    $8::jsonb
                    || (SELECT jsonb_object_agg(k, cid) FROM unnest($10::text[]) AS k)
                    || jsonb_build_object('partition', part,
                        'partition_epoch', CASE WHEN part IS NULL THEN NULL ELSE ($9::bigint[])[part + 1] END)
               FROM src ORDER BY g",
        )
        .bind(prefix)
        .bind(first as i64)
        .bind((first + n - 1) as i64)
        .bind(&partitions)
        .bind(BANK_ACCOUNT)
        .bind(&self.home_region)
        .bind(&self.event_type)
        .bind(&self.metadata)
        .bind(&cluster.partition_epochs)
        .bind(&id_keys)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Checks that a bulk row has exactly the template's shape.
    async fn check_bulk_row(&self, pool: &PgPool, prefix: &str, n: usize) -> anyhow::Result<()> {
        let id = account_id(prefix, n);
        let (payload, metadata): (Value, Value) = sqlx::query_as(
            "SELECT payload, metadata FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
        )
        .bind(BANK_ACCOUNT)
        .bind(&id)
        .fetch_one(pool)
        .await?;
        let keys = |v: &Value| -> Vec<String> {
            let mut keys: Vec<String> = v
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            keys
        };
        ensure!(
            keys(&metadata) == keys(&self.metadata) && keys(&payload) == keys(&self.payload),
            "bulk row {id} differs in shape from the host's: {payload} {metadata}"
        );
        for (key, value) in self.metadata.as_object().into_iter().flatten() {
            let same_as_command = *value == self.metadata["command_id"];
            let varies = matches!(key.as_str(), "partition" | "partition_epoch") || same_as_command;
            ensure!(
                varies || metadata[key] == *value,
                "bulk row {id}: metadata {key} is {}, the host wrote {value}",
                metadata[key]
            );
            ensure!(
                !same_as_command || metadata[key] == metadata["command_id"],
                "bulk row {id}: metadata {key} should be its command id: {metadata}"
            );
        }
        Ok(())
    }
}

/// GETs `ids[range]` with at most `concurrency` requests in flight, checking each state;
/// prints progress every 5 s. Returns the elapsed seconds and the state sizes.
async fn get_all(
    client: &reqwest::Client,
    base: &str,
    ids: Arc<Vec<String>>,
    range: std::ops::Range<usize>,
    concurrency: usize,
    what: &'static str,
    pid: u32,
) -> anyhow::Result<(f64, Sizes)> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(range.len()).max(1) {
        let (client, base, ids, next, done) = (
            client.clone(),
            base.to_owned(),
            ids.clone(),
            next.clone(),
            done.clone(),
        );
        let end = range.end;
        tasks.spawn(async move {
            let mut sizes = (usize::MAX, 0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return anyhow::Ok(sizes);
                }
                let view = get_state(&client, &base, &ids[i]).await?;
                ensure!(
                    view.version == 1,
                    "{} is at version {}, expected 1",
                    ids[i],
                    view.version
                );
                let bytes = serde_json::to_string(&view.state)?.len();
                sizes = (sizes.0.min(bytes), sizes.1.max(bytes), sizes.2 + bytes);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let total = range.len();
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    let mut sizes = (usize::MAX, 0usize, 0usize);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(result) => {
                    let (min, max, sum) = result.context("a GET task panicked")??;
                    sizes = (sizes.0.min(min), sizes.1.max(max), sizes.2 + sum);
                }
                None => break,
            },
            _ = ticker.tick() => {
                let n = done.load(Ordering::Relaxed);
                let rss = memory(pid).map(|m| m.rss_kb / 1024).unwrap_or(0);
                println!(
                    "{what}: {n} / {total} ({:.0}/s), host RSS {rss} MiB",
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sizes = Sizes {
        min: if total == 0 { 0 } else { sizes.0 },
        max: sizes.1,
        mean: sizes.2 as f64 / total.max(1) as f64,
    };
    Ok((elapsed, sizes))
}

async fn get_state(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<StateView> {
    let url = format!("{base}{}", aggregate_path(BANK_ACCOUNT, id));
    let mut attempt = 0;
    loop {
        let result = async {
            let response = client.get(&url).send().await?;
            anyhow::Ok(response.error_for_status()?.json::<StateView>().await?)
        }
        .await;
        match result {
            Ok(view) => return Ok(view),
            Err(error) if attempt >= 3 => return Err(error.context(format!("GET {url}"))),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The host's `meridian_aggregate_loads_total` counter.
async fn loads_total(client: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()
        .context("reading /metrics (the benchmark needs the host's metrics)")?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| {
            line.strip_prefix("meridian_aggregate_loads_total")
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
