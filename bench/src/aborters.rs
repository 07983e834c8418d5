//! Hostile clients for the robustness step: each connects to the proxy, sends CONNECT, then
//! alternately half a TLS ClientHello or a whole one (closing once the ServerHello arrives),
//! and closes. Run alongside a measured scenario, they must not change the
//! figures (host-wide fallback state, a stuck accept loop or a leaked task would).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The first half of a ClientHello: a handshake record announcing 512 bytes, of which only the
/// header and the start of the hello are ever sent.
fn half_client_hello() -> Vec<u8> {
    let mut b = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    b.extend(std::iter::repeat_n(0x5a, 100));
    b
}

pub struct Aborters {
    stop: Arc<AtomicBool>,
    pub aborted: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Aborters {
    /// `workers` threads aborting handshakes through `proxy` (CONNECT `authority`) in a loop.
    pub fn start(proxy: SocketAddr, authority: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let aborted = Arc::new(AtomicU64::new(0));
        let threads = (0..workers)
            .map(|_| {
                let (stop, aborted, authority) =
                    (stop.clone(), aborted.clone(), authority.to_string());
                std::thread::spawn(move || {
                    let mut full = false;
                    while !stop.load(Ordering::Relaxed) {
                        full = !full;
                        if abort_once(proxy, &authority, full).is_ok() {
                            aborted.fetch_add(1, Ordering::Relaxed);
                        }
                        // A steady trickle, not a flood: the step measures state, not capacity.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Self {
            stop,
            aborted,
            threads,
        }
    }

    /// Stops the threads; returns how many handshakes were aborted.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.aborted.load(Ordering::Relaxed)
    }
}

/// One CONNECT, then either half a ClientHello or (`full`) a complete ClientHello for the
/// authority's host, closing once the server's first handshake bytes arrive: the server is then
/// mid-handshake with a client that goes away, which is what a client cancelling its dials does.
fn abort_once(proxy: SocketAddr, authority: &str, full: bool) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    if !buf[..n].starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("CONNECT refused"));
    }
    if !full {
        return s.write_all(&half_client_hello());
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name =
        rustls_pki_types::ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    let mut tls =
        rustls::ClientConnection::new(Arc::new(cfg), name).map_err(std::io::Error::other)?;
    while tls.wants_write() {
        tls.write_tls(&mut s)?;
    }
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::Error::other("closed before the ServerHello"));
    }
    Ok(())
}
