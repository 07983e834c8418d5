//! The loaded policy bundles' metric (`firma_authority_bundle_info`), set at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<Family<BundleLabels, Gauge>> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabels {
    kind: &'static str,
    version: String,
}

/// Creates the bundle metric in `r` (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let bundle_info = Family::<BundleLabels, Gauge>::default();
    r.register(
        "bundle_info",
        "Loaded policy bundles (value 1) by kind (runtime, issuance) and version",
        bundle_info.clone(),
    );
    let _ = METRICS.set(bundle_info);
}

/// The loaded bundles as of a scrape: (kind, version) pairs.
pub fn set_loaded(bundles: impl IntoIterator<Item = (&'static str, String)>) {
    let Some(info) = METRICS.get() else { return };
    info.clear();
    for (kind, version) in bundles {
        info.get_or_create(&BundleLabels { kind, version }).set(1);
    }
}
