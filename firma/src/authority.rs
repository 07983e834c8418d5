//! `firma authority`: run the gRPC Authority, or (offline) generate its key, issue capability
//! seeds and manage revocations. Every form reads the `[authority]` section of `-c FILE`
//! except `generate-key -o KEY`, which needs no config.

use crate::ConfigFailure;
use crate::config::{AuthorityConfig, FirmaConfig};
use anyhow::{Context, bail};
use firma_authority::issuance::{DenialCode, IssueRequest, Issuer, seed_toml, write_seed};
use firma_authority::revocations::RevocationFile;
use firma_common::capability::rfc3339;
use firma_common::keys;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The sectioned firma.toml (its `[authority]` section is used).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Without a subcommand: run the Authority server.
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Generate the Ed25519 signing key (KEY, mode 0600) and its public key (KEY with `.pub`).
    GenerateKey {
        /// Private key path; defaults to `authority.key_file` from the config.
        #[arg(short, long, value_name = "KEY")]
        output: Option<PathBuf>,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Mint a capability offline under the issuance policy and write it as a seed file.
    Issue(IssueArgs),
    /// Manage revocations (the revocation file, or etcd with `[authority.etcd]`).
    #[command(subcommand)]
    Revocations(RevocationCmd),
}

#[derive(clap::Args)]
struct IssueArgs {
    #[arg(long)]
    agent_id: String,
    #[arg(long)]
    session_id: String,
    /// Action class to grant; repeat for several.
    #[arg(long = "action", value_name = "CLASS")]
    actions: Vec<String>,
    /// `*`, a prefix ending in `*`, or an exact resource (`host/path`).
    #[arg(long, default_value = "*")]
    resource_scope: String,
    /// Requested lifetime; clamped to `authority.max_ttl_seconds`.
    #[arg(long, allow_hyphen_values = true)]
    ttl_seconds: i64,
    /// Seed file to write (mode 0600); printed to stdout when omitted.
    #[arg(short, long, value_name = "SEED.toml")]
    output: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum RevocationCmd {
    /// Revoke a token: append its id to the revocation file, or record it in etcd (returns once
    /// the quorum committed it; every Authority streams it on). No-op if already listed.
    Add {
        #[arg(value_name = "TOKEN_ID")]
        token_id: String,
    },
    /// Drop entries whose tokens have certainly expired (revoked > max_ttl_seconds ago).
    Compact,
    /// Print every revoked token id and when it was revoked.
    List,
}

fn load_config(path: Option<&Path>) -> anyhow::Result<AuthorityConfig> {
    let Some(path) = path else {
        bail!("this command needs the config file: pass -c/--config FILE");
    };
    let cfg = FirmaConfig::load(path).map_err(ConfigFailure)?;
    Ok(cfg.authority().map_err(ConfigFailure)?.clone())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.as_deref();
    match args.command {
        None => serve(&load_config(config)?),
        Some(Cmd::GenerateKey { output, force }) => {
            let path = match output {
                Some(p) => p,
                None => load_config(config)?.key_file,
            };
            let (key, public) = keys::generate(&path, force)?;
            println!("wrote private key {} (mode 0600)", key.display());
            println!("wrote public key  {}", public.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Issue(a)) => issue(&load_config(config)?, a),
        Some(Cmd::Revocations(cmd)) => revocations(&load_config(config)?, cmd),
    }
}

fn serve(cfg: &AuthorityConfig) -> anyhow::Result<ExitCode> {
    crate::logging::init(&cfg.log_level, cfg.log_format);
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        };
        firma_authority::server::run(cfg, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn issue(cfg: &AuthorityConfig, a: IssueArgs) -> anyhow::Result<ExitCode> {
    let key = keys::load_signing_key(&cfg.key_file)?;
    let loaded = firma_authority::bundles::load("issuance", &cfg.issuance_policy_dir)?;
    let issuer = Issuer {
        key: &key,
        policies: &loaded.compiled,
        max_ttl_seconds: cfg.max_ttl_seconds,
    };
    let req = IssueRequest {
        agent_id: a.agent_id,
        session_id: a.session_id,
        actions: a.actions,
        resource_scope: a.resource_scope,
        ttl_seconds: a.ttl_seconds,
    };
    let issued = match issuer.issue(&req) {
        Ok(i) => i,
        // An InvalidRequest reason already starts with its code and names the field.
        Err(denial) if denial.code == DenialCode::InvalidRequest => bail!("{}", denial.reason),
        Err(denial) => bail!("{} [{}]", denial.reason, denial.code.as_str()),
    };
    if let Some(asked) = issued.clamped_from {
        eprintln!(
            "note: requested TTL {asked}s exceeds authority.max_ttl_seconds; clamped to {}s",
            cfg.max_ttl_seconds
        );
    }
    let c = &issued.claims;
    match &a.output {
        Some(path) => {
            write_seed(path, &issued.seed())?;
            eprintln!(
                "issued capability {} (agent={} session={} actions={} expires {}) -> {}",
                c.token_id,
                c.agent_id,
                c.session_id,
                c.action_set.join(","),
                rfc3339(c.exp),
                path.display()
            );
        }
        None => print!("{}", seed_toml(&issued.seed())?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Now in Unix milliseconds: what `revocations add` records (and the stream sends on).
fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 with milliseconds (falls back to the number, like [`rfc3339`]).
fn rfc3339_ms(ms: i64) -> String {
    let secs = rfc3339(ms.div_euclid(1000));
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{:03}Z", ms.rem_euclid(1000)),
        None => ms.to_string(),
    }
}

fn revocations(cfg: &AuthorityConfig, cmd: RevocationCmd) -> anyhow::Result<ExitCode> {
    if let Some(etcd) = &cfg.etcd {
        return etcd_revocations(etcd, cfg.max_ttl_seconds, cmd);
    }
    let path = cfg
        .revocation_file
        .as_ref()
        .context("validated: revocation_file or [authority.etcd]")?;
    let file = RevocationFile::new(path);
    match cmd {
        RevocationCmd::Add { token_id } => {
            if file.add(&token_id, now_unix_ms())? {
                println!("revoked {token_id} (appended to {})", path.display());
            } else {
                println!("{token_id} was already revoked");
            }
        }
        RevocationCmd::Compact => {
            let r = file.compact(now_unix_ms(), cfg.max_ttl_seconds)?;
            println!(
                "compacted {}: kept {}, dropped {} (revoked more than {}s ago)",
                path.display(),
                r.kept,
                r.dropped,
                cfg.max_ttl_seconds
            );
        }
        RevocationCmd::List => {
            let list = file.read()?;
            for (line, text) in &list.malformed {
                eprintln!(
                    "warning: {}:{line}: ignoring malformed line {text:?}",
                    path.display()
                );
            }
            print_entries(&list.entries);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_entries(entries: &[firma_authority::revocations::RevocationEntry]) {
    for e in entries {
        match e.revoked_at_ms {
            Some(t) => println!("{}\t{}", e.token_id, rfc3339_ms(t)),
            None => println!("{}\t-", e.token_id),
        }
    }
}

/// The same commands against the etcd store; an etcd without quorum fails the command (the
/// revocation is not recorded, and the exit code says so).
fn etcd_revocations(
    etcd: &firma_authority::config::EtcdConfig,
    max_ttl_seconds: u64,
    cmd: RevocationCmd,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let store = firma_authority::etcd::EtcdStore::connect(&etcd.endpoints, &etcd.prefix).await?;
        match cmd {
            RevocationCmd::Add { token_id } => {
                if store.add(&token_id, now_unix_ms()).await? {
                    println!("revoked {token_id} (committed to etcd {})", etcd.endpoints.join(","));
                } else {
                    println!("{token_id} was already revoked");
                }
            }
            RevocationCmd::Compact => {
                let r = store.compact(now_unix_ms(), max_ttl_seconds).await?;
                println!(
                    "compacted etcd {}revocations/: kept {}, dropped {} (revoked more than {max_ttl_seconds}s ago)",
                    etcd.prefix, r.kept, r.dropped
                );
            }
            RevocationCmd::List => print_entries(&store.list().await?.0),
        }
        Ok(ExitCode::SUCCESS)
    })
}
