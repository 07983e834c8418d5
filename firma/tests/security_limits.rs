//! `[sidecar.limits]` end to end: the real `firma sidecar` (http_proxy mode) under a 256
//! descriptor limit, flooded with idle HTTP/2 (h2c prior-knowledge) connections that send the
//! preface and then nothing, as in the reported incident. Shows that:
//! - the effective `max_connections` is derived from RLIMIT_NOFILE and logged;
//! - connections beyond the per-client and the total cap are refused at once (503 or close),
//!   never left to time out, and without one WARN per connection;
//! - idle connections are closed after `idle_timeout_secs` (HTTP/2 with no stream, HTTP/1
//!   keep-alive), freeing their descriptors;
//! - a normal client from another address is served throughout the per-client flood, the policy
//!   directory still reloads while every slot is taken, and accept never hits EMFILE;
//! - a request whose upstream takes longer than the idle timeout is not cut (HTTP/1 and HTTP/2);
//! - a connect burst while the accept loop does not run (SIGSTOP) is queued by the kernel, not
//!   dropped: a normal client right after it still connects at once.
//!
//! Every address is on loopback (127.0.0.1 floods, 127.0.0.3 floods, 127.0.0.2 is the normal
//! client); `prlimit` (util-linux) sets the limit.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const NOFILE: u32 = 256;
const IDLE_SECS: u64 = 3;
const PER_CLIENT: usize = 60;
const FLOOD: usize = 300;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends right after the preface.
const H2_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

fn limits_toml(idle: u64, per_client: usize) -> String {
    format!(
        "[sidecar.limits]\nidle_timeout_secs = {idle}\nmax_connections_per_client = {per_client}\n"
    )
}

fn deployment(extra: String) -> (Upstream, Deployment) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com", "api.acme-vendor.com"]);
    let d = Deployment::new(
        Some(&up),
        &Settings {
            upstream_hosts: vec!["api.openai.com".into(), "api.acme-vendor.com".into()],
            default_timeout_ms: 15_000,
            constraint_enforcement: (6, 2000),
            extra,
            ..Settings::default()
        },
    );
    std::mem::forget(tmp); // the upstream CA file must outlive the sidecar
    (up, d)
}

/// `firma sidecar` started through `prlimit --nofile=N:N` (prlimit execs it: same pid).
fn start_limited(config: &std::path::Path, nofile: u32) -> Sidecar {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg(firma_bin())
        .args(["sidecar", "-c", config.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    Sidecar::spawn(cmd).unwrap_or_else(|e| panic!("prlimit firma sidecar: {e}"))
}

/// Descriptors the sidecar process has open.
fn fds_of(sc: &Sidecar) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", sc.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The number after `key=` in the first log line containing it.
fn logged_number(log: &str, key: &str) -> usize {
    log.split(key)
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {key} in log:\n{log}"))
}

/// One flood connection from `from`, having sent the HTTP/2 preface and SETTINGS.
struct Idle {
    s: TcpStream,
    seen: Vec<u8>,
    closed: bool,
}

fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        sock.connect(to).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

fn flood(from: &str, to: SocketAddr, n: usize) -> Vec<Idle> {
    (0..n)
        .map(|_| {
            let mut s = connect_from(from, to);
            // A refused connection may already be closed: a failed write is a result too.
            let _ = s.write_all(H2_PREFACE);
            let _ = s.write_all(&H2_SETTINGS);
            Idle {
                s,
                seen: Vec::new(),
                closed: false,
            }
        })
        .collect()
}

impl Idle {
    /// Reads what is there without waiting long; notes EOF or reset as closed.
    fn poll(&mut self) -> bool {
        if self.closed {
            return true;
        }
        self.s
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        self.closed
    }

    /// The server answered with HTTP/2 frames (its SETTINGS first).
    fn served_h2(&self) -> bool {
        self.seen.len() >= 9 && self.seen[3] == 4
    }

    fn got_503(&self) -> bool {
        self.seen.starts_with(b"HTTP/1.1 503")
    }
}

/// (still open, closed) after polling every connection.
fn census(conns: &mut [Idle]) -> (usize, usize) {
    let closed = conns.iter_mut().map(Idle::poll).filter(|c| *c).count();
    (conns.len() - closed, closed)
}

/// A normal client from 127.0.0.2: one request over MITM'd HTTPS.
fn normal_request(sc: &Sidecar, d: &Deployment, extra: &[&str]) -> CurlOut {
    let mut args = vec!["--interface", "127.0.0.2"];
    args.extend_from_slice(extra);
    curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/models",
        &args,
    )
}

fn warn_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN")).collect()
}

#[test]
fn idle_h2_flood_is_capped_and_closed_while_normal_clients_and_reloads_work() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        firma_testing::skip("idle_h2_flood", "`prlimit` (util-linux) not installed");
        return;
    }
    // The admin listener tells when the normal client's connections are gone (before flood B).
    let (_up, d) = deployment(format!(
        "{}[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n",
        limits_toml(IDLE_SECS, PER_CLIENT)
    ));
    let sc = start_limited(&d.config, NOFILE);
    let log = sc.log_text();
    let max = logged_number(&log, "max_connections=");
    assert!(
        max < NOFILE as usize / 2 && max > PER_CLIENT,
        "effective max_connections {max} must leave room under {NOFILE} descriptors:\n{log}"
    );
    assert!(log.contains("max_connections lowered"), "{log}");
    let fds_idle = fds_of(&sc);
    eprintln!("effective max_connections = {max}; sidecar fds at rest = {fds_idle}");

    // Flood A from 127.0.0.1: the first PER_CLIENT are served, the rest refused at once.
    let mut a = flood("127.0.0.1", sc.addr, FLOOD);
    let flood_a_sent = Instant::now();
    // Settled when every refused one is closed and every admitted one has its SETTINGS.
    let _ = eventually(Duration::from_secs(10), "flood A settled", || {
        census(&mut a) == (PER_CLIENT, FLOOD - PER_CLIENT)
            && a.iter().filter(|c| !c.closed).all(Idle::served_h2)
    });
    let (open_a, closed_a) = census(&mut a);
    assert_eq!(
        (open_a, closed_a),
        (PER_CLIENT, FLOOD - PER_CLIENT),
        "per-client cap\n{}",
        sc.log_text()
    );
    let served = a.iter().filter(|c| !c.closed).all(Idle::served_h2);
    assert!(served, "admitted connections get HTTP/2 SETTINGS");
    let answered_503 = a.iter().filter(|c| c.got_503()).count();
    eprintln!(
        "flood A: {open_a} open, {closed_a} refused ({answered_503} read the 503 before the close)"
    );

    // A normal client from another address is served during the flood, over h1 and h2.
    let out = normal_request(&sc, &d, &[]);
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let out = normal_request(&sc, &d, &["--http2"]);
    assert_eq!(out.status, 200, "{out:?}");

    // Flood B from 127.0.0.3 fills the total cap; beyond it everyone is refused cleanly
    // (a 503, not a timeout), and the descriptors stay below the limit.
    let active = || sc.metric("firma_sidecar_connections_active{mode=\"http_proxy\"}");
    assert_eventually(
        Duration::from_secs(10),
        "the normal client's connections closed",
        || active() == Some(PER_CLIENT as f64),
    );
    let mut b = flood("127.0.0.3", sc.addr, FLOOD);
    let flood_b_sent = Instant::now();
    // Settled when every connection of B is either closed or has its SETTINGS.
    let _ = eventually(Duration::from_secs(10), "flood B settled", || {
        census(&mut b);
        b.iter().all(|c| c.closed || c.served_h2()) && census(&mut b).0 + PER_CLIENT == max
    });
    let (open_b, closed_b) = census(&mut b);
    let (open_a2, _) = census(&mut a);
    assert_eq!(open_a2 + open_b, max, "total cap");
    assert_eq!(open_b + closed_b, FLOOD);
    let fds_full = fds_of(&sc);
    eprintln!("flood B: {open_b} open, {closed_b} refused; sidecar fds at the cap = {fds_full}");
    assert!(fds_full + 64 <= NOFILE as usize, "fds {fds_full}");
    let asked = Instant::now();
    let refused = normal_request(&sc, &d, &["--max-time", "5"]);
    let refused_in = asked.elapsed();
    eprintln!("new client at the total cap: refused in {refused_in:?}: {refused:?}");
    assert!(
        refused.status != 200 && refused_in < Duration::from_secs(2),
        "at the total cap a new client is refused at once: {refused:?}"
    );

    // The policy directory still reloads with every slot taken.
    let installs = |log: &str| log.matches("installed runtime bundle").count();
    let before = installs(&sc.log_text());
    let policy = d.root().join("policies/runtime.cedar");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str("\n// reloaded under connection pressure\n");
    std::fs::write(&policy, text).unwrap();
    assert_eventually(Duration::from_secs(8), "policy reload at the cap", || {
        installs(&sc.log_text()) > before
    });

    // Idle connections are closed after the idle timeout (plus at most the GOAWAY grace for
    // peers that never answer the shutdown PING, as these do not), freeing every slot.
    let wait_closed = |conns: &mut [Idle], since: Instant, what: &str| {
        let deadline = since + Duration::from_secs(IDLE_SECS + 8);
        while conns.iter_mut().any(|c| !c.poll()) {
            assert!(
                Instant::now() < deadline,
                "{what}: idle connections still open:\n{}",
                sc.log_text()
            );
            // Poll interval of a wait on a condition (every connection closed), bounded above.
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = since.elapsed();
        eprintln!(
            "{what}: all idle connections closed {:.2}s after they went quiet (idle_timeout_secs = {IDLE_SECS})",
            after.as_secs_f64()
        );
        assert!(after >= Duration::from_secs(IDLE_SECS), "{what}: {after:?}");
    };
    wait_closed(&mut a, flood_a_sent, "flood A");
    wait_closed(&mut b, flood_b_sent, "flood B");
    assert_eventually(Duration::from_secs(3), "descriptors released", || {
        fds_of(&sc) <= fds_idle + 2
    });
    eprintln!("sidecar fds after idle close = {}", fds_of(&sc));

    // Served again, not stale.
    let out = normal_request(&sc, &d, &[]);
    assert_eq!(out.status, 200, "{out:?}");

    let log = sc.log_text();
    assert!(!log.contains("Too many open files"), "EMFILE:\n{log}");
    assert!(!log.contains("PolicyBundleStale"), "{log}");
    let warns = warn_lines(&log);
    eprintln!(
        "{} WARN lines for {} refused connections",
        warns.len(),
        closed_a + closed_b
    );
    assert!(warns.len() <= 6, "WARN flood:\n{}", warns.join("\n"));
    assert!(
        log.contains("rejected_since_last_report"),
        "refusals reported:\n{log}"
    );
}

#[test]
fn http1_keep_alive_idle_connection_is_closed() {
    let (_up, d) = deployment(limits_toml(1, 100));
    let sc = d.start(&[]);
    let mut s = TcpStream::connect(sc.addr).unwrap();
    // A denied request (no upstream needed) on a keep-alive connection.
    s.write_all(b"GET http://paste.rs/ HTTP/1.1\r\nHost: paste.rs\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let idle = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    eprintln!("HTTP/1 keep-alive connection closed {idle:?} after its request");
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );
}

/// hyper's own header-read timer (30 s) also runs while a keep-alive connection waits for its
/// next request: the configured idle timeout, longer than that, must be the one that closes it.
#[test]
fn http1_keep_alive_lives_for_an_idle_timeout_longer_than_the_head_timeout() {
    const IDLE: u64 = 36;
    let (_up, d) = deployment(limits_toml(IDLE, 100));
    let sc = d.start(&[]);
    let mut s = TcpStream::connect(sc.addr).unwrap();
    let request = b"GET http://paste.rs/ HTTP/1.1\r\nHost: paste.rs\r\n\r\n";
    s.write_all(request).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(IDLE + 20)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 403"), "{:?}", &buf[..n]);
    let started = Instant::now();
    // Blocks until the sidecar closes the connection: the wait is on that event.
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(_) => {}
        }
    };
    eprintln!(
        "HTTP/1 keep-alive connection closed {closed:?} after its answer (idle_timeout_secs = {IDLE})"
    );
    assert!(
        closed >= Duration::from_secs(IDLE - 1) && closed < Duration::from_secs(IDLE + 10),
        "closed after {closed:?}, not at idle_timeout_secs = {IDLE}:\n{}",
        sc.log_text()
    );
}

#[test]
fn slow_response_longer_than_the_idle_timeout_is_not_cut() {
    let (up, d) = deployment(limits_toml(1, 100));
    let sc = d.start(&[]);
    for version in ["--http1.1", "--http2"] {
        let started = Instant::now();
        let out = curl(
            &sc.proxy_url(),
            &d.ca_cert(),
            "https://api.acme-vendor.com/slow?ms=3500",
            &[version],
        );
        let took = started.elapsed();
        assert_eq!(out.status, 200, "{version}: {out:?}\n{}", sc.log_text());
        assert!(took >= Duration::from_millis(3500), "{took:?}");
        eprintln!("{version}: slow response after {took:?} with idle_timeout_secs = 1");
    }
    assert_eq!(up.count(), 2);
}

/// Resumes a process stopped with SIGSTOP when dropped (also when an assertion fails).
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn stop(pid: u32) -> Self {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A connection from `from` to `to` that sends `CONNECT` at once (the kernel queues the bytes
/// until the sidecar reads them).
async fn connect_and_ask(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse().unwrap())?;
    let mut s = sock.connect(to).await?;
    s.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        .await?;
    Ok(s)
}

/// The status line the sidecar answered on `s`.
async fn status_line(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n") && head.len() < 256 {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).trim().to_string()
}

/// Hostile: a burst of connects while the sidecar's accept loop does not run (stopped here
/// with SIGSTOP, as a loaded host deschedules it) is queued by the kernel, not dropped. A
/// normal client connecting right after the burst gets its connection at once, and every
/// queued connection is served once the sidecar runs again. With the std/mio listen backlog
/// (128) the kernel dropped the SYNs past the 129th, and those clients waited for their SYN
/// retransmits (1 s, 3 s, 7 s): one process's connect burst stalled every client's new
/// connections (`sockopt::LISTEN_BACKLOG`).
#[test]
fn a_connect_burst_while_accept_is_stalled_is_queued_not_dropped() {
    const BURST: usize = 500;
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn <= BURST {
        let why =
            format!("net.core.somaxconn = {somaxconn} caps every listen backlog below {BURST}");
        firma_testing::skip("a_connect_burst_while_accept_is_stalled", &why);
        return;
    }
    let (_up, d) = deployment(String::new());
    let sc = d.start(&[]);
    let addr = sc.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stopped = Stopped::stop(sc.process.child.id());

    // The burst, from 127.0.0.3: each completes its handshake in the kernel or not at all.
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let burst: Vec<_> = (0..BURST)
        .map(|_| {
            let connected = connected.clone();
            rt.spawn(async move {
                let s = connect_and_ask("127.0.0.3", addr).await;
                connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                s
            })
        })
        .collect();
    let count = || connected.load(std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = eventually(Duration::from_secs(20), "the whole burst connected", || {
        count() == BURST
    }) {
        panic!(
            "{e}: {} of {BURST} connections completed while accept was stopped; the listen \
             backlog dropped the others' SYNs",
            count()
        );
    }
    // A normal client from 127.0.0.2, after the burst, before the sidecar runs again.
    let normal = rt.spawn(connect_and_ask("127.0.0.2", addr));
    eventually(
        Duration::from_secs(20),
        "the normal client connected",
        || normal.is_finished(),
    )
    .expect("the normal client's SYN was dropped behind the burst");
    drop(stopped);

    rt.block_on(async {
        let mut normal = normal.await.unwrap().expect("normal client connects");
        let line = tokio::time::timeout(Duration::from_secs(60), status_line(&mut normal))
            .await
            .expect("the normal client is answered once the sidecar runs");
        assert!(line.starts_with("HTTP/1.1 200"), "normal client: {line:?}");
        // Every queued connection was accepted and served: none was lost in the queue.
        let mut answered = 0;
        for h in burst {
            let mut s = h.await.unwrap().expect("burst connection");
            let line = tokio::time::timeout(Duration::from_secs(60), status_line(&mut s))
                .await
                .expect("every queued connection is answered");
            assert!(
                line.starts_with("HTTP/1.1 200"),
                "burst connection: {line:?}"
            );
            answered += 1;
        }
        assert_eq!(answered, BURST);
    });
    let out = normal_request(&sc, &d, &[]);
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
}
