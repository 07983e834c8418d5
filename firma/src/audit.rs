//! `firma audit verify FILE|DIR|FILE… --public-key K` and `firma audit collect --listen ADDR --output FILE`.

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
    /// rotated audit files in order; report the first bad line. Given several files (the
    /// files of collector replicas), check each on its own as with `--part`, then rebuild
    /// every chain across them and report every gap, fork and overlap.
    Verify {
        /// JSON-lines audit file (file sink output or collector output), or the directory
        /// holding the file sink's rotated files (`audit.jsonl.000001`, …, `audit.jsonl`), or
        /// several collector replicas' files.
        #[arg(required = true, num_args = 1..)]
        file: Vec<PathBuf>,
        /// One collector replica's file on its own: chains may be held in stretches (each
        /// linked and covered by a signature, a stretch's first line taken from the prev_hash
        /// it states); what lies between them is checked across all replicas' files.
        #[arg(long)]
        part: bool,
        /// Public key(s) of the sidecars' `[sidecar.audit] signing_key_path` (the `.pub` file).
        #[arg(long = "public-key", required = true)]
        public_key: Vec<PathBuf>,
        /// Also check the chain heads the sidecars anchored in etcd
        /// (`etcd://HOST:PORT[,HOST:PORT…][/PREFIX/]`): a file that lacks an anchored line or
        /// holds another line at its seq (truncated or rewritten after anchoring) fails.
        #[arg(long, value_name = "etcd://…")]
        anchors: Option<String>,
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
        Command::Verify {
            file,
            part,
            public_key,
            anchors,
        } => match file.as_slice() {
            [one] if !part => verify(one, &keys(&public_key)?, anchors.as_deref()),
            _ => verify_replicas(&file, &keys(&public_key)?, anchors.as_deref()),
        },
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
fn verify(path: &Path, keys: &[VerifyingKey], anchors: Option<&str>) -> anyhow::Result<ExitCode> {
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
            if let Some(url) = anchors
                && !check_anchors(&files, url, keys)?
            {
                println!("FAILED: the file(s) do not match the anchored chain heads");
                return Ok(ExitCode::FAILURE);
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

/// Collector replicas' files (or one with `--part`): each on its own, then every chain across
/// them (`firma_common::audit_replicas`). Exit 0 when no file fails and no chain has a gap, a
/// fork or a broken join; identical overlaps are reported as notes.
fn verify_replicas(
    paths: &[PathBuf],
    keys: &[VerifyingKey],
    anchors: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use firma_common::audit_replicas::{MergeFailure, verify_part};
    for p in paths {
        if !std::fs::metadata(p)
            .with_context(|| format!("{}", p.display()))?
            .is_file()
        {
            anyhow::bail!(
                "{}: expected a file (a directory of rotated files is verified alone)",
                p.display()
            );
        }
    }
    if let [one] = paths {
        if anchors.is_some() {
            anyhow::bail!(
                "--anchors with --part: give every replica's file (one holds only stretches of a chain)"
            );
        }
        return Ok(match verify_part(one, keys) {
            Ok(v) => {
                println!(
                    "OK: {} event(s) in {} chain(s) ({} stretch(es)), {} signature(s); every signature and link within each stretch verifies and covers every line (joins between stretches are checked across all replicas' files)",
                    v.events, v.chains, v.stretches, v.signatures
                );
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("{f}");
                println!("FAILED: {}", one.display());
                ExitCode::FAILURE
            }
        });
    }
    match firma_common::audit_replicas::verify_replicas(paths, keys) {
        Ok(m) => {
            for (p, v) in paths.iter().zip(&m.parts) {
                println!(
                    "{}: OK on its own: {} event(s), {} stretch(es) of {} chain(s)",
                    p.display(),
                    v.events,
                    v.stretches,
                    v.chains
                );
            }
            for n in &m.notes {
                println!("NOTE: {n}");
            }
            let files: Vec<_> = paths
                .iter()
                .map(|p| audit_files::AuditFile {
                    path: p.clone(),
                    index: None,
                })
                .collect();
            if let Some(url) = anchors
                && !check_anchors(&files, url, keys)?
            {
                println!("FAILED: the file(s) do not match the anchored chain heads");
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "OK: {} event(s) in {} chain(s) across {} file(s); every chain is complete from seq 0, no gap, no fork ({} event(s) held by two files, identical)",
                m.events,
                m.chains,
                paths.len(),
                m.overlaps
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(MergeFailure::Part(f)) => {
            println!("{f}");
            match f.line {
                Some(n) => println!("FAILED: first bad line is {n} of {}", f.file.display()),
                None => println!("FAILED: {}", f.file.display()),
            }
            Ok(ExitCode::FAILURE)
        }
        Err(MergeFailure::Chains(problems)) => {
            for p in &problems {
                println!("{p}");
            }
            println!(
                "FAILED: {} problem(s) rebuilding the chains across {} file(s)",
                problems.len(),
                paths.len()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What the files hold of one anchored chain: the highest seq, and the hash of the line at the
/// anchored seq.
#[derive(Default)]
struct Seen {
    last: Option<u64>,
    at_anchor: Option<String>,
}

/// Compares the files with every anchor under the URL; prints one line per anchored chain
/// (`ANCHOR OK`, `ANCHOR FAILED`, or a `NOTE` for chains these files do not hold). `false` when
/// any check failed.
fn check_anchors(
    files: &[audit_files::AuditFile],
    url: &str,
    keys: &[VerifyingKey],
) -> anyhow::Result<bool> {
    use firma_common::anchor::{fetch_all, parse_etcd_url};
    use std::collections::HashMap;
    let (endpoints, prefix) = parse_etcd_url(url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let anchors = rt.block_on(fetch_all(&endpoints, &prefix))?;
    let mut seen: HashMap<&str, Seen> = anchors
        .iter()
        .map(|a| (a.chain_id.as_str(), Seen::default()))
        .collect();
    let want: HashMap<&str, u64> = anchors
        .iter()
        .map(|a| (a.chain_id.as_str(), a.seq))
        .collect();
    for f in files {
        let text =
            std::fs::read_to_string(&f.path).with_context(|| format!("{}", f.path.display()))?;
        for line in text.lines() {
            let Ok(serde_json::Value::Object(m)) = serde_json::from_str(line) else {
                continue;
            };
            let Ok(p) = firma_common::audit::ChainPos::of(&m) else {
                continue;
            };
            if let Some(s) = seen.get_mut(p.chain_id.as_str()) {
                s.last = Some(s.last.map_or(p.seq, |l| l.max(p.seq)));
                if want.get(p.chain_id.as_str()) == Some(&p.seq) {
                    s.at_anchor = Some(firma_common::audit::line_hash(line));
                }
            }
        }
    }
    let mut ok = true;
    for a in &anchors {
        let s = &seen[a.chain_id.as_str()];
        let at = rfc3339_ms(a.at_ms);
        if !a.verify(keys) {
            ok = false;
            println!(
                "ANCHOR FAILED: chain {}: the anchor's signature does not verify with the given key(s)",
                a.chain_id
            );
            continue;
        }
        match (&s.last, &s.at_anchor) {
            (None, _) => println!(
                "NOTE: anchored chain {} (seq {}, {at}) is not in these file(s)",
                a.chain_id, a.seq
            ),
            (Some(last), _) if *last < a.seq => {
                ok = false;
                println!(
                    "ANCHOR FAILED: chain {}: anchored at seq {} ({at}) but the file(s) end at seq {last}: truncated after anchoring",
                    a.chain_id, a.seq
                );
            }
            (Some(_), Some(h)) if *h == a.hash => println!(
                "ANCHOR OK: chain {}: the line at the anchored seq {} ({at}) matches",
                a.chain_id, a.seq
            ),
            (Some(_), _) => {
                ok = false;
                println!(
                    "ANCHOR FAILED: chain {}: the line at seq {} is missing or differs from the one anchored at {at}: rewritten after anchoring",
                    a.chain_id, a.seq
                );
            }
        }
    }
    Ok(ok)
}

/// RFC 3339 with milliseconds.
fn rfc3339_ms(ms: i64) -> String {
    let secs = firma_common::capability::rfc3339(ms.div_euclid(1000));
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{:03}Z", ms.rem_euclid(1000)),
        None => ms.to_string(),
    }
}
