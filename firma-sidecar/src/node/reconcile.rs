//! One reconcile pass: the pod sandboxes the runtime reports against the pod cgroups attached.
//!
//! Every attached cgroup that is a pod-level cgroup (`ebpf::cgroup::pod_uid_of`) belongs to
//! the agent: it stays attached while a READY sandbox of that pod asks for enforcement with the
//! same identity, and is detached otherwise (pod stopped or removed, annotation removed).

use super::cri::{Client, CriError};
use super::identity::PodIdentity;
use crate::ebpf::cgroup::pod_uid_of;
use crate::ebpf::{LINKS_PER_CGROUP, Redirector, Target};
use firma_common::proto::cri::{ListPodSandboxRequest, PodSandboxState};
use std::collections::HashMap;
use std::sync::Arc;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Pods (re)attached now.
    pub attached: usize,
    /// Pods detached now.
    pub detached: usize,
    /// Pods that ask for enforcement and are attached after the pass.
    pub enforced: usize,
    /// Pods that ask for enforcement but could not be attached (retried next pass).
    pub failed: usize,
}

impl Report {
    pub fn changed(&self) -> bool {
        self.attached + self.detached + self.failed > 0
    }
}

/// Lists the sandboxes and applies the difference.
pub async fn once(client: &mut Client, redirector: &Arc<Redirector>) -> Result<Report, CriError> {
    let items = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .map_err(CriError::call("ListPodSandbox"))?
        .into_inner()
        .items;
    let mut desired = HashMap::new();
    for s in items {
        if s.state != PodSandboxState::SandboxReady as i32 {
            continue;
        }
        let (Some(meta), Some(id)) = (
            s.metadata,
            PodIdentity::from_metadata(&s.annotations, &s.labels),
        ) else {
            continue;
        };
        desired.insert(meta.uid.replace('_', "-"), (id, meta.namespace, meta.name));
    }
    let r = redirector.clone();
    Ok(tokio::task::spawn_blocking(move || apply(&r, &desired))
        .await
        .unwrap_or_default())
}

type Desired = HashMap<String, (PodIdentity, String, String)>;

/// Attaches what is desired and not (fully) attached, detaches attached pods not desired.
pub fn apply(r: &Redirector, desired: &Desired) -> Report {
    let mut report = Report::default();
    let current: HashMap<String, (String, PodIdentity, usize)> = r
        .status()
        .into_iter()
        .filter_map(|(b, links)| {
            let uid = pod_uid_of(&b.cgroup_path)?;
            let id = PodIdentity {
                agent_id: b.agent_id,
                session_id: b.session_id,
            };
            Some((uid, (b.cgroup_path, id, links)))
        })
        .collect();
    for (uid, (id, namespace, name)) in desired {
        if let Some((_, have, links)) = current.get(uid)
            && have == id
            && *links == LINKS_PER_CGROUP
        {
            report.enforced += 1;
            continue;
        }
        match r.attach(
            &Target::Pod(uid.clone()),
            &id.agent_id,
            id.session_id.as_deref(),
        ) {
            Ok(out) => {
                tracing::info!(pod = %format!("{namespace}/{name}"), uid, cgroup = %out.cgroup_path, agent_id = %id.agent_id, session_id = ?id.session_id, "node agent: pod attached");
                report.attached += 1;
                report.enforced += 1;
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), uid, error = %e, "node agent: cannot attach pod yet");
                report.failed += 1;
            }
        }
    }
    for (uid, (path, _, _)) in current {
        if desired.contains_key(&uid) {
            continue;
        }
        match r.detach(&Target::Cgroup(path.clone())) {
            Ok(out) => {
                tracing::info!(uid, cgroup = %path, links_removed = out.links_removed, "node agent: pod detached");
                report.detached += 1;
            }
            Err(e) => tracing::warn!(uid, cgroup = %path, error = %e, "node agent: detach failed"),
        }
    }
    report
}
