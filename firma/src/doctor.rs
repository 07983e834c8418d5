//! `firma doctor` (owned by the doctor work; placeholder until it lands).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`firma doctor` is not available in this build")
}
