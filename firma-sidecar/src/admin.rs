//! The sidecar's admin reader: what `/metrics` and `/readyz` answer. Scrape-time values are
//! copied from their owners (audit sink, pipeline, leaf cache, kernel) into the components'
//! metrics just before encoding.

use crate::ebpf::metrics::KernelState;
use crate::metrics::Metrics;
use crate::state::SidecarState;
use firma_common::admin::{AdminSource, Check};
use std::sync::Arc;

/// The sidecar's `/metrics` and `/readyz`.
pub struct SidecarAdmin {
    pub metrics: &'static Metrics,
    pub state: Arc<SidecarState>,
    /// Transparent mode: the loaded eBPF redirector.
    pub kernel: Option<Arc<dyn KernelState>>,
}

impl AdminSource for SidecarAdmin {
    fn metrics(&self) -> String {
        self.state.audit.refresh_metrics();
        self.state.pipeline.refresh_metrics();
        if let Some(mitm) = &self.state.mitm {
            crate::interceptor::metrics::set_leaves_minted(mitm.leaves.minted());
        }
        if let Some(k) = &self.kernel {
            crate::ebpf::metrics::refresh(k.as_ref());
        }
        self.metrics.encode()
    }

    fn readiness(&self) -> Vec<Check> {
        let mut checks = Vec::with_capacity(3);
        checks.push(match self.state.pipeline.bundle_usable() {
            Ok(()) => Check::pass("policy_bundle"),
            Err(detail) => Check::fail("policy_bundle", detail),
        });
        checks.push(if self.state.audit.health().healthy() {
            Check::pass("audit_sink")
        } else {
            Check::fail(
                "audit_sink",
                "the last audit write failed: allows are denied AuditUnavailable",
            )
        });
        if let Some(k) = &self.kernel {
            let w = k.workloads();
            let partial = w.iter().filter(|ok| !**ok).count();
            checks.push(if partial == 0 {
                Check::pass("ebpf")
            } else {
                Check::fail(
                    "ebpf",
                    format!(
                        "{partial} of {} attached workload(s) miss program links",
                        w.len()
                    ),
                )
            });
        }
        checks
    }
}
