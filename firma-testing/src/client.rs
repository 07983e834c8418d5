//! Clients: curl through the proxy, raw bytes to a socket, and programs started inside a
//! cgroup (with the Python socket clients the transparent tests use).

use crate::text;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Proxy variables removed from every client's environment.
pub const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Result of one curl call.
#[derive(Debug)]
pub struct CurlOut {
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl CurlOut {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// `curl --proxy PROXY --cacert CA ARGS… URL`, printing the status on the last line.
pub fn curl(proxy: &str, ca: &Path, url: &str, args: &[&str]) -> CurlOut {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy", proxy, "--noproxy", ""])
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .args(["-w", "\n%{http_code}", url])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl");
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    CurlOut {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: text(&out.stderr),
    }
}

/// Sends raw bytes to `addr` and returns everything read until close (or 5 s).
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    text(&out)
}

/// `program args…` as a command that first moves itself into `cgroup` (never the test
/// process itself: `sh` writes its own pid, then execs), with no proxy variables in its
/// environment.
pub fn in_cgroup_command<S: AsRef<std::ffi::OsStr>>(
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[S],
) -> Command {
    let mut cmd = Command::new("sh");
    match cgroup {
        Some(cg) => cmd.arg("-c").arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            cg.display()
        )),
        None => cmd.arg("-c").arg("exec \"$@\""),
    };
    cmd.arg("sh").arg(program).args(args);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Runs [`in_cgroup_command`] to completion.
pub fn run_in_cgroup(cgroup: Option<&Path>, program: &str, args: &[&str]) -> Output {
    in_cgroup_command(cgroup, program, args)
        .output()
        .expect("spawn client")
}

/// Python client: connects (TCP) to `host:port` (`family` 4, 6), prints
/// `PEER <ip> <port>` from getpeername, `PID <pid>`, then the first line it receives.
pub const PY_TCP_CLIENT: &str = r#"
import os, socket, sys
host, port, fam = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if fam == '6' else socket.AF_INET, socket.SOCK_STREAM)
if len(sys.argv) > 4:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[4]))
s.settimeout(5)
s.connect((host, port))
peer = s.getpeername()
print('PEER', peer[0], peer[1])
print('PID', os.getpid())
s.sendall(b'hello\n')
print('GOT', s.makefile().readline().strip())
"#;

/// Python client: UDP to `host:443` with sendto and with connect; prints what happened.
pub const PY_UDP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
try:
    s.sendto(b'x', (host, port)); print('SENDTO ok')
except OSError as e:
    print('SENDTO refused', e.errno)
u = socket.socket(fam, socket.SOCK_DGRAM)
try:
    u.connect((host, port)); print('CONNECT ok')
except OSError as e:
    print('CONNECT refused', e.errno)
"#;
