//! The Kubernetes node agent (`[sidecar.node]`): learns the pods on this node from the
//! container runtime's CRI socket and tags the pod-level cgroup of every pod that asks for
//! enforcement, with the agent and session ids its annotations (or labels) name; untags pods
//! that stop or go. The same `Redirector::attach`/`detach` as `firma sidecar attach --pod`.
//!
//! - [`cri`]: the CRI client over the runtime's Unix socket.
//! - [`reconcile`]: one pass: sandboxes the runtime reports vs. pod cgroups attached.
//! - [`hook`]: the OCI `createRuntime` hook that closes the start window: an app container
//!   of an enforced pod cannot start before its pod cgroup is attached.
//!
//! See docs/kubernetes.md for the deployment and the failure modes.

pub mod cri;
pub mod hook;
pub mod identity;
pub mod reconcile;

pub use identity::{AGENT_ID_KEY, PodIdentity, SESSION_ID_KEY};

use crate::config::NodeConfig;
use crate::ebpf::Redirector;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the agent until `stop`: one reconcile at once (the resync after a restart: pods
/// created while the agent was down are tagged, pods gone meanwhile untagged), then one per
/// `resync_interval_ms`. A runtime that cannot be reached is logged and retried; pods already
/// attached stay attached meanwhile (their links are pinned).
pub async fn run(cfg: NodeConfig, redirector: Arc<Redirector>, stop: CancellationToken) {
    let every = Duration::from_millis(cfg.resync_interval_ms);
    let mut client = None;
    let mut unreachable_logged = false;
    loop {
        if client.is_none() {
            match cri::connect(&cfg.cri_socket).await {
                Ok(c) => {
                    tracing::info!(socket = %cfg.cri_socket.display(), "node agent connected to the CRI runtime");
                    unreachable_logged = false;
                    client = Some(c);
                }
                Err(e) if !unreachable_logged => {
                    tracing::warn!(error = %e, "node agent: CRI runtime unreachable; retrying (attached pods stay enforced)");
                    unreachable_logged = true;
                }
                Err(_) => {}
            }
        }
        if let Some(c) = client.as_mut() {
            match reconcile::once(c, &redirector).await {
                Ok(report) if report.changed() => {
                    tracing::info!(
                        attached = report.attached,
                        detached = report.detached,
                        enforced = report.enforced,
                        "node agent resynced"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "node agent: listing pods failed; reconnecting");
                    client = None;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
