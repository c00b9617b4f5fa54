//! A latency histogram rendered in Prometheus' text format, with fixed
//! bucket bounds as Prometheus' Go client makes them (so the series read
//! like etcd's: same names, same `le` labels). Lock-free: recording is two
//! atomic adds, the bucket's count and the sum.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct Histogram {
    /// Upper bounds of the buckets in seconds, ascending; `+Inf` is implied.
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// `count` buckets from `start` seconds, each `factor` times the one
    /// before (Go's `prometheus.ExponentialBuckets`).
    pub fn exponential(start: f64, factor: f64, count: usize) -> Histogram {
        let bounds: Vec<f64> = std::iter::successors(Some(start), |b| Some(b * factor))
            .take(count)
            .collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds,
            counts,
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// etcd's disk latency buckets: 1 ms to 8.192 s
    /// (`etcd_disk_wal_fsync_duration_seconds`,
    /// `etcd_disk_backend_commit_duration_seconds`).
    pub fn disk_latency() -> Histogram {
        Histogram::exponential(0.001, 2.0, 14)
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.partition_point(|&le| le < seconds);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Appends the series `name` (with `# HELP` and `# TYPE`) to `out`.
    /// Concurrent observations may land between the bucket reads, so the
    /// count is taken as the `+Inf` bucket: the exposition stays
    /// self-consistent (cumulative, `+Inf` equal to `_count`).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let mut cumulative = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_print_like_prometheus_go_client() {
        let h = Histogram::disk_latency();
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        let les: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(
            les,
            [
                "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
                "0.512", "1.024", "2.048", "4.096", "8.192", "+Inf"
            ]
        );
    }

    #[test]
    fn observations_land_in_cumulative_buckets_with_sum_and_count() {
        let h = Histogram::disk_latency();
        h.observe(Duration::from_micros(500)); // le 0.001
        h.observe(Duration::from_millis(1)); // le 0.001 (bounds are inclusive)
        h.observe(Duration::from_millis(3)); // le 0.004
        h.observe(Duration::from_secs(20)); // +Inf only
        let mut out = String::new();
        h.render(&mut out, "lat", "Latency.");
        assert!(out.starts_with("# HELP lat Latency.\n# TYPE lat histogram\n"));
        for want in [
            "lat_bucket{le=\"0.001\"} 2\n",
            "lat_bucket{le=\"0.002\"} 2\n",
            "lat_bucket{le=\"0.004\"} 3\n",
            "lat_bucket{le=\"8.192\"} 3\n",
            "lat_bucket{le=\"+Inf\"} 4\n",
            "lat_sum 20.0045\n",
            "lat_count 4\n",
        ] {
            assert!(out.contains(want), "{want:?} not in\n{out}");
        }
        assert_eq!(h.count(), 4);
    }
}
