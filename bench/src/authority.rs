//! `firma-bench authority`: the Authority's costs (docs/benchmarks.md, "The Authority's
//! issuance path").
//!
//! 1. Sequential `IssueCapability` over gRPC ([`crate::issuance`]), `--repetitions` fresh
//!    Authorities: p50 latency and the Authority's CPU per call (tonic, h2, loopback, Cedar,
//!    signing, the INFO line). The in-process part alone is the criterion bench
//!    `firma-authority/benches/issuance.rs`; the difference is the RPC's.
//! 2. Revocation catch-up: a real `firma authority` whose revocation file holds
//!    `--revocations` entries; the sidecar's own client code
//!    (`authority_client::run_revocation_stream`, into a `RevocationSet` as the pipeline does)
//!    connects, and the time from starting the connect to the whole set installed is measured,
//!    with the Authority's CPU for the replay and the client process's. Each repetition is a
//!    fresh connection (the Authority replays the whole set to each subscriber).

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
    /// Sequential `IssueCapability` calls per repetition (0 skips issuance).
    #[arg(long, default_value_t = 2000)]
    pub issuance_requests: usize,
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
    pub issuance: Vec<crate::issuance::Issuance>,
    pub issuance_p50_us_median: Option<f64>,
    pub issuance_server_cpu_us_per_call_median: Option<f64>,
    pub revocations: usize,
    pub catch_up: Vec<CatchUp>,
    pub catch_up_ms_median: Option<f64>,
    pub catch_up_authority_cpu_ms_median: Option<f64>,
    pub catch_up_client_cpu_ms_median: Option<f64>,
}

pub fn run(args: &AuthorityArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let median = |v: Vec<f64>| crate::report::median(v);
    let mut issuance = Vec::new();
    if args.issuance_requests > 0 {
        for rep in 1..=args.repetitions {
            let i = crate::issuance::run(args.issuance_requests).context("issuance")?;
            eprintln!(
                "  issuance #{rep}: p50 {} us, p99 {} us, Authority CPU {:.0} us/call",
                i.p50_us, i.p99_us, i.server_cpu_us_per_call
            );
            issuance.push(i);
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
        issuance_p50_us_median: median(issuance.iter().map(|i| i.p50_us as f64).collect()),
        issuance_server_cpu_us_per_call_median: median(
            issuance.iter().map(|i| i.server_cpu_us_per_call).collect(),
        ),
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
        "\nauthority: medians of {} (load {})\n  issuance over gRPC ({} sequential calls): p50 {} us, Authority CPU {} us/call\n  catch-up on {} revocations at connect: {} ms, Authority CPU {} ms, client CPU {} ms\nwritten: {}",
        args.repetitions,
        f(report.load_avg_1m, 1),
        args.issuance_requests,
        f(report.issuance_p50_us_median, 0),
        f(report.issuance_server_cpu_us_per_call_median, 0),
        args.revocations,
        f(report.catch_up_ms_median, 1),
        f(report.catch_up_authority_cpu_ms_median, 0),
        f(report.catch_up_client_cpu_ms_median, 0),
        args.out.display()
    );
    Ok(())
}

/// CPU time of every thread of `pid` so far, in ns (`/proc/PID/task/*/schedstat`, first
/// field): a catch-up takes a few ms, below the 10 ms ticks of `/proc/PID/stat`. Threads that
/// exited in between are not counted (the Authority's and this runtime's workers live on).
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(&path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("{}: {s:?}", path.display()))?;
        }
    }
    Ok(total)
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
