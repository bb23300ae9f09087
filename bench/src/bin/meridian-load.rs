//! `meridian-load`: measures command throughput and latency of a Meridian cluster (or
//! any service with the same command endpoint) at several concurrency levels.
//!
//! ```text
//! meridian-load --url http://127.0.0.1:8080 --accounts 10000 \
//!     --concurrency 1,16,64,256 --duration 10s --warmup 2s --json out.json
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meridian_bench::cli::{RunArgs, parse_duration};
use meridian_bench::load::{LevelConfig, Targets, build_client, run_level, send_all};
use meridian_bench::stats::LevelResult;
use meridian_bench::workload::{BankAccountMix, account_id, open_account_requests};

/// Closed-loop load generator for the bank-account command mix.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of a node; repeat for several nodes (requests go round-robin).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    urls: Vec<String>,

    /// Number of accounts opened before measuring and written to during it.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,

    /// Concurrency levels to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,

    /// Measured time per level.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Unmeasured time per level before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,

    #[command(flatten)]
    run: RunArgs,

    /// Concurrent requests while opening accounts.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,

    /// Don't open accounts: reuse those of an earlier run with the same --prefix.
    #[arg(long, requires = "prefix")]
    skip_setup: bool,

    /// Per-request timeout; a request that takes longer counts as failed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.accounts == 0 {
        bail!("--accounts must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs one or more levels, each at least 1");
    }
    let prefix = args.run.prefix().map_err(anyhow::Error::msg)?;
    let targets = Targets::new(&args.urls)?;
    let max_concurrency = args
        .concurrency
        .iter()
        .copied()
        .chain([args.setup_concurrency])
        .max()
        .unwrap_or(1);
    let client = build_client(max_concurrency, args.timeout).context("building the HTTP client")?;

    println!(
        "meridian-load: {} target(s), {} accounts ({}..{}), levels {:?}, warm-up {:?}, measure {:?}, seed {}",
        targets.len(),
        args.accounts,
        account_id(&prefix, 0),
        account_id(&prefix, args.accounts - 1),
        args.concurrency,
        args.warmup,
        args.duration,
        args.run.seed,
    );

    if !args.skip_setup {
        let started = Instant::now();
        let requests = open_account_requests(&prefix, args.accounts);
        let counts = send_all(&client, &targets, requests, args.setup_concurrency, 3).await;
        println!(
            "setup: opened {} accounts in {:.1}s ({} already existed, {} failed)",
            counts.ok,
            started.elapsed().as_secs_f64(),
            counts.rejected,
            counts.failed
        );
        if counts.failed > 0 {
            bail!(
                "{} of {} accounts could not be opened; is the service up at {:?}?",
                counts.failed,
                args.accounts,
                args.urls
            );
        }
    }

    let workload = Arc::new(BankAccountMix::new(&prefix, args.accounts));
    let mut results: Vec<LevelResult> = Vec::new();
    println!("\n{}", LevelResult::table_header());
    for &concurrency in &args.concurrency {
        let config = LevelConfig {
            concurrency,
            warmup: args.warmup,
            duration: args.duration,
            seed: args.run.seed,
        };
        let result = run_level(&client, &targets, workload.clone(), config).await;
        println!("{}", result.table_row());
        results.push(result);
        if let Some(path) = &args.run.json {
            let json = serde_json::to_vec_pretty(&results)?;
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        }
    }

    if let Some(level) = results.iter().find(|r| r.ok + r.rejected == 0) {
        bail!(
            "no command completed at concurrency {} ({} failed)",
            level.concurrency,
            level.failed
        );
    }
    Ok(())
}
