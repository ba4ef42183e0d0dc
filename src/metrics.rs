//! The figures the components keep for `/metrics`, and the Prometheus
//! text format they are written in.
//!
//! This module owns two small building blocks — [`Histogram`] (lock-free,
//! fixed buckets) and [`Counters`] (counts by label values) — and
//! [`Exposition`], a writer of the text format (version 0.0.4). Each
//! component keeps its own figures in these types; the admin listener
//! reads them and renders the page. Nothing here does I/O or knows about
//! any component.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket bounds in seconds for latencies from sub-millisecond fsyncs to
/// a second-long stall.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of durations with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative: `buckets[i]` counts observations in
    /// `(bounds[i-1], bounds[i]]`; the last one those above every bound.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

/// A histogram as read at one moment, cumulative like the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations ≤ bound)`, then `+Inf` with the count.
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = self.bounds.partition_point(|&bound| bound < seconds);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(self.bounds.len() + 1);
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            running += bucket.load(Ordering::Relaxed);
            cumulative.push((*bound, running));
        }
        running += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            count: running,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Counts by a key of label values (e.g. `(route, reason)`).
#[derive(Debug)]
pub struct Counters<K: Ord + Clone> {
    counts: Mutex<BTreeMap<K, u64>>,
}

impl<K: Ord + Clone> Default for Counters<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<K: Ord + Clone> Counters<K> {
    pub fn add(&self, key: K) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<K, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A page in the Prometheus text format, written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the family just started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        write_labels(&mut self.text, labels);
        let _ = writeln!(self.text, " {}", format_value(value));
        self
    }

    /// A whole histogram family with one series (no labels).
    pub fn histogram(&mut self, name: &str, help: &str, snapshot: &HistogramSnapshot) -> &mut Self {
        self.family(name, help, Kind::Histogram);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &snapshot.cumulative {
            let le = format_value(*bound);
            self.sample(&bucket, &[("le", &le)], *count as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], snapshot.count as f64);
        self.sample(&format!("{name}_sum"), &[], snapshot.sum_seconds);
        self.sample(&format!("{name}_count"), &[], snapshot.count as f64)
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn write_labels(text: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    text.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(text, "{name}=\"");
        for c in value.chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '"' => text.push_str("\\\""),
                '\n' => text.push_str("\\n"),
                c => text.push(c),
            }
        }
        text.push('"');
    }
    text.push('}');
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket_cumulatively() {
        let histogram = Histogram::new(&[0.001, 0.01, 0.1]);
        for millis in [0, 1, 5, 10, 50, 2000] {
            histogram.observe(Duration::from_millis(millis));
        }
        let snapshot = histogram.snapshot();
        // ≤ 1 ms: 0 and 1; ≤ 10 ms: + 5 and 10; ≤ 100 ms: + 50; +Inf: + 2 s.
        assert_eq!(snapshot.cumulative, vec![(0.001, 2), (0.01, 4), (0.1, 5)]);
        assert_eq!(snapshot.count, 6);
        assert!((snapshot.sum_seconds - 2.066).abs() < 1e-9);
    }

    #[test]
    fn the_text_format_escapes_label_values_and_writes_histograms() {
        let histogram = Histogram::new(&[0.5]);
        histogram.observe(Duration::from_millis(100));
        let mut page = Exposition::new();
        page.family("relay_things_total", "Things.\nMany.", Kind::Counter)
            .sample("relay_things_total", &[("reason", "a \"b\"\\c\nd")], 3.0)
            .histogram("relay_latency_seconds", "Latency.", &histogram.snapshot());
        assert_eq!(
            page.finish(),
            "# HELP relay_things_total Things.\\nMany.\n\
             # TYPE relay_things_total counter\n\
             relay_things_total{reason=\"a \\\"b\\\"\\\\c\\nd\"} 3\n\
             # HELP relay_latency_seconds Latency.\n\
             # TYPE relay_latency_seconds histogram\n\
             relay_latency_seconds_bucket{le=\"0.5\"} 1\n\
             relay_latency_seconds_bucket{le=\"+Inf\"} 1\n\
             relay_latency_seconds_sum 0.1\n\
             relay_latency_seconds_count 1\n"
        );
    }

    #[test]
    fn counters_count_per_key() {
        let counters = Counters::default();
        counters.add(("notify", "unauthorized"));
        counters.add(("notify", "unauthorized"));
        counters.add(("webhook", "malformed"));
        let snapshot = counters.snapshot();
        assert_eq!(snapshot[&("notify", "unauthorized")], 2);
        assert_eq!(snapshot[&("webhook", "malformed")], 1);
    }
}
