//! `firma audit verify FILE|DIR --public-key K` and `firma audit collect --listen ADDR --output FILE`.

use anyhow::Context;
use firma_common::audit_files::{self, Head};
use firma_common::keys::{VerifyingKey, load_verifying_key};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check every signature and the hash chain of an audit file, or of a directory of
    /// rotated audit files in order; report the first bad line.
    Verify {
        /// JSON-lines audit file (file sink output or collector output), or the directory
        /// holding the file sink's rotated files (`audit.jsonl.000001`, …, `audit.jsonl`).
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
/// `path` is one file, or a directory holding one set of rotated files
/// (`firma_common::audit_files`), checked in order as one chain.
fn verify(path: &Path, keys: &[VerifyingKey]) -> anyhow::Result<ExitCode> {
    let dir = path.is_dir();
    let (files, head) = if dir {
        let files = audit_files::set_in_dir(path).map_err(anyhow::Error::msg)?;
        (files, Head::Complete)
    } else {
        std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let one = vec![audit_files::AuditFile {
            path: path.to_path_buf(),
            index: None,
        }];
        (one, Head::MayContinue)
    };
    match audit_files::verify_set(&files, keys, head) {
        Ok(ok) => {
            for n in &ok.notes {
                println!("NOTE: {n}");
            }
            if !dir
                && let Ok(rotated) = audit_files::rotated_files(path)
                && !rotated.is_empty()
            {
                println!(
                    "NOTE: {} rotated file(s) beside it: `firma audit verify {}` checks the chain across all of them",
                    rotated.len(),
                    path.parent()
                        .map_or(".".into(), |p| p.display().to_string())
                );
            }
            let files = if dir {
                format!(" across {} file(s)", ok.files)
            } else {
                String::new()
            };
            println!(
                "OK: {} event(s) in {} chain(s), {} signature(s){files}; every signature and chain link verifies and covers every line",
                ok.events, ok.chains, ok.signatures
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            println!("{f}");
            match f.line {
                Some(n) if dir => {
                    println!("FAILED: first bad line is {n} of {}", f.file.display())
                }
                Some(n) => println!("FAILED: first bad line is {n}"),
                None => println!("FAILED: {}", f.file.display()),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
