//! Forwarding allowed questions to the configured resolvers (or the host's, from
//! /etc/resolv.conf). The guard sends a query of its own making (see
//! [`super::query::upstream_query`]) over the transport the client used: UDP answers come back
//! as they are, truncation bit included, so the client retries over TCP as it would with any
//! resolver. Sockets carry the sidecar's `SO_MARK` so the eBPF programs never redirect them.

use super::query::{self, Answer, Question};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Why no answer came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error(
        "no upstream resolver configured ([sidecar.dns] upstream empty, none in /etc/resolv.conf)"
    )]
    NoServer,
    #[error("no answer from {0} within the timeout")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
}

impl UpstreamError {
    /// The abort name the audit `outcome` carries (as for HTTP upstreams).
    pub fn abort_reason(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "UpstreamTimeout",
            _ => "UpstreamUnavailable",
        }
    }

    /// The `kind` label of `firma_sidecar_dns_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoServer => "no_server",
            Self::Timeout(_) => "timeout",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

pub struct Upstream {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    mark: u32,
}

/// The `nameserver` lines of a resolv.conf text, port 53.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        // A scoped IPv6 address (fe80::1%eth0) is skipped rather than misparsed.
        .filter_map(crate::config::parse_dns_server)
        .collect()
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration, mark: u32) -> Self {
        Self {
            servers,
            timeout,
            mark,
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks each server in turn until one answers `q`; returns the answer under the client's id.
    pub async fn resolve(
        &self,
        q: &Question,
        tcp: bool,
    ) -> Result<(Vec<u8>, Answer, SocketAddr), UpstreamError> {
        let mut last = UpstreamError::NoServer;
        for server in &self.servers {
            let id: u16 = rand::random();
            let out = query::upstream_query(q, id);
            let attempt = if tcp {
                self.over_tcp(*server, &out, id, q).await
            } else {
                self.over_udp(*server, &out, id, q).await
            };
            match attempt {
                Ok((bytes, answer)) => return Ok((query::with_id(bytes, q.id), answer, *server)),
                Err(e) => {
                    tracing::debug!(%server, error = %e, "DNS upstream failed; trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn mark<F: AsFd>(&self, f: &F) {
        if let Err(e) = nix::sys::socket::setsockopt(f, nix::sys::socket::sockopt::Mark, &self.mark)
        {
            tracing::debug!(error = %e, "cannot set SO_MARK on a DNS upstream socket");
        }
    }

    async fn over_udp(
        &self,
        server: SocketAddr,
        out: &[u8],
        id: u16,
        q: &Question,
    ) -> Result<(Vec<u8>, Answer), UpstreamError> {
        let unavailable = |e: std::io::Error| UpstreamError::Unavailable(format!("{server}: {e}"));
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap_or(server)
        } else {
            "[::]:0".parse().unwrap_or(server)
        };
        let sock = UdpSocket::bind(bind).await.map_err(unavailable)?;
        self.mark(&sock);
        sock.connect(server).await.map_err(unavailable)?;
        sock.send(out).await.map_err(unavailable)?;
        let mut buf = vec![0u8; 65_535];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| UpstreamError::Timeout(server.to_string()))?
                .map_err(unavailable)?;
            // Anything that is not the answer to this query (stray, spoofed) is ignored.
            if let Some(a) = query::check_answer(&buf[..n], id, q) {
                return Ok((buf[..n].to_vec(), a));
            }
        }
    }

    async fn over_tcp(
        &self,
        server: SocketAddr,
        out: &[u8],
        id: u16,
        q: &Question,
    ) -> Result<(Vec<u8>, Answer), UpstreamError> {
        let unavailable = |e: std::io::Error| UpstreamError::Unavailable(format!("{server}: {e}"));
        let exchange = async {
            let sock = if server.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(unavailable)?;
            self.mark(&sock);
            let mut s = sock.connect(server).await.map_err(unavailable)?;
            let len = u16::try_from(out.len())
                .map_err(|_| UpstreamError::Unavailable("query too long".into()))?;
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(out);
            s.write_all(&framed).await.map_err(unavailable)?;
            let n = s.read_u16().await.map_err(unavailable)?;
            let mut buf = vec![0u8; usize::from(n)];
            s.read_exact(&mut buf).await.map_err(unavailable)?;
            let a = query::check_answer(&buf, id, q).ok_or_else(|| {
                UpstreamError::Unavailable(format!("{server}: answer does not match the query"))
            })?;
            Ok((buf, a))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(server.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameserver_lines() {
        let t = "# c\nsearch x\nnameserver 10.0.0.2\nnameserver fd00::53\nnameserver fe80::1%eth0\noptions ndots:1\n";
        assert_eq!(
            resolv_conf_servers(t),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
    }
}
