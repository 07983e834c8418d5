//! `firma-bench idle`: the many-idle-connections scenario (docs/benchmarks.md, "Many idle
//! connections").
//!
//! The streams scenario's upstream and sidecar recipe, with `[sidecar.limits]` raised to fit
//! `--connections` (and RLIMIT_NOFILE raised for the harness and the sidecar it starts). A probe
//! connection sends `--probe-requests` sequential small requests (`GET /v1/models/bytes-64`)
//! `--repetitions` times: first alone, then while `--connections` other client connections are
//! held open through the sidecar, each idle after one completed request (HTTP/1.1 keep-alive
//! inside a MITM'd CONNECT tunnel). Reported: the sidecar's RSS before and with the idle
//! connections (per connection), the probe's p50/p99 medians before and during, and the same
//! probe direct to the upstream for reference.

use crate::deploy;
use crate::report::median;
use crate::scenario;
use crate::streams::SseUpstream;
use anyhow::{Context, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Idle keep-alive client connections held through the sidecar.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Sequential requests per probe run.
    #[arg(long, default_value_t = 2000)]
    pub probe_requests: usize,
    /// Probe runs before and during; medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    #[arg(long, default_value = "target/bench/idle.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub runs_p99_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub date_unix: u64,
    pub cpus: usize,
    /// Idle connections held (`requested`, unless RLIMIT_NOFILE could not be raised to fit).
    pub connections: usize,
    pub requested_connections: usize,
    /// Why fewer than requested were held (`None`: all of them).
    pub reduced_because: Option<String>,
    pub probe_requests: usize,
    pub repetitions: usize,
    pub direct: Probe,
    pub sidecar_alone: Probe,
    pub sidecar_with_idle: Probe,
    /// with idle / alone.
    pub p99_ratio: f64,
    pub rss_before_mb: f64,
    pub rss_with_idle_mb: f64,
    pub rss_per_connection_kb: f64,
    /// Seconds to open (CONNECT + TLS + one request) every idle connection.
    pub open_secs: f64,
    /// Seconds after opening until the sidecar's RSS was steady (when `rss_with_idle_mb` was read).
    pub settle_secs: f64,
    /// Connections the sidecar reported parked then (`firma_sidecar_connections_parked`;
    /// `None`: a binary without the gauge).
    pub parked: Option<f64>,
}

/// Descriptors the sidecar keeps for itself beyond its connections' (listeners, audit file,
/// eBPF, the probe's connection and headroom): above the sidecar's own reserve.
const NOFILE_RESERVE: u64 = 512;

/// Raises RLIMIT_NOFILE (soft and hard, as root) to fit `fds`; children inherit it.
fn raise_nofile(fds: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = fds.max(soft);
    if want > hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, want) {
            // Without CAP_SYS_RESOURCE (a container): the hard limit is what there is.
            eprintln!("cannot raise RLIMIT_NOFILE to {want} ({e}): using the hard limit {hard}");
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
            return Ok(hard);
        }
    } else {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(want)
}

async fn probe(t: &crate::client::Target, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut c = crate::client::open(t).await?;
    for _ in 0..50 {
        crate::bodies::transfer(&mut c, deploy::HOST, false, 64).await?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        lat.push(crate::bodies::transfer(&mut c, deploy::HOST, false, 64).await? * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let at = |p: f64| lat[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Ok((at(0.50), at(0.99)))
}

fn probes(
    rt: &tokio::runtime::Runtime,
    t: &crate::client::Target,
    args: &IdleArgs,
    what: &str,
) -> anyhow::Result<Probe> {
    let mut runs = Vec::new();
    for _ in 0..args.repetitions {
        runs.push(rt.block_on(probe(t, args.probe_requests))?);
    }
    let p = Probe {
        p50_ms: median(runs.iter().map(|r| r.0).collect()).unwrap_or(0.0),
        p99_ms: median(runs.iter().map(|r| r.1).collect()).unwrap_or(0.0),
        runs_p99_ms: runs.iter().map(|r| r.1).collect(),
    };
    eprintln!(
        "  probe {what}: p50 {:.3} ms, p99 {:.3} ms",
        p.p50_ms, p.p99_ms
    );
    Ok(p)
}

pub fn run(args: &IdleArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 || args.probe_requests == 0 {
        bail!("--repetitions and --probe-requests must be at least 1");
    }
    let nofile = raise_nofile(args.connections as u64 * 3 + 4096)?;
    // The sidecar needs 2 descriptors per connection plus a reserve (its own
    // `max_connections` is lowered to fit the limit); when the limit cannot be raised, hold as
    // many as fit with room for the probe, and say so, rather than fail the whole bench run.
    let fits = usize::try_from(nofile.saturating_sub(NOFILE_RESERVE) / 2).unwrap_or(usize::MAX);
    let (connections, reduced_because) = if fits < args.connections {
        let why = format!(
            "RLIMIT_NOFILE is {nofile} and cannot be raised here (no CAP_SYS_RESOURCE): {fits} connections fit at 2 descriptors each plus a reserve"
        );
        eprintln!(
            "holding {fits} idle connections, not {}: {why}",
            args.connections
        );
        (fits, Some(why))
    } else {
        (args.connections, None)
    };
    let firma = scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let up = SseUpstream::start(tmp.path(), 1, Duration::from_millis(1))?;
    let root = tmp.path().join("sidecar");
    let max = connections + 1024;
    let (d, mut sc) = scenario::llm_sidecar(&firma, &root, up.addr, &up.ca_path, |t| {
        t.extra = format!(
            "[sidecar.limits]\nmax_connections = {max}\nmax_connections_per_client = {max}\nidle_timeout_secs = 600\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n"
        )
    })?;
    let pid = sc.child.id();
    let admin: std::net::SocketAddr = sc
        .logged("admin listening on ")
        .context("the sidecar logged no admin address")?;
    eprintln!(
        "upstream https://{}, sidecar {} (pid {pid}), RLIMIT_NOFILE {nofile}",
        up.addr, sc.addr
    );
    let rt = scenario::client_runtime()?;
    let direct_t = scenario::direct_target(up.addr, &up.ca_path)?;
    let via = Arc::new(scenario::sidecar_target(sc.addr, &d)?);
    let direct = probes(&rt, &direct_t, args, "direct")?;
    let alone = probes(&rt, &via, args, "through the sidecar, alone")?;
    let rss_before = crate::peers::rss_mb(pid)?;
    let started = Instant::now();
    let held = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(connections);
        for _ in 0..connections {
            let (t, sem) = (via.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await;
                let mut c = crate::client::open(&t).await?;
                crate::bodies::transfer(&mut c, deploy::HOST, false, 16).await?;
                anyhow::Ok(c)
            }));
        }
        let mut held = Vec::with_capacity(connections);
        for t in tasks {
            held.push(t.await.context("open task")??);
        }
        anyhow::Ok(held)
    });
    let held = held.with_context(|| {
        format!(
            "open {} idle connections:\n{}",
            connections,
            crate::measure::log_tail(&sc.log_text(), 10)
        )
    })?;
    let open_secs = started.elapsed().as_secs_f64();
    // Let the sidecar settle before reading RSS: handshake buffers go back to the allocator,
    // idle connections are parked after a second (`interceptor/park.rs`) and the allocator
    // returns freed pages after a delay. Sampled once a second until two samples agree within
    // 1% (at most 20 s).
    let settle = Instant::now();
    let mut rss_idle = crate::peers::rss_mb(pid)?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = crate::peers::rss_mb(pid)?;
        let steady = (rss_idle - now).abs() <= rss_idle * 0.01 && settle.elapsed().as_secs() >= 3;
        rss_idle = now;
        if steady || settle.elapsed() >= Duration::from_secs(20) {
            break;
        }
    }
    let settle_secs = settle.elapsed().as_secs_f64();
    let parked = crate::run::scrape_sum(admin, "firma_sidecar_connections_parked ")?;
    eprintln!(
        "  {} idle connections open in {open_secs:.1} s: sidecar RSS {rss_before:.1} -> {rss_idle:.1} MB (settled after {settle_secs:.0} s; parked: {parked:?})",
        held.len()
    );
    let during = probes(
        &rt,
        &via,
        args,
        "through the sidecar, with the idle connections",
    )?;
    if held.iter().any(|c| c.is_closed()) || !sc.alive() {
        bail!("an idle connection was closed during the run, or the sidecar died");
    }
    drop(held);
    drop(sc);
    let report = IdleReport {
        date_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        connections,
        requested_connections: args.connections,
        reduced_because,
        probe_requests: args.probe_requests,
        repetitions: args.repetitions,
        p99_ratio: during.p99_ms / alone.p99_ms,
        direct,
        sidecar_alone: alone,
        sidecar_with_idle: during,
        rss_before_mb: rss_before,
        rss_with_idle_mb: rss_idle,
        rss_per_connection_kb: (rss_idle - rss_before) * 1024.0 / connections as f64,
        open_secs,
        settle_secs,
        parked,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let r = &report;
    println!(
        "\nmany idle connections: {} held through the sidecar, probe of {} sequential requests, medians of {}\n\
         probe p50/p99 ms: direct {:.3}/{:.3}, sidecar alone {:.3}/{:.3}, sidecar with idle {:.3}/{:.3} (p99 x{:.2})\n\
         sidecar RSS {:.1} MB -> {:.1} MB: {:.1} KB per idle connection; opened in {:.1} s\nwritten: {}",
        r.connections,
        r.probe_requests,
        r.repetitions,
        r.direct.p50_ms,
        r.direct.p99_ms,
        r.sidecar_alone.p50_ms,
        r.sidecar_alone.p99_ms,
        r.sidecar_with_idle.p50_ms,
        r.sidecar_with_idle.p99_ms,
        r.p99_ratio,
        r.rss_before_mb,
        r.rss_with_idle_mb,
        r.rss_per_connection_kb,
        r.open_secs,
        args.out.display()
    );
    if let Some(why) = &r.reduced_because {
        println!(
            "(fewer than the {} asked for: {why})",
            r.requested_connections
        );
    }
    Ok(())
}
