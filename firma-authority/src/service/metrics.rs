//! The gRPC service's metrics: capability requests by result and reason, and the sidecar
//! streams (open now, messages sent).

use crate::issuance::DenialCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<ServiceMetrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuanceLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: &'static str,
}

/// A server-streaming RPC kind.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Bundles = 0,
    Revocations = 1,
}

struct ServiceMetrics {
    issuances: Family<IssuanceLabels, Counter>,
    connected: [Gauge; 2],
    sends: [Counter; 2],
}

/// Creates the service's metrics in `r` and turns its hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let issuances = Family::<IssuanceLabels, Counter>::default();
    r.register(
        "issuances",
        "Capability requests by result (allowed, denied, invalid) and denial reason code",
        issuances.clone(),
    );
    let connected = Family::<StreamLabel, Gauge>::default();
    let sends = Family::<StreamLabel, Counter>::default();
    let kinds = ["bundles", "revocations"];
    let connected_h = kinds.map(|k| connected.get_or_create(&StreamLabel { stream: k }).clone());
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
    let _ = METRICS.set(ServiceMetrics {
        issuances,
        connected: connected_h,
        sends: sends_h,
    });
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
