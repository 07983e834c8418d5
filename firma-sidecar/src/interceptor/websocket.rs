//! WebSocket over HTTP/1.1 (`Upgrade: websocket`).
//!
//! The upgrade request is an ordinary request to the pipeline: mapping, Stage 1/2, credential
//! injection and the persisted ALLOW decision happen before it leaves. The connector sends it on
//! a dedicated HTTP/1.1 upstream connection (never pooled, ALPN `http/1.1`); on `101 Switching
//! Protocols` the sidecar answers the client's 101 and relays bytes both ways until either side
//! closes (or nothing moves for the tunnel idle timeout). The `outcome` audit event is written at
//! close with the bytes each way and the session's duration. A denied upgrade gets the JSON
//! denial and the connection is closed (the framing guard stops checking heads after an upgrade
//! request, so nothing may follow a refused one). RFC 8441 (WebSocket over HTTP/2) is not
//! offered: HTTP/2 clients get a plain request.

use crate::audit::Committed;
use crate::conn::ConnectorOutcome;
use http::{HeaderMap, Method, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::time::Instant;

/// Whether a request head asks for a WebSocket upgrade: `GET` with an `Upgrade` header naming
/// `websocket` and a `Connection` header naming `upgrade`.
pub fn is_upgrade_head(method: &str, headers: &HeaderMap) -> bool {
    method.eq_ignore_ascii_case("GET")
        && has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade")
}

/// [`is_upgrade_head`] for a parsed HTTP/1.1 request.
pub fn is_upgrade(method: &Method, version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_11 && is_upgrade_head(method.as_str(), headers)
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// After both 101s: relays until either side closes or the tunnel idle timeout, then writes
/// the outcome (bytes each way, duration).
pub async fn relay(
    client: OnUpgrade,
    upstream: OnUpgrade,
    mut committed: Committed,
    drain: crate::drain::Drain,
) {
    let started = Instant::now();
    let mut outcome: ConnectorOutcome = committed.outcome_mut().clone();
    let (c, u) = tokio::join!(client, upstream);
    let (c, u) = match (c, u) {
        (Ok(c), Ok(u)) => (c, u),
        (c, _) => {
            // The client went away before taking its 101, or the upstream side failed.
            let reason = if c.is_err() {
                "ClientGone"
            } else {
                "UpstreamUnavailable"
            };
            tracing::debug!(reason, "WebSocket upgrade did not complete");
            outcome.aborted = Some(reason.into());
            committed.finish(outcome);
            return;
        }
    };
    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
    let idle = super::limits::timeouts().tunnel_idle;
    tokio::select! {
        moved = super::limits::copy_until_idle(&mut c, &mut u, idle) => match moved {
            Ok(m) => {
                if m.idle {
                    outcome.aborted = Some("Idle".into());
                }
                outcome.bytes_up = Some(m.up);
                outcome.bytes_down = Some(m.down);
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket relay ended with an error"),
        },
        _ = drain.cancelled() => outcome.aborted = Some("Draining".into()),
    }
    outcome.duration_ms = Some(started.elapsed().as_millis() as u64);
    committed.finish(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "WebSocket".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(is_upgrade_head("GET", &h));
        assert!(!is_upgrade_head("POST", &h));
        assert!(!is_upgrade(&Method::GET, http::Version::HTTP_2, &h));
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        assert!(!is_upgrade_head("GET", &h), "Connection must name upgrade");
        h.insert(header::CONNECTION, "upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        assert!(!is_upgrade_head("GET", &h));
    }
}
