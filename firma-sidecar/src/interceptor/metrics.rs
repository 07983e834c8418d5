//! The interceptor's metrics: client connections by mode, MITM handshakes and leaf
//! certificates, the time the sidecar adds to a request, and LLM usage read from responses
//! (`firma_sidecar_llm_*`).

use crate::conn::InterceptKind;
use firma_common::admin::latency_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static METRICS: OnceLock<InterceptorMetrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    direction: &'static str,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

struct InterceptorMetrics {
    overhead: Histogram,
    /// http_proxy, transparent.
    conns_active: [Gauge; 2],
    conns_total: [Counter; 2],
    conns_parked: Gauge,
    mitm_ok: Counter,
    mitm_failed: Counter,
    leaf_lookups: AtomicU64,
    // Read at scrape time (hits = lookups - minted).
    leaf_hits: Counter,
    leaf_minted: Counter,
    llm_tokens: Family<TokenLabels, Counter>,
    llm_cost: Family<ModelLabel, Counter<f64, AtomicU64>>,
}

/// Creates the interceptor's metrics in `r` and turns its hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let overhead = Histogram::new(latency_buckets());
    r.register(
        "request_overhead_seconds",
        "Time the sidecar adds to a request: from its arrival to sending it upstream (or to the denial)",
        overhead.clone(),
    );
    let active = Family::<ModeLabel, Gauge>::default();
    let total = Family::<ModeLabel, Counter>::default();
    let modes = ["http_proxy", "transparent"];
    let conns_active = modes.map(|m| active.get_or_create(&ModeLabel { mode: m }).clone());
    let conns_total = modes.map(|m| total.get_or_create(&ModeLabel { mode: m }).clone());
    r.register(
        "connections_active",
        "Client connections open now, by interception mode",
        active,
    );
    r.register(
        "connections",
        "Client connections accepted, by interception mode",
        total,
    );
    let conns_parked = Gauge::default();
    r.register(
        "connections_parked",
        "Idle HTTP/1 client connections parked now: hyper's connection state and buffers released until the next request",
        conns_parked.clone(),
    );
    let mitm = Family::<ResultLabel, Counter>::default();
    let mitm_ok = mitm.get_or_create(&ResultLabel { result: "ok" }).clone();
    let mitm_failed = mitm
        .get_or_create(&ResultLabel { result: "failed" })
        .clone();
    r.register(
        "mitm_handshakes",
        "TLS handshakes with clients on intercepted names, by result",
        mitm,
    );
    let leaf_hits = Counter::default();
    let leaf_minted = Counter::default();
    r.register(
        "leaf_cache_hits",
        "MITM leaf certificate lookups served from the cache",
        leaf_hits.clone(),
    );
    r.register(
        "leaf_certificates_minted",
        "MITM leaf certificates minted (cache misses and renewals)",
        leaf_minted.clone(),
    );
    let llm = r.sub_registry_with_prefix("llm");
    let llm_tokens = Family::<TokenLabels, Counter>::default();
    llm.register(
        "tokens",
        "LLM tokens reported by upstream responses, by direction (input, output) and model (priced models by name, others as `other`)",
        llm_tokens.clone(),
    );
    let llm_cost = Family::<ModelLabel, Counter<f64, AtomicU64>>::default();
    llm.register(
        "cost_usd",
        "Cost of LLM usage in USD from [[sidecar.llm.prices]], by model",
        llm_cost.clone(),
    );
    let _ = METRICS.set(InterceptorMetrics {
        overhead,
        conns_active,
        conns_total,
        conns_parked,
        mitm_ok,
        mitm_failed,
        leaf_lookups: AtomicU64::new(0),
        leaf_hits,
        leaf_minted,
        llm_tokens,
        llm_cost,
    });
}

/// The time the sidecar added to one request, measured from `since`.
pub fn overhead(since: Instant) {
    if let Some(m) = METRICS.get() {
        m.overhead.observe(since.elapsed().as_secs_f64());
    }
}

/// Counts an accepted connection; the guard keeps it in `connections_active` until dropped.
pub fn connection(kind: InterceptKind) -> ConnectionGuard {
    let i = match kind {
        InterceptKind::HttpProxy => 0,
        InterceptKind::Transparent => 1,
        // DNS queries are not client connections.
        InterceptKind::Dns => return ConnectionGuard(None),
        // Decided for a caller that carries the request itself: no Firma connection.
        InterceptKind::Embedded | InterceptKind::ExtAuthz => return ConnectionGuard(None),
    };
    if let Some(m) = METRICS.get() {
        m.conns_total[i].inc();
        m.conns_active[i].inc();
        ConnectionGuard(Some(i))
    } else {
        ConnectionGuard(None)
    }
}

/// Held for the life of a client connection.
pub struct ConnectionGuard(Option<usize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let (Some(i), Some(m)) = (self.0, METRICS.get()) {
            m.conns_active[i].dec();
        }
    }
}

/// Counts a parked connection in `connections_parked` until the guard is dropped.
pub fn parked() -> ParkedGuard {
    let m = METRICS.get();
    if let Some(m) = m {
        m.conns_parked.inc();
    }
    ParkedGuard(m.is_some())
}

/// Held while a connection is parked.
pub struct ParkedGuard(bool);

impl Drop for ParkedGuard {
    fn drop(&mut self) {
        if let (true, Some(m)) = (self.0, METRICS.get()) {
            m.conns_parked.dec();
        }
    }
}

/// A leaf certificate was looked up for a MITM handshake.
pub fn leaf_lookup() {
    if let Some(m) = METRICS.get() {
        m.leaf_lookups.fetch_add(1, Ordering::Relaxed);
    }
}

/// A MITM handshake with a client ended.
pub fn mitm_handshake(ok: bool) {
    if let Some(m) = METRICS.get() {
        if ok { &m.mitm_ok } else { &m.mitm_failed }.inc();
    }
}

/// The leaf cache's mint count as of a scrape; hits are the lookups it did not mint for.
pub(crate) fn set_leaves_minted(minted: u64) {
    let Some(m) = METRICS.get() else { return };
    let lookups = m.leaf_lookups.load(Ordering::Relaxed);
    m.leaf_minted.inner().store(minted, Ordering::Relaxed);
    m.leaf_hits
        .inner()
        .store(lookups.saturating_sub(minted), Ordering::Relaxed);
}

/// Token usage of one LLM response (`model`: a priced model's name or `other`).
pub fn llm_usage(model: String, input: i64, output: i64, cost_nano_usd: Option<i64>) {
    let Some(m) = METRICS.get() else { return };
    for (direction, n) in [("input", input), ("output", output)] {
        let labels = TokenLabels {
            direction,
            model: model.clone(),
        };
        m.llm_tokens
            .get_or_create(&labels)
            .inc_by(u64::try_from(n).unwrap_or(0));
    }
    if let Some(c) = cost_nano_usd {
        m.llm_cost
            .get_or_create(&ModelLabel { model })
            .inc_by(c as f64 / 1e9);
    }
}
