//! The JSON bodies of audit events (before chaining and signing).
//!
//! `event` says which kind a line is:
//! - `decision`: one per decision, allow or deny. For an allow it is persisted *before* anything
//!   is sent upstream; `connector.credential_injected`/`credential_source` say what will be
//!   attached.
//! - `outcome`: after an allowed request or tunnel was sent: `decision_event_id` names its
//!   decision; `connector{upstream_status, aborted, client_gone}` and `timings_us.upstream_us`
//!   say what happened (`aborted` = `UpstreamUnavailable`, `UpstreamTimeout`, `ClientGone`).
//! - `abandoned`: the client went away before a decision; nothing was sent upstream.
//! - `recovery`: written at start when the file ended in a torn line that was cut.
//!
//! Decision field layout (the seeds' examples are sub-objects of it):
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
    let timestamp = now();
    let v = json!({
        "event": "decision",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": timestamp,
        "conn": conn_json(conn),
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
    object(v)
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The `outcome` event of an allowed request or tunnel whose decision is `decision_event_id`.
pub fn outcome(input: &AuditInput<'_>, decision_event_id: &str) -> Map<String, Value> {
    let c = input.connector.clone().unwrap_or_default();
    let conn = input.conn;
    object(json!({
        "event": "outcome",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": now(),
        "decision_event_id": decision_event_id,
        "conn": { "id": conn.conn_id, "intercept": conn.kind },
        "envelope": {
            "intent": {
                "action_class": input.decision.action_class,
                "resource": { "host": input.host, "path": input.path },
                "method": input.method,
                "port": input.port,
            }
        },
        "connector": {
            "credential_injected": c.credential_injected,
            "credential_source": c.credential_source,
            "upstream_status": c.upstream_status,
            "aborted": c.aborted,
            "client_gone": c.client_gone,
            "bytes_up": c.bytes_up,
            "bytes_down": c.bytes_down,
            "upstream_protocol": c.upstream_protocol,
            "upstream_reused": c.upstream_reused,
            "duration_ms": c.duration_ms,
            "usage": c.usage.map(|u| json!({
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "total_tokens": u.input_tokens.saturating_add(u.output_tokens),
                "cost_usd": u.cost_nano_usd.map(|n| n as f64 / 1e9),
            })),
        },
        "timings_us": { "upstream_us": c.upstream_us },
    }))
}

/// The `abandoned` event: the client left before a decision was made.
pub fn abandoned(input: &AuditInput<'_>) -> Map<String, Value> {
    let conn = input.conn;
    object(json!({
        "event": "abandoned",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": now(),
        "conn": conn_json(conn),
        "workload": conn.workload,
        "envelope": {
            "intent": {
                "resource": { "host": input.host, "path": input.path },
                "method": input.method,
                "port": input.port,
            }
        },
        "detail": "client went away before a decision; nothing was sent upstream",
    }))
}

/// The `recovery` event: `cut` bytes after the last signed line (hex SHA-256 `sha256`) were
/// removed: a torn line and/or `unsigned_lines` complete lines of a batch never completed.
pub fn recovery(cut: u64, sha256: &str, torn: bool, unsigned_lines: u64) -> Map<String, Value> {
    let what = match (torn, unsigned_lines) {
        (true, 0) => "a torn line".to_string(),
        (false, n) => format!("{n} complete line(s) no signature covers"),
        (true, n) => format!("a torn line and {n} complete line(s) no signature covers"),
    };
    object(json!({
        "event": "recovery",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": now(),
        "detail": format!("the file ended in {what} ({cut} bytes, from a crash or a full disk mid-batch); it was cut back to the last signed line"),
        "cut_bytes": cut,
        "cut_sha256": sha256,
        "cut_torn_line": torn,
        "cut_unsigned_lines": unsigned_lines,
    }))
}

/// Where a connection came from, as every event that opens a record shows it.
fn conn_json(conn: &crate::conn::ConnectionInfo) -> Value {
    json!({
        "id": conn.conn_id,
        "intercept": conn.kind,
        "peer": conn.peer.to_string(),
        "original_dst": conn.original_dst.map(|a| a.to_string()),
    })
}
