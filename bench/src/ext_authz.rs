//! `firma-bench ext-authz`: Envoy alone vs Envoy asking Firma (ext_authz) vs the Firma sidecar
//! (docs/benchmarks.md, "Embedded and ext_authz").
//!
//! One upstream (nginx or builtin, `api.openai.com`), one `firma sidecar` deployment serving
//! both its http_proxy listener and `[sidecar.ext_authz]`, and two Envoys built like the main
//! run's (CONNECT, TLS terminated with Envoy's own CA, TLS originated to the upstream, verified):
//! one that injects the credential itself (`envoy`), one whose ext_authz filter asks Firma and
//! lets Firma's answer set it (`envoy+ext_authz`). The same `firma-bench client` (keep-alive,
//! the chat request whose body the mapping rule extracts) drives all three, interleaved,
//! `--repetitions` times; medians of req/s, p50, p99, and CPU per 10k requests (Envoy + Firma
//! for ext_authz), with ratios to Envoy alone. Every completed request must reach the upstream
//! with the injected credential (Envoy alone sets it; ext_authz and the sidecar only when Firma
//! allowed), every Firma decision must be in the signed audit, and `firma audit verify` passes.

use crate::client::ClientArgs;
use crate::measure::{Client, Env, Load, Run, Target, measure};
use crate::peers::{Venv, cpu_secs};
use crate::report::median;
use crate::run::RunArgs;
use crate::scenario;
use anyhow::{Context, bail};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, clap::Args)]
pub struct ExtAuthzArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Runs of every target, interleaved; medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Seconds each run is measured for, after its warmup.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Concurrent keep-alive client connections.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Unmeasured requests first on the same connections.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Client runtime threads.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// nginx (default when installed) or the builtin upstream.
    #[arg(long, value_enum)]
    pub upstream: Option<crate::upstream::Kind>,
    /// Where Envoy is installed (the venv `firma-bench install-peers` creates).
    #[arg(long, default_value = "target/bench/peers")]
    pub peers_dir: PathBuf,
    #[arg(long, default_value = "target/bench/ext_authz.json")]
    pub out: PathBuf,
}

/// Medians of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds per 10,000 requests of the proxy (Envoy + Firma for ext_authz).
    pub cpu_s_per_10k: f64,
    /// Of which Firma's (ext_authz: the Check server; sidecar: all of it).
    pub firma_cpu_s_per_10k: Option<f64>,
    /// rps / Envoy alone's rps.
    pub rps_vs_envoy: Option<f64>,
    /// p99 / Envoy alone's p99.
    pub p99_vs_envoy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtAuthzReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub load_avg_1m: Option<f64>,
    pub concurrency: usize,
    pub duration_secs: u64,
    pub repetitions: usize,
    pub upstream: crate::upstream::Kind,
    /// Why Envoy is missing, if it is (then only the sidecar row is measured).
    pub skipped: Option<String>,
    pub rows: Vec<Row>,
    pub runs: Vec<Run>,
    /// Firma CPU seconds during each ext_authz run, per 10k requests (in `runs` order).
    pub ext_authz_firma_cpu_s_per_10k: Vec<f64>,
    pub audit_events: usize,
}

pub const ENVOY: &str = crate::report::names::ENVOY;
pub const ENVOY_AUTHZ: &str = "envoy+ext_authz";
pub const SIDECAR: &str = crate::report::names::HTTP_PROXY;

/// The 1-minute load average, for the record (the machine is shared).
pub fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(args: &ExtAuthzArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 || args.duration_secs == 0 {
        bail!("--repetitions and --duration-secs must be positive");
    }
    let firma = scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let (up, kind, _) = scenario::upstream(tmp.path(), args.upstream)?;
    let root = tmp.path().join("sidecar");
    let authz_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let d = scenario::proxy_deployment(&firma, &root, up.addr, &up.ca_path, |t| {
        // Envoy originates TLS to the upstream, verified (its cluster's UpstreamTlsContext).
        t.extra.push_str(&format!(
            "\n[sidecar.ext_authz]\nlisten_addr = \"127.0.0.1:{authz_port}\"\nupstream_tls = true\n"
        ));
    })?;
    let mut sc = d.start_sidecar()?;
    let firma_pid = sc.child.id();
    let authz: SocketAddr = sc
        .logged("ext_authz listening on ")
        .context("the sidecar logged no ext_authz listener")?;
    eprintln!("sidecar http_proxy {}, ext_authz {authz}", sc.addr);

    let venv = Venv {
        dir: args.peers_dir.join("venv"),
    };
    let envoy_bin = if venv.dir.join("bin/envoy").exists() {
        venv.envoy_binary()
    } else {
        Err(anyhow::anyhow!(
            "no Envoy in {} (firma-bench install-peers installs it)",
            venv.dir.display()
        ))
    };
    let (mut envoys, mut skipped) = (Vec::new(), None);
    match envoy_bin {
        Ok(bin) => {
            for a in [None, Some(authz)] {
                let dir = tmp
                    .path()
                    .join(if a.is_some() { "envoy-authz" } else { "envoy" });
                envoys.push(crate::peers::start_envoy_with(
                    &bin,
                    &dir,
                    up.addr,
                    &up.ca_path,
                    a,
                )?);
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            eprintln!("SKIP envoy and envoy+ext_authz: {why}");
            skipped = Some(why);
        }
    }

    let run_args = RunArgs {
        firma: firma.clone(),
        requests: 1 << 40,
        concurrency: args.concurrency,
        warmup: args.warmup,
        new_connection_requests: 0,
        duration_secs: args.duration_secs,
        time_limit_secs: args.duration_secs + 60,
        client_threads: args.client_threads,
        skip_transparent: true,
        skip_metrics: true,
        issuance_requests: 0,
        peers_dir: args.peers_dir.clone(),
        skip_peers: false,
        repetitions: args.repetitions,
        upstream: Some(kind),
        mitm_fallback: false,
        skip_hey: true,
        out: args.out.clone(),
    };
    let target = |name: &str, addr: SocketAddr, ca: PathBuf, connect: String, pid: u32| {
        let mut fb: ClientArgs = run_args.client(addr, vec![ca]);
        fb.proxy_connect = Some(connect);
        Target {
            name: name.into(),
            fb,
            hey: None,
            loads: vec![Load::KeepAlive],
            cgroup: None,
            pid: Some(pid),
            via: true,
            aborters: None,
        }
    };
    let mut targets: Vec<Target> = envoys
        .iter()
        .map(|p| target(p.name, p.addr, p.ca.clone(), p.connect_to.clone(), p.pid()))
        .collect();
    targets.push(target(
        SIDECAR,
        sc.addr,
        d.firma_ca(),
        scenario::sidecar_connect(),
        firma_pid,
    ));

    let env = Env {
        args: &run_args,
        up: &up,
        scratch: tmp.path(),
        hey: None,
    };
    let (mut runs, mut authz_cpu) = (Vec::new(), Vec::new());
    for rep in 1..=args.repetitions {
        eprintln!("repetition {rep}/{}", args.repetitions);
        for t in &targets {
            let firma_before = cpu_secs(firma_pid)?;
            let r = measure(&env, t, Load::KeepAlive, Client::FirmaBench, rep)
                .with_context(|| format!("\"{}\"", t.name))?;
            if t.name == ENVOY_AUTHZ {
                let firma = cpu_secs(firma_pid)? - firma_before;
                authz_cpu.push(firma / r.served.max(1) as f64 * 10_000.0);
            }
            if !sc.alive() {
                bail!(
                    "the sidecar exited during \"{}\":\n{}",
                    t.name,
                    sc.log_text()
                );
            }
            if r.result.errors > 0 {
                bail!(
                    "\"{}\": {} requests failed (first: {:?}); sidecar log:\n{}",
                    t.name,
                    r.result.errors,
                    r.result.first_error,
                    crate::measure::log_tail(&sc.log_text(), 20)
                );
            }
            runs.push(r);
        }
    }
    drop(envoys);

    // Every request Firma decided (the sidecar's and the Check calls, warmups included) has
    // its decision and outcome events, each batch signed.
    let decided: usize = runs
        .iter()
        .filter(|r| r.target != ENVOY)
        .map(|r| r.served)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.audit_events() < 2 * decided && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let audit_events = d.audit_events();
    if audit_events < 2 * decided {
        bail!("{audit_events} audit events for {decided} requests Firma decided (2 each expected)");
    }
    drop(sc);
    d.verify_audit()?;

    let rows = rows(&runs, &authz_cpu);
    let report = ExtAuthzReport {
        date_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_avg_1m: load_avg(),
        concurrency: args.concurrency,
        duration_secs: args.duration_secs,
        repetitions: args.repetitions,
        upstream: kind,
        skipped,
        rows,
        runs,
        ext_authz_firma_cpu_s_per_10k: authz_cpu,
        audit_events,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{}written: {}", table(&report), args.out.display());
    Ok(())
}

/// The medians per target, with ratios to Envoy alone.
fn rows(runs: &[Run], authz_cpu: &[f64]) -> Vec<Row> {
    let mut rows: Vec<Row> = [ENVOY, ENVOY_AUTHZ, SIDECAR]
        .iter()
        .filter_map(|&name| {
            let of: Vec<&Run> = runs.iter().filter(|r| r.target == name).collect();
            if of.is_empty() {
                return None;
            }
            let m = |f: &dyn Fn(&Run) -> f64| median(of.iter().map(|r| f(r)).collect());
            let proxy_cpu = m(&|r| r.cpu_s_per_10k.unwrap_or(f64::NAN)).unwrap_or(f64::NAN);
            let firma_cpu = match name {
                ENVOY_AUTHZ => median(authz_cpu.to_vec()),
                SIDECAR => Some(proxy_cpu),
                _ => None,
            };
            // ext_authz: Envoy's CPU plus Firma's, run by run.
            let cpu = if name == ENVOY_AUTHZ {
                median(
                    of.iter()
                        .zip(authz_cpu)
                        .map(|(r, f)| r.cpu_s_per_10k.unwrap_or(f64::NAN) + f)
                        .collect(),
                )
                .unwrap_or(f64::NAN)
            } else {
                proxy_cpu
            };
            Some(Row {
                target: name.into(),
                rps: m(&|r| r.result.throughput_rps).unwrap_or(0.0),
                p50_ms: m(&|r| r.result.p50_us as f64 / 1000.0).unwrap_or(0.0),
                p99_ms: m(&|r| r.result.p99_us as f64 / 1000.0).unwrap_or(0.0),
                cpu_s_per_10k: cpu,
                firma_cpu_s_per_10k: firma_cpu,
                rps_vs_envoy: None,
                p99_vs_envoy: None,
            })
        })
        .collect();
    if let Some(base) = rows.iter().find(|r| r.target == ENVOY).cloned() {
        for r in &mut rows {
            r.rps_vs_envoy = Some(r.rps / base.rps);
            r.p99_vs_envoy = Some(r.p99_ms / base.p99_ms);
        }
    }
    rows
}

fn table(r: &ExtAuthzReport) -> String {
    let mut t = format!(
        "ext_authz: keep-alive, concurrency {}, medians of {} x {} s, {} CPUs, load {}\n{:<17} {:>9} {:>8} {:>8} {:>11} {:>11} {:>9} {:>9}\n",
        r.concurrency,
        r.repetitions,
        r.duration_secs,
        r.cpus,
        r.load_avg_1m.map_or("?".into(), |l| format!("{l:.1}")),
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU-s/10k",
        "Firma's",
        "x Envoy",
        "p99 x"
    );
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for row in &r.rows {
        t.push_str(&format!(
            "{:<17} {:>9.0} {:>8.2} {:>8.2} {:>11.2} {:>11} {:>9} {:>9}\n",
            row.target,
            row.rps,
            row.p50_ms,
            row.p99_ms,
            row.cpu_s_per_10k,
            opt(row.firma_cpu_s_per_10k, 2),
            opt(row.rps_vs_envoy, 2),
            opt(row.p99_vs_envoy, 2),
        ));
    }
    if let Some(why) = &r.skipped {
        t.push_str(&format!("SKIPPED Envoy: {why}\n"));
    }
    t
}
