//! Latency histograms and the results of one measured run.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram can hold, in microseconds (five minutes); anything
/// slower is clamped to it, which is far beyond any request timeout we use.
const MAX_LATENCY_US: u64 = 300_000_000;

/// A latency histogram in microseconds, with 3 significant digits (0.1% error).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// Records one latency; values outside the histogram's range are clamped, never lost,
/// so counts always match the number of requests.
pub fn record_us(histogram: &mut Histogram<u64>, micros: u64) {
    histogram.saturating_record(micros.clamp(1, MAX_LATENCY_US));
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of recorded latencies.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest recorded.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microsecond latencies; all zeros when it is empty.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self {
                count: 0,
                p50_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// What a request's response means for the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command was executed (2xx).
    Ok,
    /// The command was executed and refused by the aggregate's rules (422), e.g. a
    /// withdrawal over the balance. It was processed in full, so it counts as completed.
    Rejected,
    /// Anything else: conflicts, unavailability, server errors, transport errors.
    Failed,
}

impl Outcome {
    /// Classifies an HTTP status code.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 => Outcome::Ok,
            422 => Outcome::Rejected,
            _ => Outcome::Failed,
        }
    }

    /// Whether the command was processed (accepted or rejected by the aggregate).
    pub fn is_completed(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Rejected)
    }
}

/// Counts of request outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Accepted commands.
    pub ok: u64,
    /// Commands the aggregate refused (still completed).
    pub rejected: u64,
    /// Failed requests.
    pub failed: u64,
}

impl Counts {
    /// Adds one outcome.
    pub fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Failed => self.failed += 1,
        }
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &Counts) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.failed += other.failed;
    }

    /// Commands processed: accepted plus rejected.
    pub fn completed(&self) -> u64 {
        self.ok + self.rejected
    }
}

/// The measured result of one concurrency level; the JSON output is an array of these.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelResult {
    /// Number of concurrent clients.
    pub concurrency: usize,
    /// Completed commands (accepted + rejected) per second.
    pub throughput: f64,
    /// Median latency of completed commands.
    pub p50_ms: f64,
    /// 99th percentile latency of completed commands.
    pub p99_ms: f64,
    /// 99.9th percentile latency of completed commands.
    pub p999_ms: f64,
    /// Accepted commands.
    pub ok: u64,
    /// Rejected commands (422).
    pub rejected: u64,
    /// Failed requests.
    pub failed: u64,
    /// Length of the measured window, in seconds (warm-up excluded).
    pub duration_s: f64,
}

impl LevelResult {
    /// Builds a level's result from its merged counts and latency histogram.
    pub fn new(
        concurrency: usize,
        counts: Counts,
        latencies: &Histogram<u64>,
        duration_s: f64,
    ) -> Self {
        let summary = LatencySummary::from_histogram(latencies);
        let throughput = if duration_s > 0.0 {
            counts.completed() as f64 / duration_s
        } else {
            0.0
        };
        Self {
            concurrency,
            throughput,
            p50_ms: summary.p50_ms,
            p99_ms: summary.p99_ms,
            p999_ms: summary.p999_ms,
            ok: counts.ok,
            rejected: counts.rejected,
            failed: counts.failed,
            duration_s,
        }
    }

    /// The header line of the results table.
    pub fn table_header() -> String {
        format!(
            "{:>11} {:>12} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
            "concurrency", "commands/s", "p50 ms", "p99 ms", "p99.9 ms", "ok", "rejected", "failed"
        )
    }

    /// This result as one line of the results table.
    pub fn table_row(&self) -> String {
        format!(
            "{:>11} {:>12.1} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>10} {:>8}",
            self.concurrency,
            self.throughput,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.ok,
            self.rejected,
            self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) -> bool {
        // The histogram keeps 3 significant digits.
        (actual - expected).abs() <= expected * 0.001 + 1e-9
    }

    #[test]
    fn summary_of_uniform_latencies() {
        let mut h = new_histogram();
        for ms in 1..=1000u64 {
            record_us(&mut h, ms * 1_000);
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1000);
        assert!(close(s.p50_ms, 500.0), "p50 {}", s.p50_ms);
        assert!(close(s.p99_ms, 990.0), "p99 {}", s.p99_ms);
        assert!(close(s.p999_ms, 999.0), "p999 {}", s.p999_ms);
        assert!(close(s.max_ms, 1000.0), "max {}", s.max_ms);
    }

    #[test]
    fn summary_sees_the_tail() {
        let mut h = new_histogram();
        // 0.2% of requests are slow: invisible at p99, dominant at p99.9.
        for _ in 0..9_980 {
            record_us(&mut h, 2_000);
        }
        for _ in 0..20 {
            record_us(&mut h, 250_000);
        }
        let s = LatencySummary::from_histogram(&h);
        assert!(close(s.p50_ms, 2.0));
        assert!(close(s.p99_ms, 2.0));
        assert!(close(s.p999_ms, 250.0), "p999 {}", s.p999_ms);
        assert!(close(s.max_ms, 250.0));
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        let s = LatencySummary::from_histogram(&new_histogram());
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_ms, 0.0);
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_dropped() {
        let mut h = new_histogram();
        record_us(&mut h, 0);
        record_us(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn status_classification() {
        assert_eq!(Outcome::from_status(200), Outcome::Ok);
        assert_eq!(Outcome::from_status(201), Outcome::Ok);
        assert_eq!(Outcome::from_status(422), Outcome::Rejected);
        assert_eq!(Outcome::from_status(409), Outcome::Failed);
        assert_eq!(Outcome::from_status(503), Outcome::Failed);
        assert_eq!(Outcome::from_status(500), Outcome::Failed);
        assert_eq!(Outcome::from_status(404), Outcome::Failed);
        assert!(Outcome::Rejected.is_completed());
        assert!(!Outcome::Failed.is_completed());
    }

    #[test]
    fn throughput_counts_completed_commands_only() {
        let mut h = new_histogram();
        record_us(&mut h, 1_000);
        let counts = Counts {
            ok: 70,
            rejected: 30,
            failed: 50,
        };
        let r = LevelResult::new(16, counts, &h, 2.0);
        assert_eq!(r.throughput, 50.0);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "concurrency",
            "throughput",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "ok",
            "rejected",
            "failed",
            "duration_s",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
    }
}
