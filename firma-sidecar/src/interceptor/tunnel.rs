//! Destination-level decisions and blind tunnels (no HTTP parsing), for every mode.

use super::idle::Moved;
use crate::audit::{Committed, ConnectorOutcome, RequestAudit};
use crate::conn::{ConnectionInfo, Decision, DenyReason};
use crate::connector::binding::Unbound;
use crate::connector::dial::UpstreamIo;
use crate::pipeline::DestinationContext;
use crate::response;
use crate::state::SidecarState;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub enum TunnelStart {
    /// Denied by the pipeline, or its decision could not be persisted (already audited).
    Denied(Decision),
    /// Allowed but the upstream could not be reached (already audited as an abort).
    Failed(String),
    /// Allowed, persisted and connected; [`pump`] records the outcome when it ends.
    Open(Box<UpstreamIo>, Box<Committed>),
}

/// How a client learns its tunnel's fate: a transparent client only sees the connection open
/// or close; a `CONNECT` client gets an HTTP answer (200, 403, 502) before any tunnelled byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Silent,
    Connect,
}

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// The one tunnel path for every mode: decide the destination (with the `CONNECT` request's
/// headers when there was one, so `x-firma-capability`/`x-firma-session` apply), persist the
/// decision, connect, answer the client as `reply` says, and pump until either side closes.
/// `prefix`: bytes already read from the client, sent upstream first.
#[allow(clippy::too_many_arguments)]
pub async fn tunnel<S>(
    state: &SidecarState,
    mut stream: S,
    prefix: &[u8],
    conn: &ConnectionInfo,
    host: Option<&str>,
    port: u16,
    headers: &http::HeaderMap,
    reply: Reply,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answer: Option<Vec<u8>> = match decide_and_connect(state, conn, host, port, headers).await {
        TunnelStart::Open(up, committed) => {
            if reply == Reply::Connect && stream.write_all(ESTABLISHED).await.is_err() {
                return;
            }
            return pump(stream, up, prefix, committed).await;
        }
        TunnelStart::Denied(d) => (reply == Reply::Connect).then(|| response::raw_deny(&d)),
        TunnelStart::Failed(detail) => (reply == Reply::Connect).then(|| {
            response::raw_abort(
                http::StatusCode::BAD_GATEWAY,
                "UpstreamUnavailable",
                &detail,
            )
        }),
    };
    if let Some(bytes) = answer {
        let _ = stream.write_all(&bytes).await;
    }
    let _ = stream.shutdown().await;
}

/// Decides the destination, persists the decision, then connects when allowed.
pub async fn decide_and_connect(
    state: &SidecarState,
    conn: &ConnectionInfo,
    host: Option<&str>,
    port: u16,
    headers: &http::HeaderMap,
) -> TunnelStart {
    let dst = DestinationContext {
        conn: conn.clone(),
        host: host.map(str::to_string),
        port,
    };
    let rec = RequestAudit::new(&state.audit, conn).target(host, port, None);
    let decision = state.pipeline.decide_connect(&dst, headers).await;
    if !decision.is_allow() {
        rec.deny(&decision);
        return TunnelStart::Denied(decision);
    }
    // The upstream is an address of the decided name (or the ruled IP), never one the client
    // chose: bound before the decision is persisted, so a mismatch is the decision.
    let addr = match state.connector.bind(host, port, conn).await {
        Ok(a) => a,
        Err(Unbound::Mismatch(m)) => {
            let denied = decision.into_deny(DenyReason::DestinationMismatch, m.detail);
            tracing::warn!(conn = conn.conn_id, host = host.unwrap_or("-"), port, detail = %denied.detail, "destination mismatch");
            rec.destination(m.record).deny(&denied);
            return TunnelStart::Denied(denied);
        }
        Err(Unbound::Unresolved(e)) => {
            let outcome = ConnectorOutcome {
                aborted: Some("UpstreamUnavailable".into()),
                ..ConnectorOutcome::default()
            };
            rec.abort_before_send(&decision, outcome);
            return TunnelStart::Failed(e);
        }
    };
    // Nothing is sent (not even a SYN) before the decision is in the audit sink.
    let mut committed = match rec.commit(&decision, ConnectorOutcome::default()).await {
        Ok(c) => c,
        Err((rec, e)) => return TunnelStart::Denied(rec.deny_unaudited(&e)),
    };
    let started = std::time::Instant::now();
    let connected = state.connector.connect_tunnel(host, addr, conn).await;
    committed.outcome_mut().upstream_us = started.elapsed().as_micros() as u64;
    match connected {
        Ok(io) => TunnelStart::Open(Box::new(io), Box::new(committed)),
        Err(e) => {
            tracing::warn!(conn = conn.conn_id, host = host.unwrap_or("-"), port, error = %e, "tunnel upstream unavailable");
            let mut outcome = committed.outcome_mut().clone();
            outcome.aborted = Some("UpstreamUnavailable".into());
            committed.finish(outcome);
            TunnelStart::Failed(e)
        }
    }
}

/// Copies both ways until either side closes or nothing moves for the tunnel idle timeout
/// (`[sidecar.limits] tunnel_idle_timeout_secs`); `prefix` (bytes already read from the client)
/// goes upstream first. The tunnel's outcome (bytes each way) is recorded when it ends.
pub async fn pump<C>(
    mut client: C,
    mut upstream: Box<UpstreamIo>,
    prefix: &[u8],
    mut committed: Box<Committed>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut outcome = committed.outcome_mut().clone();
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        outcome.aborted = Some("UpstreamUnavailable".into());
        committed.finish(outcome);
        return;
    }
    let idle = super::idle::timeouts().tunnel_idle;
    match super::idle::copy_until_idle(&mut client, &mut upstream, idle).await {
        Ok(Moved {
            up,
            down,
            idle: went_idle,
        }) => {
            if went_idle {
                tracing::debug!(idle_secs = idle.as_secs(), "closing idle tunnel");
                outcome.aborted = Some("Idle".into());
            }
            outcome.bytes_up = Some(up + prefix.len() as u64);
            outcome.bytes_down = Some(down);
        }
        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
    committed.finish(outcome);
}
