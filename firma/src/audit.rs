//! `firma audit verify FILE --public-key K` and `firma audit collect --listen ADDR --output FILE`.

use anyhow::Context;
use firma_common::audit::ChainVerifier;
use firma_common::keys::{VerifyingKey, load_verifying_key};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check every signature and the hash chain of an audit file; report the first bad line.
    Verify {
        /// JSON-lines audit file (file sink output or collector output).
        file: PathBuf,
        /// Public key(s) of the sidecars' `[sidecar.audit] signing_key_path` (the `.pub` file).
        #[arg(long = "public-key", required = true)]
        public_key: Vec<PathBuf>,
    },
    /// Run an audit collector: receive events from sidecars with `sink = "grpc"`.
    Collect {
        /// Address to listen on, e.g. `127.0.0.1:9090`.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// File the received events are appended to.
        #[arg(long)]
        output: PathBuf,
        /// Refuse events whose signature does not verify with these key(s).
        #[arg(long = "public-key")]
        public_key: Vec<PathBuf>,
        /// Log level (overridden by RUST_LOG).
        #[arg(long, default_value = "info")]
        log_level: String,
    },
}

fn keys(paths: &[PathBuf]) -> anyhow::Result<Vec<VerifyingKey>> {
    paths
        .iter()
        .map(|p| load_verifying_key(p).map_err(anyhow::Error::from))
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Verify { file, public_key } => verify(&file, &keys(&public_key)?),
        Command::Collect {
            listen,
            output,
            public_key,
            log_level,
        } => {
            crate::logging::init(&log_level, firma_common::config::LogFormat::Text);
            let collector =
                firma_authority::collector::Collector::open(&output, keys(&public_key)?)?;
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(firma_authority::collector::serve(
                listen,
                collector,
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Exit 0 when every line verifies and is covered by a signature (the last line of each batch
/// is signed; docs/architecture.md, audit); 1 with `FILE:LINE: reason` for the first bad line.
fn verify(file: &Path, keys: &[VerifyingKey]) -> anyhow::Result<ExitCode> {
    let f = std::fs::File::open(file).with_context(|| format!("{}", file.display()))?;
    let mut v = ChainVerifier::new(keys.to_vec());
    let mut events = 0u64;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", file.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = v.push(&line) {
            println!("{}:{}: {e}", file.display(), i + 1);
            println!("FAILED: first bad line is {}", i + 1);
            return Ok(ExitCode::FAILURE);
        }
        events += 1;
    }
    if let Err(e) = v.finish() {
        println!("{}: {e}", file.display());
        println!("FAILED: the end of the file is not covered by a signature");
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "OK: {events} event(s) in {} chain(s), {} signature(s); every signature and chain link verifies and covers every line",
        v.chains(),
        v.signatures()
    );
    Ok(ExitCode::SUCCESS)
}
