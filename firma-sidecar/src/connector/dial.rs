//! Opening upstream connections: TCP (optionally `SO_MARK`ed), TLS verified for a host name,
//! and an HTTP/1.1 client handshake on top.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

pub type UpstreamIo = Either<TcpStream, TlsStream<TcpStream>>;
pub type ReqBody = BoxBody<Bytes, hyper::Error>;

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
}

/// Opens upstream connections with one TLS client configuration.
#[derive(Clone)]
pub struct Dialer {
    tls: Arc<ClientConfig>,
}

impl Dialer {
    pub fn new(tls: Arc<ClientConfig>) -> Self {
        Self { tls }
    }

    /// TCP to `addr`; TLS verified for `tls_name` when given. `mark` sets `SO_MARK` before
    /// connecting so the kernel programs never redirect the sidecar's own traffic.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
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
        let tls = TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|source| DialError::Tls {
                name: name.to_string(),
                addr,
                cause: source,
            })?;
        Ok(Either::Right(tls))
    }

    /// [`Self::connect`] plus an HTTP/1.1 handshake; the connection task runs in the background.
    pub async fn http1(
        &self,
        addr: SocketAddr,
        tls_name: Option<&str>,
        mark: Option<u32>,
    ) -> Result<SendRequest<ReqBody>, DialError> {
        let io = self.connect(addr, tls_name, mark).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| DialError::Http {
                addr,
                cause: source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

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
