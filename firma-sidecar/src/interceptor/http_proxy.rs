//! `mode = "http_proxy"`: the listener apps reach with `HTTP_PROXY`/`HTTPS_PROXY`.
//!
//! The first request head on a connection decides: `CONNECT host:port` becomes a tunnel
//! (MITM'd via [`serve_stream`] for intercepted hosts, otherwise a destination-level decision
//! *before* answering 200, so a denied tunnel gets a readable 403); anything else is served as
//! HTTP with absolute-form URIs.

use super::head::{self, HeadError};
use super::http::{HEAD_TIMEOUT, HttpMode, deny_raw, normalize_host, serve_http};
use super::limits::{self, AcceptBackoff, ClientKey, Limits};
use super::rewind::Rewind;
use super::serve::serve_stream;
use super::tunnel::{Reply, tunnel};
use crate::conn::InterceptKind;
use crate::state::{SidecarState, TlsPlan};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// Accepts until drain begins; each admitted connection is a task the drain waits for. A
/// connection over `[sidecar.limits]` gets a 503 and is closed at once.
pub async fn serve(state: Arc<SidecarState>, listener: TcpListener, limits: Arc<Limits>) {
    let mut backoff = AcceptBackoff::new("http_proxy");
    loop {
        let accepted = tokio::select! {
            _ = state.drain.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                match limits.admit(ClientKey::Ip(peer.ip())) {
                    Ok(permit) => {
                        crate::sockopt::tune(&stream);
                        let (st, lim) = (state.clone(), limits.clone());
                        crate::workers::dispatch(&state.drain, stream, move |s| {
                            lim.scope(permit, handle(st, s, peer))
                        });
                    }
                    Err(r) => limits::refuse(stream, &limits::rejection_response(r)),
                }
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
    tracing::info!("http_proxy listener stopped accepting");
}

async fn handle(state: Arc<SidecarState>, mut stream: TcpStream, peer: SocketAddr) {
    let conn = state.new_conn(InterceptKind::HttpProxy, peer, None, None);
    let _counted = crate::interceptor::metrics::connection(conn.kind);
    let span = tracing::info_span!("conn", id = conn.conn_id, %peer);
    async move {
        let mut buf = Vec::new();
        match head::read_head(&mut stream, &mut buf, HEAD_TIMEOUT).await {
            Err(HeadError::Closed) => {}
            Err(HeadError::H2Preface) => {
                Box::pin(serve_http(state, stream, buf, conn, HttpMode::Proxy, true)).await
            }
            Err(HeadError::Malformed(detail)) => {
                Box::pin(deny_raw(&state, &mut stream, &conn, None, 0, None, &detail)).await
            }
            Ok(h) if h.method == "CONNECT" => {
                let rest = buf.split_off(h.len);
                // The CONNECT head is parsed: its buffer must not live as long as the tunnel.
                drop(buf);
                let Some((host, port)) = connect_target(&h.target) else {
                    let detail = format!("CONNECT target {:?} is not host:port", h.target);
                    deny_raw(
                        &state,
                        &mut stream,
                        &conn,
                        None,
                        0,
                        Some("CONNECT"),
                        &detail,
                    )
                    .await;
                    return;
                };
                // Boxed like the other branches (see `serve_stream`).
                Box::pin(connect(state, stream, rest, conn, (host, port), h.headers)).await;
            }
            Ok(_) => Box::pin(serve_http(state, stream, buf, conn, HttpMode::Proxy, false)).await,
        }
    }
    .instrument(span)
    .await
}

fn connect_target(target: &str) -> Option<(String, u16)> {
    let auth: http::uri::Authority = target.parse().ok()?;
    let port = auth.port_u16().filter(|p| *p != 0)?;
    if auth.as_str() != target {
        return None;
    }
    Some((normalize_host(auth.host())?, port))
}

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// `CONNECT host:port`: an intercepted host is answered 200 at once and served like any TLS
/// connection (each request decided); any other goes down the one tunnel path, decided with
/// the `CONNECT` request's own headers and answered before any byte is tunnelled.
async fn connect(
    state: Arc<SidecarState>,
    mut stream: TcpStream,
    rest: Vec<u8>,
    conn: crate::conn::ConnectionInfo,
    target: (String, u16),
    headers: http::HeaderMap,
) {
    let (host, port) = target;
    if matches!(state.tls_plan(&conn, &host), TlsPlan::Intercept { .. }) {
        if stream.write_all(ESTABLISHED).await.is_err() {
            return;
        }
        Box::pin(serve_stream(
            state,
            Rewind::new(rest, stream),
            conn,
            Some(host),
            port,
        ))
        .await;
        return;
    }
    Box::pin(tunnel(
        &state,
        stream,
        &rest,
        &conn,
        Some(&host),
        port,
        &headers,
        Reply::Connect,
    ))
    .await;
}

#[cfg(test)]
mod tests {
    use super::connect_target;

    #[test]
    fn connect_targets() {
        assert_eq!(
            connect_target("API.example.com:443"),
            Some(("api.example.com".into(), 443))
        );
        assert_eq!(connect_target("[::1]:8443"), Some(("::1".into(), 8443)));
        assert_eq!(connect_target("example.com"), None);
        assert_eq!(connect_target("example.com:0"), None);
        assert_eq!(connect_target("http://example.com:80/"), None);
        assert_eq!(connect_target("exa mple.com:80"), None);
    }
}
