//! Opening upstream connections: TCP (optionally `SO_MARK`ed), TLS verified for a host name
//! (offering ALPN `h2` then `http/1.1`), and the HTTP client handshake the server chose.

use super::pool::Sender;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

pub type UpstreamIo = Either<TcpStream, TlsStream<TcpStream>>;
pub use crate::http_body::ReqBody;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("setting SO_MARK {mark:#x} on the upstream socket (needs CAP_NET_ADMIN): {detail}")]
    Mark { mark: u32, detail: String },
    #[error("{name:?} is not a valid TLS server name")]
    BadName { name: String },
    #[error("TLS handshake with {name} at {addr}: {cause}")]
    Tls {
        name: String,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("HTTP/1.1 handshake with {addr}: {cause}")]
    Http {
        addr: SocketAddr,
        cause: hyper::Error,
    },
    #[error("HTTP/2 handshake with {addr}: {cause}")]
    Http2 {
        addr: SocketAddr,
        cause: hyper::Error,
    },
}

/// Opens upstream connections with one TLS client configuration.
#[derive(Clone)]
pub struct Dialer {
    tls: Arc<ClientConfig>,
    /// The same with ALPN `http/1.1` only (WebSocket upgrades need an HTTP/1.1 hop).
    tls_h1: Arc<ClientConfig>,
}

impl Dialer {
    pub fn new(tls: Arc<ClientConfig>) -> Self {
        let mut h1 = (*tls).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            tls,
            tls_h1: Arc::new(h1),
        }
    }

    /// TCP to `addr`; TLS verified for `tls_name` when given. `mark` sets `SO_MARK` before
    /// connecting so the kernel programs never redirect the sidecar's own traffic.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
    ) -> Result<UpstreamIo, DialError> {
        self.connect_with(addr, tls_name, mark, &self.tls).await
    }

    async fn connect_with(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
        tls_config: &Arc<ClientConfig>,
    ) -> Result<UpstreamIo, DialError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|source| DialError::Connect {
            addr,
            cause: source,
        })?;
        if let Some(mark) = mark {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark).map_err(
                |e| DialError::Mark {
                    mark,
                    detail: e.to_string(),
                },
            )?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|source| DialError::Connect {
                addr,
                cause: source,
            })?;
        crate::sockopt::tune(&tcp);
        let Some(name) = tls_name else {
            return Ok(Either::Left(tcp));
        };
        let server_name =
            ServerName::try_from(name.to_string()).map_err(|_| DialError::BadName {
                name: name.to_string(),
            })?;
        let tls = TlsConnector::from(tls_config.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|source| DialError::Tls {
                name: name.to_string(),
                addr,
                cause: source,
            })?;
        Ok(Either::Right(tls))
    }

    /// [`Self::connect`] plus the HTTP handshake: HTTP/2 when TLS negotiated `h2` or when
    /// `h2c` asks for plaintext HTTP/2 with prior knowledge, HTTP/1.1 otherwise. The connection
    /// task runs in the background until every sender is dropped.
    pub async fn open(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
        h2c: bool,
    ) -> Result<Sender, DialError> {
        let io = self.connect(addr, tls_name, mark).await?;
        let h2 = match &io {
            Either::Left(_) => h2c,
            Either::Right(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()),
        };
        let io = TokioIo::new(io);
        if h2 {
            let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .adaptive_window(true)
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true);
            let (sender, conn) = b
                .handshake(io)
                .await
                .map_err(|cause| DialError::Http2 { addr, cause })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            return Ok(Sender::H2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|cause| DialError::Http { addr, cause })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Sender::H1(sender))
    }
}

impl Dialer {
    /// An HTTP/1.1 connection (ALPN `http/1.1` only) that supports upgrades, for one WebSocket
    /// session; never pooled.
    pub async fn open_upgradable(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
    ) -> Result<hyper::client::conn::http1::SendRequest<ReqBody>, DialError> {
        let io = self
            .connect_with(addr, tls_name, mark, &self.tls_h1)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|cause| DialError::Http { addr, cause })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// An idle pooled HTTP/2 connection is pinged this often, so a dead one is noticed before a
/// request is put on it.
const H2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// Transparent mode depends on the mark being on the socket before `connect`.
    #[tokio::test]
    async fn upstream_socket_carries_so_mark() {
        crate::tls::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = Dialer::new(crate::tls::upstream::client_config(
            rustls::RootCertStore::empty(),
        ));
        match dialer.connect(addr, None, Some(0x4649_524d)).await {
            Ok(Either::Left(tcp)) => {
                let mark =
                    nix::sys::socket::getsockopt(&tcp, nix::sys::socket::sockopt::Mark).unwrap();
                assert_eq!(mark, 0x4649_524d);
            }
            Err(DialError::Mark { .. }) => {
                eprintln!("SKIP: setting SO_MARK needs CAP_NET_ADMIN");
            }
            other => panic!("unexpected: {:?}", other.map(|_| ())),
        }
        let plain = dialer.connect(addr, None, None).await.unwrap();
        let Either::Left(tcp) = plain else { panic!() };
        assert_eq!(
            nix::sys::socket::getsockopt(&tcp, nix::sys::socket::sockopt::Mark).unwrap(),
            0
        );
    }
}
