//! Helpers for the transparent-mode tests: root/BPF checks that skip with a message, running a
//! test body inside a fresh network namespace, test cgroups, and clients started inside them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Addresses the tests add to `lo` inside their own network namespace. Nothing outside the
/// namespace is ever a destination; without a route these would fail, not leak.
pub const DST_V4: &str = "10.77.0.2";
pub const DST_V6: &str = "fd77::2";
pub const EXCLUDED_V4: &str = "10.77.1.2";
pub const EXCLUDED_CIDR: &str = "10.77.1.0/24";

/// `Some(reason)` when this host cannot run the eBPF tests.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if firma_sidecar::ebpf::embedded_object().is_err() {
        return Some("no eBPF object in this build (run scripts/install-bpf-linker.sh)".into());
    }
    if let Err(e) = firma_sidecar::ebpf::Cgroup2::discover() {
        return Some(format!("no cgroup2: {e}"));
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() && !Path::new("/sys/fs/bpf").exists() {
        return Some("kernel without BPF filesystem support".into());
    }
    for tool in ["unshare", "ip"] {
        if Command::new(tool).arg("--help").output().is_err() {
            return Some(format!("`{tool}` not installed"));
        }
    }
    None
}

/// Runs the calling test again inside `unshare --net` (a fresh network namespace with `lo` up
/// and the test addresses on it). Returns `true` in the inner run, where the test body goes;
/// in the outer run it waits for the inner one, asserts it passed and returns `false`.
pub fn in_fresh_netns(test_name: &str) -> bool {
    if std::env::var_os("FIRMA_TEST_NETNS").is_some() {
        setup_netns();
        return true;
    }
    if let Some(why) = skip_reason() {
        eprintln!("SKIP {test_name}: {why}");
        return false;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("FIRMA_TEST_NETNS", "1")
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- inner run of {test_name} ---\n{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "{test_name} failed inside its network namespace"
    );
    assert!(
        stdout.contains("1 passed"),
        "{test_name} did not run inside its network namespace"
    );
    false
}

fn setup_netns() {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "addr", "add", &format!("{DST_V4}/32"), "dev", "lo"]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{EXCLUDED_V4}/32"),
        "dev",
        "lo",
    ]);
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{DST_V6}/128"),
        "dev",
        "lo",
        "nodad",
    ]);
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for this test's cgroups and pins.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup made by the test, removed (with its children) on drop.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("create test cgroup");
        Self { dir }
    }

    /// A test cgroup directly under the cgroup2 mount.
    pub fn top(name: &str) -> Self {
        let mount = firma_sidecar::ebpf::Cgroup2::discover().expect("cgroup2");
        Self::new(mount.mount().join(name))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.dir);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // cgroup directories are removed with rmdir (their control files go with them).
    let _ = std::fs::remove_dir(dir);
}

/// A bpffs pin directory unique to the test, removed on drop.
pub struct TestPins {
    pub dir: PathBuf,
}

impl TestPins {
    pub fn new() -> Self {
        Self {
            dir: PathBuf::from("/sys/fs/bpf").join(unique("firma-test")),
        }
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `program args…` as a child that first moves itself into `cgroup` (never the test
/// process itself), with no proxy variables in its environment.
pub fn run_in_cgroup(cgroup: Option<&Path>, program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    match cgroup {
        Some(cg) => cmd.arg("-c").arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            cg.display()
        )),
        None => cmd.arg("-c").arg("exec \"$@\""),
    };
    cmd.arg("sh").arg(program).args(args);
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.output().expect("spawn client")
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn eventually<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free port on both 127.0.0.1 and ::1 (bound briefly to check).
pub fn free_dual_port() -> u16 {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = v4.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
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
