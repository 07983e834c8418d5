//! Who a pod's connections belong to: the `firma.dev/*` annotations (or labels) of its sandbox.

use std::collections::HashMap;

/// Pod annotation (or label) naming the agent id a pod's connections are bound to.
pub const AGENT_ID_KEY: &str = "firma.dev/agent-id";
/// Pod annotation (or label) naming the session id (optional).
pub const SESSION_ID_KEY: &str = "firma.dev/session-id";

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
