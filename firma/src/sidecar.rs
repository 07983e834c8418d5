//! `firma sidecar -c F`: run the enforcement sidecar; `firma sidecar attach|detach|status`:
//! manage workloads of a running one (see `workload.rs`).

use crate::ConfigFailure;
use crate::config::{ConfigError, FirmaConfig};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The sectioned firma.toml (reads the `[sidecar.*]` tables).
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "/etc/firma/firma.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<crate::workload::WorkloadCommand>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(cmd) = args.command {
        return crate::workload::run(cmd, &args.config);
    }
    let file = FirmaConfig::load(&args.config).map_err(ConfigFailure)?;
    let cfg = file.sidecar().map_err(ConfigFailure)?.clone();
    crate::logging::init(&cfg.log.level, cfg.log.format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match rt.block_on(firma_sidecar::server::run(&cfg)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.config_key() {
            Some(key) => {
                Err(ConfigFailure(ConfigError::invalid(&args.config, key, e.to_string())).into())
            }
            None => Err(anyhow::Error::new(e).context("sidecar failed")),
        },
    }
}
