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
use crate::audit::Committed;
use crate::conn::ConnectorOutcome;
use crate::connector::RespBody;
use crate::connector::dial::ReqBody;
use crate::pipeline::mcp::follow::{Follower, SseSplitter};
use crate::pipeline::mcp::{McpSpec, Message};
use crate::pipeline::{Decision, DenyReason, Outcome, RequestContext};
use crate::state::SidecarState;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// How long a client has to send an MCP body (it must be read before the decision).
const BODY_TIME: Duration = Duration::from_secs(30);
/// The JSON-RPC error code of a Firma denial (implementation-defined server error range).
pub const DENIED_CODE: i64 = -32001;

/// The messages of one POST to an MCP endpoint.
pub struct McpCall {
    pub messages: Vec<Message>,
    pub batch: bool,
    /// The `Mcp-Session-Id` header (the legacy transport: the `session_id` query parameter),
    /// for the audit.
    pub session: Option<String>,
    /// The legacy transport's stream of this POST (`host` + `session_id` query parameter),
    /// where its denials go (see [`LegacyStreams`]).
    pub legacy: Option<String>,
}

/// The legacy HTTP+SSE transport answers on the GET stream, and its clients ignore the POST's
/// answer body (they check only the status): a denial must be delivered on the stream of the
/// session, or the client would wait for it forever. Each followed GET stream whose
/// `endpoint` event names a session registers here (keyed by host and session id); a denied
/// POST of that session puts its JSON-RPC errors on the stream and is answered `202
/// Accepted`, as the server would.
#[derive(Default)]
pub struct LegacyStreams(
    std::sync::Mutex<std::collections::HashMap<String, UnboundedSender<Bytes>>>,
);

impl LegacyStreams {
    fn global() -> &'static Self {
        static STREAMS: std::sync::OnceLock<LegacyStreams> = std::sync::OnceLock::new();
        STREAMS.get_or_init(Self::default)
    }

    fn key(host: &str, session: &str) -> String {
        format!("{host}\0{session}")
    }

    fn register(&self, key: String, tx: UnboundedSender<Bytes>) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, t| !t.is_closed());
        m.insert(key, tx);
    }

    fn remove(&self, key: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Puts `event` on the stream of `key`; false when no such stream is open.
    fn send(&self, key: &str, event: Bytes) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .is_some_and(|tx| tx.send(event).is_ok())
    }
}

/// Reads and classifies the body with big bodies' reader (see [`super::body`]: at most
/// `limit` bytes, `[sidecar.mcp] max_body_bytes`, within [`BODY_TIME`], its bytes counted
/// against the shared body `budget`); gives the request back with the same bytes. On refusal
/// the request comes back with what is left of its body, for [`super::body::answer_request`]:
/// `MalformedRequest` (not MCP), `BodyTooLarge` or `BodyBudgetExhausted`.
pub async fn read(
    req: Request<Incoming>,
    host: &str,
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
    // The legacy transport names its session in the query instead.
    let legacy_session = req
        .uri()
        .query()
        .and_then(|q| crate::pipeline::mcp::follow::legacy_session(&format!("?{q}")));
    let legacy = legacy_session
        .as_deref()
        .map(|s| LegacyStreams::key(host, s));
    let session = session.or(legacy_session);
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
            legacy,
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
        if let Some(key) = &self.legacy
            && LegacyStreams::global().send(
                key,
                Bytes::from(format!("event: message\ndata: {body}\n\n")),
            )
        {
            let mut r = json_response(StatusCode::ACCEPTED, String::new());
            r.headers_mut().remove(header::CONTENT_TYPE);
            return r;
        }
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

/// How an allowed MCP request's answer is followed (see `pipeline::mcp::follow`).
pub struct Follow {
    pub follower: Follower,
    /// The request asked for `tools/list`: an answer that cannot be read is not forwarded.
    pub must_filter: bool,
    /// Largest JSON answer or SSE event read (`[sidecar.mcp] max_body_bytes`).
    pub limit: usize,
    /// The upstream host (legacy streams are keyed by it).
    pub host: String,
}

impl Follow {
    /// The follower of a request from `ctx` whose listed tools are called on `call_path`.
    pub fn new(state: &SidecarState, ctx: &RequestContext, call: Option<&McpCall>) -> Self {
        let pipeline = state.pipeline.clone();
        let host = ctx.host.clone();
        let ctx = ctx.clone();
        let must_filter = call.is_some_and(|c| c.messages.iter().any(|m| m.method == "tools/list"));
        Self {
            follower: Follower::new(
                ctx.path.to_string(),
                Box::new(move |path, tool| pipeline.mcp_tool_listed(&ctx, path, tool)),
            ),
            must_filter,
            limit: state.pipeline.mcp_config().max_body_bytes,
            host,
        }
    }
}

/// Follows the answer: a JSON answer is read whole (bounded), filtered and sent with its new
/// `Content-Length`; an SSE answer goes through [`SseTap`] event by event. The `outcome`
/// event is written when the answer ends, with what it contained (`connector.mcp`).
pub async fn follow(
    resp: Response<RespBody>,
    outcome: ConnectorOutcome,
    mut committed: Committed,
    mut f: Follow,
) -> Response<RespBody> {
    *committed.outcome_mut() = outcome;
    let essence = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let encoded = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    let finish = |mut committed: Committed, f: &Follow| {
        committed.outcome_mut().mcp = Some(f.follower.followed.to_json());
        let o = committed.outcome_mut().clone();
        committed.finish(o);
    };
    if encoded && matches!(essence.as_str(), "application/json" | "text/event-stream") {
        // Accept-Encoding was removed from the request; a server that encodes anyway cannot
        // be followed, and a tool list that cannot be filtered is not forwarded.
        f.follower.followed.stopped = Some("the answer has a Content-Encoding".into());
        if f.must_filter {
            committed.outcome_mut().aborted = Some("McpAnswerUnreadable".into());
            finish(committed, &f);
            return unreadable("the MCP server's tools/list answer has a Content-Encoding");
        }
        finish(committed, &f);
        return resp;
    }
    match essence.as_str() {
        "text/event-stream" => {
            let (mut parts, body) = resp.into_parts();
            // Events may be rewritten: the length is not known in advance.
            parts.headers.remove(header::CONTENT_LENGTH);
            let host = f.host.clone();
            Response::from_parts(parts, SseTap::new(body, f, committed, host).boxed())
        }
        "application/json" => {
            let (mut parts, mut body) = resp.into_parts();
            let mut buf = Vec::new();
            let over = loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(d) = frame.into_data() {
                            buf.extend_from_slice(&d);
                            if buf.len() > f.limit {
                                break true;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        f.follower.followed.stopped = Some(format!("reading the answer: {e}"));
                        committed.outcome_mut().aborted = Some("UpstreamBodyError".into());
                        finish(committed, &f);
                        return unreadable(&format!("the MCP server's answer broke off: {e}"));
                    }
                    None => break false,
                }
            };
            if over {
                f.follower.followed.stopped =
                    Some(format!("a JSON answer larger than {} bytes", f.limit));
                if f.must_filter {
                    committed.outcome_mut().aborted = Some("McpAnswerUnreadable".into());
                    finish(committed, &f);
                    return unreadable("the MCP server's tools/list answer is too large to filter");
                }
                finish(committed, &f);
                let body = Prefixed {
                    first: Some(Bytes::from(buf)),
                    rest: body,
                };
                return Response::from_parts(parts, body.boxed());
            }
            // An empty answer (202 to a notification) carries no message.
            let rewritten = if buf.is_empty() {
                None
            } else {
                f.follower.json(&buf, f.must_filter)
            };
            let out = match rewritten {
                Some(new) => Bytes::from(new),
                None => Bytes::from(buf),
            };
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(out.len()));
            finish(committed, &f);
            Response::from_parts(
                parts,
                Full::new(out).map_err(|never| match never {}).boxed(),
            )
        }
        _ => {
            finish(committed, &f);
            resp
        }
    }
}

/// A tool list Firma could not read: a JSON-RPC error, 502.
fn unreadable(detail: &str) -> Response<RespBody> {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {
        "code": -32603,
        "message": format!("Firma could not follow the MCP answer: {detail}"),
        "data": {"denied": true, "reason": "McpAnswerUnreadable", "detail": detail},
    }});
    json_response(StatusCode::BAD_GATEWAY, body.to_string())
}

/// The bytes already read, then the rest of the body.
struct Prefixed {
    first: Option<Bytes>,
    rest: RespBody,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// An SSE answer followed event by event: bytes are held only until their event is complete,
/// then forwarded (unchanged, rewritten or dropped, see `pipeline::mcp::follow`).
pub struct SseTap {
    inner: RespBody,
    splitter: SseSplitter,
    follow: Follow,
    out: VecDeque<Bytes>,
    ended: bool,
    committed: Option<Committed>,
    /// Host of the stream (for [`LegacyStreams`] keys).
    host: String,
    /// Denials of the legacy session's POSTs, to deliver on this stream.
    injected: Option<(String, UnboundedReceiver<Bytes>)>,
}

impl SseTap {
    fn new(inner: RespBody, follow: Follow, committed: Committed, host: String) -> Self {
        Self {
            inner,
            splitter: SseSplitter::default(),
            follow,
            out: VecDeque::new(),
            ended: false,
            committed: Some(committed),
            host,
            injected: None,
        }
    }

    /// Registers the legacy session the `endpoint` event named.
    fn register_legacy(&mut self) {
        if let Some(session) = self.follow.follower.legacy_session.take() {
            let key = LegacyStreams::key(&self.host, &session);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            LegacyStreams::global().register(key.clone(), tx);
            if let Some((old, _)) = self.injected.replace((key, rx)) {
                LegacyStreams::global().remove(&old);
            }
        }
    }

    fn end(&mut self, aborted: Option<&str>) {
        self.ended = true;
        if let Some(mut c) = self.committed.take() {
            let o = c.outcome_mut();
            o.mcp = Some(self.follow.follower.followed.to_json());
            match aborted {
                Some("ClientGone") => o.client_gone = true,
                Some(a) if o.aborted.is_none() => o.aborted = Some(a.to_owned()),
                _ => {}
            }
            let o = o.clone();
            c.finish(o);
        }
    }
}

impl hyper::body::Body for SseTap {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some((_, rx)) = &mut this.injected
                && let Poll::Ready(Some(b)) = rx.poll_recv(cx)
            {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => {
                        let mut events = Vec::new();
                        let fed = this.splitter.feed(&d, this.follow.limit, &mut events);
                        for e in events {
                            if let Some(o) = this.follow.follower.event(&e) {
                                this.out.push_back(Bytes::from(o));
                            }
                        }
                        this.register_legacy();
                        if let Err(why) = fed {
                            // Fail closed: what cannot be parsed is not forwarded.
                            tracing::warn!(target: "firma_sidecar::mcp", %why, "MCP event stream cut");
                            this.follow.follower.followed.stopped = Some(why);
                            this.end(Some("McpEventTooLarge"));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    this.follow.follower.followed.stopped = Some(format!("upstream: {e}"));
                    this.end(Some("UpstreamBodyError"));
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    if this.splitter.pending() > 0 {
                        // Clients discard an event that never ended; so does Firma.
                        this.follow.follower.followed.stopped =
                            Some("the stream ended in the middle of an event".into());
                    }
                    this.end(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty()
    }
}

impl Drop for SseTap {
    fn drop(&mut self) {
        if let Some((key, _)) = &self.injected {
            LegacyStreams::global().remove(key);
        }
        // The client went away mid-stream: what was seen is recorded.
        self.end(Some("ClientGone"));
    }
}
