//! `firma ca init -c F [--force]`: create the sidecar's MITM CA in `[sidecar.ca] dir`.
//!
//! The sidecar also creates it on first start; this command exists to create it ahead of
//! time (to distribute `firma-ca.crt` before the first client connects) or to replace it.

use crate::ConfigFailure;
use crate::config::FirmaConfig;
use firma_sidecar::tls::ca::CertificateAuthority;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(clap::Subcommand)]
enum CaCommand {
    /// Generate firma-ca.crt and firma-ca.key (0600) in [sidecar.ca] dir.
    Init {
        #[arg(short = 'c', long = "config", default_value = "/etc/firma/firma.toml")]
        config: PathBuf,
        /// Replace an existing CA (clients trusting the old certificate will fail).
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        CaCommand::Init { config, force } => {
            let file = FirmaConfig::load(&config).map_err(ConfigFailure)?;
            let dir = &file.sidecar().map_err(ConfigFailure)?.ca.dir;
            let ca = CertificateAuthority::init(dir, force)?;
            println!("{}", ca.cert_path().display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
