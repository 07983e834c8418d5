//! Serving HTTP on an accepted (or decrypted) connection: one pipeline decision per request.
//!
//! Each request runs the one sequence of [`crate::sequence`], once, in order: framing check ->
//! target (host, port, path normalised once) -> attributes (MCP messages, extraction) ->
//! [`sequence::decide`] (pipeline, placeholder leak, plaintext credential) -> connector (only
//! for an allow: upstream address -> credential -> rate limit) -> audit commit -> respond.
//! Every request goes through one [`RequestAudit`]: a denial is one `decision` event; an allow
//! is a `decision` event persisted before the request leaves, then an `outcome` event (also
//! when the client goes away mid-request). If the decision cannot be persisted the request is
//! denied `AuditUnavailable`.

use super::body::{self, Refused, body_refusal};
use super::framing::{FramingGuard, Verdict};
use super::head::{self, HeadError};
use super::idle;
use super::park;
use super::rewind::Rewind;
use super::websocket;
use crate::audit::RequestAudit;
use crate::config::ErrorFormat;
use crate::conn::{ConnectionInfo, Decision, DenyReason};
use crate::connector::binding::Unbound;
use crate::connector::{Failure, RespBody, UpstreamTarget};
use crate::pipeline::RequestContext;
use crate::pipeline::extract;
use crate::pipeline::path::NormalPath;
use crate::response::{self, Answer};
use crate::sequence::{self, Decided, abort_of};
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
    let timeouts = idle::timeouts();
    let activity = Arc::new(idle::Activity::default());
    let svc = {
        let state = state.clone();
        let conn = conn.clone();
        let mode = mode.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let (state, conn, mode) = (state.clone(), conn.clone(), mode.clone());
            let busy = activity.begin();
            // Boxed: hyper's HTTP/1 server keeps a box the size of this future for the
            // connection's whole life (the request pipeline's state is many KB); boxed, an
            // idle keep-alive connection holds a pointer and the state lives per request.
            Box::pin(async move {
                let resp = handle(&state, &conn, &mode, req).await;
                Ok::<_, Infallible>(idle::hold_until_sent(resp, busy))
            })
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
                idle::finish_closing(c).await
            }
        }
    } else {
        // Every later head on the connection is checked like the first (see `framing`).
        let mut io = FramingGuard::new(Rewind::new(buf, stream), verdict.clone());
        let mut svc = svc;
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // hyper runs this timer from the end of one response to the end of the next
            // head, idle time included: left at HEAD_TIMEOUT it would close every keep-alive
            // connection after 30 s whatever `idle_timeout_secs` says. A head trickled for
            // that long costs no more than an idle connection may; the idle tracker below
            // closes quiet connections at `idle_timeout_secs`.
            .header_read_timeout(HEAD_TIMEOUT.max(timeouts.http_idle))
            .max_buf_size(head::MAX_HEAD + 8192);
        loop {
            // Upgrades: WebSocket requests that the upstream switched (see `websocket`).
            // Boxed: while the connection is parked, its task holds a pointer, not hyper's
            // state.
            let mut c = Box::pin(
                builder
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades(),
            );
            let mut refused_at = None;
            let ended = loop {
                tokio::select! {
                    r = c.as_mut() => break Some(r),
                    _ = verdict.notify.notified() => {
                        c.as_mut().graceful_shutdown();
                        break Some(c.as_mut().await);
                    }
                    // The client half-closed right behind its request: answer it, then close.
                    _ = verdict.half_closed.notified() => {
                        c.as_mut().graceful_shutdown();
                        break Some(c.as_mut().await);
                    }
                    _ = state.drain.cancelled() => {
                        c.as_mut().graceful_shutdown();
                        break Some(c.as_mut().await);
                    }
                    _ = activity.idle_timeout(timeouts.http_idle) => {
                        tracing::debug!(conn = conn.conn_id, "closing idle HTTP/1 connection");
                        c.as_mut().graceful_shutdown();
                        break Some(idle::finish_closing(c.as_mut()).await);
                    }
                    _ = activity.idle_timeout(park::PARK_AFTER),
                        if refused_at != Some(activity.started()) =>
                    {
                        if park::can_park(&verdict, &activity) {
                            break None;
                        }
                        // Not between messages (a body still draining, a response still
                        // flushing): look again after the next request.
                        refused_at = Some(activity.started());
                    }
                }
            };
            if let Some(r) = ended {
                break r;
            }
            // Parked: hyper's connection is taken apart (its buffers freed) and the guard
            // waits alone for the next request.
            let Some(parts) = std::pin::Pin::into_inner(c).into_parts() else {
                break Ok(());
            };
            io = parts.io.into_inner();
            io.unread(&parts.read_buf);
            svc = parts.service;
            drop(parts.read_buf);
            tracing::trace!(conn = conn.conn_id, "parked idle HTTP/1 connection");
            match park::wait(&mut io, &verdict, &activity, &state, timeouts.http_idle).await {
                park::Woken::Request => continue,
                park::Woken::Close => {
                    let _ = tokio::time::timeout(idle::CLOSE_GRACE, io.shutdown()).await;
                    break Ok(());
                }
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

/// Host normalisation is the sequence's first step (re-exported for the proxy listener and
/// the fuzz targets).
pub use crate::sequence::normalize_host;

struct Target {
    upstream: UpstreamTarget,
    /// The request URI's path, normalised once (the URI forwarded holds the same form).
    path: NormalPath,
}

/// The port a `Host` value names, if any (`[v6]:p`, `name:p`).
fn host_port(raw: &str) -> Option<u16> {
    let raw = raw.trim();
    let tail = match raw.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.1.strip_prefix(':')?,
        None => raw.rsplit_once(':')?.1,
    };
    tail.parse().ok()
}

/// Absolute-form: a `Host` that names another destination than the request target is a
/// request with two destinations (a proxy forwards to the target, a server behind it may route
/// on `Host`): `DestinationMismatch`, never forwarded.
fn check_proxy_host(
    headers: &http::HeaderMap,
    host: &str,
    port: u16,
    tls: bool,
) -> Result<(), String> {
    let Some(raw) = headers.get(http::header::HOST) else {
        return Ok(());
    };
    let raw = raw.to_str().unwrap_or_default();
    let named = normalize_host(raw);
    let named_port = host_port(raw).unwrap_or(if tls { 443 } else { 80 });
    if named.as_deref() == Some(host) && named_port == port {
        return Ok(());
    }
    Err(format!(
        "Host {raw:?} names another destination than the request target {host}:{port}"
    ))
}

fn target_of(req: &mut Request<Incoming>, mode: &HttpMode) -> Result<Target, (DenyReason, String)> {
    target_inner(req, mode).map_err(|e| match e {
        TargetError::Malformed(d) => (DenyReason::MalformedRequest, d),
        TargetError::Destination(d) => (DenyReason::DestinationMismatch, d),
    })
}

enum TargetError {
    Malformed(String),
    Destination(String),
}

impl From<String> for TargetError {
    fn from(s: String) -> Self {
        Self::Malformed(s)
    }
}

impl From<&str> for TargetError {
    fn from(s: &str) -> Self {
        Self::Malformed(s.into())
    }
}

fn target_inner(req: &mut Request<Incoming>, mode: &HttpMode) -> Result<Target, TargetError> {
    // Decide on, audit and forward one spelling of the path (see `pipeline::path`).
    let (uri, path) = crate::pipeline::path::normalize_uri(req.uri()).map_err(|e| e.to_string())?;
    *req.uri_mut() = uri;
    let uri = req.uri();
    let named = uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
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
            check_proxy_host(req.headers(), &host, port, tls).map_err(TargetError::Destination)?;
            UpstreamTarget { host, port, tls }
        }
        HttpMode::Bound { host, port, tls } => {
            if let Some(n) = &named {
                let n = normalize_host(n).ok_or("invalid Host header")?;
                if &n != host {
                    return Err(format!(
                        "Host {n:?} does not match the connection's server name {host:?}"
                    )
                    .into());
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
    // gRPC clients get denials and aborts as grpc-status, everything else the JSON bodies, in
    // the error shape of the host's API once the host is known (SDKs show the reason). Read
    // from the request and the configuration: the connector is not visited before the decision.
    let (mode_h, mode_p) = mode_host(mode);
    let answer = Answer::of(
        req.headers(),
        mode_h
            .as_deref()
            .map_or(ErrorFormat::Firma, |h| state.error_shapes.for_host(h)),
    );
    let deny = |d: &Decision| answer.deny(d);
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
        .map_err(|d| (DenyReason::MalformedRequest, d))
        .and_then(|()| target_of(&mut req, mode));
    let target = match target {
        Ok(t) => t,
        Err((reason, detail)) => {
            let d = Decision::deny(reason, detail);
            rec.deny(&d);
            return body::answer_request(req, true, deny(&d)).await;
        }
    };
    let up = &target.upstream;
    let answer = Answer {
        format: state.error_shapes.for_host(&up.host),
        ..answer
    };
    let deny = |d: &Decision| answer.deny(d);
    let abort =
        |status: StatusCode, reason: &str, detail: &str| answer.abort(status, reason, detail);
    let rec = rec.target(Some(&up.host), up.port, Some(&target.path));
    // MCP endpoints: the JSON-RPC body is read (within `[sidecar.mcp] max_body_bytes` and the
    // shared body budget) and each message decided (pipeline::mcp).
    let mut mcp = None;
    let req = match state
        .pipeline
        .mcp_endpoint(method.as_str(), &up.host, &target.path)
    {
        None => Ok(req),
        Some(mcp_spec) => {
            let limit = state.pipeline.mcp_config().max_body_bytes;
            let (_, budget) = state.pipeline.extract_limits();
            match super::mcp::read(req, &up.host, &mcp_spec, limit, budget).await {
                Ok((read, call)) => {
                    mcp = Some(call);
                    Err(read)
                }
                Err(Refused {
                    req,
                    decision,
                    unread,
                }) => {
                    rec.deny(&decision);
                    // A body that is not MCP gets a JSON-RPC error; one too large or over the
                    // budget the usual 413 / 503 + Retry-After.
                    let resp = if decision.reason == Some(DenyReason::MalformedRequest) {
                        super::mcp::malformed(&decision)
                    } else {
                        deny(&decision)
                    };
                    return body::answer_request(req, unread, resp).await;
                }
            }
        }
    };
    // Rules that extract attributes for Cedar: the query string's, then (bounded) the body's.
    let spec = state
        .pipeline
        .extraction(method.as_str(), &up.host, &target.path);
    let metered = extract::reads_body(&spec) && upgrade.is_none();
    // Inline base64 images in a body read for extraction (budget reservations count them apart).
    let mut inline = extract::InlineData::default();
    let (mut req, attrs) = match req {
        // An MCP body, already read.
        Err(read) => (read, None),
        Ok(req) => {
            let query_attrs = match extract::extract_query(&spec, req.uri().query()) {
                Ok(a) => a,
                Err(detail) => {
                    let d = Decision::deny(DenyReason::MalformedRequest, detail);
                    rec.deny(&d);
                    return body::answer_request(req, true, deny(&d)).await;
                }
            };
            if spec.is_empty() {
                (req.map(http_body_util::BodyExt::boxed), None)
            } else if !extract::reads_body(&spec) {
                (req.map(http_body_util::BodyExt::boxed), Some(query_attrs))
            } else {
                let (limit, budget) = state.pipeline.extract_limits();
                match read_for_extract(req, &spec, limit, budget).await {
                    Ok((req, mut attrs, found)) => {
                        attrs.extend(query_attrs);
                        inline = found;
                        (req, Some(attrs))
                    }
                    Err(Refused {
                        req,
                        decision,
                        unread,
                    }) => {
                        rec.deny(&decision);
                        // Refused on its declared size: an `Expect: 100-continue` client has not
                        // sent the body and is not asked to.
                        return body::answer_request(req, unread, deny(&decision)).await;
                    }
                }
            }
        }
    };
    let rec = rec.request_attrs(attrs.as_ref().map(extract::to_json));
    // Whether the body was read (MCP, extraction); an unread one is drained or left before answering.
    let body_read = mcp.is_some() || extract::reads_body(&spec);
    // A metered LLM call (its rule extracts from the body): its usage is read from the
    // response, which must then arrive uncompressed, and it reserves against the budgets
    // (see docs/llm-policies.md).
    let llm_model = attrs
        .as_ref()
        .filter(|_| metered)
        .map(|a| match a.get("model") {
            Some(extract::AttrValue::String(m)) => Some(m.clone()),
            _ => None,
        });
    let mut want = None;
    if let (Some(model), Some(a)) = (&llm_model, &attrs) {
        req.headers_mut().remove(http::header::ACCEPT_ENCODING);
        let streams = matches!(a.get("stream"), Some(extract::AttrValue::Bool(true)));
        if streams
            && state
                .pipeline
                .injects_include_usage(method.as_str(), &up.host, &target.path)
        {
            req = match include_usage(req).await {
                Ok(r) => r,
                Err(detail) => {
                    let d = Decision::deny(DenyReason::MalformedRequest, detail);
                    rec.deny(&d);
                    return deny(&d);
                }
            };
        }
        use hyper::body::Body as _;
        let body_len = req
            .body()
            .size_hint()
            .exact()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(state.pipeline.extract_limit());
        let mut w = crate::pipeline::usage::want_for(
            a,
            body_len,
            inline,
            state.pipeline.reserve_output_tokens(),
        );
        if let Some(price) = model.as_deref().and_then(|m| state.pipeline.price(m)) {
            w.cost_nano_usd = crate::connector::usage::cost_nano_usd(
                price,
                crate::connector::usage::Tokens {
                    input: w.input_tokens,
                    output: w.output_tokens,
                },
            );
        }
        want = Some(w);
    }
    // MCP answers (POST answers, GET event streams) are followed (docs/mcp.md): they must
    // arrive unencoded to be read.
    let follows_mcp = mcp.is_some()
        || state
            .pipeline
            .mcp_stream(method.as_str(), &up.host, &target.path);
    if follows_mcp {
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
    // The decision: the policy (each MCP message, or the request with its reservation), then
    // what denies an allow whatever the policy said (a placeholder credential that would leave,
    // a credential that would leave in plaintext). A reservation taken for a request denied
    // here is released when it drops.
    let Decided {
        mut decision,
        with: (reservation, mcp_audit),
        cleared,
    } = match &mcp {
        // Each message decided; none of them reserves (MCP calls are not metered).
        Some(call) => {
            sequence::decide(state, &ctx, up, req.uri(), async {
                let (d, audit) = call.decide(state, &ctx).await;
                (d, (None, Some(audit)))
            })
            .await
        }
        None => {
            sequence::decide(state, &ctx, up, req.uri(), async {
                let (d, r) = state.pipeline.decide_reserving(&ctx, want).await;
                (d, (r, None))
            })
            .await
        }
    };
    let mut rec = match mcp_audit {
        Some(audit) => rec.request_attrs(Some(audit)),
        None => rec,
    };
    // MCP clients get their denials as JSON-RPC errors of the calls.
    let deny = |d: &Decision| match &mcp {
        Some(call) => call.deny(d),
        None => deny(d),
    };
    // The connector, for an allow only: where to, an address of the decided name, never one the
    // client chose (a refusal is a denial like the ones above, so the body is read the same way
    // before answering).
    let connecting = std::time::Instant::now();
    let mut bound = None;
    if let Some(cleared) = &cleared {
        match state.connector.bind_request(cleared, conn).await {
            Ok(b) => bound = Some(b),
            Err(Unbound::Mismatch(m)) => {
                decision = decision.into_deny(DenyReason::DestinationMismatch, m.detail);
                tracing::warn!(conn = conn.conn_id, host = %up.host, detail = %decision.detail, "destination mismatch");
                rec = rec.destination(m.record);
            }
            Err(Unbound::Unresolved(e)) => {
                let outcome = crate::conn::ConnectorOutcome {
                    aborted: Some("UpstreamUnavailable".into()),
                    ..Default::default()
                };
                rec.abort_before_send(&decision, outcome);
                let resp = abort(StatusCode::BAD_GATEWAY, "UpstreamUnavailable", &e);
                return body::answer_request(req, !body_read, resp).await;
            }
        }
    }
    let (Some(cleared), Some(bound)) = (cleared, bound) else {
        rec.deny(&decision);
        super::metrics::overhead(arrived);
        // Extracted bodies were read; any other is still unread.
        return body::answer_request(req, !body_read, deny(&decision)).await;
    };
    let prepared = state.connector.prepare(req, &cleared, conn, bound).await;
    crate::pipeline::metrics::stage(
        crate::pipeline::metrics::Stage::Connector,
        connecting.elapsed(),
    );
    let prepared = match prepared {
        Ok(p) => p,
        Err((Failure::CredentialUnavailable(detail), _)) => {
            // Fail closed: the allow becomes a denial; nothing was sent upstream.
            let denied = decision.into_deny(DenyReason::CredentialUnavailable, detail);
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
    super::metrics::overhead(arrived);
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
    let follow = follows_mcp.then(|| super::mcp::Follow::new(state, &ctx, mcp.as_ref()));
    let mut reservation = reservation;
    if let Some(r) = reservation.as_mut() {
        // A client that leaves from here on (this future dropped) is charged the reservation.
        r.sending();
    }
    match state.connector.send(prepared).await {
        Ok((resp, outcome)) => match llm_model {
            Some(model) => track_usage(state, resp, outcome, committed, model, reservation),
            None => match follow {
                Some(f) => super::mcp::follow(resp, outcome, committed, f).await,
                None => {
                    committed.finish(outcome);
                    resp
                }
            },
        },
        Err((failure, mut outcome)) => {
            let (status, reason, detail) = abort_of(failure);
            tracing::warn!(conn = conn.conn_id, host = %up.host, reason, detail = %detail, "aborted after allow");
            // No response from the upstream: released, as a request that never left.
            if let Some(r) = reservation {
                r.release();
            }
            outcome.aborted = Some(reason.to_string());
            committed.finish(outcome);
            abort(status, reason, &detail)
        }
    }
}

/// Streams an LLM response through a [`UsageTap`]; when it ends, its reservation is settled
/// with what it used (tokens and cost to the session's and agent's totals) and the request's
/// `outcome` event, written then rather than at the response head, says what was charged.
///
/// What is charged (docs/llm-policies.md, "Budgets that hold"): the usage the response
/// reported; the reservation when it reported none on a 2xx, reported something refused
/// (negative, absurd), or did not complete (the client left, the upstream broke off: the larger
/// of what was seen and the reservation); nothing for a complete non-2xx answer without usage
/// (providers do not bill refused requests).
fn track_usage(
    state: &SidecarState,
    resp: Response<RespBody>,
    outcome: crate::conn::ConnectorOutcome,
    mut committed: crate::audit::Committed,
    model: Option<String>,
    reservation: Option<crate::pipeline::usage::Reservation>,
) -> Response<RespBody> {
    use crate::connector::usage::{Done, Tokens, UsageParser, UsageTap};
    use http_body_util::BodyExt;
    let parser = UsageParser::for_response(resp.headers());
    let success = resp.status().is_success();
    *committed.outcome_mut() = outcome;
    let price = model.as_deref().and_then(|m| state.pipeline.price(m));
    // Priced models are configured (bounded); any other name the client sent is `other`.
    let model_label = match (&model, price) {
        (Some(m), Some(_)) => m.clone(),
        _ => "other".to_string(),
    };
    let done: Done = Box::new(move |reported, complete| {
        let mut outcome = committed.outcome_mut().clone();
        let want = reservation.as_ref().map(|r| r.want()).unwrap_or_default();
        let reserved = Tokens {
            input: want.input_tokens,
            output: want.output_tokens,
        };
        let (charged, how, note) = match (&reported.tokens, &reported.rejected) {
            (_, Some(why)) => {
                tracing::warn!(target: "firma_sidecar::llm", model = %model_label, "{why}; charging the reservation");
                (
                    Some(reserved),
                    "reservation",
                    Some(format!("{why}; the reservation is charged")),
                )
            }
            (Some(t), None) if complete => (Some(*t), "reported", None),
            (Some(t), None) => (
                Some(Tokens {
                    input: t.input.max(reserved.input),
                    output: t.output.max(reserved.output),
                }),
                "reservation",
                Some("the response did not complete; the larger of what it reported and the reservation is charged".to_string()),
            ),
            (None, None) if !complete => (
                Some(reserved),
                "reservation",
                Some("the response did not complete before its usage; the reservation is charged".to_string()),
            ),
            (None, None) if success => (
                Some(reserved),
                "reservation",
                Some("the response reported no usage; the reservation is charged".to_string()),
            ),
            (None, None) => (None, "nothing", None),
        };
        let cost = match (charged, price) {
            (Some(t), Some(p)) => Some(crate::connector::usage::cost_nano_usd(p, t)),
            _ => None,
        };
        if let Some(t) = charged {
            super::metrics::llm_usage(model_label, t.input, t.output, cost);
        }
        let usage = crate::pipeline::usage::Usage {
            input_tokens: charged.map_or(0, |t| t.input),
            output_tokens: charged.map_or(0, |t| t.output),
            cost_nano_usd: cost.unwrap_or(0),
        };
        if let Some(r) = reservation {
            r.settle(&usage);
        }
        outcome.usage = Some(crate::conn::UsageOutcome {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cost_nano_usd: cost,
            charged: how,
            reserved_tokens: want.tokens(),
            note,
        });
        if !complete && outcome.aborted.is_none() {
            outcome.aborted = Some("ResponseIncomplete".into());
        }
        committed.finish(outcome);
    });
    resp.map(|b| UsageTap::new(b, parser, done).boxed())
}

/// Sets `stream_options.include_usage: true` in a streamed request's JSON body so that its
/// usage can be counted (OpenAI chat streams carry it only then). The top-level members are
/// re-emitted in their order with their values byte for byte, except `stream_options`, whose
/// own members are kept the same way with `include_usage` set; `Content-Length` follows.
async fn include_usage(
    req: Request<crate::connector::dial::ReqBody>,
) -> Result<Request<crate::connector::dial::ReqBody>, String> {
    use http_body_util::{BodyExt, Full};
    let (mut parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
        .to_bytes();
    let out = extract::with_include_usage(&bytes)?;
    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts.headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(out.len()),
        );
    }
    let body = Full::new(bytes::Bytes::from(out))
        .map_err(|never| match never {})
        .boxed();
    Ok(Request::from_parts(parts, body))
}

/// How long a client has to send a body that must be read before the decision.
const EXTRACT_BODY_TIME: Duration = Duration::from_secs(30);

/// Reads a body whose rule extracts attributes (see [`body`]: per-request limit, shared
/// budget, [`EXTRACT_BODY_TIME`]), extracts them, and gives the request back with the same
/// bytes as its body. On refusal the request comes back with what is left of its body, for
/// [`body::answer_unread`].
async fn read_for_extract(
    req: Request<Incoming>,
    spec: &[extract::Extract],
    limit: usize,
    budget: &Arc<body::BodyBudget>,
) -> Result<
    (
        Request<crate::connector::dial::ReqBody>,
        extract::Attributes,
        extract::InlineData,
    ),
    Refused,
> {
    let (parts, mut incoming) = req.into_parts();
    // hyper has checked Content-Length against the framing; `read_buffered` still stops at
    // `limit` whatever arrives (HTTP/2 DATA beyond it, a lying length).
    let refused = |parts, incoming, e: &body::ReadError, unread| Refused {
        req: Request::from_parts(parts, incoming),
        decision: body_refusal(e),
        unread,
    };
    let declared = hyper::body::Body::size_hint(&incoming).exact();
    let share = match body::admit(declared, limit, budget) {
        Ok(s) => s,
        Err(e) => return Err(refused(parts, incoming, &e, true)),
    };
    let buffered = match body::read_buffered(&mut incoming, share, limit, EXTRACT_BODY_TIME).await {
        Ok(b) => b,
        Err(e) => return Err(refused(parts, incoming, &e, false)),
    };
    match extract::extract_measured(spec, &buffered.bytes) {
        Ok((attrs, inline)) => Ok((
            Request::from_parts(parts, buffered.into_body()),
            attrs,
            inline,
        )),
        Err(detail) => Err(Refused {
            req: Request::from_parts(parts, incoming),
            decision: Decision::deny(DenyReason::MalformedRequest, detail),
            unread: false,
        }),
    }
}
