//! `firma-bench`: the end-to-end load harness behind `cargo xtask bench`.
//!
//! `run` starts one HTTPS upstream (nginx or the builtin server), the real `firma sidecar`
//! (http_proxy mode, MITM, credential injection, seed capability, Cedar policy, signed audit to
//! a file), Envoy and mitmproxy, and with root and eBPF a transparent-mode sidecar in a fresh
//! network namespace (`transparent-inner`); then it drives two clients, `firma-bench client`
//! and Go `hey`, against every target, repeated and interleaved, and reports medians and
//! ratios. `client` is the load generator; it runs as its own process so it can be placed in a
//! cgroup and never shares a scheduler with the upstream.

mod aborters;
mod authority;
mod bodies;
mod client;
mod deploy;
mod ext_authz;
mod hey;
mod idle;
mod issuance;
mod measure;
mod peers;
mod report;
mod run;
mod run_overhead;
mod scenario;
mod streams;
mod tenants;
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
    /// The many-tenants scenario alone: the shipped bundle vs the shipped bundle plus N tenant
    /// policies, one keep-alive client, and a reload of N policies under load.
    Tenants(tenants::TenantsArgs),
    /// The LLM streams scenario alone: N concurrent SSE responses direct vs through the
    /// sidecar with a token budget policy on; added per-event latency, sidecar CPU and RSS.
    Streams(streams::StreamsArgs),
    /// The big-bodies scenario alone: multi-MB uploads (on the rule that extracts) and
    /// downloads, direct vs through the sidecar; MB/s and sidecar CPU-s per GB.
    Bodies(bodies::BodiesArgs),
    /// The many-idle-connections scenario alone: N idle keep-alive connections through the
    /// sidecar; RSS per connection and a probe connection's p99 before and during.
    Idle(idle::IdleArgs),
    /// Envoy alone vs Envoy + Firma ext_authz vs the Firma sidecar (http_proxy), one
    /// keep-alive client, same upstream, interleaved; medians of req/s, p50/p99, CPU.
    ExtAuthz(ext_authz::ExtAuthzArgs),
    /// The Authority: in-process vs gRPC issuance cost, and a sidecar's client catching up on N
    /// revocations at connect (time and the Authority's CPU).
    Authority(authority::AuthorityArgs),
    /// `firma run` overhead: the same curl direct and under `firma run`, and `firma run --
    /// true`, interleaved; start to the first enforced request and client end to exit.
    RunOverhead(run_overhead::RunOverheadArgs),
    /// Internal: the SSE client of `streams`; prints one JSON result on stdout.
    #[command(hide = true)]
    StreamsClient(streams::StreamsClientArgs),
    /// The load generator: prints one JSON `ClientResult` on stdout.
    Client(client::ClientArgs),
    /// Install Envoy and mitmproxy into DIR/venv, and (as root, with apt-get) `hey` and
    /// `nginx-light`; each skipped when present. `run` installs the peers too, but `cargo xtask
    /// bench` calls this first because `run` goes into a namespace without network.
    InstallPeers {
        #[arg(long, default_value = "target/bench/peers")]
        dir: std::path::PathBuf,
    },
    /// Internal: the transparent-mode comparison, inside a fresh network namespace.
    #[command(hide = true)]
    TransparentInner(transparent::InnerArgs),
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::Run(args) => run::run(&args),
        Cmd::Tenants(args) => tenants::run(&args),
        Cmd::Streams(args) => streams::run(&args),
        Cmd::Bodies(args) => bodies::run(&args),
        Cmd::Idle(args) => idle::run(&args),
        Cmd::ExtAuthz(args) => ext_authz::run(&args),
        Cmd::Authority(args) => authority::run(&args),
        Cmd::RunOverhead(args) => run_overhead::run(&args),
        Cmd::StreamsClient(args) => {
            let result = streams::client(&args)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Client(args) => {
            let result = client::run(&args)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::InstallPeers { dir } => {
            peers::install_all(&dir);
            Ok(())
        }
        Cmd::TransparentInner(args) => transparent::inner(&args),
    }
}
