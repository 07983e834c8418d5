//! The test environment: root/BPF checks, a private network namespace with the test addresses,
//! and test cgroups and pin directories that clean up after themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Addresses put on `lo` inside the private network namespace. Nothing outside the namespace is
/// ever a destination; without the namespace these have no route and fail rather than leak.
pub const DST_V4: &str = "10.77.0.2";
pub const DST_V6: &str = "fd77::2";
pub const EXCLUDED_V4: &str = "10.77.1.2";
pub const EXCLUDED_CIDR: &str = "10.77.1.0/24";

/// `Some(reason)` when this machine cannot run the kernel tests.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the tests load eBPF programs and create cgroups)".into());
    }
    if let Err(e) = firma_sidecar::ebpf::embedded_object() {
        return Some(e.to_string());
    }
    if let Err(e) = firma_sidecar::ebpf::Cgroup2::discover() {
        return Some(format!("no cgroup2: {e}"));
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
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{DST_V4}/32"), "dev", "lo"])?;
    ip(&["addr", "add", &format!("{EXCLUDED_V4}/32"), "dev", "lo"])?;
    // No `nodad`: busybox's ip lacks it, and the kernel skips DAD on loopback anyway.
    ip(&["-6", "addr", "add", &format!("{DST_V6}/128"), "dev", "lo"])?;
    Ok(())
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call (cgroups and pins of concurrent runs never clash).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
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

    /// A test cgroup directly under the cgroup2 mount.
    pub fn top(prefix: &str) -> Result<Self, String> {
        let cg2 = firma_sidecar::ebpf::Cgroup2::discover().map_err(|e| e.to_string())?;
        Self::new(cg2.mount().join(unique(prefix)))
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
            dir: PathBuf::from(firma_sidecar::ebpf::bpffs::DEFAULT_BPFFS).join(unique("firma-vm")),
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

/// Polls `f` until it returns `Some` or `deadline` passes (things the kernel does after a
/// socket closes are not synchronous with the close).
pub fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
