//! The audit sink's metrics (`firma_sidecar_audit_*`): write latency, counted by the writer;
//! the sink's health counters, read from it at scrape time ([`super::AuditLog::refresh_metrics`]).

use firma_common::admin::latency_buckets;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

static METRICS: OnceLock<AuditMetrics> = OnceLock::new();

struct AuditMetrics {
    write: Histogram,
    // Read at scrape time.
    written: Counter,
    failures: Counter,
    healthy: Gauge,
    disk_free: Gauge,
    disk_low: Gauge,
    rotated: Counter,
    aggregated: Counter,
    shipped: Counter,
    failovers: Counter,
}

/// The sink's state as of a scrape (counters since start).
pub(crate) struct SinkState {
    pub written: u64,
    pub lost: u64,
    pub healthy: bool,
    pub disk_free: Option<u64>,
    pub disk_low: bool,
    pub rotated: u64,
    pub aggregated: u64,
    /// `grpc` sink only (0 otherwise).
    pub shipped: u64,
    pub failovers: u64,
}

/// Creates the audit metrics under `audit_` in `r` and turns the hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let r = r.sub_registry_with_prefix("audit");
    let write = Histogram::new(latency_buckets());
    r.register(
        "write_duration_seconds",
        "Time to write (and sync, per fsync policy) one batch of audit events",
        write.clone(),
    );
    let written = Counter::default();
    let failures = Counter::default();
    let healthy = Gauge::default();
    r.register(
        "events_written",
        "Audit events persisted by the sink",
        written.clone(),
    );
    r.register(
        "failures",
        "Audit events the sink could not persist (their requests were denied AuditUnavailable)",
        failures.clone(),
    );
    r.register(
        "sink_healthy",
        "1 while the audit sink's last write succeeded",
        healthy.clone(),
    );
    let disk_free = Gauge::default();
    let disk_low = Gauge::default();
    let rotated = Counter::default();
    let aggregated = Counter::default();
    r.register(
        "disk_free_bytes",
        "Free bytes on the audit file's filesystem at the last check (every 5 s; file sink only)",
        disk_free.clone(),
    );
    r.register(
        "disk_low",
        "1 while the audit filesystem has less free space than [sidecar.audit] free_space_warn_bytes",
        disk_low.clone(),
    );
    r.register(
        "files_rotated",
        "Audit files rotated ([sidecar.audit] max_file_bytes)",
        rotated.clone(),
    );
    r.register(
        "denials_aggregated",
        "Denials counted into deny_summary events instead of written one by one (also counted in decisions_total)",
        aggregated.clone(),
    );
    let shipped = Counter::default();
    let failovers = Counter::default();
    r.register(
        "events_shipped",
        "Audit events a collector acknowledged (sink = \"grpc\")",
        shipped.clone(),
    );
    r.register(
        "collector_failovers",
        "Times the grpc sink left a collector that failed for the next one in grpc_urls",
        failovers.clone(),
    );
    let _ = METRICS.set(AuditMetrics {
        write,
        written,
        failures,
        healthy,
        disk_free,
        disk_low,
        rotated,
        aggregated,
        shipped,
        failovers,
    });
}

/// One batch of audit events was written (or failed to be) in `took`.
pub fn write(took: Duration) {
    if let Some(m) = METRICS.get() {
        m.write.observe(took.as_secs_f64());
    }
}

/// Copies the sink's counters into the metrics (at scrape time: nothing is counted twice).
pub(crate) fn set_sink_state(s: SinkState) {
    let Some(m) = METRICS.get() else { return };
    m.written.inner().store(s.written, Ordering::Relaxed);
    m.failures.inner().store(s.lost, Ordering::Relaxed);
    m.healthy.set(i64::from(s.healthy));
    if let Some(free) = s.disk_free {
        m.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
    }
    m.disk_low.set(i64::from(s.disk_low));
    m.rotated.inner().store(s.rotated, Ordering::Relaxed);
    m.aggregated.inner().store(s.aggregated, Ordering::Relaxed);
    m.shipped.inner().store(s.shipped, Ordering::Relaxed);
    m.failovers.inner().store(s.failovers, Ordering::Relaxed);
}
