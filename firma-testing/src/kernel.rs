//! Kernel fixtures for transparent mode: root/BPF checks, private network namespaces with the
//! test addresses, and test cgroups and bpffs pin directories that clean up after themselves.

use crate::unique;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Addresses put on `lo` inside the private network namespace. Nothing outside the namespace is
/// ever a destination; without the namespace these have no route and fail rather than leak.
pub const DST_V4: &str = "10.77.0.2";
pub const DST_V6: &str = "fd77::2";
pub const EXCLUDED_V4: &str = "10.77.1.2";
pub const EXCLUDED_CIDR: &str = "10.77.1.0/24";

/// Env var marking the inner run of [`in_fresh_netns`].
const NETNS_VAR: &str = "FIRMA_TEST_NETNS";

/// `Some(reason)` when this machine cannot run the kernel tests.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the tests load eBPF programs and create cgroups)".into());
    }
    if let Err(e) = firma_sidecar::ebpf::embedded_object() {
        return Some(format!(
            "no eBPF object in this build (run scripts/install-bpf-linker.sh): {e}"
        ));
    }
    if let Err(e) = firma_sidecar::ebpf::Cgroup2::discover() {
        return Some(format!("no cgroup2: {e}"));
    }
    if !Path::new(firma_sidecar::ebpf::bpffs::DEFAULT_BPFFS).exists() {
        return Some("kernel without BPF filesystem support".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` not installed (iproute2 or busybox)".into());
    }
    None
}

/// Moves this process into a fresh network namespace with `lo` up and the test addresses on
/// it. Must run before any thread is started: a namespace switch applies to the calling
/// thread, and threads and children started afterwards inherit it.
pub fn enter_private_netns() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    add_test_addresses()
}

/// Brings `lo` up and adds the test addresses to it (in the current network namespace).
pub fn add_test_addresses() -> Result<(), String> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{DST_V4}/32"), "dev", "lo"])?;
    ip(&["addr", "add", &format!("{EXCLUDED_V4}/32"), "dev", "lo"])?;
    // No `nodad`: busybox's ip lacks it. The kernel skips DAD on loopback, but a fresh
    // namespace's address can still refuse a bind for a moment (EADDRNOTAVAIL, seen on a
    // loaded machine): wait until it binds.
    ip(&["-6", "addr", "add", &format!("{DST_V6}/128"), "dev", "lo"])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind((DST_V6, 0)) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(format!("{DST_V6} is not usable 10 s after adding it: {e}"));
            }
            // Poll interval of the wait for the address to become usable (DAD), bounded.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// For libtest tests: runs the calling test again inside `unshare --net` (a fresh network
/// namespace with `lo` up and the test addresses on it). Returns `true` in the inner run,
/// where the test body goes; in the outer run it waits for the inner one, asserts it passed
/// and returns `false`. Prints `SKIP` and returns `false` when [`skip_reason`] says so.
pub fn in_fresh_netns(test_name: &str) -> bool {
    if std::env::var_os(NETNS_VAR).is_some() {
        add_test_addresses().expect("test addresses");
        return true;
    }
    let why = skip_reason().or_else(|| {
        Command::new("unshare")
            .arg("--help")
            .output()
            .is_err()
            .then(|| "`unshare` not installed".to_string())
    });
    if let Some(why) = why {
        crate::skip(test_name, &why);
        return false;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(NETNS_VAR, "1")
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

/// Runs `args` as a command and returns its stdout; panics when it fails.
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

/// A cgroup made by a test, removed (with its children) on drop.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(dir: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    /// A test cgroup named `name` directly under the cgroup2 mount.
    pub fn top(name: &str) -> Result<Self, String> {
        let cg2 = firma_sidecar::ebpf::Cgroup2::discover().map_err(|e| e.to_string())?;
        Self::new(cg2.mount().join(name))
    }

    /// A test cgroup with a [`unique`] name from `prefix` under the cgroup2 mount.
    pub fn unique(prefix: &str) -> Result<Self, String> {
        Self::top(&unique(prefix))
    }

    /// The mount-relative path (`/name`), as the redirector reports it.
    pub fn rel_path(&self) -> String {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        format!("/{}", name.unwrap_or_default())
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
    // cgroup directories go with rmdir (their control files go with them).
    let _ = std::fs::remove_dir(dir);
}

/// A bpffs pin directory unique to the test, removed (unpinning everything) on drop.
pub struct TestPins {
    pub dir: PathBuf,
}

impl TestPins {
    pub fn new() -> Self {
        Self {
            dir: PathBuf::from(firma_sidecar::ebpf::bpffs::DEFAULT_BPFFS)
                .join(unique("firma-test")),
        }
    }
}

impl Default for TestPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
