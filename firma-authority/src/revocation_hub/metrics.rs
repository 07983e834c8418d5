//! The revocation hub's metrics: revocations known (set at scrape time) and those picked up
//! from the file after startup.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<RevocationMetrics> = OnceLock::new();

struct RevocationMetrics {
    revocations: Gauge,
    recorded: Counter,
}

/// Creates the revocation metrics in `r` and turns the hook on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let revocations = Gauge::default();
    r.register(
        "revocations",
        "Revoked capability ids in the revocation file (as streamed to sidecars)",
        revocations.clone(),
    );
    let recorded = Counter::default();
    r.register(
        "revocations_recorded",
        "Revocations picked up from the revocation file after startup (each then streamed to every connected sidecar)",
        recorded.clone(),
    );
    let _ = METRICS.set(RevocationMetrics {
        revocations,
        recorded,
    });
}

/// `n` revocations new to the authority were read from the revocation file.
pub fn recorded(n: usize) {
    if let Some(m) = METRICS.get() {
        m.recorded.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// The number of revoked ids known, as of a scrape.
pub fn set_known(n: usize) {
    if let Some(m) = METRICS.get() {
        m.revocations.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
