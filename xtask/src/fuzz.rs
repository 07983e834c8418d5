//! `cargo xtask fuzz [--seconds N] [TARGET]`: build the cargo-fuzz targets in `fuzz/` once
//! (nightly, libFuzzer, AddressSanitizer) and run each for N seconds from its checked-in seed
//! corpus `fuzz/corpus/<target>/`. See docs/fuzzing.md.
//!
//! New inputs go to a working corpus under the fuzz target dir, so the seed corpus only changes
//! when someone adds a file on purpose. A crash stops the run with the artifact's path.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Pinned so a CI run does not pick up a new cargo-fuzz with different flags.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &[
    "http_head",
    "tls_sniff",
    "mapping",
    "capability",
    "config",
    "dns_query",
    "mcp",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Build directory (default: `fuzz/target`, or `$FIRMA_FUZZ_TARGET_DIR`). Keeping it
    /// between runs turns a ~15 min cold build into an incremental one.
    #[arg(long, env = "FIRMA_FUZZ_TARGET_DIR")]
    target_dir: Option<PathBuf>,
    /// Run only this target (one of: http_head, tls_sniff, mapping, capability, config).
    target: Option<String>,
}

/// `cargo …` on the nightly toolchain with the environment `cargo xtask` runs under removed
/// (it pins the stable toolchain and the workspace's target dir).
fn nightly_cargo(fuzz_dir: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"])
        .current_dir(fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

fn ensure_cargo_fuzz(fuzz_dir: &Path) -> anyhow::Result<()> {
    let out = nightly_cargo(fuzz_dir).args(["fuzz", "--version"]).output();
    let installed = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if installed.as_deref() == Some(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        return Ok(());
    }
    crate::exec(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))
}

/// The last `n` lines of a log, for a failure report.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// libFuzzer's `-print_final_stats=1` figures: (executed runs, execs/s).
fn stats(log: &Path) -> (String, String) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let stat = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_start_matches(':').trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    (
        stat("stat::number_of_executed_units"),
        stat("stat::average_exec_per_sec"),
    )
}

pub fn run(root: &Path, args: FuzzArgs) -> anyhow::Result<()> {
    let fuzz_dir = root.join("fuzz");
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target {t:?}; known: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz(&fuzz_dir)?;
    let target_dir = args
        .target_dir
        .clone()
        .unwrap_or_else(|| fuzz_dir.join("target"));
    std::fs::create_dir_all(&target_dir)
        .with_context(|| format!("cannot create {}", target_dir.display()))?;
    // The sidecar embeds its eBPF object; the fuzz targets never load it, so an empty one
    // spares a nested nightly BPF build.
    let no_ebpf = target_dir.join("empty-ebpf.o");
    std::fs::write(&no_ebpf, b"").with_context(|| format!("cannot write {}", no_ebpf.display()))?;
    let fuzz = |sub: &str| {
        let mut c = nightly_cargo(&fuzz_dir);
        c.args(["fuzz", sub, "--target-dir"])
            .arg(&target_dir)
            .env("FIRMA_EBPF_OBJECT", &no_ebpf);
        c
    };

    crate::exec(&mut fuzz("build"))?;
    let mut report = Vec::new();
    for t in &targets {
        let work = target_dir.join("corpus").join(t);
        let logs = target_dir.join("logs");
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{t}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot write {}", log.display()))?;
        eprintln!(
            "fuzzing {t} for {} s (log: {})",
            args.seconds,
            log.display()
        );
        let status = fuzz("run")
            .arg(t)
            .arg(&work)
            .arg(fuzz_dir.join("corpus").join(t))
            .args([
                "--",
                &format!("-max_total_time={}", args.seconds),
                "-print_final_stats=1",
                "-rss_limit_mb=4096",
            ])
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .status()
            .with_context(|| format!("cannot start cargo fuzz run {t}"))?;
        if !status.success() {
            bail!(
                "fuzz target {t} failed ({status}); reproduce with the artifact named below \
                 (`cargo +nightly fuzz run {t} <artifact>` in fuzz/)\n{}",
                tail(&log, 60)
            );
        }
        let (runs, per_sec) = stats(&log);
        report.push(format!("{t:<12} {runs:>10} runs  {per_sec:>7} exec/s"));
    }
    eprintln!("fuzzing passed, {} s per target:", args.seconds);
    for line in report {
        eprintln!("  {line}");
    }
    Ok(())
}
