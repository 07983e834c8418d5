//! Serving HTTP on an accepted (or decrypted) connection: one pipeline decision per request.
//!
//! Phases per request, in order: framing check -> target (host, port, path) -> decide
//! (pipeline) -> connector (credential -> rate limit -> upstream) -> audit -> respond.
//! Every request goes through one [`RequestAudit`]: a denial is one `decision` event; an allow
//! is a `decision` event persisted before the request leaves, then an `outcome` event (also
//! when the client goes away mid-request). If the decision cannot be persisted the request is
//! denied `AuditUnavailable`.

use super::framing::{FramingGuard, Verdict};
use super::head::{self, HeadError};
use super::limits;
use super::rewind::Rewind;
use super::websocket;
use crate::audit::RequestAudit;
use crate::conn::{ConnectionInfo, Decision, DenyReason};
use crate::connector::{Failure, RespBody, UpstreamTarget};
use crate::pipeline::RequestContext;
use crate::pipeline::extract;
use crate::response;
use crate::state::SidecarState;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A client that opens a connection must send its request head within this time.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How the requests on a connection name their destination.
#[derive(Debug, Clone)]
pub enum HttpMode {
    /// The `http_proxy` listener: every request carries an absolute-form URI.
    Proxy,
    /// The host is fixed by the connection (TLS SNI, `CONNECT` target); requests must name
    /// the same host in `Host`/`:authority`, otherwise they are denied `MalformedRequest`
    /// (no domain fronting through an intercepted name).
    Bound { host: String, port: u16, tls: bool },
    /// Transparent plain HTTP: each request's `Host` header names the host; the upstream is
    /// the original destination.
    HostHeader { port: u16 },
}

/// Serves HTTP/1.1 (or HTTP/2 when `h2`) on `stream`, whose first bytes may already be in
/// `buf`. Returns when the connection ends.
pub async fn serve_http<S>(
    state: Arc<SidecarState>,
    mut stream: S,
    mut buf: Vec<u8>,
    conn: ConnectionInfo,
    mode: HttpMode,
    mut h2: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !h2 {
        match head::read_head(&mut stream, &mut buf, HEAD_TIMEOUT).await {
            Ok(_) => {}
            Err(HeadError::Closed) => return,
            Err(HeadError::H2Preface) => h2 = true,
            Err(HeadError::Malformed(detail)) => {
                let (host, port) = mode_host(&mode);
                deny_raw(
                    &state,
                    &mut stream,
                    &conn,
                    host.as_deref(),
                    port,
                    None,
                    &detail,
                )
                .await;
                return;
            }
        }
    }
    // Idle = no request in flight; each request and its response body hold `activity` busy.
    let timeouts = limits::timeouts();
    let activity = Arc::new(limits::Activity::default());
    let svc = {
        let state = state.clone();
        let conn = conn.clone();
        let mode = mode.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let (state, conn, mode) = (state.clone(), conn.clone(), mode.clone());
            let busy = activity.begin();
            async move {
                let resp = handle(&state, &conn, &mode, req).await;
                Ok::<_, Infallible>(limits::hold_until_sent(resp, busy))
            }
        })
    };
    let verdict = Arc::new(Verdict::default());
    let result = if h2 {
        let io = TokioIo::new(Rewind::new(buf, stream));
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some((interval, timeout)) = timeouts.h2_keepalive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout);
        }
        let c = builder.serve_connection(io, svc);
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            _ = state.drain.cancelled() => { c.as_mut().graceful_shutdown(); c.await }
            _ = activity.idle_timeout(timeouts.http_idle) => {
                tracing::debug!(conn = conn.conn_id, "closing idle HTTP/2 connection");
                c.as_mut().graceful_shutdown();
                limits::finish_closing(c).await
            }
        }
    } else {
        // Every later head on the connection is checked like the first (see `framing`).
        let io = TokioIo::new(FramingGuard::new(Rewind::new(buf, stream), verdict.clone()));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(head::MAX_HEAD + 8192);
        // Upgrades: WebSocket requests that the upstream switched (see `websocket`).
        let c = builder.serve_connection(io, svc).with_upgrades();
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            _ = verdict.notify.notified() => { c.as_mut().graceful_shutdown(); c.await }
            // The client half-closed right behind its request: answer it, then close.
            _ = verdict.half_closed.notified() => { c.as_mut().graceful_shutdown(); c.await }
            _ = state.drain.cancelled() => { c.as_mut().graceful_shutdown(); c.await }
            _ = activity.idle_timeout(timeouts.http_idle) => {
                tracing::debug!(conn = conn.conn_id, "closing idle HTTP/1 connection");
                c.as_mut().graceful_shutdown();
                limits::finish_closing(c).await
            }
        }
    };
    let (host, port) = mode_host(&mode);
    if let Some(detail) = verdict.rejected() {
        // The guard refused a later head: hyper never saw it; the guard wrote the 400.
        RequestAudit::new(&state.audit, &conn)
            .target(host.as_deref(), port, None)
            .deny(&Decision::deny(DenyReason::MalformedRequest, detail));
        return;
    }
    if let Err(e) = result {
        // hyper refused a request on this connection (it answered 400/431 itself, or an HTTP/2
        // protocol error ended the connection): still one audit record for it.
        if e.is_parse()
            || e.is_parse_too_large()
            || e.is_parse_status()
            || (h2 && is_h2_protocol_error(&e))
        {
            RequestAudit::new(&state.audit, &conn)
                .target(host.as_deref(), port, None)
                .deny(&Decision::deny(
                    DenyReason::MalformedRequest,
                    format!("malformed HTTP request: {e}"),
                ));
        } else {
            tracing::debug!(conn = conn.conn_id, error = %e, "client connection ended with an error");
        }
    }
}

/// An HTTP/2 connection error caused by what the client sent (a GOAWAY for a protocol
/// violation), as opposed to I/O errors and timeouts.
fn is_h2_protocol_error(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return false;
        }
        let text = s.to_string();
        if text.contains("protocol error")
            || text.contains("frame with invalid size")
            || text.contains("compression error")
        {
            return true;
        }
        src = s.source();
    }
    false
}

fn mode_host(mode: &HttpMode) -> (Option<String>, u16) {
    match mode {
        HttpMode::Proxy => (None, 0),
        HttpMode::Bound { host, port, .. } => (Some(host.clone()), *port),
        HttpMode::HostHeader { port } => (None, *port),
    }
}

/// Audits a `MalformedRequest` denial and writes it as a raw HTTP/1.1 response, then closes.
pub async fn deny_raw<S: AsyncWrite + Unpin>(
    state: &SidecarState,
    stream: &mut S,
    conn: &ConnectionInfo,
    host: Option<&str>,
    port: u16,
    method: Option<&str>,
    detail: &str,
) {
    let d = Decision::deny(DenyReason::MalformedRequest, detail);
    RequestAudit::new(&state.audit, conn)
        .method(method)
        .target(host, port, None)
        .deny(&d);
    let _ = stream.write_all(&response::raw_deny(&d)).await;
    let _ = stream.shutdown().await;
}

/// Lowercase host without port or brackets, if it is a plausible DNS name or IP literal.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']')?;
        let ip: std::net::Ipv6Addr = rest[..end].parse().ok()?;
        return Some(ip.to_string());
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then_some(host)
}

struct Target {
    upstream: UpstreamTarget,
    path: String,
}

fn target_of(req: &mut Request<Incoming>, mode: &HttpMode) -> Result<Target, String> {
    // Decide on, audit and forward one spelling of the path (see `pipeline::path`).
    *req.uri_mut() = crate::pipeline::path::normalize_uri(req.uri()).map_err(|e| e.to_string())?;
    let uri = req.uri();
    let named = uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(format!("request target {:?} has no absolute path", uri));
    }
    let path = path.to_string();
    let upstream = match mode {
        HttpMode::Proxy => {
            let tls = match uri.scheme_str() {
                Some("http") => false,
                Some("https") => true,
                _ => {
                    return Err(
                        "proxy requests must use an absolute URI (http://host/path) or CONNECT"
                            .into(),
                    );
                }
            };
            let auth = uri.authority().ok_or("absolute URI without a host")?;
            let host = normalize_host(auth.host()).ok_or("invalid host in request URI")?;
            let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
            UpstreamTarget { host, port, tls }
        }
        HttpMode::Bound { host, port, tls } => {
            if let Some(n) = &named {
                let n = normalize_host(n).ok_or("invalid Host header")?;
                if &n != host {
                    return Err(format!(
                        "Host {n:?} does not match the connection's server name {host:?}"
                    ));
                }
            }
            UpstreamTarget {
                host: host.clone(),
                port: *port,
                tls: *tls,
            }
        }
        HttpMode::HostHeader { port } => {
            let n = named.ok_or("request without a Host header")?;
            UpstreamTarget {
                host: normalize_host(&n).ok_or("invalid Host header")?,
                port: *port,
                tls: false,
            }
        }
    };
    Ok(Target { upstream, path })
}

async fn handle(
    state: &SidecarState,
    conn: &ConnectionInfo,
    mode: &HttpMode,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    if !websocket::is_upgrade(req.method(), req.version(), req.headers()) {
        return handle_request(state, conn, mode, req, None).await;
    }
    let client = hyper::upgrade::on(&mut req);
    let mut resp = handle_request(state, conn, mode, req, Some(client)).await;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The framing guard stopped checking heads after the upgrade request: nothing may
        // follow a refused one on this connection.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// One request; `upgrade` is the client side of a WebSocket upgrade request.
async fn handle_request(
    state: &SidecarState,
    conn: &ConnectionInfo,
    mode: &HttpMode,
    mut req: Request<Incoming>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<RespBody> {
    let arrived = std::time::Instant::now();
    let method = req.method().clone();
    // gRPC clients get denials and aborts as grpc-status, everything else the JSON bodies.
    let grpc = crate::connector::is_grpc(req.headers());
    let deny = |d: &Decision| {
        if grpc {
            response::grpc_deny(d)
        } else {
            response::deny(d)
        }
    };
    let abort = |status: StatusCode, reason: &str, detail: &str| {
        if grpc {
            response::grpc_abort(status, reason, detail)
        } else {
            response::abort(status, reason, detail)
        }
    };
    let (mode_h, mode_p) = mode_host(mode);
    // From here on, whatever happens (including the client leaving), one record.
    let rec = RequestAudit::new(&state.audit, conn)
        .method(Some(method.as_str()))
        .target(mode_h.as_deref(), mode_p, None);
    // Malformed: framing or target problems are denied before any decision.
    let target = head::check_framing(req.headers())
        .and_then(|()| {
            if method == http::Method::CONNECT {
                Err("CONNECT is only accepted as the first request of a proxy connection".into())
            } else {
                Ok(())
            }
        })
        .and_then(|()| target_of(&mut req, mode));
    let target = match target {
        Ok(t) => t,
        Err(detail) => {
            let d = Decision::deny(DenyReason::MalformedRequest, detail);
            rec.deny(&d);
            discard_body(req.into_body()).await;
            return deny(&d);
        }
    };
    let up = &target.upstream;
    let rec = rec.target(Some(&up.host), up.port, Some(&target.path));
    // MCP endpoints: the JSON-RPC body is read and each message decided (pipeline::mcp).
    let mut mcp = None;
    let req = match state
        .pipeline
        .mcp_endpoint(method.as_str(), &up.host, &target.path)
    {
        None => Ok(req),
        Some(spec) => {
            let limit = state.pipeline.mcp_config().max_body_bytes;
            match super::mcp::read(req, &spec, limit).await {
                Ok((read, call)) => {
                    mcp = Some(call);
                    Err(read)
                }
                Err(detail) => {
                    let d = Decision::deny(DenyReason::MalformedRequest, detail);
                    rec.deny(&d);
                    return super::mcp::malformed(&d);
                }
            }
        }
    };
    // Rules that extract body attributes for Cedar: read (bounded) and parse the body first.
    let spec = state
        .pipeline
        .extraction(method.as_str(), &up.host, &target.path);
    let (mut req, attrs) = match req {
        Err(read) => (read, None),
        Ok(req) if spec.is_empty() => (req.map(http_body_util::BodyExt::boxed), None),
        Ok(req) => match read_for_extract(req, &spec, state.pipeline.extract_limit()).await {
            Ok((req, attrs)) => (req, Some(attrs)),
            Err(detail) => {
                let d = Decision::deny(DenyReason::MalformedRequest, detail);
                rec.deny(&d);
                return deny(&d);
            }
        },
    };
    let rec = rec.request_attrs(attrs.as_ref().map(extract::to_json));
    // An LLM call (its rule extracts): its usage is read from the response, which must then
    // arrive uncompressed (see docs/llm-policies.md).
    let llm_model = attrs.as_ref().map(|a| match a.get("model") {
        Some(extract::AttrValue::String(m)) => Some(m.clone()),
        _ => None,
    });
    if llm_model.is_some() {
        req.headers_mut().remove(http::header::ACCEPT_ENCODING);
    }
    let ctx = RequestContext {
        conn: conn.clone(),
        method: method.clone(),
        host: up.host.clone(),
        port: up.port,
        path: target.path.clone(),
        headers: req.headers().clone(),
        tls: matches!(mode, HttpMode::Bound { tls: true, .. }),
        request: attrs,
    };
    let (mut decision, rec) = match &mcp {
        Some(call) => {
            let (d, audit) = call.decide(state, &ctx).await;
            (d, rec.request_attrs(Some(audit)))
        }
        None => (state.pipeline.decide(&ctx).await, rec),
    };
    // MCP clients get their denials as JSON-RPC errors of the calls.
    let deny = |d: &Decision| match &mcp {
        Some(call) => call.deny(d),
        None => deny(d),
    };
    if decision.is_allow()
        && let Some(detail) = state.connector.insecure(up)
    {
        decision = decision.into_deny(DenyReason::InsecureUpstream, detail);
    }
    if !decision.is_allow() {
        rec.deny(&decision);
        crate::metrics::overhead(arrived);
        discard_body(req.into_body()).await;
        return deny(&decision);
    }
    let connecting = std::time::Instant::now();
    let prepared = state.connector.prepare(req, up, conn).await;
    crate::metrics::stage(crate::metrics::Stage::Connector, connecting.elapsed());
    let prepared = match prepared {
        Ok(p) => p,
        Err((Failure::CredentialUnavailable(detail), _)) => {
            // Fail closed: the allow becomes a denial; nothing was sent upstream.
            let denied = decision.into_deny(DenyReason::CredentialUnavailable, detail);
            rec.deny(&denied);
            return deny(&denied);
        }
        Err((Failure::InsecureUpstream(detail), _)) => {
            let denied = decision.into_deny(DenyReason::InsecureUpstream, detail);
            rec.deny(&denied);
            return deny(&denied);
        }
        Err((failure, mut outcome)) => {
            let (status, reason, detail) = abort_of(failure);
            outcome.aborted = Some(reason.to_string());
            rec.abort_before_send(&decision, outcome);
            return abort(status, reason, &detail);
        }
    };
    // The decision is in the audit sink before anything leaves.
    let committed = match rec.commit(&decision, prepared.planned.clone()).await {
        Ok(c) => c,
        Err((rec, e)) => return deny(&rec.deny_unaudited(&e)),
    };
    crate::metrics::overhead(arrived);
    if let Some(client) = upgrade {
        return match state.connector.send_upgrade(prepared).await {
            Ok((resp, Some(upstream), outcome)) => {
                let mut committed = committed;
                *committed.outcome_mut() = outcome;
                state.drain.spawn(websocket::relay(
                    client,
                    upstream,
                    committed,
                    state.drain.clone(),
                ));
                resp
            }
            Ok((resp, None, outcome)) => {
                committed.finish(outcome);
                resp
            }
            Err((failure, mut outcome)) => {
                let (status, reason, detail) = abort_of(failure);
                outcome.aborted = Some(reason.to_string());
                committed.finish(outcome);
                abort(status, reason, &detail)
            }
        };
    }
    match state.connector.send(prepared).await {
        Ok((resp, outcome)) => match llm_model {
            Some(model) => track_usage(state, resp, outcome, committed, &decision, model),
            None => {
                committed.finish(outcome);
                resp
            }
        },
        Err((failure, mut outcome)) => {
            let (status, reason, detail) = abort_of(failure);
            tracing::warn!(conn = conn.conn_id, host = %up.host, reason, detail = %detail, "aborted after allow");
            outcome.aborted = Some(reason.to_string());
            committed.finish(outcome);
            abort(status, reason, &detail)
        }
    }
}

/// Streams an LLM response through a [`UsageTap`]; when it ends, its tokens (and cost) go to
/// the session's and agent's totals and into the request's `outcome` event, which is written
/// then rather than at the response head.
fn track_usage(
    state: &SidecarState,
    resp: Response<RespBody>,
    outcome: crate::conn::ConnectorOutcome,
    mut committed: crate::audit::Committed,
    decision: &Decision,
    model: Option<String>,
) -> Response<RespBody> {
    use crate::connector::usage::{Done, UsageParser, UsageTap};
    use http_body_util::BodyExt;
    let parser = UsageParser::for_response(resp.headers());
    *committed.outcome_mut() = outcome;
    let who = decision
        .capability
        .as_ref()
        .map(|c| (c.session_id.clone(), c.agent_id.clone()));
    let pipeline = state.pipeline.clone();
    let price = model.as_deref().and_then(|m| state.connector.price(m));
    // Priced models are configured (bounded); any other name the client sent is `other`.
    let model_label = match (&model, price) {
        (Some(m), Some(_)) => m.clone(),
        _ => "other".to_string(),
    };
    let done: Done = Box::new(move |tokens, complete| {
        let mut outcome = committed.outcome_mut().clone();
        if let Some(t) = tokens {
            let cost = price.map(|p| crate::connector::usage::cost_nano_usd(p, t));
            crate::metrics::llm_usage(model_label, t.input, t.output, cost);
            if let Some((session, agent)) = &who {
                pipeline.usage().add(
                    session,
                    agent,
                    &crate::pipeline::usage::Usage {
                        input_tokens: t.input,
                        output_tokens: t.output,
                        cost_nano_usd: cost.unwrap_or(0),
                    },
                );
            }
            outcome.usage = Some(crate::conn::UsageOutcome {
                input_tokens: t.input,
                output_tokens: t.output,
                cost_nano_usd: cost,
            });
        }
        if !complete && outcome.aborted.is_none() {
            outcome.aborted = Some("ResponseIncomplete".into());
        }
        committed.finish(outcome);
    });
    resp.map(|b| UsageTap::new(b, parser, done).boxed())
}

/// Status, reason and detail of an abort after an allow.
fn abort_of(failure: Failure) -> (StatusCode, &'static str, String) {
    match failure {
        Failure::RateLimited(d) => (StatusCode::TOO_MANY_REQUESTS, "RateLimited", d),
        Failure::UpstreamTimeout(d) => (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout", d),
        Failure::UpstreamUnavailable(d)
        | Failure::CredentialUnavailable(d)
        | Failure::InsecureUpstream(d) => (StatusCode::BAD_GATEWAY, "UpstreamUnavailable", d),
    }
}

/// How long a client has to send a body that must be read before the decision.
const EXTRACT_BODY_TIME: Duration = Duration::from_secs(30);

/// Reads a body whose rule extracts attributes (at most `limit` bytes, within
/// [`EXTRACT_BODY_TIME`]), extracts them, and gives the request back with the same bytes as its
/// body. `Err` is the `MalformedRequest` detail.
async fn read_for_extract(
    req: Request<Incoming>,
    spec: &[extract::Extract],
    limit: usize,
) -> Result<
    (
        Request<crate::connector::dial::ReqBody>,
        extract::Attributes,
    ),
    String,
> {
    use http_body_util::{BodyExt, Full, Limited};
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(EXTRACT_BODY_TIME, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            format!("request body not received within {EXTRACT_BODY_TIME:?}")
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!(
                    "request body larger than {limit} bytes ([sidecar.mapping] extract_max_body_bytes); this endpoint's mapping rule reads attributes from it"
                )
            } else {
                format!("reading the request body: {e}")
            }
        })?;
    let bytes = collected.to_bytes();
    let attrs = extract::extract(spec, &bytes)?;
    let body = Full::new(bytes).map_err(|never| match never {}).boxed();
    Ok((Request::from_parts(parts, body), attrs))
}

/// Most of a denied request's body we read (and drop) before answering.
const DISCARD_MAX: usize = 64 * 1024;
/// How long we wait for it.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops what is left of a request body we answer without forwarding, up to
/// [`DISCARD_MAX`] or [`DISCARD_TIME`]. Over HTTP/2, answering while the client is still
/// sending makes hyper reset the stream (RST_STREAM), and clients such as curl then report the
/// 403 as a framing error instead of showing it; a small body read to its end lets the stream
/// close cleanly. Anything larger is not worth receiving: the reset is the right answer then.
async fn discard_body<B: hyper::body::Body<Data = bytes::Bytes> + Unpin>(mut body: B) {
    use http_body_util::BodyExt;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DISCARD_MAX {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn hosts_normalize() {
        assert_eq!(
            normalize_host("API.OpenAI.com:443").unwrap(),
            "api.openai.com"
        );
        assert_eq!(normalize_host("[::1]:8080").unwrap(), "::1");
        assert_eq!(normalize_host("127.0.0.1").unwrap(), "127.0.0.1");
        assert!(normalize_host("a b").is_none());
        assert!(normalize_host("").is_none());
        assert!(normalize_host("evil.com/x").is_none());
    }
}
