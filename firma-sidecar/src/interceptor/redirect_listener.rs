//! The transparent listeners on 127.0.0.1:port and [::1]:port. Each accepted connection is
//! looked up by its peer address; a connection with no kernel record (not redirected, or its
//! entry already gone) is closed and reported, never served with a guessed destination.

use super::limits::{self, AcceptBackoff, ClientKey, Limits};
use crate::conn::Workload;
use crate::drain::Drain;
use crate::ebpf::Redirector;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// One redirected connection, as the kernel described it.
#[derive(Debug)]
pub struct Redirected {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Where the app connected to.
    pub original_dst: SocketAddr,
    /// The attached workload it came from (`None` if its binding vanished meanwhile).
    pub workload: Option<Workload>,
}

/// A connection accepted on a transparent listener with no redirect record.
#[derive(Debug)]
pub struct Unredirected {
    pub peer: SocketAddr,
}

/// Binds both listeners (fails if either cannot be bound: half a listener would refuse one
/// address family's workloads without saying why).
/// `extra_v4` (`redirect_address`) is bound too: pods in their own network namespace reach it.
/// Each with [`crate::sockopt::LISTEN_BACKLOG`].
pub async fn bind(port: u16, extra_v4: Option<Ipv4Addr>) -> std::io::Result<Vec<TcpListener>> {
    let listen = crate::sockopt::listen;
    let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))?;
    let mut out = vec![v4, v6];
    if let Some(a) = extra_v4 {
        out.push(listen(SocketAddr::from((a, port)))?);
    }
    Ok(out)
}

/// Accepts on `listener` until `drain` begins, resolving each connection through the
/// redirector and handing it to `serve` as a task `drain` tracks (or to `reject` when there is
/// no record; the stream is then dropped, which closes it). A connection over `limits` (per
/// workload cgroup and in total) is closed at once.
pub async fn accept_loop<S, SF, R>(
    listener: TcpListener,
    redirector: Arc<Redirector>,
    drain: Drain,
    limits: Arc<Limits>,
    serve: S,
    reject: R,
) where
    S: Fn(Redirected) -> SF + Send + Sync + 'static,
    SF: std::future::Future<Output = ()> + Send + 'static,
    R: Fn(Unredirected) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let mut backoff = AcceptBackoff::new("transparent");
    loop {
        let accepted = tokio::select! {
            _ = drain.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff.reset();
                // Before anything is written: the MITM handshake's small records must not wait
                // for the client's delayed ACK.
                crate::sockopt::tune(&a.0);
                a
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        match redirector.original_destination(peer) {
            Some(orig) => {
                // Over the limit: closed at once (the client sees a reset or EOF).
                let Ok(permit) = limits.admit(ClientKey::Cgroup(orig.cgroup_id)) else {
                    limits::refuse(stream, &[]);
                    continue;
                };
                let workload = redirector.workload(&orig);
                let original_dst = orig.socket_addr();
                let (serve, lim) = (serve.clone(), limits.clone());
                crate::workers::dispatch(&drain, stream, move |stream| {
                    let conn = Redirected {
                        stream,
                        peer,
                        original_dst,
                        workload,
                    };
                    lim.scope(permit, serve(conn))
                });
            }
            None => {
                tracing::warn!(%peer, "transparent connection without a redirect record; closing");
                reject(Unredirected { peer });
            }
        }
    }
}
