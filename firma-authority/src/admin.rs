//! The authority's admin reader: what `/metrics` and `/readyz` answer.

use crate::bundles::LoadedBundle;
use crate::metrics::Metrics;
use crate::revocation_hub::RevocationHub;
use firma_common::admin::{AdminSource, Check};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

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
        crate::bundles::metrics::set_loaded(
            [("runtime", &self.runtime), ("issuance", &self.issuance)]
                .map(|(kind, rx)| (kind, rx.borrow().bundle.version.clone())),
        );
        crate::revocation_hub::metrics::set_known(self.revocations.len());
        self.metrics.encode()
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
