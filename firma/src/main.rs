//! `firma`: a thin CLI over the authority and sidecar libraries.
//!
//! Exit codes: 0 success, 1 runtime failure or denial, 2 usage error (clap),
//! 78 (`EX_CONFIG`) configuration error. `firma run` passes CMD's status through and uses
//! 125/126/127 for its own failures (see `run/mod.rs`).

mod audit;
mod authority;
mod ca;
mod config;
mod doctor;
mod init;
mod logging;
mod policy;
mod run;
mod shipped;
mod sidecar;
mod workload;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: per-thread heaps without arena locks. The request path
/// allocates per request (HTTP heads, audit bodies); under load glibc's arena lock contention
/// and consolidation were about a fifth of the sidecar's CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults commit arenas and each thread's segments eagerly and purge freed pages
/// lazily: with a dozen threads (tokio workers and blocking pool, the audit writer) that
/// nearly doubled the sidecar's peak resident memory under load (26 -> 47 MB) for no
/// measurable speed. These are the settings measured in docs/benchmarks.md.
///
/// They must be in place before mimalloc reserves its first arena, i.e. before the first
/// Rust allocation (the runtime allocates before `main`): so this runs as an ELF constructor.
extern "C" fn tune_allocator() {
    // `mi_option_e` of the bundled mimalloc (include/mimalloc.h; libmimalloc-sys builds v3
    // unless its `v2` feature is on). 4 and 15 mean the same in both; 3 is v2's eager_commit,
    // deprecated and ignored by v3 (kept for a v2 build). The sys crate names only some.
    const EAGER_COMMIT: libmimalloc_sys::mi_option_t = 3;
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain setters of mimalloc's option table; no other thread exists yet.
    unsafe {
        libmimalloc_sys::mi_option_set(EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[derive(Parser)]
#[command(name = "firma", version, about = "Egress enforcement for AI agents")]
struct Cli {
    /// Log line format of long-running commands (overrides the config's `log.format` /
    /// `log_format`): `text` (colours only on a terminal) or `json`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<logging::CliLogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Authority (gRPC), or manage keys, capabilities and revocations.
    Authority(authority::Args),
    /// Run the enforcement sidecar, or attach/detach workloads of a running one.
    Sidecar(sidecar::Args),
    /// Manage the sidecar's MITM certificate authority.
    Ca(ca::Args),
    /// Verify or collect signed audit logs.
    Audit(audit::Args),
    /// Validate Cedar policy directories against the schema.
    Policy(policy::Args),
    /// Check kernel features, cgroup2, bpffs, key modes and reachability.
    Doctor(doctor::Args),
    /// Create a working deployment directory: config, keys, CA, policies, a capability seed.
    Init(init::Args),
    /// Run one program under enforcement: `firma run [OPTIONS] -- CMD [ARGS...]` (root).
    Run(Box<run::Args>),
}

/// A configuration problem: reported with exit code 78 so supervisors can tell it apart.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigFailure(#[from] pub firma_common::config::ConfigError);

/// The error and its causes on one line. Every library error follows one rule (a message
/// embeds its cause or chains it, never both: `firma_common::errors`), so each cause shows once.
fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::set_cli_format(cli.log_format);
    let result = match cli.command {
        // Its own exit codes: CMD's status, or 78/125/126/127 (run/mod.rs).
        Command::Run(a) => return run::run(*a),
        Command::Authority(a) => authority::run(a),
        Command::Sidecar(a) => sidecar::run(a),
        Command::Ca(a) => ca::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Policy(a) => policy::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Init(a) => init::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if e.downcast_ref::<ConfigFailure>().is_some() {
                ExitCode::from(78)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
