//! `cargo xtask …`: build the eBPF object, run the tests, VM tests, demo, benchmarks.

mod bench;
mod demo;
mod fuzz;
mod imports;

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
    BuildEbpf {
        /// Fail unless the build equals the committed firma-ebpf/prebuilt/firma-ebpf.bpf.o
        /// byte for byte (CI).
        #[arg(long, conflicts_with = "update")]
        check: bool,
        /// Copy the build to firma-ebpf/prebuilt/ (commit it with the eBPF change).
        #[arg(long)]
        update: bool,
    },
    /// Transparent-mode demo (root): authority, sidecar, a local HTTPS "api.openai.com", a
    /// tagged cgroup and unmodified curl showing credential injection and a deny.
    Demo,
    /// Run vm-tests inside a QEMU VM with a kernel of its own (see vm-tests/README.md).
    VmTest(vm::VmTestArgs),
    /// Criterion benches, then the end-to-end load harness (direct vs through the sidecar).
    Bench(bench::BenchArgs),
    /// Build the cargo-fuzz targets (nightly) and run each for N seconds from its seed corpus.
    Fuzz(fuzz::FuzzArgs),
    /// Import rules of the product crates: no circle between files, no arrow from a lower
    /// floor to a higher one (docs/architecture.md, "Import rules").
    Imports(imports::ImportsArgs),
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

/// What `build-ebpf` does with the object it built.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Prebuilt {
    /// Nothing: print its path.
    Leave,
    /// Compare it with the committed one.
    Check,
    /// Replace the committed one (and its toolchain note).
    Update,
}

/// Installs bpf-linker if missing, then builds the eBPF object through
/// `firma_ebpf_build::build`, the code path firma-sidecar/build.rs uses too, and prints its path;
/// `--check` / `--update` compare it with / copy it to the committed object.
pub fn build_ebpf(prebuilt: Prebuilt) -> anyhow::Result<()> {
    use firma_ebpf_build as eb;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    exec(Command::new("bash").arg(root.join("scripts/install-bpf-linker.sh")))?;
    eprintln!(
        "+ {:?}",
        eb::command(&root, std::path::Path::new(eb::STAGING), &eb::target_arch())
    );
    let obj = eb::build(&root, eb::Output::Inherit).map_err(anyhow::Error::msg)?;
    let committed = root.join(eb::PREBUILT);
    let built = std::fs::read(&obj).with_context(|| format!("reading {}", obj.display()))?;
    match prebuilt {
        Prebuilt::Leave => println!("{}", obj.display()),
        Prebuilt::Update => {
            std::fs::create_dir_all(committed.parent().expect("has a parent"))?;
            std::fs::write(&committed, &built)?;
            std::fs::write(root.join(eb::PREBUILT_TOOLCHAIN), eb::toolchain_versions())?;
            println!(
                "updated {} ({} bytes); commit it with {}",
                committed.display(),
                built.len(),
                eb::PREBUILT_TOOLCHAIN
            );
        }
        Prebuilt::Check => {
            let old = std::fs::read(&committed).unwrap_or_default();
            if old != built {
                let at = old.iter().zip(&built).position(|(a, b)| a != b);
                let noted = std::fs::read_to_string(root.join(eb::PREBUILT_TOOLCHAIN))
                    .unwrap_or_else(|_| "(none)\n".into());
                bail!(
                    "{} ({} bytes) is not what the eBPF sources build ({} bytes, first difference at byte {}).\n\
                     Refresh it with `{}` and commit it.\n\
                     Committed object built with:\n{}This machine:\n{}",
                    eb::PREBUILT,
                    old.len(),
                    built.len(),
                    at.map_or_else(|| "end of the shorter".to_string(), |i| i.to_string()),
                    eb::UPDATE_COMMAND,
                    noted,
                    eb::toolchain_versions()
                );
            }
            println!(
                "{} matches the sources ({} bytes)",
                eb::PREBUILT,
                built.len()
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf { check, update } => build_ebpf(if check {
            Prebuilt::Check
        } else if update {
            Prebuilt::Update
        } else {
            Prebuilt::Leave
        }),
        Task::Demo => demo::run(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")),
        Task::VmTest(args) => vm::run(args),
        Task::Imports(args) => imports::run(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
            &args,
        ),
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
            build_ebpf(Prebuilt::Leave)?;
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
