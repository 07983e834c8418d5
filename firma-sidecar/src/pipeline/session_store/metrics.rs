//! Metrics of the shared session store (`firma_sidecar_session_store_*`): round-trip latency
//! and errors per operation, reachability, and calls allowed from the local allowance. Recorded
//! by [`super::RedisStore`]; registered with the sidecar's registry (idle with the default
//! in-memory backend).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<StoreMetrics> = OnceLock::new();

/// Creates the store's metrics under `firma_sidecar_session_store_` and turns them on (first
/// call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let m = StoreMetrics::new(r.sub_registry_with_prefix("session_store"));
    // The in-memory default is always available; a Redis store sets it from then on.
    m.set_up(true);
    let _ = METRICS.set(m);
}

/// The store's metrics, when recording is on.
pub fn get() -> Option<&'static StoreMetrics> {
    METRICS.get()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// One Redis operation kind (the `op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Commit,
    Settle,
    Extend,
    Ping,
    Replay,
}

const OPS: [&str; 6] = ["read", "commit", "settle", "extend", "ping", "replay"];

/// Latency, errors and reachability of the store.
pub struct StoreMetrics {
    latency: [Histogram; 6],
    errors: [Counter; 6],
    up: Gauge,
    local_allowed: Counter,
}

impl StoreMetrics {
    fn new(registry: &mut Registry) -> Self {
        let latency_family: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(firma_common::admin::latency_buckets()));
        let errors_family: Family<OpLabel, Counter> = Family::default();
        let latency = OPS.map(|op| latency_family.get_or_create(&OpLabel { op }).clone());
        let errors = OPS.map(|op| errors_family.get_or_create(&OpLabel { op }).clone());
        registry.register(
            "latency_seconds",
            "Round trip of one session-store operation (a Lua script or PING) to Redis",
            latency_family,
        );
        registry.register(
            "errors",
            "Session-store operations that failed or timed out",
            errors_family,
        );
        let up = Gauge::default();
        registry.register(
            "up",
            "1 while Redis answers, 0 while decisions that need it are denied SessionStoreUnavailable (or use the local allowance)",
            up.clone(),
        );
        let local_allowed = Counter::default();
        registry.register(
            "local_allowed",
            "Calls allowed from the local allowance while Redis was unreachable",
            local_allowed.clone(),
        );
        Self {
            latency,
            errors,
            up,
            local_allowed,
        }
    }

    pub fn record(&self, op: Op, took: std::time::Duration, ok: bool) {
        let i = op as usize;
        self.latency[i].observe(took.as_secs_f64());
        if !ok {
            self.errors[i].inc();
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub fn local_allowed(&self) {
        self.local_allowed.inc();
    }
}
