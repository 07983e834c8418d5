//! `cargo xtask …`: build the eBPF object, run the tests, VM tests, demo, benchmarks.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use std::process::Command;

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

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test { args } => {
            exec(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
            exec(
                Command::new("cargo")
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .args(args),
            )
        }
    }
}
