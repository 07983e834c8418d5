//! `firma-bench`: the end-to-end load harness behind `cargo xtask bench`.
//!
//! `run` starts a local HTTPS upstream and the real `firma sidecar` (http_proxy mode, MITM,
//! credential injection, seed capability, Cedar policy, signed audit to a file), then drives the
//! same load client direct and through the sidecar in one run and reports ratios. With root and
//! eBPF it also re-runs itself in a fresh network namespace (`transparent-inner`) to compare a
//! client in a tagged cgroup against the same client untagged. `client` is the load generator;
//! it runs as its own process so it can be placed in a cgroup and never shares a scheduler with
//! the upstream.

mod client;
mod deploy;
mod issuance;
mod report;
mod run;
mod transparent;
mod upstream;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Firma end-to-end load harness (direct vs through the sidecar)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every scenario, print the table, write the JSON report.
    Run(run::RunArgs),
    /// The load generator: prints one JSON `ClientResult` on stdout.
    Client(client::ClientArgs),
    /// Internal: the transparent-mode comparison, inside a fresh network namespace.
    #[command(hide = true)]
    TransparentInner(transparent::InnerArgs),
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::Run(args) => run::run(&args),
        Cmd::Client(args) => {
            let result = client::run(&args)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::TransparentInner(args) => transparent::inner(&args),
    }
}
