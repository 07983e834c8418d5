//! `firma audit` (owned by the audit work; placeholder until it lands).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`firma audit` is not available in this build")
}
