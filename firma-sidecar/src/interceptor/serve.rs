//! The connection-serving function shared by every interception mode.

use super::http::{HttpMode, deny_raw, serve_http};
use super::rewind::Rewind;
use super::tunnel::{self, Reply};
use crate::conn::ConnectionInfo;
use crate::state::{SidecarState, TlsPlan};
use crate::tls::sniff::{Sniffed, sniff};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

/// Time a new connection has to show its protocol (a ClientHello or a request line). A
/// server-speaks-first protocol sends nothing and is treated as unknown after this.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to complete the MITM TLS handshake once the ClientHello is in.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one client connection whose destination is known, until it ends.
///
/// # Contract (shared by `CONNECT` in `http_proxy` mode and the transparent interceptor)
/// - `stream`: the client side, nothing read yet (for `CONNECT`, any bytes the client sent
///   after the `CONNECT` head must be replayed first, e.g. with [`Rewind`]).
/// - `conn`: from [`SidecarState::new_conn`]. Transparent mode passes
///   `kind = InterceptKind::Transparent`, `original_dst = Some(orig)` (the address the app
///   connected to) and `workload = Some(..)` (from the kernel's record). In transparent mode
///   the upstream of every request and tunnel is an address of the decided name that
///   `original_dst` must match (`connector::binding`, else `DestinationMismatch`), and upstream
///   sockets carry `SO_MARK = [sidecar.interceptor.transparent] socket_mark`.
/// - `host_hint`: the name the client asked for when known (`CONNECT` target); `None` in
///   transparent mode, where SNI or `Host` supplies it.
/// - `port`: the destination port (`CONNECT` port or `original_dst.port()`).
///
/// What happens: the first bytes are sniffed. A TLS ClientHello for an intercepted host
/// (SNI, else `host_hint`) is MITM'd with a leaf certificate for that name and each HTTP/1.1 or
/// HTTP/2 request runs the pipeline; any other TLS gets a destination-level decision and a blind
/// tunnel. Plain HTTP runs the pipeline per request (host from `host_hint`, else `Host`). Other
/// bytes get a destination decision on `host_hint` (or ip:port when `None`) and a tunnel,
/// except to an intercepted host, which is denied `MalformedRequest`. Every decision is
/// audited exactly once; denied connections are closed (HTTP ones after a 403/400 JSON body).
/// Never panics on client input; returns when the connection is done.
pub async fn serve_stream<S>(
    state: Arc<SidecarState>,
    mut stream: S,
    conn: ConnectionInfo,
    host_hint: Option<String>,
    port: u16,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Every branch below is boxed: a task is as large as its largest state, and inline the
    // branches made each connection's task ~29 KiB (heap profile, docs/benchmarks.md) whatever
    // path it took; boxed, a connection holds only the branch it is in.
    let mut buf = Vec::new();
    match sniff(&mut stream, &mut buf, SNIFF_TIMEOUT).await {
        Sniffed::Closed => {}
        Sniffed::Http => {
            let mode = match host_hint {
                Some(host) => HttpMode::Bound {
                    host,
                    port,
                    tls: false,
                },
                None => HttpMode::HostHeader { port },
            };
            Box::pin(serve_http(state, stream, buf, conn, mode, false)).await;
        }
        Sniffed::Tls { sni } => {
            // A name in CONNECT and a different name in SNI is domain fronting: refuse.
            if let (Some(h), Some(s)) = (&host_hint, &sni)
                && h != s
                && h.parse::<std::net::IpAddr>().is_err()
            {
                let detail = format!("TLS server name {s:?} differs from the requested host {h:?}");
                return refuse(&state, &mut stream, &conn, h, port, &detail).await;
            }
            let name = sni.or(host_hint);
            let plan = name.as_deref().map(|n| state.tls_plan(&conn, n));
            match (name, plan) {
                (Some(name), Some(TlsPlan::Intercept { strict })) => {
                    Box::pin(mitm(state, stream, buf, conn, name, port, strict)).await
                }
                (name, _) => {
                    // A blind tunnel holds the replayed bytes for its whole life.
                    buf.shrink_to_fit();
                    Box::pin(tunnel(&state, stream, &buf, &conn, name.as_deref(), port)).await
                }
            }
        }
        Sniffed::Unknown { detail } => {
            if let Some(h) = &host_hint
                && matches!(state.tls_plan(&conn, h), TlsPlan::Intercept { .. })
            {
                let detail = format!("intercepted host {h} requires TLS or HTTP: {detail}");
                return refuse(&state, &mut stream, &conn, h, port, &detail).await;
            }
            buf.shrink_to_fit();
            Box::pin(tunnel(
                &state,
                stream,
                &buf,
                &conn,
                host_hint.as_deref(),
                port,
            ))
            .await;
        }
    }
}

/// Denies a connection before any protocol runs (`MalformedRequest`), boxed like every branch
/// of [`serve_stream`].
async fn refuse<S: AsyncWrite + Unpin>(
    state: &SidecarState,
    stream: &mut S,
    conn: &ConnectionInfo,
    host: &str,
    port: u16,
    detail: &str,
) {
    Box::pin(deny_raw(
        state,
        stream,
        conn,
        Some(host),
        port,
        None,
        detail,
    ))
    .await
}

async fn tunnel<S>(
    state: &SidecarState,
    stream: S,
    prefix: &[u8],
    conn: &ConnectionInfo,
    host: Option<&str>,
    port: u16,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let none = http::HeaderMap::new();
    tunnel::tunnel(
        state,
        stream,
        prefix,
        conn,
        host,
        port,
        &none,
        Reply::Silent,
    )
    .await;
}

async fn mitm<S>(
    state: Arc<SidecarState>,
    stream: S,
    buf: Vec<u8>,
    conn: ConnectionInfo,
    name: String,
    port: u16,
    strict: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(m) = state.mitm.as_ref() else {
        return;
    };
    // Only a client that *rejected our certificate* (a certificate alert: it pins, or does not
    // trust the Firma CA) switches this host to a blind tunnel for it, and only for hosts that
    // opted in (`fallback_hosts`). A handshake that merely
    // ended (EOF, reset, timeout, a client cancelling a connect it no longer needs) must not:
    // that would let any process behind the same client key (a source address, a cgroup)
    // turn interception off for everyone behind it, and a load client cancelling its spare
    // connects got the whole host denied for 300 s (found by the bench harness).
    let fail = |detail: String, rejected_certificate: bool| {
        let fallback = if strict {
            "strict host: denied, no fallback"
        } else if rejected_certificate && m.may_fall_back(&name) {
            m.note_failure(&crate::state::ClientKey::of(&conn), &name);
            "falling back to a blind tunnel for this host, for this client only, for 300 s"
        } else if rejected_certificate {
            "the client rejected the certificate; this connection is closed and nothing else changes (fallback is off for this host: [sidecar.interceptor.https_mitm] fallback_hosts)"
        } else {
            "the client did not reject the certificate: no fallback"
        };
        let d = crate::conn::Decision::deny(
            crate::conn::DenyReason::MalformedRequest,
            format!("TLS interception of {name} failed ({fallback}): {detail}"),
        );
        tracing::warn!(conn = conn.conn_id, host = %name, detail = %d.detail, "MITM failed");
        crate::audit::RequestAudit::new(&state.audit, &conn)
            .target(Some(&name), port, None)
            .deny(&d);
    };
    super::metrics::leaf_lookup();
    let config = match m.leaves.server_config(&name).await {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), false),
    };
    let accept = TlsAcceptor::from(config).accept(Rewind::new(buf, stream));
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await;
    super::metrics::mitm_handshake(matches!(handshake, Ok(Ok(_))));
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let rejected = rejected_certificate(&e);
            return fail(e.to_string(), rejected);
        }
        Err(_) => {
            return fail(
                format!("handshake not completed within {HANDSHAKE_TIMEOUT:?}"),
                false,
            );
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let mode = HttpMode::Bound {
        host: name,
        port,
        tls: true,
    };
    serve_http(state, tls, Vec::new(), conn, mode, h2).await;
}

/// Whether a failed MITM handshake is the client refusing our certificate (a TLS alert about
/// it), as opposed to a connection that just ended.
fn rejected_certificate(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
        ))
    )
}
