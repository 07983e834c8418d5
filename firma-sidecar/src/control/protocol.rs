//! Wire format of the control socket.

use serde::{Deserialize, Serialize};

/// One command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Attach {
        cgroup: Option<String>,
        pod: Option<String>,
        agent_id: String,
        session_id: Option<String>,
    },
    Detach {
        cgroup: Option<String>,
        pod: Option<String>,
    },
    Status,
}

/// The answer: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Self {
        Self {
            ok: true,
            result: serde_json::to_value(result).ok(),
            error: None,
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        }
    }
}

/// `status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub port: u16,
    pub pin_dir: String,
    pub cgroup2_mount: String,
    pub block_quic: bool,
    pub redirect_dns: bool,
    pub excluded_cidrs: Vec<String>,
    pub excluded_ports: Vec<u16>,
    /// UDP exceptions and loopback allowances (UDP and loopback are otherwise closed).
    #[serde(default)]
    pub allow_udp: Vec<String>,
    #[serde(default)]
    pub allow_loopback: Vec<String>,
    /// Connections currently tracked by socket cookie / by client address.
    pub tracked_by_cookie: usize,
    pub tracked_by_peer: usize,
    pub workloads: Vec<WorkloadStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub cgroup_path: String,
    pub cgroup_id: u64,
    pub agent_id: String,
    pub session_id: Option<String>,
    /// Pinned links (7 when fully attached).
    pub links: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r: Request = serde_json::from_str(
            r#"{"op":"attach","cgroup":"/a","pod":null,"agent_id":"x","session_id":null}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::Attach { .. }));
        let s: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(s, Request::Status);
        assert!(
            serde_json::from_str::<Request>(
                r#"{"op":"detach","cgroup":"/a","pod":null,"force":true}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }
}
