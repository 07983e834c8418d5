//! Destination-level decisions and blind tunnels (no HTTP parsing).

use crate::audit::{AuditInput, ConnectorOutcome};
use crate::connector::dial::UpstreamIo;
use crate::pipeline::{ConnectionInfo, Decision, DenyReason, DestinationContext};
use crate::state::SidecarState;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub enum TunnelStart {
    /// Denied by the pipeline (already audited).
    Denied(Decision),
    /// Allowed but the upstream could not be reached (already audited as an abort).
    Failed(String),
    /// Allowed and connected (already audited).
    Open(Box<UpstreamIo>),
}

/// Decides the destination, connects when allowed, and writes exactly one audit record.
pub async fn decide_and_connect(
    state: &SidecarState,
    conn: &ConnectionInfo,
    host: Option<&str>,
    port: u16,
) -> TunnelStart {
    let dst = DestinationContext {
        conn: conn.clone(),
        host: host.map(str::to_string),
        port,
    };
    let decision = state.pipeline.decide_destination(&dst).await;
    let record = |d: &Decision, outcome: Option<ConnectorOutcome>| {
        state.record(AuditInput {
            conn,
            method: None,
            host,
            port,
            path: None,
            decision: d,
            connector: outcome,
        })
    };
    if !decision.is_allow() {
        tracing::info!(
            conn = conn.conn_id,
            host = host.unwrap_or("-"),
            port,
            reason = decision.reason.map_or("-", DenyReason::as_str),
            "tunnel denied"
        );
        record(&decision, None);
        return TunnelStart::Denied(decision);
    }
    let mut outcome = ConnectorOutcome::default();
    let started = std::time::Instant::now();
    let connected = async {
        let addr = state.connector.tunnel_addr(host, port, conn).await?;
        let timeout = state.connector.timeout_for(host.unwrap_or_default());
        match tokio::time::timeout(
            timeout,
            state
                .connector
                .dialer()
                .connect(addr, None, state.connector.mark_for(conn)),
        )
        .await
        {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connecting to {addr} timed out")),
        }
    }
    .await;
    outcome.upstream_us = started.elapsed().as_micros() as u64;
    match connected {
        Ok(io) => {
            tracing::info!(
                conn = conn.conn_id,
                host = host.unwrap_or("-"),
                port,
                "tunnel allowed"
            );
            record(&decision, Some(outcome));
            TunnelStart::Open(Box::new(io))
        }
        Err(e) => {
            tracing::warn!(conn = conn.conn_id, host = host.unwrap_or("-"), port, error = %e, "tunnel upstream unavailable");
            outcome.aborted = Some("UpstreamUnavailable".into());
            record(&decision, Some(outcome));
            TunnelStart::Failed(e)
        }
    }
}

/// Copies both ways until either side closes or nothing moves for the tunnel idle timeout
/// (`[sidecar.limits] tunnel_idle_timeout_secs`); `prefix` (bytes already read from the client)
/// goes upstream first.
pub async fn pump<C>(mut client: C, mut upstream: Box<UpstreamIo>, prefix: &[u8])
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return;
    }
    let idle = super::limits::timeouts().tunnel_idle;
    if let Ok(true) = super::limits::copy_until_idle(&mut client, &mut upstream, idle).await {
        tracing::debug!(idle_secs = idle.as_secs(), "closing idle tunnel");
    }
}
