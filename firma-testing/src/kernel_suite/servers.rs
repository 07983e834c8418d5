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
