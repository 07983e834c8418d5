//! Listeners that run as threads of the test process: the stand-in for the sidecar's
//! transparent listener and the "upstreams" a workload would reach without redirection.

use firma_sidecar::ebpf::Redirector;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

type Handler = Arc<dyn Fn(TcpStream, SocketAddr) + Send + Sync>;

/// Accept loops on some addresses, each connection answered by a handler. Stopped (and the
/// listening sockets closed) on drop, so the next test can bind the same addresses.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(addrs: &[SocketAddr], handler: Handler) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for addr in addrs {
            let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("nonblocking {addr}: {e}"))?;
            let (stop, accepted, handler) = (stop.clone(), accepted.clone(), handler.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = s.set_nonblocking(false);
                            handler(s, peer);
                        }
                        // Poll interval of a non-blocking accept loop (stops on `stop`).
                        Err(_) => std::thread::sleep(Duration::from_millis(3)),
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            accepted,
            threads,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Stands in for the sidecar on 127.0.0.1:port and [::1]:port: answers each connection with
/// `ORIG <original dst> <agent> <cgroup path> <pid>` as the redirector reports it, or `NOENTRY`.
pub fn fake_sidecar(port: u16, r: Arc<Redirector>) -> Result<Server, String> {
    let addrs = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    Server::start(
        &addrs,
        Arc::new(move |mut s, peer| {
            let line = match r.original_destination(peer) {
                Some(o) => {
                    let w = r.workload(&o);
                    format!(
                        "ORIG {} {} {} {}\n",
                        o.socket_addr(),
                        w.as_ref().map_or("-", |w| w.agent_id.as_str()),
                        w.as_ref().map_or("-", |w| w.cgroup_path.as_str()),
                        o.pid
                    )
                }
                None => "NOENTRY\n".into(),
            };
            let _ = s.write_all(line.as_bytes());
        }),
    )
}

/// Stands in for the sidecar's DNS guard listener: UDP on 127.0.0.1:port and [::1]:port answers
/// each datagram with `ORIG …` as [`Redirector::dns_origin`] reports its sender (or `NOENTRY`);
/// TCP is [`fake_sidecar`] on the same port (TCP/53 is tracked like any redirected connection).
/// Returns the TCP server and the UDP threads' stop handle (drop both to stop).
pub fn fake_dns(port: u16, r: Arc<Redirector>) -> Result<(Server, UdpServer), String> {
    let addrs = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    let tcp = fake_sidecar(port, r.clone())?;
    let udp = UdpServer::start(
        &addrs,
        Arc::new(move |peer| match r.dns_origin(peer) {
            Some(o) => {
                let w = r.workload(&o);
                format!(
                    "ORIG {} {} {} {}",
                    o.socket_addr(),
                    w.as_ref().map_or("-", |w| w.agent_id.as_str()),
                    w.as_ref().map_or("-", |w| w.cgroup_path.as_str()),
                    o.pid
                )
            }
            None => "NOENTRY".into(),
        }),
    )?;
    Ok((tcp, udp))
}

type UdpHandler = Arc<dyn Fn(SocketAddr) -> String + Send + Sync>;

/// UDP receive loops answering each datagram with what the handler says about its sender;
/// stopped on drop.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(addrs: &[SocketAddr], handler: UdpHandler) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for addr in addrs {
            let u = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
            u.set_read_timeout(Some(Duration::from_millis(20)))
                .map_err(|e| format!("timeout {addr}: {e}"))?;
            let (stop, received, handler) = (stop.clone(), received.clone(), handler.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = u.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::Relaxed);
                        let _ = u.send_to(handler(peer).as_bytes(), peer);
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            received,
            threads,
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A direct destination that answers `UPSTREAM`; its accept count proves whether a workload
/// reached it.
pub fn upstream(addr: SocketAddr) -> Result<Server, String> {
    Server::start(
        &[addr],
        Arc::new(|mut s, _| {
            let _ = s.write_all(b"UPSTREAM\n");
        }),
    )
}

/// Counts datagrams of an IP protocol other than UDP (UDP-Lite) arriving at `addr`; stopped on
/// drop. `Ok(None)` when the kernel has no such protocol.
pub struct ProtoReceiver {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl ProtoReceiver {
    pub fn start(addr: SocketAddr, protocol: i32) -> Result<Option<Self>, String> {
        use nix::sys::socket::{SockaddrStorage, bind, recv, setsockopt, sockopt};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let af = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(af, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(|e| format!("bind proto {protocol} {addr}: {e}"))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 20_000),
        )
        .map_err(|e| format!("timeout: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .is_ok()
                {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Some(Self {
            stop,
            received,
            thread: Some(thread),
        }))
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for ProtoReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
