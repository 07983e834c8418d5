//! The connector's metrics: credential lookups by source and result
//! (`firma_sidecar_credential_fetches_total`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<ConnectorMetrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    source: &'static str,
    result: &'static str,
}

struct ConnectorMetrics {
    /// basic/ok, basic/error, vault/ok, vault/error.
    credentials: [Counter; 4],
}

/// Creates the connector's metrics in `r` and turns its hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let creds = Family::<CredentialLabels, Counter>::default();
    let credentials = [
        ("basic", "ok"),
        ("basic", "error"),
        ("vault", "ok"),
        ("vault", "error"),
    ]
    .map(|(source, result)| {
        creds
            .get_or_create(&CredentialLabels { source, result })
            .clone()
    });
    r.register(
        "credential_fetches",
        "Credential lookups for allowed requests, by source (basic = env, vault) and result",
        creds,
    );
    let _ = METRICS.set(ConnectorMetrics { credentials });
}

/// A credential lookup for `source` (`"basic"` or `"vault"`) ended.
pub fn credential_fetch(source: &str, ok: bool) {
    if let Some(m) = METRICS.get() {
        let i = usize::from(source == "vault") * 2 + usize::from(!ok);
        m.credentials[i].inc();
    }
}
