//! Prometheus metrics of the authority, and what its admin listener serves.
//!
//! Recording is off unless `[authority] admin_addr` is set ([`enable`]). Label sets are fixed
//! and small (result, reason code, stream kind); bundle versions and the revocation count are
//! read at scrape time. Names and labels are listed in docs/metrics.md.

use crate::bundles::LoadedBundle;
use crate::issuance::DenialCode;
use crate::revocation_hub::RevocationHub;
use firma_common::admin::{AdminSource, Check};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

static METRICS: OnceLock<Metrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuanceLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabels {
    kind: &'static str,
    version: String,
}

/// A server-streaming RPC kind.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Bundles = 0,
    Revocations = 1,
}

pub struct Metrics {
    registry: Registry,
    issuances: Family<IssuanceLabels, Counter>,
    connected: [Gauge; 2],
    sends: [Counter; 2],
    bundle_info: Family<BundleLabels, Gauge>,
    revocations: Gauge,
    revocations_recorded: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("firma_authority");
        let issuances = Family::<IssuanceLabels, Counter>::default();
        r.register(
            "issuances",
            "Capability requests by result (allowed, denied, invalid) and denial reason code",
            issuances.clone(),
        );
        let connected = Family::<StreamLabel, Gauge>::default();
        let sends = Family::<StreamLabel, Counter>::default();
        let kinds = ["bundles", "revocations"];
        let connected_h =
            kinds.map(|k| connected.get_or_create(&StreamLabel { stream: k }).clone());
        let sends_h = kinds.map(|k| sends.get_or_create(&StreamLabel { stream: k }).clone());
        r.register(
            "connected_sidecars",
            "Open sidecar streams, by stream (bundles, revocations)",
            connected,
        );
        r.register(
            "stream_sends",
            "Messages sent on sidecar streams (bundle pushes and re-sends, revocation entries)",
            sends,
        );
        let bundle_info = Family::<BundleLabels, Gauge>::default();
        r.register(
            "bundle_info",
            "Loaded policy bundles (value 1) by kind (runtime, issuance) and version",
            bundle_info.clone(),
        );
        let revocations = Gauge::default();
        r.register(
            "revocations",
            "Revoked capability ids in the revocation file (as streamed to sidecars)",
            revocations.clone(),
        );
        let revocations_recorded = Counter::default();
        r.register(
            "revocations_recorded",
            "Revocations picked up from the revocation file after startup (each then streamed to every connected sidecar)",
            revocations_recorded.clone(),
        );
        Self {
            registry: r,
            issuances,
            connected: connected_h,
            sends: sends_h,
            bundle_info,
            revocations,
            revocations_recorded,
        }
    }
}

/// Turns recording on (idempotent).
pub fn enable() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// One capability request answered: `Ok` allowed, `Err(code)` refused.
pub fn issuance(result: Result<(), DenialCode>) {
    let Some(m) = METRICS.get() else { return };
    let labels = match result {
        Ok(()) => IssuanceLabels {
            result: "allowed",
            reason: "",
        },
        Err(DenialCode::InvalidRequest) => IssuanceLabels {
            result: "invalid",
            reason: DenialCode::InvalidRequest.as_str(),
        },
        Err(code) => IssuanceLabels {
            result: "denied",
            reason: code.as_str(),
        },
    };
    m.issuances.get_or_create(&labels).inc();
}

/// `n` revocations new to the authority were read from the revocation file.
pub fn revocations_recorded(n: usize) {
    if let Some(m) = METRICS.get() {
        m.revocations_recorded
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// One message sent on a sidecar stream.
pub fn stream_send(stream: Stream) {
    if let Some(m) = METRICS.get() {
        m.sends[stream as usize].inc();
    }
}

/// Counts an open sidecar stream until the guard drops.
pub fn stream_open(stream: Stream) -> StreamGuard {
    match METRICS.get() {
        Some(m) => {
            m.connected[stream as usize].inc();
            StreamGuard(Some(stream))
        }
        None => StreamGuard(None),
    }
}

pub struct StreamGuard(Option<Stream>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let (Some(s), Some(m)) = (self.0, METRICS.get()) {
            m.connected[s as usize].dec();
        }
    }
}

/// The authority's `/metrics` and `/readyz`.
pub struct AuthorityAdmin {
    pub metrics: &'static Metrics,
    pub runtime: watch::Receiver<Arc<LoadedBundle>>,
    pub issuance: watch::Receiver<Arc<LoadedBundle>>,
    pub revocations: Arc<RevocationHub>,
    pub key_file: PathBuf,
}

impl AdminSource for AuthorityAdmin {
    fn metrics(&self) -> String {
        let m = self.metrics;
        m.bundle_info.clear();
        for (kind, rx) in [("runtime", &self.runtime), ("issuance", &self.issuance)] {
            let version = rx.borrow().bundle.version.clone();
            m.bundle_info
                .get_or_create(&BundleLabels { kind, version })
                .set(1);
        }
        m.revocations
            .set(i64::try_from(self.revocations.len()).unwrap_or(i64::MAX));
        firma_common::admin::encode(&m.registry)
    }

    fn readiness(&self) -> Vec<Check> {
        let mut checks = Vec::with_capacity(3);
        for (name, rx) in [
            ("runtime_bundle", &self.runtime),
            ("issuance_bundle", &self.issuance),
        ] {
            let b = rx.borrow();
            checks.push(if b.bundle.file_count() > 0 {
                Check::pass(name)
            } else {
                Check::fail(name, "no policy file loaded")
            });
        }
        checks.push(match firma_common::keys::load_signing_key(&self.key_file) {
            Ok(_) => Check::pass("signing_key"),
            Err(e) => Check::fail("signing_key", e.to_string()),
        });
        checks
    }
}
