//! `firma-bench tenants`: the many-tenants scenario (docs/benchmarks.md, "Many tenants").
//!
//! Two http_proxy sidecars from the same recipe as `run`'s: one with the shipped genai-app
//! bundle alone, one with the shipped bundle plus `--tenants` policies written the way the seed
//! guide onboards a tenant (`permit (principal == Firma::Agent::"tenant-N", action ==
//! Firma::Action::"model.inference.chat", resource) when {…};`), `tenant-acme` (the agent of
//! the capability) among them. One keep-alive client sends sequential allowed chat requests,
//! repeated and interleaved across the two; the medians and their ratio are reported. Then,
//! during one more run on the many-tenants sidecar, a different set of `--tenants` policies is
//! written into its policy directory: the sidecar re-reads it, compiles and swaps it in, and
//! the requests that overlapped that window (file written -> install logged) are reported
//! with their maximum latency.

use crate::client::{ClientArgs, ClientResult};
use crate::deploy::{self, Deployment};
use crate::report::median;
use crate::scenario;
use crate::upstream::Kind;
use anyhow::{Context, bail};
use firma_common::policy::PolicyBundle;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// `[sidecar.constraint_enforcement] bundle_ttl_seconds` of both sidecars: the policy
/// directory is re-read every third of it (3 s), so a reload lands within the reload run.
const BUNDLE_TTL_SECS: u64 = 9;

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Tenant policies added to the shipped bundle.
    #[arg(long, default_value_t = 10_000)]
    pub tenants: usize,
    /// Measured seconds per run, after the warmup.
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Runs of each sidecar, interleaved; the table shows the medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Unmeasured requests first on the same connection.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Length of the run during which the tenant policies are replaced (0: no reload).
    #[arg(long, default_value_t = 10)]
    pub reload_run_secs: u64,
    /// The upstream server (default: nginx when installed, else builtin).
    #[arg(long, value_enum)]
    pub upstream: Option<Kind>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/tenants.json")]
    pub out: PathBuf,
}

/// The medians of one sidecar's runs.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub name: String,
    pub policies: usize,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_s_per_10k: f64,
    pub rss_mb: f64,
    pub runs: Vec<ClientResult>,
}

/// The run during which the bundle was replaced.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    /// From writing the new policy file to the sidecar logging the install (includes waiting
    /// for its next re-read of the directory).
    pub window_ms: f64,
    /// What the sidecar logged for reading and compiling the new bundle.
    pub load_and_compile_ms: Option<f64>,
    pub requests_in_window: usize,
    pub max_in_window_ms: f64,
    pub max_outside_window_ms: f64,
    pub run: ClientResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantsReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub upstream: Kind,
    pub tenants: usize,
    pub duration_secs: u64,
    pub repetitions: usize,
    pub shipped: Side,
    pub many: Side,
    pub reload: Option<Reload>,
}

/// `n` tenant policies of generation `generation` (different tenant ids per generation, so a
/// reload really replaces them); `tenant-acme` is always the last.
pub fn tenant_policies(n: usize, generation: usize) -> String {
    let mut text = String::with_capacity(n * 190);
    for i in 0..n {
        let agent = if i + 1 == n {
            "tenant-acme".to_string()
        } else {
            format!("tenant-{}", generation * n + i)
        };
        text.push_str(&format!(
            "permit (principal == Firma::Agent::\"{agent}\", action == Firma::Action::\"model.inference.chat\", resource)\n  when {{ resource has \"host\" && resource.host == \"{}\" }};\n",
            deploy::HOST
        ));
    }
    text
}

/// Writes the tenant policies into `dir` atomically (a hidden temporary file, which the
/// sidecar's directory reader skips, renamed over the old one); returns the bundle version.
fn write_tenants(dir: &Path, n: usize, generation: usize) -> anyhow::Result<String> {
    let tmp = dir.join(".tenants.cedar.tmp");
    std::fs::write(&tmp, tenant_policies(n, generation))?;
    std::fs::rename(&tmp, dir.join("tenants.cedar"))?;
    Ok(PolicyBundle::load_dir(dir)
        .context("read the bundle back")?
        .version)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Deployed {
    name: String,
    policies: usize,
    d: Deployment,
    sc: firma_testing::sidecar::Sidecar,
}

impl Deployed {
    fn client(&self, args: &TenantsArgs, secs: u64, series: Option<PathBuf>) -> ClientArgs {
        ClientArgs {
            connect: self.sc.addr,
            host: deploy::HOST.into(),
            proxy_connect: Some(format!("{}:443", deploy::HOST)),
            cas: vec![self.d.firma_ca()],
            requests: 1 << 40,
            concurrency: 1,
            warmup: args.warmup,
            new_connection: false,
            time_limit_secs: secs + 30,
            duration_secs: secs,
            threads: 1,
            series,
        }
    }

    /// One measured run: the client's result and the sidecar's CPU seconds per 10k requests.
    fn measure(
        &mut self,
        args: &TenantsArgs,
        scratch: &Path,
    ) -> anyhow::Result<(ClientResult, f64)> {
        let pid = self.sc.child.id();
        let before = crate::peers::cpu_secs(pid)?;
        let a = self.client(args, args.duration_secs, None);
        let r = crate::run::spawn_client(&a, None, scratch)?;
        let cpu = crate::peers::cpu_secs(pid)? - before;
        self.check(&r)?;
        let per_10k = cpu / (r.ok + a.warmup).max(1) as f64 * 10_000.0;
        eprintln!(
            "  {}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms, {per_10k:.2} CPU-s/10k",
            self.name,
            r.throughput_rps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.max_us as f64 / 1000.0
        );
        Ok((r, per_10k))
    }

    fn check(&mut self, r: &ClientResult) -> anyhow::Result<()> {
        if r.errors > 0 || !self.sc.alive() {
            bail!(
                "\"{}\": {} failed requests (first: {:?}); sidecar log:\n{}",
                self.name,
                r.errors,
                r.first_error,
                crate::measure::log_tail(&self.sc.log_text(), 20)
            );
        }
        Ok(())
    }
}

pub fn run(args: &TenantsArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 || args.duration_secs == 0 {
        bail!("--repetitions and --duration-secs must be at least 1");
    }
    let firma = scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let (up, kind, _) = scenario::upstream(tmp.path(), args.upstream)?;
    let mut sides = Vec::new();
    for (name, tenants) in [
        ("shipped bundle".to_string(), 0),
        (format!("shipped + {} tenants", args.tenants), args.tenants),
    ] {
        let root = tmp
            .path()
            .join(if tenants == 0 { "shipped" } else { "many" });
        let d = scenario::proxy_deployment(&firma, &root, up.addr, &up.ca_path, |t| {
            t.constraint_enforcement = Some((BUNDLE_TTL_SECS, 2000))
        })?;
        if tenants > 0 {
            write_tenants(&root.join("policies"), tenants, 0)?;
        }
        let started = Instant::now();
        let sc = d.start_sidecar()?;
        eprintln!(
            "{name}: sidecar {} ready in {:.2} s",
            sc.addr,
            started.elapsed().as_secs_f64()
        );
        let policies = PolicyBundle::load_dir(&root.join("policies"))?
            .compile()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .policy_ids()
            .len();
        sides.push(Deployed {
            name,
            policies,
            d,
            sc,
        });
    }

    let mut results: Vec<Vec<(ClientResult, f64)>> = vec![Vec::new(), Vec::new()];
    for rep in 1..=args.repetitions {
        eprintln!("repetition {rep}/{}", args.repetitions);
        for (i, side) in sides.iter_mut().enumerate() {
            results[i].push(side.measure(args, tmp.path())?);
        }
    }

    let reload = if args.reload_run_secs == 0 {
        None
    } else {
        Some(reload(args, &mut sides[1], tmp.path())?)
    };

    let mut medians = Vec::new();
    for (side, runs) in sides.iter().zip(results) {
        let col = |f: &dyn Fn(&(ClientResult, f64)) -> f64| {
            median(runs.iter().map(f).collect()).unwrap_or(0.0)
        };
        let pid = side.sc.child.id();
        medians.push(Side {
            name: side.name.clone(),
            policies: side.policies,
            throughput_rps: col(&|r| r.0.throughput_rps),
            p50_ms: col(&|r| r.0.p50_us as f64 / 1000.0),
            p99_ms: col(&|r| r.0.p99_us as f64 / 1000.0),
            max_ms: col(&|r| r.0.max_us as f64 / 1000.0),
            cpu_s_per_10k: col(&|r| r.1),
            rss_mb: crate::peers::rss_mb(pid).unwrap_or(0.0),
            runs: runs.into_iter().map(|r| r.0).collect(),
        });
    }
    // Every completed request has its signed, verifiable audit event.
    for side in &sides {
        let completed: usize = medians
            .iter()
            .find(|m| m.name == side.name)
            .map_or(0, |m| m.runs.iter().map(|r| r.ok).sum());
        let deadline = Instant::now() + Duration::from_secs(10);
        while side.d.audit_events() < completed && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if side.d.audit_events() < completed {
            bail!(
                "\"{}\": {} audit events for {completed} requests",
                side.name,
                side.d.audit_events()
            );
        }
    }
    for Deployed { d, sc, .. } in sides {
        drop(sc);
        d.verify_audit()?;
    }

    let many = medians.pop().context("two sides")?;
    let shipped = medians.pop().context("two sides")?;
    let report = TenantsReport {
        date_unix: unix_us() / 1_000_000,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        upstream: kind,
        tenants: args.tenants,
        duration_secs: args.duration_secs,
        repetitions: args.repetitions,
        shipped,
        many,
        reload,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{}", table(&report));
    println!("written: {}", args.out.display());
    Ok(())
}

/// One run on the many-tenants sidecar during which its tenant policies are replaced.
fn reload(args: &TenantsArgs, side: &mut Deployed, scratch: &Path) -> anyhow::Result<Reload> {
    let series = scratch.join("reload-series.txt");
    let a = side.client(args, args.reload_run_secs, Some(series.clone()));
    let scratch_owned = scratch.to_path_buf();
    eprintln!(
        "reload: {} s run, {} tenant policies replaced after ~2 s",
        args.reload_run_secs, args.tenants
    );
    let client = std::thread::spawn(move || crate::run::spawn_client(&a, None, &scratch_owned));
    // The warmup (a few hundred sequential requests) is over well within 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let dir = side.d.root.join("policies");
    let t0 = unix_us();
    let version = write_tenants(&dir, args.tenants, 1)?;
    let needle = format!("installed runtime bundle {version}");
    let deadline = Instant::now() + Duration::from_secs(args.reload_run_secs.saturating_sub(3));
    let line = loop {
        if let Some(l) = side
            .sc
            .log_lines()
            .into_iter()
            .find(|l| l.contains(&needle))
        {
            break l;
        }
        if Instant::now() > deadline {
            bail!(
                "the sidecar did not install the new bundle within the run:\n{}",
                crate::measure::log_tail(&side.sc.log_text(), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let t1 = unix_us();
    let run = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    side.check(&run)?;
    let compiled = line
        .split("compiled in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|ms| ms.parse().ok());
    let mut inside = Vec::new();
    let mut outside = Vec::new();
    let mut before_t0 = false;
    let mut after_t1 = false;
    for l in std::fs::read_to_string(&series)?.lines() {
        let mut f = l.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        let (start, lat) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        before_t0 |= start + lat < t0;
        after_t1 |= start > t1;
        if start <= t1 && start + lat >= t0 {
            inside.push(lat);
        } else {
            outside.push(lat);
        }
    }
    if !(before_t0 && after_t1) {
        bail!("the reload window was not inside the measured run (lengthen --reload-run-secs)");
    }
    let ms = |v: &[u64]| v.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
    Ok(Reload {
        window_ms: (t1 - t0) as f64 / 1000.0,
        load_and_compile_ms: compiled,
        requests_in_window: inside.len(),
        max_in_window_ms: ms(&inside),
        max_outside_window_ms: ms(&outside),
        run,
    })
}

fn table(r: &TenantsReport) -> String {
    let mut s = format!(
        "many tenants: one keep-alive client, sequential allowed chat requests through http_proxy, medians of {} x {} s, upstream {:?}\n",
        r.repetitions, r.duration_secs, r.upstream
    );
    s.push_str(&format!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}\n",
        "sidecar", "policies", "req/s", "p50 ms", "p99 ms", "max ms", "CPU-s/10k", "RSS MB"
    ));
    for side in [&r.shipped, &r.many] {
        s.push_str(&format!(
            "{:<28} {:>9} {:>9.0} {:>9.3} {:>9.3} {:>9.2} {:>10.2} {:>8.1}\n",
            side.name,
            side.policies,
            side.throughput_rps,
            side.p50_ms,
            side.p99_ms,
            side.max_ms,
            side.cpu_s_per_10k,
            side.rss_mb
        ));
    }
    let (a, b) = (&r.shipped, &r.many);
    s.push_str(&format!(
        "ratio many / shipped: p50 x{:.3}  p99 x{:.3}  throughput x{:.3} (slower/faster)  CPU x{:.3}\n",
        b.p50_ms / a.p50_ms,
        b.p99_ms / a.p99_ms,
        a.throughput_rps / b.throughput_rps,
        b.cpu_s_per_10k / a.cpu_s_per_10k
    ));
    if let Some(rl) = &r.reload {
        s.push_str(&format!(
            "reload of {} tenant policies during a {} s run: window {:.0} ms (file written -> install logged; sidecar: read and compiled in {}), {} requests in it, max latency {:.2} ms in the window vs {:.2} ms outside; run p50 {:.3} ms, p99 {:.3} ms\n",
            r.tenants,
            rl.run.elapsed_secs.round(),
            rl.window_ms,
            rl.load_and_compile_ms.map_or("?".into(), |m| format!("{m} ms")),
            rl.requests_in_window,
            rl.max_in_window_ms,
            rl.max_outside_window_ms,
            rl.run.p50_us as f64 / 1000.0,
            rl.run.p99_us as f64 / 1000.0,
        ));
    }
    s
}
