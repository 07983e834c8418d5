//! The sidecar's metric registry: each component owns its metrics (`<component>/metrics.rs`:
//! a small struct, its hooks, and what it reads at scrape time) and registers them here, under
//! the `firma_sidecar` prefix and, where the names share one, a sub-registry (`audit_`,
//! `dns_`, `ebpf_`, `llm_`).
//!
//! Recording is off unless `[sidecar.admin] listen_addr` is set ([`enable`]); every hook is then
//! one `OnceLock` load and returns. On the hot path hooks touch only atomics: label sets are
//! small fixed enums whose handles are created once at startup (stages, modes, kinds), except
//! the decision counter, whose `action_class` label comes from the mapping rules (a bounded,
//! configured set) and costs one hash lookup. Values that already exist elsewhere (audit
//! counters, bundle age, eBPF counters, leaf certificates minted) are read at scrape time, not
//! counted twice. Names and labels are listed in docs/metrics.md.

use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static REGISTRY: OnceLock<Metrics> = OnceLock::new();

/// The sidecar's registry, with every component's metrics in it.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("firma_sidecar");
        crate::pipeline::metrics::register(&mut r);
        crate::pipeline::session_store::metrics::register(&mut r);
        crate::interceptor::metrics::register(&mut r);
        crate::connector::metrics::register(&mut r);
        crate::audit::metrics::register(&mut r);
        crate::authority_client::metrics::register(&mut r);
        crate::dns::metrics::register(&mut r);
        crate::ebpf::metrics::register(&mut r);
        Self { registry: r }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        firma_common::admin::encode(&self.registry)
    }
}

/// Turns recording on (idempotent). Until this is called every hook is a no-op.
pub fn enable() -> &'static Metrics {
    REGISTRY.get_or_init(Metrics::new)
}
