//! A closed-loop HTTP load generator: N clients, each sending one request at a time and
//! the next as soon as the previous one is answered.
//!
//! Nothing here is specific to Meridian or to the bank-account mix: any service that
//! takes JSON POSTs and answers 2xx / 422 / other can be measured with a [`Workload`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::StdRng;
use reqwest::Client;
use serde_json::Value;
use tokio::time::{Instant, sleep, sleep_until};

use crate::stats::{Counts, LevelResult, Outcome, new_histogram, record_us};
use crate::workload::{Request, Workload};

/// Pause after a transport error (refused connection, reset), so a dead target does
/// not turn the clients into a busy loop competing with the service for the CPU.
const TRANSPORT_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// The base URLs requests are spread over, e.g. one per node of a cluster.
#[derive(Debug, Clone)]
pub struct Targets {
    base_urls: Vec<String>,
}

impl Targets {
    /// Targets from base URLs such as `http://127.0.0.1:8080`; a trailing `/` is ignored.
    pub fn new<I, S>(urls: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut base_urls = Vec::new();
        for url in urls {
            let url = url.as_ref().trim().trim_end_matches('/');
            let parsed =
                reqwest::Url::parse(url).with_context(|| format!("invalid URL {url:?}"))?;
            if parsed.scheme() != "http" {
                bail!("unsupported URL {url:?}: only plain http is supported");
            }
            base_urls.push(url.to_owned());
        }
        if base_urls.is_empty() {
            bail!("at least one target URL is needed");
        }
        Ok(Self { base_urls })
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.base_urls.len()
    }

    /// Always false: construction requires a target.
    pub fn is_empty(&self) -> bool {
        self.base_urls.is_empty()
    }

    /// The full URL of `path` on the target for request number `n`. Consecutive numbers
    /// go to consecutive targets, which spreads requests round-robin.
    pub fn url(&self, n: usize, path: &str) -> String {
        let base = &self.base_urls[n % self.base_urls.len()];
        format!("{base}{path}")
    }
}

/// A client for up to `max_concurrency` simultaneous requests per target.
///
/// One client is shared by every task so connections are pooled and kept alive
/// (HTTP/1.1); the idle pool must hold one connection per task, or connections would be
/// closed and reopened between requests and the benchmark would measure TCP setup.
pub fn build_client(max_concurrency: usize, timeout: Duration) -> reqwest::Result<Client> {
    Client::builder()
        .http1_only()
        .pool_max_idle_per_host(max_concurrency.max(1) + 16)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .build()
}

/// Sends one POST and reads the whole response, which returns the connection to the pool.
pub async fn send(client: &Client, url: &str, body: &Value) -> Outcome {
    match client.post(url).json(body).send().await {
        Ok(response) => {
            let outcome = Outcome::from_status(response.status().as_u16());
            match response.bytes().await {
                Ok(_) => outcome,
                Err(_) => Outcome::Failed,
            }
        }
        Err(_) => Outcome::Failed,
    }
}

/// Sends every request once, at most `concurrency` at a time, retrying failures (with
/// the same body, hence the same command id, so a retry is never executed twice) up to
/// `retries` more times. Returns each request's final outcome, counted.
pub async fn send_all(
    client: &Client,
    targets: &Targets,
    requests: Vec<Request>,
    concurrency: usize,
    retries: u32,
) -> Counts {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, targets) = (client.clone(), targets.clone());
        let (requests, next) = (requests.clone(), next.clone());
        tasks.spawn(async move {
            let mut counts = Counts::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let mut attempt = 0;
                let outcome = loop {
                    let url = targets.url(i + attempt as usize, &request.path);
                    let outcome = send(&client, &url, &request.body).await;
                    if outcome.is_completed() || attempt >= retries {
                        break outcome;
                    }
                    attempt += 1;
                    sleep(Duration::from_millis(50) * attempt).await;
                };
                counts.add(outcome);
            }
            counts
        });
    }
    let mut total = Counts::default();
    while let Some(counts) = tasks.join_next().await {
        total.merge(&counts.expect("send_all task panicked"));
    }
    total
}

/// One concurrency level of a run.
#[derive(Debug, Clone, Copy)]
pub struct LevelConfig {
    /// Number of concurrent clients.
    pub concurrency: usize,
    /// Time spent sending before measuring: fills connection pools and caches.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Seed for the clients' random choices.
    pub seed: u64,
}

/// The seed of client `task` at a level, distinct per client and per level so clients
/// don't send the same sequence in lockstep.
pub fn task_seed(seed: u64, concurrency: usize, task: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((concurrency as u64) << 32) ^ task as u64
}

/// Runs one level: `concurrency` clients send requests from `workload` for
/// warm-up + duration. Only requests *started* inside the measured window are counted,
/// and in-flight requests are abandoned when it closes, so the level ends on time even
/// when the service stalls.
pub async fn run_level<W: Workload>(
    client: &Client,
    targets: &Targets,
    workload: Arc<W>,
    config: LevelConfig,
) -> LevelResult {
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..config.concurrency {
        let (client, targets, workload) = (client.clone(), targets.clone(), workload.clone());
        let mut rng = StdRng::seed_from_u64(task_seed(config.seed, config.concurrency, task));
        tasks.spawn(async move {
            let mut latencies = new_histogram();
            let mut counts = Counts::default();
            // Start each client on a different target so the first round is spread too.
            let mut n = task;
            loop {
                let request = workload.next_request(&mut rng);
                let url = targets.url(n, &request.path);
                n = n.wrapping_add(1);
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = tokio::select! {
                    outcome = send(&client, &url, &request.body) => outcome,
                    _ = sleep_until(end) => break,
                };
                let elapsed = sent.elapsed();
                if sent >= measure_from {
                    counts.add(outcome);
                    // Latency percentiles describe completed commands; failures are
                    // counted, but a fast 503 must not make the service look quicker.
                    if outcome.is_completed() {
                        record_us(&mut latencies, elapsed.as_micros() as u64);
                    }
                }
                if outcome == Outcome::Failed && elapsed < TRANSPORT_ERROR_PAUSE {
                    sleep(TRANSPORT_ERROR_PAUSE).await;
                }
            }
            (counts, latencies)
        });
    }

    let mut counts = Counts::default();
    let mut latencies: Histogram<u64> = new_histogram();
    while let Some(joined) = tasks.join_next().await {
        let (task_counts, task_latencies) = joined.expect("load client task panicked");
        counts.merge(&task_counts);
        latencies
            .add(&task_latencies)
            .expect("histograms share their bounds");
    }
    LevelResult::new(
        config.concurrency,
        counts,
        &latencies,
        config.duration.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_robin() {
        let t = Targets::new(["http://a:1/", "http://b:2"]).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.url(0, "/x"), "http://a:1/x");
        assert_eq!(t.url(1, "/x"), "http://b:2/x");
        assert_eq!(t.url(2, "/x"), "http://a:1/x");
    }

    #[test]
    fn targets_are_validated() {
        assert!(Targets::new(Vec::<String>::new()).is_err());
        assert!(Targets::new(["not a url"]).is_err());
        assert!(Targets::new(["https://a"]).is_err());
    }

    #[test]
    fn task_seeds_differ_per_task_and_level() {
        assert_ne!(task_seed(1, 16, 0), task_seed(1, 16, 1));
        assert_ne!(task_seed(1, 16, 0), task_seed(1, 64, 0));
        assert_eq!(task_seed(1, 16, 3), task_seed(1, 16, 3));
    }

    /// A minimal keep-alive HTTP/1.1 server standing in for a service: 422 for
    /// withdrawals, 200 otherwise. Returns its base URL and a count of connections.
    async fn mock_service() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_ascii_lowercase();
                            if line.is_empty() {
                                break;
                            }
                            if let Some(value) = line.strip_prefix("content-length:") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let status = if String::from_utf8_lossy(&body).contains("Withdraw") {
                            "422 Unprocessable Entity"
                        } else {
                            "200 OK"
                        };
                        let response =
                            format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\n{{}}");
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, connections)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_level_measures_a_service() {
        let (url, connections) = mock_service().await;
        let targets = Targets::new([&url]).unwrap();
        let client = build_client(4, Duration::from_secs(5)).unwrap();
        let workload = Arc::new(crate::workload::BankAccountMix::new("t", 10));
        let config = LevelConfig {
            concurrency: 4,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(400),
            seed: 1,
        };
        let started = std::time::Instant::now();
        let result = run_level(&client, &targets, workload, config).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the level ends on time"
        );

        assert_eq!(result.concurrency, 4);
        assert_eq!(result.failed, 0);
        let completed = result.ok + result.rejected;
        assert!(completed > 50, "completed {completed}");
        let rejected_share = result.rejected as f64 / completed as f64;
        assert!(
            (0.1..0.5).contains(&rejected_share),
            "rejected share {rejected_share}"
        );
        assert!(result.p50_ms > 0.0 && result.p50_ms <= result.p99_ms);
        assert!((result.throughput - completed as f64 / 0.4).abs() < 1e-6);
        // Keep-alive: connections are reused rather than opened per request. A few more
        // than one per client is normal: a connection goes back to the pool a moment after
        // its response is read, and a request that finds the pool empty opens another.
        let opened = connections.load(Ordering::Relaxed);
        assert!(
            opened <= 16,
            "{opened} connections for {completed} requests"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_all_opens_everything_and_counts_failures() {
        let (url, _) = mock_service().await;
        let client = build_client(8, Duration::from_secs(5)).unwrap();
        let targets = Targets::new([&url]).unwrap();
        let requests = crate::workload::open_account_requests("t", 50);
        let counts = send_all(&client, &targets, requests, 8, 0).await;
        assert_eq!((counts.ok, counts.rejected, counts.failed), (50, 0, 0));

        // Nothing listens on a port we just closed: every request fails, after retries.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let targets = Targets::new([dead]).unwrap();
        let requests = crate::workload::open_account_requests("t", 3);
        let counts = send_all(&client, &targets, requests, 2, 1).await;
        assert_eq!((counts.ok, counts.failed), (0, 3));
    }
}
