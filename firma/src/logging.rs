//! One tracing setup for every long-running command: `RUST_LOG` wins over the config level,
//! `--log-format` over the config format. Colours only when stderr is a terminal, so log files
//! and journald never get ANSI escape codes.

use firma_common::config::LogFormat;
use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// `--log-format` from the command line, when given.
static CLI_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Command-line values of `--log-format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CliLogFormat {
    Text,
    Json,
}

pub fn set_cli_format(f: Option<CliLogFormat>) {
    if let Some(f) = f {
        let _ = CLI_FORMAT.set(match f {
            CliLogFormat::Text => LogFormat::Text,
            CliLogFormat::Json => LogFormat::Json,
        });
    }
}

pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        // vaultrs/rustify log every failed Vault call at ERROR; the connector logs its own
        // denial with the reason, so keep theirs quiet unless RUST_LOG asks.
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rustify=off,vaultrs=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match CLI_FORMAT.get().copied().unwrap_or(format) {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
