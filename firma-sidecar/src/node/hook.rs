//! The OCI `createRuntime` hook (`firma sidecar oci-hook`): the runtime runs it after it has
//! put a new container's first process in its cgroup and before that process runs the
//! container's program. For an app container of a pod that asks for enforcement (its pod
//! annotations reach the container's OCI spec through containerd's `pod_annotations`), it
//! attaches the pod-level cgroup through the sidecar's control socket and succeeds only once
//! that is done, so the program's first `connect()` is already redirected. If the sidecar
//! cannot be reached the hook fails, and with it the container's start (fail closed: the
//! kubelet retries). Containers of pods that do not ask are let through untouched.

use super::identity::PodIdentity;
use crate::control::{self, Request};
use crate::ebpf::cgroup::pod_uid_of;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// containerd's annotation saying whether an OCI container is a pod's sandbox or an app
/// container (CRI-O: `io.kubernetes.cri-o.ContainerType`).
const CONTAINER_TYPE_KEYS: [&str; 2] = [
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];

/// The OCI state the runtime writes on the hook's stdin (fields the hook uses).
#[derive(Debug, Deserialize)]
pub struct OciState {
    pub id: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// What the hook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod does not ask for enforcement.
    NotEnforced,
    /// The pod's sandbox: nothing to do yet (the agent tags the pod when it sees it; its first
    /// app container comes through here again).
    Sandbox,
    /// The pod cgroup is attached (now or already).
    Attached { cgroup: String, agent_id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("the OCI state on stdin is not valid: {0}")]
    State(String),
    #[error("container {id}: cannot read the cgroup of its process {pid}: {detail}")]
    Cgroup {
        id: String,
        pid: u32,
        detail: String,
    },
    #[error(
        "container {id} runs in {cgroup}, whose parent is not a Kubernetes pod cgroup: refusing to guess what to tag"
    )]
    NotAPod { id: String, cgroup: String },
    #[error(transparent)]
    Control(#[from] control::ClientError),
    #[error("the sidecar refused to attach {cgroup}: {error}")]
    Refused { cgroup: String, error: String },
}

/// Runs the hook for the OCI state `state` (the JSON the runtime gave on stdin).
pub fn run(control_socket: &Path, state: &str) -> Result<Outcome, HookError> {
    let st: OciState = serde_json::from_str(state).map_err(|e| HookError::State(e.to_string()))?;
    let Some(id) = PodIdentity::from_metadata(&st.annotations, &HashMap::new()) else {
        return Ok(Outcome::NotEnforced);
    };
    let kind = CONTAINER_TYPE_KEYS
        .iter()
        .find_map(|k| st.annotations.get(*k))
        .map(String::as_str);
    if kind == Some("sandbox") {
        return Ok(Outcome::Sandbox);
    }
    let cgroup = process_cgroup(st.pid).map_err(|detail| HookError::Cgroup {
        id: st.id.clone(),
        pid: st.pid,
        detail,
    })?;
    let pod = match cgroup.rsplit_once('/') {
        Some((parent, _)) if pod_uid_of(parent).is_some() => parent.to_string(),
        _ => {
            return Err(HookError::NotAPod { id: st.id, cgroup });
        }
    };
    let answer = control::request(
        control_socket,
        &Request::Attach {
            cgroup: Some(pod.clone()),
            pod: None,
            agent_id: id.agent_id.clone(),
            session_id: id.session_id,
        },
    )?;
    if !answer.ok {
        return Err(HookError::Refused {
            cgroup: pod,
            error: answer.error.unwrap_or_default(),
        });
    }
    Ok(Outcome::Attached {
        cgroup: pod,
        agent_id: id.agent_id,
    })
}

/// The cgroup v2 path (`0::` line) of process `pid`.
fn process_cgroup(pid: u32) -> Result<String, String> {
    if pid == 0 {
        return Err("the OCI state has no pid".into());
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .filter(|p| p.starts_with('/') && p.len() > 1)
        .ok_or_else(|| "no cgroup v2 entry in /proc/PID/cgroup".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unannotated_and_sandbox_containers_need_no_sidecar() {
        let nowhere = Path::new("/nonexistent/firma.sock");
        let plain = r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"/b","annotations":{"io.kubernetes.cri.container-type":"container"}}"#;
        assert_eq!(run(nowhere, plain).unwrap(), Outcome::NotEnforced);
        let sandbox = r#"{"id":"s1","pid":1,"annotations":{"io.kubernetes.cri.container-type":"sandbox","firma.dev/agent-id":"a"}}"#;
        assert_eq!(run(nowhere, sandbox).unwrap(), Outcome::Sandbox);
    }

    #[test]
    fn enforced_container_fails_closed_without_the_sidecar() {
        let st = r#"{"id":"c1","pid":0,"annotations":{"firma.dev/agent-id":"a"}}"#;
        assert!(matches!(
            run(Path::new("/nonexistent/firma.sock"), st),
            Err(HookError::Cgroup { .. })
        ));
        assert!(matches!(
            run(Path::new("/x"), "not json"),
            Err(HookError::State(_))
        ));
    }
}
