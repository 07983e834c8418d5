//! `cargo xtask vm-test`: runs `vm-tests` inside a QEMU VM with a kernel of its own.
//!
//! Steps: host tools (QEMU, static busybox; installed with apt only when missing and root), the
//! musl target, a static build of `vm-kernel-tests` with the eBPF object embedded, Debian's
//! current kernel (cached under `target/vm/kernel/`), an initramfs, and a boot under TCG (or
//! KVM where it really works) with a hard timeout. See `vm-tests/README.md`.

mod initramfs;
mod kernel;
mod qemu;

use crate::exec;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MUSL: &str = "x86_64-unknown-linux-musl";
const BIN: &str = "vm-kernel-tests";
const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Kill the VM after this many seconds (QEMU exits 0 even after a guest panic, so a
    /// missing DONE marker is also a failure).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Run only the tests whose name contains this.
    filter: Option<String>,
}

pub fn run(args: VmTestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // The filter ends up in the guest's /init shell script.
    if let Some(f) = &args.filter
        && !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        bail!("filter {f:?}: use letters, digits and `_` only (a part of a test name)");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let work = target_dir.join("vm");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let busybox = host_tools()?;
    let t = Instant::now();
    let tests = build_tests(&root, &target_dir)?;
    eprintln!("vm-test: test binary ready in {:.1?}", t.elapsed());

    let t = Instant::now();
    let vmlinux = kernel::vmlinux(&work)?;
    eprintln!("vm-test: kernel ready in {:.1?}", t.elapsed());

    let initrd = work.join("initramfs.cpio");
    initramfs::build(
        &initrd,
        &busybox,
        &tests,
        args.filter.as_deref().unwrap_or(""),
    )?;
    eprintln!(
        "vm-test: initramfs {} ({} MB)",
        initrd.display(),
        std::fs::metadata(&initrd)?.len() >> 20
    );

    let t = Instant::now();
    let report = qemu::boot(&vmlinux, &initrd, Duration::from_secs(args.timeout))?;
    eprintln!(
        "vm-test: VM ran {:.1?}; {} passed, {} failed; total {:.1?}",
        t.elapsed(),
        report.passed.len(),
        report.failed.len(),
        started.elapsed()
    );
    match report.problem() {
        Some(why) => bail!("vm-test failed: {why}"),
        None => Ok(()),
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn static_busybox() -> Option<PathBuf> {
    BUSYBOX_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read(p).is_ok_and(|d| initramfs::is_static_elf(&d)))
}

/// QEMU and a static busybox; installs them with apt when missing and running as root.
fn host_tools() -> anyhow::Result<PathBuf> {
    let have_qemu = which("qemu-system-x86_64");
    let busybox = static_busybox();
    if have_qemu && busybox.is_some() && which("xz") {
        return busybox.context("checked above");
    }
    let packages = ["qemu-system-x86", "busybox-static", "xz-utils", "zstd"];
    if !kernel::is_root() {
        bail!(
            "missing host tools; run as root: apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        );
    }
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !which("qemu-system-x86_64") {
        bail!("qemu-system-x86_64 still missing after installing qemu-system-x86");
    }
    static_busybox().context("no static busybox at /bin/busybox after installing busybox-static")
}

/// Builds the test binary statically for musl and checks it is static and has the eBPF object.
fn build_tests(root: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    // The eBPF part of firma-sidecar's build script is target-independent (nightly, bpfel);
    // FIRMA_EBPF_REQUIRED turns a missing toolchain into a build error instead of an empty
    // object and skipped tests.
    let mut cargo = Command::new("cargo");
    cargo
        .args(["build", "-p", "vm-tests", "--bin", BIN, "--target", MUSL])
        .env("FIRMA_EBPF_REQUIRED", "1")
        .current_dir(root);
    // ring compiles C; cc-rs looks for x86_64-linux-musl-gcc, which Debian does not ship. The
    // host gcc/ar target the same architecture and ring's C needs no libc headers of note.
    for (var, tool) in [
        ("CC_x86_64_unknown_linux_musl", "gcc"),
        ("AR_x86_64_unknown_linux_musl", "ar"),
    ] {
        if std::env::var_os(var).is_none() && !which("x86_64-linux-musl-gcc") {
            cargo.env(var, tool);
        }
    }
    exec(&mut cargo)?;
    let built = target_dir.join(MUSL).join("debug").join(BIN);
    let data = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
    if !initramfs::is_static_elf(&data) {
        bail!("{} is not statically linked", built.display());
    }
    // It runs on the host too (static): ask it whether the object is embedded.
    exec(Command::new(&built).arg("--check-object"))?;
    // Debug info is most of the size; the VM copies the initramfs into RAM at every boot.
    let stripped = target_dir.join("vm").join(BIN);
    std::fs::copy(&built, &stripped)?;
    if let Err(e) = exec(Command::new("strip").arg("--strip-debug").arg(&stripped)) {
        eprintln!("vm-test: not stripped ({e}); using the full binary");
    }
    Ok(stripped)
}
