//! The workload: the test executable re-run with `FIRMA_KERNEL_CLIENT` set to its arguments
//! (`[--cgroup DIR] MODE …`, one a line); [`client_entry`] turns such a process into the client.
//! In `vm-kernel-tests` that is the first thing `main` does; under libtest it is a test of its
//! own that the suite names in [`set_client_args`].
//! The child moves itself into the cgroup before opening any socket (never the test process:
//! writing `cgroup.procs` moves the whole process), then reports what the kernel did on stdout.
//!
//! Modes and their output lines:
//! - `tcp ADDR [MARK]`: `CONNECT ok` or `CONNECT err <errno>`; then `PEER <getpeername>`,
//!   `PID <pid>`, `GOT <first line received>`.
//! - `udp ADDR`: `SENDTO ok|err <errno>` (unconnected), `CONNECT ok|err <errno>` and
//!   `SEND ok|err <errno>` (one datagram on the connected socket).
//! - `udplite ADDR`: the same three lines on an `IPPROTO_UDPLITE` socket; `UNSUPPORTED
//!   <errno>` alone when the kernel has no UDP-Lite.
//! - `ping ADDR`: one ICMP echo request on an unprivileged ping socket (`SOCK_DGRAM`,
//!   `IPPROTO_ICMP`/`ICMPV6`): `PING ok|err <errno>`, or `UNSUPPORTED <errno>` when ping
//!   sockets are not permitted.
//! - `dns ADDR`: one datagram unconnected (`UFROM <sender seen>`, `UGOT <reply>`), one on a
//!   connected UDP socket (`CPEER <getpeername>`, `CGOT <reply>`), one TCP connection
//!   (`TGOT <first line>`), `PID <pid>`; a failure prints `<TAG> err <errno or message>`.
//! - `many ADDR N`: N sequential connects, each reading one line; `OK <count starting ORIG>`.
//! - `latency ADDR N`: N sequential connects, timed and closed at once;
//!   `RESULT n=N mean_us=… p50_us=… p99_us=…`.

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, sendto, setsockopt, socket,
    sockopt,
};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Carries the client's arguments (one a line) to the re-run executable.
pub const CLIENT_ENV: &str = "FIRMA_KERNEL_CLIENT";

static CLIENT_ARGS: OnceLock<Vec<String>> = OnceLock::new();

/// Command-line arguments that make the test executable reach [`client_entry`] (none for
/// `vm-kernel-tests`; under libtest, the name of the test that calls it with `--exact`).
pub fn set_client_args(args: &[&str]) {
    let _ = CLIENT_ARGS.set(args.iter().map(|a| a.to_string()).collect());
}

/// When this process was started as a client ([`CLIENT_ENV`] set), runs it and exits.
pub fn client_entry() {
    if let Some(args) = std::env::var_os(CLIENT_ENV) {
        let args: Vec<String> = args.to_string_lossy().lines().map(String::from).collect();
        std::process::exit(main(&args));
    }
}

/// Entry point of the child. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("client error: {e}");
            2
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut args = args;
    if let [flag, dir, rest @ ..] = args
        && flag == "--cgroup"
    {
        let procs = Path::new(dir).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("cannot join {}: {e}", procs.display()))?;
        args = rest;
    }
    let addr = |s: Option<&String>| -> Result<SocketAddr, String> {
        let s = s.ok_or("missing address")?;
        s.parse().map_err(|e| format!("bad address {s:?}: {e}"))
    };
    match args.first().map(String::as_str) {
        Some("tcp") => {
            let mark = match args.get(2) {
                Some(m) => Some(m.parse::<u32>().map_err(|e| format!("bad mark: {e}"))?),
                None => None,
            };
            tcp(addr(args.get(1))?, mark)
        }
        Some("udp") => {
            udp(addr(args.get(1))?);
            Ok(())
        }
        Some("udplite") => {
            datagram(addr(args.get(1))?, 136);
            Ok(())
        }
        Some("ping") => {
            ping(addr(args.get(1))?);
            Ok(())
        }
        Some("dns") => {
            dns(addr(args.get(1))?);
            Ok(())
        }
        Some("many") => {
            let n: usize = args
                .get(2)
                .ok_or("missing count")?
                .parse()
                .map_err(|e| format!("bad count: {e}"))?;
            many(addr(args.get(1))?, n)
        }
        Some("latency") => {
            let n: usize = args
                .get(2)
                .ok_or("missing count")?
                .parse()
                .map_err(|e| format!("bad count: {e}"))?;
            latency(addr(args.get(1))?, n)
        }
        other => Err(format!("unknown client mode {other:?}")),
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// An IPv6 address (including v4-mapped) gets an AF_INET6 socket, as an app would use.
fn tcp(addr: SocketAddr, mark: Option<u32>) -> Result<(), String> {
    let fd = socket(
        family(&addr),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(m) = mark {
        setsockopt(&fd, sockopt::Mark, &m).map_err(|e| format!("SO_MARK: {e}"))?;
    }
    if let Err(e) = connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        println!("CONNECT err {}", e as i32);
        return Ok(());
    }
    println!("CONNECT ok");
    let stream = TcpStream::from(fd);
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    println!("PEER {peer}");
    println!("PID {}", std::process::id());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    println!("GOT {}", line.trim());
    Ok(())
}

fn udp(addr: SocketAddr) {
    match socket(
        family(&addr),
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => match sendto(
            fd.as_raw_fd(),
            b"x",
            &SockaddrStorage::from(addr),
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(_) => println!("SENDTO ok"),
            Err(e) => println!("SENDTO err {}", e as i32),
        },
        Err(e) => println!("SENDTO err {}", e as i32),
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).and_then(|u| u.connect(addr).map(|()| u));
    match sock {
        Ok(u) => {
            println!("CONNECT ok");
            match u.send(b"y") {
                Ok(_) => println!("SEND ok"),
                Err(e) => println!("SEND err {}", e.raw_os_error().unwrap_or(-1)),
            }
        }
        Err(e) => println!("CONNECT err {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// A datagram socket of `protocol` (raw `socket(2)`: std and nix have no UDP-Lite).
fn raw_dgram(addr: &SocketAddr, protocol: i32) -> Result<std::os::fd::OwnedFd, i32> {
    use std::os::fd::FromRawFd;
    let af = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(af, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn errno(e: nix::errno::Errno) -> i32 {
    e as i32
}

/// `udplite ADDR`: unconnected, then connected, on an `IPPROTO_UDPLITE` socket.
fn datagram(addr: SocketAddr, protocol: i32) {
    let dst = SockaddrStorage::from(addr);
    let flags = nix::sys::socket::MsgFlags::empty();
    let fd = match raw_dgram(&addr, protocol) {
        Ok(fd) => fd,
        Err(e) => {
            println!("UNSUPPORTED {e}");
            return;
        }
    };
    match sendto(fd.as_raw_fd(), b"x", &dst, flags) {
        Ok(_) => println!("SENDTO ok"),
        Err(e) => println!("SENDTO err {}", errno(e)),
    }
    let Ok(fd) = raw_dgram(&addr, protocol) else {
        return;
    };
    if let Err(e) = connect(fd.as_raw_fd(), &dst) {
        println!("CONNECT err {}", errno(e));
        return;
    }
    println!("CONNECT ok");
    match nix::sys::socket::send(fd.as_raw_fd(), b"y", flags) {
        Ok(_) => println!("SEND ok"),
        Err(e) => println!("SEND err {}", errno(e)),
    }
}

/// `ping ADDR`: one echo request (id and checksum are filled in by the kernel).
fn ping(addr: SocketAddr) {
    let (protocol, echo) = if addr.is_ipv4() {
        (libc::IPPROTO_ICMP, 8u8)
    } else {
        (libc::IPPROTO_ICMPV6, 128u8)
    };
    let fd = match raw_dgram(&addr, protocol) {
        Ok(fd) => fd,
        Err(e) => {
            println!("UNSUPPORTED {e}");
            return;
        }
    };
    let packet = [echo, 0, 0, 0, 0, 0, 0, 1, b'e', b'x', b'f', b'i', b'l'];
    match sendto(
        fd.as_raw_fd(),
        &packet,
        &SockaddrStorage::from(addr),
        nix::sys::socket::MsgFlags::empty(),
    ) {
        Ok(_) => println!("PING ok"),
        Err(e) => println!("PING err {}", errno(e)),
    }
}

/// The three ways a resolver library talks to a DNS server, each reporting what came back and
/// from where (the DNS guard's `recvmsg`/`getpeername` hooks must show `addr`).
fn dns(addr: SocketAddr) {
    println!("PID {}", std::process::id());
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let timeout = Some(Duration::from_secs(5));
    let err = |e: std::io::Error| e.raw_os_error().map_or(e.to_string(), |n| n.to_string());
    let unconnected = UdpSocket::bind(bind).and_then(|u| {
        u.set_read_timeout(timeout)?;
        u.send_to(b"q1", addr)?;
        let mut buf = [0u8; 512];
        let (n, from) = u.recv_from(&mut buf)?;
        Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
    });
    match unconnected {
        Ok((from, got)) => println!("UFROM {from}\nUGOT {got}"),
        Err(e) => println!("UGOT err {}", err(e)),
    }
    let connected = UdpSocket::bind(bind).and_then(|u| {
        u.set_read_timeout(timeout)?;
        u.connect(addr)?;
        let peer = u.peer_addr()?;
        u.send(b"q2")?;
        let mut buf = [0u8; 512];
        let n = u.recv(&mut buf)?;
        Ok((peer, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
    });
    match connected {
        Ok((peer, got)) => println!("CPEER {peer}\nCGOT {got}"),
        Err(e) => println!("CGOT err {}", err(e)),
    }
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|s| {
        s.set_read_timeout(timeout)?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    });
    match tcp {
        Ok(got) => println!("TGOT {got}"),
        Err(e) => println!("TGOT err {}", err(e)),
    }
}

fn many(addr: SocketAddr, n: usize) -> Result<(), String> {
    let mut ok = 0;
    for i in 0..n {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect #{i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("read #{i}: {e}"))?;
        if line.starts_with("ORIG ") {
            ok += 1;
        }
    }
    println!("OK {ok}");
    Ok(())
}

fn latency(addr: SocketAddr, n: usize) -> Result<(), String> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect #{i}: {e}"))?;
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        drop(s);
    }
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / n as f64;
    println!(
        "RESULT n={n} mean_us={mean:.2} p50_us={:.2} p99_us={:.2}",
        lat[n / 2],
        lat[n * 99 / 100]
    );
    Ok(())
}

/// What a client child printed.
#[derive(Debug)]
pub struct ClientOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ClientOutput {
    /// The rest of the first line starting with `tag ` (e.g. `line("GOT")`).
    pub fn line(&self, tag: &str) -> Result<&str, String> {
        let prefix = format!("{tag} ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::trim)
            .ok_or_else(|| format!("client printed no {tag} line: {self}"))
    }
}

impl std::fmt::Display for ClientOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stdout={:?} stderr={:?}",
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs this executable as a client child, in `cgroup` when given, without proxy variables.
pub fn run_client(cgroup: Option<&Path>, args: &[&str]) -> Result<ClientOutput, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(CLIENT_ARGS.get().into_iter().flatten());
    let mut all: Vec<String> = Vec::new();
    if let Some(cg) = cgroup {
        all.extend(["--cgroup".into(), cg.display().to_string()]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    cmd.env(CLIENT_ENV, all.join("\n"));
    for v in crate::client::PROXY_VARS {
        cmd.env_remove(v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot spawn client: {e}"))?;
    let out = ClientOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if out.success {
        Ok(out)
    } else {
        Err(format!("client {args:?} failed: {out}"))
    }
}
