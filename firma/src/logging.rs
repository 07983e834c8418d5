//! One tracing setup for every long-running command: `RUST_LOG` wins over the config level.

use tracing_subscriber::EnvFilter;

pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        // vaultrs/rustify log every failed Vault call at ERROR; the connector logs its own
        // denial with the reason, so keep theirs quiet unless RUST_LOG asks.
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rustify=off,vaultrs=warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
