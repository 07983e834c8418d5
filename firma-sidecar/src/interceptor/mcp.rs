//! MCP endpoints in the request path (see `docs/mcp.md`): read a POST's JSON-RPC body
//! (bounded), decide each message through the shared pipeline, and answer a denial the way an
//! MCP client understands it (a JSON-RPC error for each request id).
//!
//! Denials are HTTP 200 with `application/json` JSON-RPC errors: the `mcp` SDK delivers that
//! to the pending call as its error and the session goes on; 1.x clients raise on a non-2xx
//! POST answer instead of failing just that call. A body Firma cannot read as MCP is 400 with
//! a JSON-RPC error of id `null` (newer SDKs surface it as the call's error).

use super::body;
use super::body::{Refused, body_refusal};
use crate::connector::RespBody;
use crate::connector::dial::ReqBody;
use crate::pipeline::mcp::{McpSpec, Message};
use crate::pipeline::{Decision, DenyReason, Outcome, RequestContext};
use crate::state::SidecarState;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How long a client has to send an MCP body (it must be read before the decision).
const BODY_TIME: Duration = Duration::from_secs(30);
/// The JSON-RPC error code of a Firma denial (implementation-defined server error range).
pub const DENIED_CODE: i64 = -32001;

/// The messages of one POST to an MCP endpoint.
pub struct McpCall {
    pub messages: Vec<Message>,
    pub batch: bool,
    /// The `Mcp-Session-Id` header, for the audit.
    pub session: Option<String>,
}

/// Reads and classifies the body with big bodies' reader (see [`super::body`]: at most
/// `limit` bytes, `[sidecar.mcp] max_body_bytes`, within [`BODY_TIME`], its bytes counted
/// against the shared body `budget`); gives the request back with the same bytes. On refusal
/// the request comes back with what is left of its body, for [`super::body::answer_request`]:
/// `MalformedRequest` (not MCP), `BodyTooLarge` or `BodyBudgetExhausted`.
pub async fn read(
    req: Request<Incoming>,
    spec: &McpSpec,
    limit: usize,
    budget: &Arc<body::BodyBudget>,
) -> Result<(Request<ReqBody>, McpCall), Refused> {
    let malformed = |req, detail: String, unread| Refused {
        req,
        decision: Decision::deny(DenyReason::MalformedRequest, detail),
        unread,
    };
    // The policy must read what the server reads: no decoding on one side only.
    if let Some(enc) = req.headers().get(header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        let detail = format!(
            "MCP request with Content-Encoding {:?}: only identity bodies are decided",
            String::from_utf8_lossy(enc.as_bytes())
        );
        return Err(malformed(req, detail, true));
    }
    let session = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, mut incoming) = req.into_parts();
    let refused = |parts, incoming, e: &body::ReadError, unread| {
        let mut decision = body_refusal(e);
        if let body::ReadError::TooLarge { limit, declared } = e {
            // The MCP limit, not extraction's.
            decision.detail = match declared {
                Some(n) => format!(
                    "MCP request body of {n} bytes is larger than {limit} bytes ([sidecar.mcp] max_body_bytes)"
                ),
                None => format!(
                    "MCP request body larger than {limit} bytes ([sidecar.mcp] max_body_bytes)"
                ),
            };
        }
        Refused {
            req: Request::from_parts(parts, incoming),
            decision,
            unread,
        }
    };
    let declared = hyper::body::Body::size_hint(&incoming).exact();
    let share = match body::admit(declared, limit, budget) {
        Ok(s) => s,
        Err(e) => return Err(refused(parts, incoming, &e, true)),
    };
    let buffered = match body::read_buffered(&mut incoming, share, limit, BODY_TIME).await {
        Ok(b) => b,
        Err(e) => return Err(refused(parts, incoming, &e, false)),
    };
    let (messages, batch) = match crate::pipeline::mcp::classify_body(&buffered.bytes, spec) {
        Ok(m) => m,
        Err(detail) => {
            return Err(malformed(
                Request::from_parts(parts, incoming),
                detail,
                false,
            ));
        }
    };
    Ok((
        Request::from_parts(parts, buffered.into_body()),
        McpCall {
            messages,
            batch,
            session,
        },
    ))
}

impl McpCall {
    /// Decides every message; one denial denies the whole body (batches are all-or-nothing).
    /// Returns the decision to enforce and each member's audit record.
    pub async fn decide(&self, state: &SidecarState, ctx: &RequestContext) -> (Decision, Value) {
        let values = state.pipeline.mcp_config().audit_argument_values;
        let mut first_deny: Option<(usize, Decision)> = None;
        let mut first_allow: Option<Decision> = None;
        let mut members = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let d = state.pipeline.decide_mcp(ctx, m).await;
            let mut a = m.audit(values);
            a["decision"] = if d.is_allow() { "ALLOW" } else { "DENY" }.into();
            if let Some(r) = d.reason {
                a["reason"] = r.as_str().into();
            }
            members.push(a);
            if d.is_allow() {
                first_allow.get_or_insert(d);
            } else if first_deny.is_none() {
                first_deny = Some((i, d));
            }
        }
        let mut audit = if self.batch {
            json!({ "batch": members })
        } else {
            members.pop().unwrap_or(Value::Null)
        };
        audit["session_id"] = self.session.clone().map_or(Value::Null, Value::from);
        let decision = match (first_deny, first_allow) {
            (Some((i, mut d)), _) => {
                if self.batch {
                    d.detail = format!(
                        "batch member {i} of {} ({}): {}",
                        self.messages.len(),
                        self.messages[i].method,
                        d.detail
                    );
                }
                d
            }
            (None, Some(d)) => d,
            (None, None) => Decision::deny(DenyReason::MalformedRequest, "empty MCP body"),
        };
        (decision, json!({ "mcp": audit }))
    }

    /// The denial as JSON-RPC errors, one per request id (notifications get none: when no
    /// member has an id, the plain 403 denial).
    pub fn deny(&self, d: &Decision) -> Response<RespBody> {
        let reason = d.reason.map_or("Denied", DenyReason::as_str);
        let errors: Vec<Value> = self
            .messages
            .iter()
            .filter_map(|m| {
                let id = m.id.clone()?;
                let what = match &m.name {
                    Some(n) => format!("{} {n}", m.method),
                    None => m.method.clone(),
                };
                Some(json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {
                        "code": DENIED_CODE,
                        "message": format!("Firma denied {what}: {reason}: {}", d.detail),
                        "data": {"denied": true, "reason": reason, "detail": d.detail},
                    }
                }))
            })
            .collect();
        if errors.is_empty() {
            return crate::response::deny(d);
        }
        let body = if self.batch {
            Value::Array(errors).to_string()
        } else {
            errors.into_iter().next().unwrap_or(Value::Null).to_string()
        };
        json_response(StatusCode::OK, body)
    }
}

/// A body that is not MCP: 400 with a JSON-RPC error of id `null`.
pub fn malformed(d: &Decision) -> Response<RespBody> {
    debug_assert!(d.outcome == Outcome::Deny);
    let reason = d.reason.map_or("MalformedRequest", DenyReason::as_str);
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": -32600,
            "message": format!("Firma denied the request: {reason}: {}", d.detail),
            "data": {"denied": true, "reason": reason, "detail": d.detail},
        }
    });
    json_response(StatusCode::BAD_REQUEST, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
