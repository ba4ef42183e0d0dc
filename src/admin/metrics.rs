//! `/metrics`: the snapshot and the components' counters in the
//! Prometheus text format. Pure: the caller reads the figures.

use std::collections::BTreeMap;

use crate::health::{Light, Problem, Snapshot};
use crate::metrics::{Exposition, HistogramSnapshot, Kind};

/// The counters kept since start, besides the snapshot.
#[derive(Debug, Clone)]
pub struct Counters {
    /// `(route, outcome)`.
    pub accepted: BTreeMap<(&'static str, &'static str), u64>,
    /// `(route, reason)`.
    pub refused: BTreeMap<(&'static str, &'static str), u64>,
    /// `(kind, outcome)`.
    pub attempts: BTreeMap<(String, &'static str), u64>,
    pub commit_latency: HistogramSnapshot,
}

/// The whole page.
pub fn render(snapshot: &Snapshot, problems: &[Problem], counters: &Counters) -> String {
    let mut page = Exposition::new();
    let version = snapshot.version;
    page.family(
        "smaregi_relay_info",
        "The running version (always 1).",
        Kind::Gauge,
    )
    .sample("smaregi_relay_info", &[("version", version)], 1.0);
    page.family(
        "smaregi_relay_uptime_seconds",
        "Seconds since the daemon started.",
        Kind::Gauge,
    )
    .sample(
        "smaregi_relay_uptime_seconds",
        &[],
        snapshot.uptime_seconds as f64,
    );

    let name = "smaregi_relay_notifications_accepted_total";
    page.family(
        name,
        "Notifications answered 200, by route and whether they were new (stored) or resent (duplicate).",
        Kind::Counter,
    );
    for ((route, outcome), n) in &counters.accepted {
        page.sample(name, &[("route", route), ("outcome", outcome)], *n as f64);
    }
    let name = "smaregi_relay_notifications_refused_total";
    page.family(
        name,
        "Requests refused, by route and reason.",
        Kind::Counter,
    );
    for ((route, reason), n) in &counters.refused {
        page.sample(name, &[("route", route), ("reason", reason)], *n as f64);
    }
    let name = "smaregi_relay_last_notification_timestamp_seconds";
    page.family(
        name,
        "When the last new notification was stored (Unix seconds; absent before the first).",
        Kind::Gauge,
    );
    if let Some(at) = snapshot.last_notification_at {
        page.sample(name, &[], at as f64 / 1000.0);
    }
    page.histogram(
        "smaregi_relay_commit_latency_seconds",
        "How long durable commits (flush + fdatasync, shared by concurrent callers) took, as their callers waited.",
        &counters.commit_latency,
    );

    let name = "smaregi_relay_outbox_jobs";
    page.family(
        name,
        "Outbox jobs by state and kind (done and discarded until pruned).",
        Kind::Gauge,
    );
    for (state, kind, n) in &snapshot.outbox_counts {
        page.sample(name, &[("state", state), ("kind", kind)], *n as f64);
    }
    let name = "smaregi_relay_outbox_parked_jobs";
    page.family(name, "Jobs parked, waiting for an operator.", Kind::Gauge)
        .sample(name, &[], snapshot.parked as f64);
    let name = "smaregi_relay_outbox_oldest_pending_age_seconds";
    page.family(
        name,
        "Age of the oldest pending job (0 when none is pending).",
        Kind::Gauge,
    )
    .sample(
        name,
        &[],
        snapshot.oldest_pending.as_ref().map_or(0, |o| o.2) as f64,
    );
    let name = "smaregi_relay_outbox_attempts_total";
    page.family(
        name,
        "Delivery attempts by job kind and outcome class.",
        Kind::Counter,
    );
    for ((kind, outcome), n) in &counters.attempts {
        page.sample(name, &[("kind", kind), ("outcome", outcome)], *n as f64);
    }
    let name = "smaregi_relay_upstream_paused";
    page.family(
        name,
        "1 for each paused upstream, by who paused it.",
        Kind::Gauge,
    );
    for paused in &snapshot.paused {
        let by = if paused.by_operator {
            "operator"
        } else {
            "credentials"
        };
        page.sample(name, &[("upstream", &paused.upstream), ("by", by)], 1.0);
    }

    let name = "smaregi_relay_store_size_bytes";
    page.family(name, "Bytes sled's files take on disk.", Kind::Gauge)
        .sample(name, &[], snapshot.store_bytes as f64);
    if let Some((free, total)) = snapshot.disk {
        let name = "smaregi_relay_disk_free_bytes";
        page.family(
            name,
            "Free bytes on the state directory's filesystem.",
            Kind::Gauge,
        )
        .sample(name, &[], free as f64);
        let name = "smaregi_relay_disk_size_bytes";
        page.family(
            name,
            "Size of the state directory's filesystem.",
            Kind::Gauge,
        )
        .sample(name, &[], total as f64);
    }
    let name = "smaregi_relay_certificate_expiry_timestamp_seconds";
    page.family(
        name,
        "When the serving TLS certificate expires (Unix seconds).",
        Kind::Gauge,
    );
    if let Some(not_after) = snapshot.certificate_not_after {
        page.sample(name, &[], not_after as f64);
    }
    let name = "smaregi_relay_mapping_version";
    page.family(name, "The current product mapping version.", Kind::Gauge)
        .sample(name, &[], snapshot.mapping_version as f64);

    let name = "smaregi_relay_health";
    page.family(
        name,
        "The status page's light: 0 green, 1 amber, 2 red.",
        Kind::Gauge,
    )
    .sample(
        name,
        &[],
        match Light::of(problems) {
            Light::Green => 0.0,
            Light::Amber => 1.0,
            Light::Red => 2.0,
        },
    );
    let name = "smaregi_relay_problems";
    page.family(
        name,
        "Problems needing attention, by event name.",
        Kind::Gauge,
    );
    let mut by_event: BTreeMap<&str, u64> = BTreeMap::new();
    for problem in problems {
        *by_event.entry(problem.event).or_default() += 1;
    }
    for (event, n) in by_event {
        page.sample(name, &[("event", event)], n as f64);
    }
    page.finish()
}
