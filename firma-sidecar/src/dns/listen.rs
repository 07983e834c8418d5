//! The DNS guard's listeners: UDP and TCP on 127.0.0.1 and [::1], each query admitted by the
//! [`super::policy`] and answered by the [`DnsGuard`].

use super::metrics::{self, DnsOutcome};
use super::{DnsError, DnsGuard, Origin, Transport};
use crate::audit::RequestAudit;
use crate::conn::{Decision, DenyReason, InterceptKind};
use crate::drain::Drain;
use crate::interceptor::limits::Limits;
use crate::interceptor::redirect_listener::{self as listener, Redirected, Unredirected};
use serde_json::Map;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Binds the DNS listeners (UDP and TCP on 127.0.0.1:port and [::1]:port) and serves them under
/// `drain`. Fails if any cannot be bound: half a guard would refuse some workloads' DNS without
/// saying why.
pub async fn serve(
    guard: Arc<DnsGuard>,
    port: u16,
    drain: Drain,
    limits: Arc<Limits>,
) -> Result<(), DnsError> {
    let bind_err = |source| DnsError::Bind {
        port,
        cause: source,
    };
    let addrs = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for a in addrs {
        udp.push(UdpSocket::bind(a).await.map_err(bind_err)?);
        tcp.push(TcpListener::bind(a).await.map_err(bind_err)?);
    }
    tracing::info!(
        target: "firma_sidecar",
        port,
        upstream = ?guard.upstream.servers(),
        allow = ?guard.policy.allow_list().patterns(),
        "DNS guard listening on 127.0.0.1:{port} and [::1]:{port} (UDP and TCP)"
    );
    if guard.upstream.servers().is_empty() {
        tracing::warn!(
            "DNS guard: no upstream resolver ([sidecar.dns] upstream empty and none in /etc/resolv.conf); allowed names get SERVFAIL"
        );
    }
    for s in udp {
        drain.spawn(udp_loop(guard.clone(), Arc::new(s), drain.clone()));
    }
    for l in tcp {
        let (g, r) = (guard.clone(), guard.clone());
        drain.spawn(listener::accept_loop(
            l,
            guard.redirector.clone(),
            drain.clone(),
            limits.clone(),
            move |c| tcp_conn(g.clone(), c),
            move |u: Unredirected| {
                let o = Origin {
                    peer: u.peer,
                    original_dst: None,
                    workload: None,
                    cgroup: 0,
                };
                if r.admit(&o).is_some() {
                    let r = r.clone();
                    tokio::spawn(async move { r.answer(&[], &o, Transport::Tcp).await });
                }
            },
        ));
    }
    Ok(())
}

async fn udp_loop(guard: Arc<DnsGuard>, sock: Arc<UdpSocket>, drain: Drain) {
    // One byte more than any datagram, so an oversized one is seen whole (and refused).
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            _ = drain.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
        };
        let origin = guard.udp_origin(peer);
        let Some(permit) = guard.admit(&origin) else {
            continue;
        };
        let bytes = buf[..n].to_vec();
        let (g, s) = (guard.clone(), sock.clone());
        drain.spawn(async move {
            let _permit = permit;
            if let Some(reply) = g.answer(&bytes, &origin, Transport::Udp).await
                && let Err(e) = s.send_to(&reply, origin.peer).await
            {
                tracing::debug!(peer = %origin.peer, error = %e, "DNS UDP reply not sent");
            }
        });
    }
}

/// One redirected TCP connection: length-prefixed queries, answered in turn.
async fn tcp_conn(guard: Arc<DnsGuard>, c: Redirected) {
    let Redirected {
        mut stream,
        peer,
        original_dst,
        workload,
    } = c;
    let origin = Origin {
        peer,
        original_dst: Some(original_dst),
        cgroup: workload.as_ref().map_or(0, |w| w.cgroup_id),
        workload,
    };
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            // Closed between queries, or idle: nothing to audit.
            _ => return,
        };
        let mut body = vec![0u8; len];
        let mut got = 0;
        // A stall leaves `got` at what did arrive.
        let _ = tokio::time::timeout(TCP_IDLE, read_full(&mut stream, &mut body, &mut got)).await;
        let Some(_permit) = guard.admit(&origin) else {
            return;
        };
        if got < len {
            // The length prefix promised more than arrived: audited, connection closed.
            let mut f = Map::new();
            f.insert("transport".into(), "tcp".into());
            let why = format!(
                "TCP length prefix says {len} bytes, the connection delivered {got} before closing or stalling"
            );
            f.insert("malformed".into(), why.clone().into());
            let conn = guard.state.new_conn(
                InterceptKind::Dns,
                origin.peer,
                origin.original_dst,
                origin.workload.clone(),
            );
            RequestAudit::new(&guard.state.audit, &conn)
                .method(Some("DNS"))
                .target(None, original_dst.port(), None)
                .dns(f)
                .deny(&Decision::deny(DenyReason::MalformedRequest, why));
            metrics::query(DnsOutcome::Dropped, "unknown");
            return;
        }
        let Some(reply) = guard.answer(&body, &origin, Transport::Tcp).await else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// Reads until `buf` is full or the peer stops, counting what arrived in `got`.
async fn read_full(s: &mut TcpStream, buf: &mut [u8], got: &mut usize) {
    while *got < buf.len() {
        match s.read(&mut buf[*got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => *got += n,
        }
    }
}
