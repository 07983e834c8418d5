//! `cargo xtask vm-test`: runs `vm-tests` inside QEMU VMs, one kernel after another.
//!
//! Steps: host tools (QEMU, static busybox; installed with apt only when missing and root), the
//! musl target, static builds of `vm-kernel-tests` (eBPF object embedded) and `firma`, then per
//! kernel of the matrix: the Debian package fetched by version (cached under
//! `~/.cache/firma/kernels/`), an initramfs, and a boot under TCG (or KVM where it really works)
//! with a hard timeout, where `firma doctor` runs before the suite. A table (kernel x test) is
//! printed and written to `target/vm-test/results.json`. See `vm-tests/README.md` and
//! `docs/kernels.md`.

mod initramfs;
mod kernel;
mod matrix;
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
    /// Kill each VM after this many seconds (QEMU exits 0 even after a guest panic, so a
    /// missing DONE marker is also a failure).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Kernel to boot; repeat for several. A name (6.1, 6.1-cloud, 6.1-rt, 6.12, 6.12-cloud,
    /// 6.12-rt), a Debian package (linux-image-6.1.0-57-cloud-amd64), or a vmlinux/vmlinuz path.
    /// Default: the matrix 6.1, 6.1-cloud, 6.1-rt, 6.12-cloud (or FIRMA_VM_KERNEL if set).
    #[arg(long = "kernel", value_name = "NAME")]
    kernels: Vec<String>,
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
    let specs = kernel_specs(&args.kernels)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let work = target_dir.join("vm");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let busybox = host_tools()?;
    let t = Instant::now();
    let (tests, firma) = build_guest_binaries(&root, &target_dir)?;
    eprintln!("vm-test: guest binaries ready in {:.1?}", t.elapsed());

    let mut results = Vec::new();
    for spec in &specs {
        let name = spec.name();
        eprintln!("\n==> vm-test: kernel {name}");
        let result = match run_kernel(spec, &work, &busybox, &tests, &firma, &args) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vm-test: kernel {name}: {e:#}");
                matrix::KernelResult::unavailable(name, format!("{e:#}"))
            }
        };
        results.push(result);
    }

    let table = matrix::table(&results);
    println!("\n{table}");
    for r in results.iter().filter(|r| !r.console_tail.is_empty()) {
        println!(
            "\nlast console lines of {} (the whole console is echoed above):",
            r.kernel
        );
        for line in &r.console_tail {
            println!("  {} | {line}", r.kernel);
        }
    }
    let out_dir = target_dir.join("vm-test");
    std::fs::create_dir_all(&out_dir)?;
    let json = out_dir.join("results.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&serde_json::json!({ "kernels": results }))?,
    )
    .with_context(|| format!("write {}", json.display()))?;
    eprintln!(
        "vm-test: {} kernel(s) in {:.1?}; results in {}",
        results.len(),
        started.elapsed(),
        json.display()
    );
    let bad: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("vm-test failed on {}", bad.join(", "))
    }
}

/// `--kernel` values, else `FIRMA_VM_KERNEL`, else the default matrix.
fn kernel_specs(given: &[String]) -> anyhow::Result<Vec<kernel::Spec>> {
    if !given.is_empty() {
        return given.iter().map(|k| kernel::Spec::parse(k)).collect();
    }
    if let Some(path) = std::env::var_os("FIRMA_VM_KERNEL") {
        return Ok(vec![kernel::Spec::File(PathBuf::from(path))]);
    }
    kernel::DEFAULT_MATRIX
        .iter()
        .map(|k| kernel::Spec::parse(k))
        .collect()
}

/// Fetches one kernel, builds its initramfs and boots it.
fn run_kernel(
    spec: &kernel::Spec,
    work: &Path,
    busybox: &Path,
    tests: &Path,
    firma: &Path,
    args: &VmTestArgs,
) -> anyhow::Result<matrix::KernelResult> {
    let t = Instant::now();
    let k = kernel::fetch(spec, work)?;
    eprintln!("vm-test: kernel {} ready in {:.1?}", k.name, t.elapsed());
    let initrd = work.join("initramfs.cpio");
    let config = k.release.as_deref().zip(k.config.as_deref());
    initramfs::build(
        &initrd,
        &initramfs::Payload {
            busybox,
            tests,
            firma,
            config,
        },
        args.filter.as_deref().unwrap_or(""),
    )?;
    eprintln!(
        "vm-test: initramfs {} ({} MB)",
        initrd.display(),
        std::fs::metadata(&initrd)?.len() >> 20
    );
    let t = Instant::now();
    let boot = || {
        qemu::boot(
            &k.vmlinux,
            &initrd,
            Duration::from_secs(args.timeout),
            &k.name,
        )
    };
    let mut report = boot()?;
    // A guest that never reached `/init` ran none of Firma's code: that is the emulator or the
    // host (seen once in CI, not reproduced in dozens of boots), so it gets one more boot, and
    // the result says so. A guest that booted and then died is never retried.
    let mut retried = None;
    if !report.booted && !report.timed_out {
        let why = report.problem().unwrap_or_else(|| "no boot marker".into());
        eprintln!("vm-test: kernel {}: booting again: {why}", k.name);
        for line in &report.tail {
            eprintln!("  {} | {line}", k.name);
        }
        retried = Some(why);
        report = boot()?;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "vm-test: kernel {}: VM ran {secs:.1}s; {} passed, {} failed",
        k.name,
        report.passed.len(),
        report.failed.len(),
    );
    let mut result = matrix::KernelResult::from_report(&k, &report, secs);
    result.retried = retried;
    Ok(result)
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
    // The decompressors of the matrix's kernels: xz (6.1 generic, rt), lz4 (6.1 cloud), zstd
    // (6.12).
    if have_qemu && busybox.is_some() && ["xz", "lz4", "zstd"].iter().all(|t| which(t)) {
        return busybox.context("checked above");
    }
    let packages = [
        "qemu-system-x86",
        "busybox-static",
        "xz-utils",
        "zstd",
        "lz4",
    ];
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

/// Builds the test binary and `firma` statically for musl, checks both are static and that the
/// eBPF object is embedded, and returns copies with debug info stripped.
fn build_guest_binaries(root: &Path, target_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    // The eBPF part of firma-sidecar's build script is target-independent (nightly, bpfel);
    // FIRMA_EBPF_REQUIRED turns a missing toolchain into a build error instead of an empty
    // object and skipped tests.
    let mut cargo = Command::new("cargo");
    cargo
        .args([
            "build", "-p", "vm-tests", "--bin", BIN, "-p", "firma", "--bin", "firma",
        ])
        .args(["--target", MUSL])
        .env("FIRMA_EBPF_REQUIRED", "1")
        .current_dir(root);
    // ring and mimalloc compile C; cc-rs looks for x86_64-linux-musl-gcc, which Debian does
    // not ship. The host gcc/ar target the same architecture.
    for (var, tool) in [
        ("CC_x86_64_unknown_linux_musl", "gcc"),
        ("AR_x86_64_unknown_linux_musl", "ar"),
    ] {
        if std::env::var_os(var).is_none() && !which("x86_64-linux-musl-gcc") {
            cargo.env(var, tool);
        }
    }
    exec(&mut cargo)?;
    let mut out = Vec::new();
    for bin in [BIN, "firma"] {
        let built = target_dir.join(MUSL).join("debug").join(bin);
        let data = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
        if !initramfs::is_static_elf(&data) {
            bail!("{} is not statically linked", built.display());
        }
        // Debug info is most of the size; the VM copies the initramfs into RAM at every boot.
        let stripped = target_dir.join("vm").join(bin);
        std::fs::copy(&built, &stripped)?;
        if let Err(e) = exec(Command::new("strip").arg("--strip-debug").arg(&stripped)) {
            eprintln!("vm-test: {bin} not stripped ({e}); using the full binary");
        }
        out.push(stripped);
    }
    // It runs on the host too (static): ask it whether the object is embedded.
    exec(Command::new(&out[0]).arg("--check-object"))?;
    let firma = out.pop().context("two binaries")?;
    let tests = out.pop().context("two binaries")?;
    Ok((tests, firma))
}
