//! The Authority's accepted gRPC connections (its main service and the audit collector).

use std::time::Duration;
use tonic::transport::server::TcpIncoming;

/// Accepted connections with `TCP_NODELAY` and TCP keep-alive. `serve_with_incoming` ignores
/// the builder's socket options, and without `TCP_NODELAY` a unary reply waited for the client's
/// delayed ACK: ~40 ms per sequential `IssueCapability` on loopback (docs/benchmarks.md).
pub(crate) fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .with_keepalive_interval(Some(Duration::from_secs(10)))
        .with_keepalive_retries(Some(3))
}
