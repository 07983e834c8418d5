//! The authority's metric registry: each component owns its metrics (`service/metrics.rs`,
//! `bundles/metrics.rs`, `revocation_hub/metrics.rs`) and registers them here under the
//! `firma_authority` prefix.
//!
//! Recording is off unless `[authority] admin_addr` is set ([`enable`]). Label sets are fixed
//! and small (result, reason code, stream kind); bundle versions and the revocation count are
//! read at scrape time. Names and labels are listed in docs/metrics.md.

use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static REGISTRY: OnceLock<Metrics> = OnceLock::new();

/// The authority's registry, with every component's metrics in it.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("firma_authority");
        crate::service::metrics::register(&mut r);
        crate::bundles::metrics::register(&mut r);
        crate::revocation_hub::metrics::register(&mut r);
        Self { registry: r }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        firma_common::admin::encode(&self.registry)
    }
}

/// Turns recording on (idempotent).
pub fn enable() -> &'static Metrics {
    REGISTRY.get_or_init(Metrics::new)
}
