//! Options for every TCP socket the sidecar accepts or dials. One place, so no listener or
//! dialer can forget one (the transparent listener once did: without `TCP_NODELAY` a small
//! TLS record waited for the client's delayed ACK, ~40 ms on every new connection).
//!
//! - `TCP_NODELAY`: a proxy forwards whole messages (TLS records, HTTP heads); Nagle's
//!   algorithm only adds a delayed-ACK round (up to 40 ms on Linux) to the second small write.
//! - TCP keep-alive (idle 60 s, then every 10 s, 3 probes): a peer that vanished without a FIN
//!   (host down, NAT state dropped) is noticed within ~90 s instead of the kernel default 2 h, so
//!   its connection slot and limits permit are released.
//! - Buffers stay at the kernel's autotuned defaults: setting `SO_RCVBUF`/`SO_SNDBUF` disables
//!   autotuning, and the sidecar's messages are small.
//! - Interception listeners are opened by [`listen`], with a [`LISTEN_BACKLOG`] deep enough for
//!   a burst of connects while the accept loop is not running.

use std::os::fd::AsFd;

/// Idle time before the first keep-alive probe.
pub const KEEPALIVE_IDLE_SECS: u32 = 60;
/// Time between probes.
pub const KEEPALIVE_INTERVAL_SECS: u32 = 10;
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 3;

/// Listen backlog of the interception listeners (`http_proxy`, the transparent redirect
/// listeners). The std/mio default, 128, is ~45 ms of new connections at the 2,800/s measured on
/// the 2-core bench machine: a connect burst (or the accept thread descheduled for that long on
/// a loaded host) overflows it, and the kernel then drops SYNs, which clients only retry after
/// 1 s, 3 s, 7 s. The kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (`SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// [`LISTEN_BACKLOG`]. Must be called within a Tokio runtime.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Applies the options above. Failures are ignored on purpose: each option is an optimisation,
/// and the socket works without it (the same choice hyper and tonic make).
pub fn tune<S: AsFd>(socket: &S) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::TcpNoDelay, &true);
    let _ = setsockopt(socket, sockopt::KeepAlive, &true);
    let _ = setsockopt(socket, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS);
    let _ = setsockopt(socket, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS);
    let _ = setsockopt(socket, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[tokio::test]
    async fn accepted_and_dialed_sockets_get_every_option() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        for s in [&dialed, &accepted] {
            assert!(
                !getsockopt(s, sockopt::TcpNoDelay).unwrap(),
                "default is off"
            );
            tune(s);
            assert!(getsockopt(s, sockopt::TcpNoDelay).unwrap());
            assert!(getsockopt(s, sockopt::KeepAlive).unwrap());
            assert_eq!(
                getsockopt(s, sockopt::TcpKeepIdle).unwrap(),
                KEEPALIVE_IDLE_SECS
            );
            assert_eq!(
                getsockopt(s, sockopt::TcpKeepInterval).unwrap(),
                KEEPALIVE_INTERVAL_SECS
            );
            assert_eq!(
                getsockopt(s, sockopt::TcpKeepCount).unwrap(),
                KEEPALIVE_PROBES
            );
        }
    }
}
