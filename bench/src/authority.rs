//! `firma-bench authority`: the Authority's costs (docs/benchmarks.md, "The Authority's
//! issuance path").
//!
//! 1. `IssueCapability` over gRPC ([`crate::issuance`]), sequential and
//!    `--issuance-concurrency` callers on one channel, `--repetitions` fresh Authorities:
//!    latency, calls/s and the Authority's CPU per call (tonic, h2, loopback, Cedar, signing,
//!    the issuance record). Interleaved with the same against `empty-authority` (the same RPC
//!    and serving setup answering a canned capability): the RPC's own cost. The in-process part
//!    alone is the criterion bench `firma-authority/benches/issuance.rs`.
//! 2. Revocation catch-up: a real `firma authority` whose revocation file holds
//!    `--revocations` entries; the sidecar's own client code
//!    (`authority_client::run_revocation_stream`, into a `RevocationSet` as the pipeline does)
//!    connects, and the time from starting the connect to the whole set installed is measured,
//!    with the Authority's CPU for the replay and the client process's. Each repetition is a
//!    fresh connection (the Authority replays the whole set to each subscriber).

use crate::issuance::{Issuance, Target, cpu_ns};
use anyhow::{Context, bail};
use firma_sidecar::authority_client::{AuthorityEndpoint, run_revocation_stream};
use firma_sidecar::pipeline::revocations::RevocationSet;
use firma_testing::authority::Deployment;
use firma_testing::shipped_policy;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, clap::Args)]
pub struct AuthorityArgs {
    /// The `firma` binary to benchmark (a release build); its Authority is measured.
    #[arg(long)]
    pub firma: PathBuf,
    /// `IssueCapability` calls per repetition and mode (0 skips issuance).
    #[arg(long, default_value_t = 2000)]
    pub issuance_requests: usize,
    /// Callers in flight at once on one channel for the concurrent issuance run (0 skips it).
    #[arg(long, default_value_t = 16)]
    pub issuance_concurrency: usize,
    /// The `empty-authority` baseline binary (default: next to this executable; skipped with a
    /// message when absent).
    #[arg(long)]
    pub empty_authority: Option<PathBuf>,
    /// Revocations the Authority holds when the client connects (0 skips the catch-up).
    #[arg(long, default_value_t = 10_000)]
    pub revocations: usize,
    /// Repetitions of each measurement; medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    #[arg(long, default_value = "target/bench/authority.json")]
    pub out: PathBuf,
}

/// One catch-up: connect to the whole set installed.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUp {
    pub ms: f64,
    /// The Authority's CPU for the replay, ms (scheduler run time of its threads).
    pub authority_cpu_ms: f64,
    /// This (client) process's CPU for it, ms: connect, decode, insert (its runtime's
    /// threads exit before the next reading, so this is a lower bound).
    pub client_cpu_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthorityReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub load_avg_1m: Option<f64>,
    /// Every issuance run in the order it ran (Authority and baseline, sequential and
    /// concurrent, interleaved).
    pub issuance: Vec<crate::issuance::Issuance>,
    /// Medians per (server, concurrency).
    pub issuance_medians: Vec<IssuanceMedian>,
    /// Sequential against the Authority (kept for earlier reports' readers).
    pub issuance_p50_us_median: Option<f64>,
    pub issuance_server_cpu_us_per_call_median: Option<f64>,
    pub revocations: usize,
    pub catch_up: Vec<CatchUp>,
    pub catch_up_ms_median: Option<f64>,
    pub catch_up_authority_cpu_ms_median: Option<f64>,
    pub catch_up_client_cpu_ms_median: Option<f64>,
}

/// Medians of one (server, concurrency) over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct IssuanceMedian {
    pub server: &'static str,
    pub concurrency: usize,
    pub calls_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub server_cpu_us_per_call: f64,
    /// Lowest and highest CPU per call over the repetitions (the spread).
    pub server_cpu_us_per_call_range: (f64, f64),
}

fn issuance_medians(runs: &[Issuance]) -> Vec<IssuanceMedian> {
    let mut keys: Vec<(&'static str, usize)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.server, r.concurrency)) {
            keys.push((r.server, r.concurrency));
        }
    }
    keys.into_iter()
        .map(|(server, concurrency)| {
            let rs: Vec<&Issuance> = runs
                .iter()
                .filter(|r| r.server == server && r.concurrency == concurrency)
                .collect();
            let m = |f: &dyn Fn(&Issuance) -> f64| {
                crate::report::median(rs.iter().map(|r| f(r)).collect()).unwrap_or(f64::NAN)
            };
            let cpu: Vec<f64> = rs.iter().map(|r| r.server_cpu_us_per_call).collect();
            IssuanceMedian {
                server,
                concurrency,
                calls_per_sec: m(&|r| r.calls_per_sec),
                p50_us: m(&|r| r.p50_us as f64),
                p99_us: m(&|r| r.p99_us as f64),
                server_cpu_us_per_call: m(&|r| r.server_cpu_us_per_call),
                server_cpu_us_per_call_range: (
                    cpu.iter().copied().fold(f64::INFINITY, f64::min),
                    cpu.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ),
            }
        })
        .collect()
}

pub fn run(args: &AuthorityArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let median = |v: Vec<f64>| crate::report::median(v);
    let mut issuance = Vec::new();
    if args.issuance_requests > 0 {
        let empty = args
            .empty_authority
            .clone()
            .or_else(crate::issuance::empty_authority_bin);
        let mut targets = vec![Target::Authority];
        match empty {
            Some(bin) => targets.push(Target::Empty(bin)),
            None => eprintln!(
                "  SKIP empty-authority baseline: no empty-authority binary next to firma-bench (cargo build -p firma-bench)"
            ),
        }
        let mut modes = vec![1];
        if args.issuance_concurrency > 1 {
            modes.push(args.issuance_concurrency);
        }
        // Interleaved: each repetition runs every (mode, server) in turn, so drift in the
        // machine's load hits them alike.
        for rep in 1..=args.repetitions {
            for &concurrency in &modes {
                for target in &targets {
                    let i = crate::issuance::measure(target, args.issuance_requests, concurrency)
                        .with_context(|| {
                        format!("issuance ({target:?}, {concurrency} callers)")
                    })?;
                    eprintln!(
                        "  issuance #{rep} {:9} x{concurrency:<3}: {:.0} calls/s, p50 {} us, p99 {} us, server CPU {:.1} us/call",
                        i.server, i.calls_per_sec, i.p50_us, i.p99_us, i.server_cpu_us_per_call
                    );
                    issuance.push(i);
                }
            }
        }
    }
    let mut catch_up = Vec::new();
    if args.revocations > 0 {
        let d = Deployment::new(
            &shipped_policy("issuance/genai-app/issuance.cedar"),
            &shipped_policy("runtime/genai-app/genai-app.cedar"),
        );
        // The file format `firma authority revocations add` writes: `TOKEN_ID UNIX_MS`.
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_millis();
        let mut file = String::with_capacity(args.revocations * 56);
        for i in 0..args.revocations {
            file.push_str(&format!(
                "00000000-0000-4000-8000-{i:012x} {}\n",
                now_ms - 1000
            ));
        }
        std::fs::write(&d.revocations, file)?;
        let mut server = d.start();
        let pid = server.child.id();
        let url = server.url();
        for rep in 1..=args.repetitions {
            let c = catch_up_once(&url, pid, args.revocations)
                .with_context(|| format!("catch-up #{rep}"))?;
            eprintln!(
                "  catch-up #{rep}: {} revocations in {:.1} ms, Authority CPU {:.0} ms, client CPU {:.0} ms",
                args.revocations, c.ms, c.authority_cpu_ms, c.client_cpu_ms
            );
            catch_up.push(c);
        }
        if !server.alive() {
            bail!("the authority exited:\n{}", server.log_text());
        }
    }
    let report = AuthorityReport {
        date_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_avg_1m: crate::ext_authz::load_avg(),
        issuance_p50_us_median: median(authority_seq(&issuance).map(|i| i.p50_us as f64).collect()),
        issuance_server_cpu_us_per_call_median: median(
            authority_seq(&issuance)
                .map(|i| i.server_cpu_us_per_call)
                .collect(),
        ),
        issuance_medians: issuance_medians(&issuance),
        issuance,
        revocations: args.revocations,
        catch_up_ms_median: median(catch_up.iter().map(|c| c.ms).collect()),
        catch_up_authority_cpu_ms_median: median(
            catch_up.iter().map(|c| c.authority_cpu_ms).collect(),
        ),
        catch_up_client_cpu_ms_median: median(catch_up.iter().map(|c| c.client_cpu_ms).collect()),
        catch_up,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    println!(
        "\nauthority: medians of {} (load {})",
        args.repetitions,
        f(report.load_avg_1m, 1)
    );
    for m in &report.issuance_medians {
        println!(
            "  issuance over gRPC, {:9} {:>2} caller(s), {} calls: {:.0} calls/s, p50 {:.0} us, p99 {:.0} us, server CPU {:.1} us/call ({:.1}-{:.1})",
            m.server,
            m.concurrency,
            args.issuance_requests,
            m.calls_per_sec,
            m.p50_us,
            m.p99_us,
            m.server_cpu_us_per_call,
            m.server_cpu_us_per_call_range.0,
            m.server_cpu_us_per_call_range.1
        );
    }
    println!(
        "  catch-up on {} revocations at connect: {} ms, Authority CPU {} ms, client CPU {} ms\nwritten: {}",
        args.revocations,
        f(report.catch_up_ms_median, 1),
        f(report.catch_up_authority_cpu_ms_median, 0),
        f(report.catch_up_client_cpu_ms_median, 0),
        args.out.display()
    );
    Ok(())
}

/// Sequential runs against the Authority.
fn authority_seq(runs: &[Issuance]) -> impl Iterator<Item = &Issuance> {
    runs.iter()
        .filter(|i| i.server == "authority" && i.concurrency == 1)
}

/// One fresh connection of the sidecar's revocation client until `n` ids are installed.
fn catch_up_once(url: &str, authority_pid: u32, n: usize) -> anyhow::Result<CatchUp> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ep = AuthorityEndpoint::new(url, None)?;
    let set = Arc::new(RevocationSet::new());
    let installed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let own = std::process::id();
    let (a0, c0) = (cpu_ns(authority_pid)?, cpu_ns(own)?);
    let t0 = Instant::now();
    let (s, i, dn) = (set.clone(), installed.clone(), done.clone());
    let task = rt.spawn(run_revocation_stream(vec![ep], move |u| {
        // As the pipeline's callback: insert; the set is installed when every id is in.
        if s.insert(u.token_id) && i.fetch_add(1, Ordering::Relaxed) + 1 == n {
            dn.notify_one();
        }
    }));
    let finished = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), done.notified())
            .await
            .is_ok()
    });
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (a1, c1) = (cpu_ns(authority_pid)?, cpu_ns(own)?);
    task.abort();
    drop(rt);
    if !finished || set.len() != n {
        bail!(
            "{} of {n} revocations installed within 120 s",
            installed.load(Ordering::Relaxed)
        );
    }
    Ok(CatchUp {
        ms,
        authority_cpu_ms: a1.saturating_sub(a0) as f64 / 1e6,
        client_cpu_ms: c1.saturating_sub(c0) as f64 / 1e6,
    })
}
