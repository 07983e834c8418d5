//! The JSON body of one audit event (before chaining and signing).
//!
//! Field layout (DESIGN.md section 8; the seeds' examples are sub-objects of it):
//! `event_id`, `timestamp` (RFC 3339, UTC), `conn{id, intercept, peer, original_dst}`,
//! `workload{cgroup_id, cgroup_path, pid, agent_id, session_id}` (transparent mode, else null),
//! `envelope.intent{action_class, resource{host, path}, method, port, passthrough}`,
//! `decision{outcome, reason, detail, matched_policies}`,
//! `capability{token_id, agent_id, session_id, action_set}` (null when none cleared Stage 1),
//! `connector{credential_injected, credential_source, upstream_status, aborted}`,
//! `timings_us{classify_us, stage1_us, stage2_us, total_us, upstream_us}`.
//! The chain members (`chain_id`, `seq`, `prev_hash`, `key_id`) and `signature` are added by
//! the writer.

use super::AuditInput;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Builds the event body for `input`.
pub fn body(input: &AuditInput<'_>) -> Map<String, Value> {
    let d = input.decision;
    let conn = input.conn;
    let mut timings: Map<String, Value> = d
        .timings_us
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    let connector = match &input.connector {
        Some(c) => {
            if c.upstream_us > 0 {
                timings.insert("upstream_us".into(), c.upstream_us.into());
            }
            json!({
                "credential_injected": c.credential_injected,
                "credential_source": c.credential_source,
                "upstream_status": c.upstream_status,
                "aborted": c.aborted,
            })
        }
        // Nothing was sent upstream, so certainly no credential.
        None => json!({ "credential_injected": false, "credential_source": null }),
    };
    let timestamp = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let v = json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": timestamp,
        "conn": {
            "id": conn.conn_id,
            "intercept": conn.kind,
            "peer": conn.peer.to_string(),
            "original_dst": conn.original_dst.map(|a| a.to_string()),
        },
        "workload": conn.workload,
        "envelope": {
            "intent": {
                "action_class": d.action_class,
                "resource": { "host": input.host, "path": input.path },
                "method": input.method,
                "port": input.port,
                "passthrough": d.passthrough,
            }
        },
        "decision": {
            "outcome": d.outcome,
            "reason": d.reason,
            "detail": d.detail,
            "matched_policies": d.matched_policies,
        },
        "capability": d.capability,
        "connector": connector,
        "timings_us": timings,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}
