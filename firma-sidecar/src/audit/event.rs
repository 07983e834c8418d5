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
//! - `deny_summary`: denials of one workload counted instead of written ([`super::aggregate`]).
//! - `rotation`: the first line of a file started by rotation ([`super::rotate`]).
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
//!
//! Bodies are serialized here, on the request's own thread, straight from borrowed typed
//! views (no intermediate `serde_json::Map`): the single writer thread then only appends the
//! chain members to the text and signs. Building a `Map` per event and serializing it on the
//! writer was about a fifth of the sidecar's CPU under keep-alive load (docs/benchmarks.md).

use super::bound;
use crate::conn::{
    CapabilitySummary, ConnectionInfo, ConnectorOutcome, Decision, DenyReason, InterceptKind,
    Outcome, UsageOutcome, Workload,
};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Everything one audit event is made from.
#[derive(Debug, Clone)]
pub struct AuditInput<'a> {
    pub conn: &'a ConnectionInfo,
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
    pub path: Option<&'a str>,
    pub decision: &'a Decision,
    pub connector: Option<ConnectorOutcome>,
}

/// What a request's record adds to `envelope.intent` beyond the decision: a DNS query's
/// fields and the attributes extracted from the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntentExtra<'a> {
    pub dns: Option<&'a Map<String, Value>>,
    pub request: Option<&'a Value>,
    pub destination: Option<&'a Value>,
}

/// A fresh event id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The `decision` event for `input`, with a fresh id.
pub fn body(input: &AuditInput<'_>) -> String {
    decision(input, &new_id(), IntentExtra::default())
}

/// The `decision` event for `input` with the id `event_id`.
pub fn decision(input: &AuditInput<'_>, event_id: &str, extra: IntentExtra<'_>) -> String {
    let d = input.decision;
    let timestamp = now();
    let connector = match &input.connector {
        Some(c) => PlannedConnector {
            credential_injected: c.credential_injected,
            credential_source: c.credential_source,
            upstream_status: Some(c.upstream_status),
            aborted: Some(c.aborted.as_deref()),
        },
        // Nothing was sent upstream, so certainly no credential.
        None => PlannedConnector {
            credential_injected: false,
            credential_source: None,
            upstream_status: None,
            aborted: None,
        },
    };
    text(&DecisionEvent {
        event: "decision",
        event_id,
        timestamp: &timestamp,
        conn: ConnJson::of(input.conn),
        workload: input.conn.workload.as_ref(),
        envelope: Envelope::of(
            input,
            Some(d.action_class.as_deref()),
            Some(d.passthrough),
            extra,
        ),
        decision: DecisionJson {
            outcome: d.outcome,
            reason: d.reason,
            detail: bound::text(&d.detail, bound::DETAIL),
            matched_policies: &d.matched_policies,
        },
        capability: d.capability.as_ref(),
        connector,
        timings_us: Timings {
            stages: &d.timings_us,
            upstream_us: input
                .connector
                .as_ref()
                .map(|c| c.upstream_us)
                .filter(|us| *us > 0),
        },
    })
}

/// The `outcome` event of an allowed request or tunnel whose decision is `decision_event_id`.
pub fn outcome(input: &AuditInput<'_>, decision_event_id: &str, extra: IntentExtra<'_>) -> String {
    let default = ConnectorOutcome::default();
    let c = input.connector.as_ref().unwrap_or(&default);
    let timestamp = now();
    text(&OutcomeEvent {
        event: "outcome",
        event_id: &new_id(),
        timestamp: &timestamp,
        decision_event_id,
        conn: OutcomeConn {
            id: input.conn.conn_id,
            intercept: input.conn.kind,
        },
        envelope: Envelope::of(
            input,
            Some(input.decision.action_class.as_deref()),
            None,
            extra,
        ),
        connector: OutcomeConnector {
            credential_injected: c.credential_injected,
            credential_source: c.credential_source,
            upstream_status: c.upstream_status,
            aborted: c.aborted.as_deref(),
            client_gone: c.client_gone,
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            upstream_protocol: c.upstream_protocol,
            upstream_reused: c.upstream_reused,
            duration_ms: c.duration_ms,
            usage: c.usage.as_ref().map(UsageJson::of),
            mcp: c.mcp.as_ref(),
        },
        timings_us: Timings {
            stages: &[],
            upstream_us: Some(c.upstream_us),
        },
    })
}

/// The `abandoned` event: the client left before a decision was made.
pub fn abandoned(input: &AuditInput<'_>) -> String {
    let timestamp = now();
    text(&AbandonedEvent {
        event: "abandoned",
        event_id: &new_id(),
        timestamp: &timestamp,
        conn: ConnJson::of(input.conn),
        workload: input.conn.workload.as_ref(),
        envelope: Envelope::of(input, None, None, IntentExtra::default()),
        detail: "client went away before a decision; nothing was sent upstream",
    })
}

/// The `recovery` event: `cut` bytes after the last signed line (hex SHA-256 `sha256`) were
/// removed: a torn line and/or `unsigned_lines` complete lines of a batch never completed.
pub fn recovery(cut: u64, sha256: &str, torn: bool, unsigned_lines: u64) -> String {
    let what = match (torn, unsigned_lines) {
        (true, 0) => "a torn line".to_string(),
        (false, n) => format!("{n} complete line(s) no signature covers"),
        (true, n) => format!("a torn line and {n} complete line(s) no signature covers"),
    };
    text(&json!({
        "event": "recovery",
        "event_id": new_id(),
        "timestamp": now(),
        "detail": format!("the file ended in {what} ({cut} bytes, from a crash or a full disk mid-batch); it was cut back to the last signed line"),
        "cut_bytes": cut,
        "cut_sha256": sha256,
        "cut_torn_line": torn,
        "cut_unsigned_lines": unsigned_lines,
    }))
}

/// The `rotation` event, the first line of file `file_index` of a rotated set: signed and
/// chained to the last line of `previous_file` (firma_common::audit_files).
pub fn rotation(file_index: u64, previous_file: &str, max_files: Option<u32>) -> String {
    text(&json!({
        "event": firma_common::audit_files::ROTATION_EVENT,
        "event_id": new_id(),
        "timestamp": now(),
        "file_index": file_index,
        "previous_file": previous_file,
        "max_files": max_files,
        "detail": format!("the chain continues from {previous_file}"),
    }))
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// JSON text of an event. These views hold strings, numbers and string-keyed maps only, so
/// serializing cannot fail; should it ever, the line says so rather than vanishing.
fn text<T: Serialize>(event: &T) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| {
        json!({ "event": "unserializable", "event_id": new_id(), "timestamp": now(), "error": e.to_string() })
            .to_string()
    })
}

#[derive(Serialize)]
struct DecisionEvent<'a> {
    event: &'static str,
    event_id: &'a str,
    timestamp: &'a str,
    conn: ConnJson,
    workload: Option<&'a Workload>,
    envelope: Envelope<'a>,
    decision: DecisionJson<'a>,
    capability: Option<&'a CapabilitySummary>,
    connector: PlannedConnector<'a>,
    timings_us: Timings<'a>,
}

#[derive(Serialize)]
struct OutcomeEvent<'a> {
    event: &'static str,
    event_id: &'a str,
    timestamp: &'a str,
    decision_event_id: &'a str,
    conn: OutcomeConn,
    envelope: Envelope<'a>,
    connector: OutcomeConnector<'a>,
    timings_us: Timings<'a>,
}

#[derive(Serialize)]
struct AbandonedEvent<'a> {
    event: &'static str,
    event_id: &'a str,
    timestamp: &'a str,
    conn: ConnJson,
    workload: Option<&'a Workload>,
    envelope: Envelope<'a>,
    detail: &'static str,
}

/// Where a connection came from, as every event that opens a record shows it.
#[derive(Serialize)]
struct ConnJson {
    id: u64,
    intercept: InterceptKind,
    peer: String,
    original_dst: Option<String>,
}

impl ConnJson {
    fn of(conn: &ConnectionInfo) -> Self {
        Self {
            id: conn.conn_id,
            intercept: conn.kind,
            peer: conn.peer.to_string(),
            original_dst: conn.original_dst.map(|a| a.to_string()),
        }
    }
}

#[derive(Serialize)]
struct OutcomeConn {
    id: u64,
    intercept: InterceptKind,
}

#[derive(Serialize)]
struct Envelope<'a> {
    intent: Intent<'a>,
}

impl<'a> Envelope<'a> {
    /// `envelope.intent` of `input`; `None` leaves `action_class` / `passthrough` out.
    fn of(
        input: &AuditInput<'a>,
        action_class: Option<Option<&'a str>>,
        passthrough: Option<bool>,
        extra: IntentExtra<'a>,
    ) -> Self {
        Envelope {
            intent: Intent {
                action_class,
                resource: Resource {
                    host: bound::opt(input.host, bound::HOST),
                    path: bound::opt(input.path, bound::PATH),
                },
                method: bound::opt(input.method, bound::METHOD),
                port: input.port,
                passthrough,
                dns: extra.dns.map(bound::map),
                request: extra.request.map(bound::value),
                destination: extra.destination.map(bound::value),
            },
        }
    }
}

#[derive(Serialize)]
struct Intent<'a> {
    /// `Some(None)` is written as `null`; `None` (abandoned) leaves the member out.
    #[serde(skip_serializing_if = "Option::is_none")]
    action_class: Option<Option<&'a str>>,
    resource: Resource<'a>,
    method: Option<Cow<'a, str>>,
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    passthrough: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<Cow<'a, Map<String, Value>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<Cow<'a, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<Cow<'a, Value>>,
}

/// Client-controlled text, bounded ([`bound`]).
#[derive(Serialize)]
struct Resource<'a> {
    host: Option<Cow<'a, str>>,
    path: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct DecisionJson<'a> {
    outcome: Outcome,
    reason: Option<DenyReason>,
    detail: Cow<'a, str>,
    matched_policies: &'a [String],
}

/// A decision's `connector`: what will be attached; `upstream_status`/`aborted` only when
/// the connector ran (`None` leaves them out).
#[derive(Serialize)]
struct PlannedConnector<'a> {
    credential_injected: bool,
    credential_source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<Option<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aborted: Option<Option<&'a str>>,
}

#[derive(Serialize)]
struct OutcomeConnector<'a> {
    credential_injected: bool,
    credential_source: Option<&'static str>,
    upstream_status: Option<u16>,
    aborted: Option<&'a str>,
    client_gone: bool,
    bytes_up: Option<u64>,
    bytes_down: Option<u64>,
    upstream_protocol: Option<&'static str>,
    upstream_reused: Option<bool>,
    duration_ms: Option<u64>,
    usage: Option<UsageJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcp: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct UsageJson {
    input_tokens: i64,
    output_tokens: i64,
    total_tokens: i64,
    cost_usd: Option<f64>,
    charged: &'static str,
    reserved_tokens: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

impl UsageJson {
    fn of(u: &UsageOutcome) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            total_tokens: u.input_tokens.saturating_add(u.output_tokens),
            cost_usd: u.cost_nano_usd.map(|n| n as f64 / 1e9),
            charged: u.charged,
            reserved_tokens: u.reserved_tokens,
            note: u.note.clone(),
        }
    }
}

/// `timings_us`: the decision's stage timings, then `upstream_us` when known.
struct Timings<'a> {
    stages: &'a [(&'static str, u64)],
    upstream_us: Option<u64>,
}

impl Serialize for Timings<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.stages.len() + 1))?;
        for (k, v) in self.stages {
            if *k != "upstream_us" {
                m.serialize_entry(k, v)?;
            }
        }
        if let Some(us) = self.upstream_us {
            m.serialize_entry("upstream_us", &us)?;
        }
        m.end()
    }
}
