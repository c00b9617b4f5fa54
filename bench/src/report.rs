//! Latency statistics of a benchmark run, printed the way etcd's
//! `benchmark` tool prints them (summary, histogram, percentiles, errors),
//! or as JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// The percentiles etcd's report prints.
const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// Results of one workload: latencies of the calls that succeeded (in
/// seconds) and a count per distinct error.
#[derive(Debug, Default, Clone)]
pub struct Results {
    pub latencies: Vec<f64>,
    pub errors: BTreeMap<String, u64>,
}

impl Results {
    pub fn record(&mut self, outcome: Result<Duration, String>) {
        match outcome {
            Ok(d) => self.latencies.push(d.as_secs_f64()),
            Err(e) => *self.errors.entry(e).or_default() += 1,
        }
    }

    pub fn merge(&mut self, other: Results) {
        self.latencies.extend(other.latencies);
        for (e, n) in other.errors {
            *self.errors.entry(e).or_default() += n;
        }
    }
}

/// Summary statistics over a run that took `total` wall time.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub op: String,
    pub total_secs: f64,
    pub requests: usize,
    pub requests_per_sec: f64,
    pub fastest_secs: f64,
    pub slowest_secs: f64,
    pub average_secs: f64,
    pub stddev_secs: f64,
    /// (percentile, seconds)
    pub percentiles: Vec<(f64, f64)>,
    pub errors: BTreeMap<String, u64>,
    #[serde(skip)]
    sorted: Vec<f64>,
}

impl Stats {
    pub fn new(op: &str, mut results: Results, total: Duration) -> Stats {
        let lats = &mut results.latencies;
        lats.sort_by(f64::total_cmp);
        let n = lats.len();
        let average = if n == 0 {
            0.0
        } else {
            lats.iter().sum::<f64>() / n as f64
        };
        let variance = if n == 0 {
            0.0
        } else {
            lats.iter().map(|l| (l - average).powi(2)).sum::<f64>() / n as f64
        };
        let secs = total.as_secs_f64();
        Stats {
            op: op.to_string(),
            total_secs: secs,
            requests: n,
            requests_per_sec: if secs > 0.0 { n as f64 / secs } else { 0.0 },
            fastest_secs: lats.first().copied().unwrap_or(0.0),
            slowest_secs: lats.last().copied().unwrap_or(0.0),
            average_secs: average,
            stddev_secs: variance.sqrt(),
            percentiles: PERCENTILES
                .iter()
                .map(|&p| (p, percentile(lats, p)))
                .collect(),
            errors: std::mem::take(&mut results.errors),
            sorted: std::mem::take(lats),
        }
    }

    /// The latency at percentile `p` (0–100).
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.sorted, p)
    }

    /// etcd's text report; `precise` prints full floating point precision.
    pub fn text(&self, precise: bool) -> String {
        let num = |v: f64| {
            if precise {
                format!("{v}")
            } else {
                format!("{v:4.4}")
            }
        };
        let mut s = String::new();
        if self.requests > 0 {
            let _ = writeln!(s, "\nSummary:");
            let _ = writeln!(s, "  Total:\t{} secs.", num(self.total_secs));
            let _ = writeln!(s, "  Slowest:\t{} secs.", num(self.slowest_secs));
            let _ = writeln!(s, "  Fastest:\t{} secs.", num(self.fastest_secs));
            let _ = writeln!(s, "  Average:\t{} secs.", num(self.average_secs));
            let _ = writeln!(s, "  Stddev:\t{} secs.", num(self.stddev_secs));
            let _ = writeln!(s, "  Requests/sec:\t{}", num(self.requests_per_sec));
            s += &self.histogram(precise);
            let _ = writeln!(s, "\nLatency distribution:");
            for (p, v) in &self.percentiles {
                if *v > 0.0 {
                    let _ = writeln!(s, "  {p}% in {} secs.", num(*v));
                }
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "\nError distribution:");
            for (e, n) in &self.errors {
                let _ = writeln!(s, "  [{n}]\t{e}");
            }
        }
        s
    }

    /// Ten equal-width buckets between the fastest and slowest call.
    fn histogram(&self, precise: bool) -> String {
        const BUCKETS: usize = 10;
        let (lo, hi) = (self.fastest_secs, self.slowest_secs);
        let width = (hi - lo) / BUCKETS as f64;
        let bounds: Vec<f64> = (0..=BUCKETS)
            .map(|i| {
                if i == BUCKETS {
                    hi
                } else {
                    lo + width * i as f64
                }
            })
            .collect();
        let mut counts = vec![0usize; bounds.len()];
        let mut b = 0;
        for &l in &self.sorted {
            while l > bounds[b] && b < bounds.len() - 1 {
                b += 1;
            }
            counts[b] += 1;
        }
        let max = counts.iter().copied().max().unwrap_or(0).max(1);
        let mut s = String::from("\nResponse time histogram:\n");
        for (bound, count) in bounds.iter().zip(&counts) {
            let bar = "∎".repeat(count * 40 / max);
            let bound = if precise {
                format!("{bound}")
            } else {
                format!("{bound:4.4}")
            };
            let _ = writeln!(s, "  {bound} [{count}]\t|{bar}");
        }
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// etcd's percentile: the value at rank ceil(p·(n+1)/100), clamped.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let rank = (p * (n as f64 + 1.0) / 100.0).ceil() as usize;
    sorted[rank.saturating_sub(1).min(n - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(lats_ms: &[u64]) -> Stats {
        let mut r = Results::default();
        for &ms in lats_ms {
            r.record(Ok(Duration::from_millis(ms)));
        }
        r.record(Err("etcdserver: request timed out".into()));
        Stats::new("put", r, Duration::from_secs(2))
    }

    #[test]
    fn summary_percentiles_and_errors() {
        let s = stats(&(1..=100).collect::<Vec<_>>());
        assert_eq!(s.requests, 100);
        assert!((s.requests_per_sec - 50.0).abs() < 1e-9);
        assert!((s.fastest_secs - 0.001).abs() < 1e-12);
        assert!((s.slowest_secs - 0.1).abs() < 1e-12);
        assert!((s.average_secs - 0.0505).abs() < 1e-9);
        assert!((s.percentile(50.0) - 0.051).abs() < 1e-12);
        assert!((s.percentile(99.0) - 0.1).abs() < 1e-12);
        assert_eq!(s.errors["etcdserver: request timed out"], 1);
        let text = s.text(false);
        assert!(text.contains("Requests/sec:\t50.0000"), "{text}");
        assert!(text.contains("  99% in 0.1000 secs."), "{text}");
        assert!(
            text.contains("  [1]\tetcdserver: request timed out"),
            "{text}"
        );
    }

    #[test]
    fn histogram_counts_every_call_once() {
        let s = stats(&[1, 1, 2, 5, 9, 10]);
        let hist = s.histogram(false);
        let total: usize = hist
            .lines()
            .filter_map(|l| {
                l.split('[')
                    .nth(1)?
                    .split(']')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        assert_eq!(total, 6, "{hist}");
    }

    #[test]
    fn json_has_the_numbers() {
        let v: serde_json::Value = serde_json::from_str(&stats(&[3]).json()).unwrap();
        assert_eq!(v["op"], "put");
        assert_eq!(v["requests"], 1);
        assert_eq!(v["errors"]["etcdserver: request timed out"], 1);
    }
}
