//! `cargo xtask …`: build the eBPF object, run the tests, VM tests, demo, benchmarks.

mod bench;
mod demo;
mod fuzz;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use std::process::Command;

mod vm;

#[derive(Parser)]
#[command(about = "Firma developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build everything and run the whole test suite (what CI runs).
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the eBPF object (nightly, `-Z build-std=core`, bpf-linker) and print its path.
    /// `cargo build -p firma-sidecar` does the same through its build script and embeds it.
    BuildEbpf,
    /// Transparent-mode demo (root): authority, sidecar, a local HTTPS "api.openai.com", a
    /// tagged cgroup and unmodified curl showing credential injection and a deny.
    Demo,
    /// Run vm-tests inside a QEMU VM with a kernel of its own (see vm-tests/README.md).
    VmTest(vm::VmTestArgs),
    /// Criterion benches, then the end-to-end load harness (direct vs through the sidecar).
    Bench(bench::BenchArgs),
    /// Build the cargo-fuzz targets (nightly) and run each for N seconds from its seed corpus.
    Fuzz(fuzz::FuzzArgs),
}

/// Runs a command, printing it first and naming it if it fails.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Installs bpf-linker if missing, then builds the eBPF object through
/// `firma_ebpf_build::build`, the code path firma-sidecar/build.rs uses too, and prints its path.
pub fn build_ebpf() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    exec(Command::new("bash").arg(root.join("scripts/install-bpf-linker.sh")))?;
    eprintln!(
        "+ {:?}",
        firma_ebpf_build::command(&root, &firma_ebpf_build::target_arch())
    );
    let obj = firma_ebpf_build::build(&root, firma_ebpf_build::Output::Inherit)
        .map_err(anyhow::Error::msg)?;
    println!("{}", obj.canonicalize().unwrap_or(obj).display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Demo => demo::run(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")),
        Task::VmTest(args) => vm::run(args),
        Task::Fuzz(args) => fuzz::run(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
            args,
        ),
        Task::Bench(args) => bench::run(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
            &args,
        ),
        Task::Test { args } => {
            // The eBPF object must exist for the transparent tests; fail here rather than let
            // them skip silently in CI.
            build_ebpf()?;
            exec(
                Command::new("cargo")
                    .args(["build", "--workspace", "--bins"])
                    .env("FIRMA_EBPF_REQUIRED", "1"),
            )?;
            exec(
                Command::new("cargo")
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .args(args),
            )
        }
    }
}
