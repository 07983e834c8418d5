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
pub mod reconcile;

use crate::ebpf::Redirector;
use firma_common::config::ConfigError;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pod annotation (or label) naming the agent id a pod's connections are bound to.
pub const AGENT_ID_KEY: &str = "firma.dev/agent-id";
/// Pod annotation (or label) naming the session id (optional).
pub const SESSION_ID_KEY: &str = "firma.dev/session-id";

/// `[sidecar.node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The container runtime's CRI socket (containerd: `/run/containerd/containerd.sock`,
    /// CRI-O: `/var/run/crio/crio.sock`).
    #[serde(default = "default_cri_socket")]
    pub cri_socket: PathBuf,
    /// How often the pods are listed again (ms, 100..=60000). Attaching before the first
    /// connect does not depend on it (the OCI hook does that); it bounds how long a pod that
    /// stopped stays attached and how soon a pod is tagged when no hook is installed.
    #[serde(default = "default_resync_ms")]
    pub resync_interval_ms: u64,
}

fn default_cri_socket() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}
fn default_resync_ms() -> u64 {
    1000
}

impl NodeConfig {
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if !(100..=60_000).contains(&self.resync_interval_ms) {
            return Err(ConfigError::invalid(
                file,
                "sidecar.node.resync_interval_ms",
                format!(
                    "expected 100..=60000 (milliseconds), got {}",
                    self.resync_interval_ms
                ),
            ));
        }
        if !self.cri_socket.is_absolute() {
            return Err(ConfigError::invalid(
                file,
                "sidecar.node.cri_socket",
                format!(
                    "expected an absolute path to the runtime's CRI socket, got {}",
                    self.cri_socket.display()
                ),
            ));
        }
        Ok(())
    }
}

/// Who a pod's connections belong to, from its annotations (first) or labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub agent_id: String,
    pub session_id: Option<String>,
}

impl PodIdentity {
    /// `None`: the pod did not ask for enforcement (no `firma.dev/agent-id`). Annotations win
    /// over labels key by key; empty values count as absent.
    pub fn from_metadata(
        annotations: &HashMap<String, String>,
        labels: &HashMap<String, String>,
    ) -> Option<Self> {
        let get = |k: &str| {
            annotations
                .get(k)
                .or_else(|| labels.get(k))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        Some(Self {
            agent_id: get(AGENT_ID_KEY)?,
            session_id: get(SESSION_ID_KEY),
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identity_prefers_annotations_and_needs_an_agent() {
        let a = map(&[(AGENT_ID_KEY, "from-annotation")]);
        let l = map(&[(AGENT_ID_KEY, "from-label"), (SESSION_ID_KEY, "s1")]);
        assert_eq!(
            PodIdentity::from_metadata(&a, &l),
            Some(PodIdentity {
                agent_id: "from-annotation".into(),
                session_id: Some("s1".into())
            })
        );
        assert_eq!(
            PodIdentity::from_metadata(&map(&[]), &l).unwrap().agent_id,
            "from-label"
        );
        assert_eq!(
            PodIdentity::from_metadata(&map(&[(SESSION_ID_KEY, "s")]), &map(&[])),
            None
        );
        assert_eq!(
            PodIdentity::from_metadata(&map(&[(AGENT_ID_KEY, "  ")]), &map(&[])),
            None
        );
    }
}
