//! `cargo xtask bench`: the criterion benches of the decision pipeline, then the end-to-end
//! load harness (`firma-bench run`, release build) comparing the same client direct and through
//! the sidecar in one run. Results: `target/bench/e2e.json`, and the table on stdout.

use crate::exec;
use std::path::Path;
use std::process::Command;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Do not run `cargo bench -p firma-sidecar --bench decision`.
    #[arg(long)]
    pub skip_criterion: bool,
    /// Passed to `firma-bench run` (e.g. `--requests 2000 --concurrency 8 --skip-transparent`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let root = &root.canonicalize()?;
    if !args.skip_criterion {
        exec(
            Command::new("cargo")
                .args(["bench", "-p", "firma-sidecar", "--bench", "decision"])
                .current_dir(root),
        )?;
    }
    // One release build of both binaries: the figures are meaningless for a debug `firma`, and
    // a debug load client would measure itself.
    exec(
        Command::new("cargo")
            .args(["build", "--release", "-p", "firma", "-p", "firma-bench"])
            .current_dir(root),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    exec(
        Command::new(target.join("release/firma-bench"))
            .arg("run")
            .arg("--firma")
            .arg(target.join("release/firma"))
            // The Authority launcher of firma-testing (issuance latency) finds it here.
            .env("FIRMA_BIN", target.join("release/firma"))
            .arg("--out")
            .arg(target.join("bench/e2e.json"))
            .args(&args.args)
            .current_dir(root),
    )
}
