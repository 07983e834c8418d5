//! `firma-bench run`: one upstream, one sidecar, the same client, every scenario in one run.

use crate::client::{ClientArgs, ClientResult};
use crate::deploy::{self, Deployment, Mode};
use crate::report::{Checks, Ratio, Report, Scenario, Transparent};
use crate::upstream::Upstream;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Measured requests per keep-alive scenario.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Unmeasured warmup requests per scenario.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Measured requests (one connection each) per new-connection scenario.
    #[arg(long, default_value_t = 1000)]
    pub new_connection_requests: usize,
    /// Seconds each scenario is measured for, after its warmup (0: use the request counts).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Per-scenario time limit in seconds (the client stops taking requests after it).
    #[arg(long, default_value_t = 60)]
    pub time_limit_secs: u64,
    /// Client runtime threads.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Do not attempt the transparent-mode (eBPF) comparison.
    #[arg(long)]
    pub skip_transparent: bool,
    /// Do not run the metrics on/off comparison (a second sidecar with `[sidecar.admin]`).
    #[arg(long)]
    pub skip_metrics: bool,
    /// Sequential `IssueCapability` calls measured against the real Authority (0 skips them).
    #[arg(long, default_value_t = 500)]
    pub issuance_requests: usize,
    /// Where the peers (Envoy, mitmproxy) are installed: a venv, created once.
    #[arg(long, default_value = "target/bench/peers")]
    pub peers_dir: PathBuf,
    /// Do not measure Envoy and mitmproxy.
    #[arg(long)]
    pub skip_peers: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/e2e.json")]
    pub out: PathBuf,
}

impl RunArgs {
    /// Client arguments shared by every scenario; callers set the path-specific fields.
    pub fn client(&self, connect: std::net::SocketAddr, cas: Vec<PathBuf>) -> ClientArgs {
        ClientArgs {
            connect,
            host: deploy::HOST.to_string(),
            proxy_connect: None,
            cas,
            requests: self.count(self.requests),
            concurrency: self.concurrency,
            warmup: self.warmup,
            new_connection: false,
            time_limit_secs: self.time_limit_secs,
            duration_secs: self.duration_secs,
            threads: self.client_threads,
        }
    }

    /// The request cap: `n`, or unbounded when the run is timed by `--duration-secs`.
    fn count(&self, n: usize) -> usize {
        if self.duration_secs > 0 { 1 << 40 } else { n }
    }

    pub fn new_conn(&self, mut a: ClientArgs) -> ClientArgs {
        a.new_connection = true;
        a.requests = self.count(self.new_connection_requests);
        a.warmup = self.concurrency;
        a
    }
}

/// The keep-alive run through the sidecar repeated with handshake-aborting clients alongside.
const ABORT_SCENARIO: &str = "sidecar http_proxy KA, aborters";

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let firma = args
        .firma
        .canonicalize()
        .with_context(|| format!("firma binary {}", args.firma.display()))?;
    let tmp = tempfile::tempdir()?;
    let up = Upstream::start(
        tmp.path(),
        &[deploy::HOST],
        "127.0.0.1:0".parse()?,
        &deploy::injected_auth(),
    )?;
    let d = Deployment::new(
        &firma,
        tmp.path(),
        up.addr,
        &up.ca_path,
        &Mode::HttpProxy,
        false,
    )?;
    let mut sc = d.start_sidecar()?;
    let proxy = sc.addr;
    eprintln!(
        "upstream https://{} (as {}), sidecar http_proxy {proxy}, deployment {}",
        up.addr,
        deploy::HOST,
        tmp.path().display()
    );

    // The same deployment with the admin listener on (metrics recorded), as a second sidecar.
    let metrics_root = tmp.path().join("metrics-on");
    let mut with_metrics = None;
    if !args.skip_metrics {
        std::fs::create_dir_all(&metrics_root)?;
        let dm = Deployment::new(
            &firma,
            &metrics_root,
            up.addr,
            &up.ca_path,
            &Mode::HttpProxy,
            true,
        )?;
        let scm = dm.start_sidecar()?;
        let admin: std::net::SocketAddr = scm
            .logged("admin listening on ")
            .context("the metrics sidecar logged no admin address")?;
        with_metrics = Some((dm, scm, admin));
    }

    let direct = args.client(up.addr, vec![up.ca_path.clone()]);
    let mut via = args.client(proxy, vec![d.firma_ca()]);
    via.proxy_connect = Some(format!("{}:443", deploy::HOST));

    // (name, client, which sidecar: 0 none, 1 metrics off, 2 metrics on)
    let mut plan = vec![
        ("direct, keep-alive", direct.clone(), 0),
        ("sidecar http_proxy, keep-alive", via.clone(), 1),
        ("direct, new connection each", args.new_conn(direct), 0),
        (
            "sidecar http_proxy, new conn each",
            args.new_conn(via.clone()),
            1,
        ),
        // Robustness: the same keep-alive run while clients abort TLS handshakes mid-way.
        (ABORT_SCENARIO, via.clone(), 1),
    ];
    if let Some((dm, scm, _)) = &with_metrics {
        let mut via_m = args.client(scm.addr, vec![dm.firma_ca()]);
        via_m.proxy_connect = via.proxy_connect.clone();
        // Alternated, so that drift in the machine's load hits both sides alike.
        plan.push(("sidecar keep-alive, metrics off", via.clone(), 1));
        plan.push(("sidecar keep-alive, metrics on", via_m.clone(), 2));
        plan.push(("sidecar keep-alive, metrics off #2", via.clone(), 1));
        plan.push(("sidecar keep-alive, metrics on #2", via_m, 2));
    }
    let mut scenarios = Vec::new();
    let mut costs = Vec::new();
    let mut checks = Checks::default();
    let mut via_metrics = 0u64;
    for (name, client, sidecar) in plan {
        let injected_before = up.injected();
        eprintln!("running: {name}");
        let pid = match (sidecar, &with_metrics) {
            (1, _) => Some(sc.child.id()),
            (2, Some((_, scm, _))) => Some(scm.child.id()),
            _ => None,
        };
        let cpu_before = pid.and_then(cpu_time_us);
        let cpu_secs_before = crate::peers::cpu_secs(sc.child.id())?;
        let aborters = (name == ABORT_SCENARIO)
            .then(|| crate::aborters::Aborters::start(proxy, &format!("{}:443", deploy::HOST), 2));
        let result = spawn_client(&client, None, tmp.path())?;
        if let Some(a) = aborters {
            let n = a.stop();
            eprintln!("robustness: {n} TLS handshakes aborted mid-way during \"{name}\"");
            checks.aborted_handshakes = n;
        }
        if sidecar == 1 {
            costs.push(crate::peers::ProxyCost::new(
                name,
                "firma",
                sc.child.id(),
                cpu_secs_before,
                result.ok + client.warmup,
            ));
        }
        let cpu = match (pid.and_then(cpu_time_us), cpu_before) {
            (Some(after), Some(before)) if result.ok + client.warmup > 0 => {
                Some((after - before) as f64 / (result.ok + client.warmup) as f64)
            }
            _ => None,
        };
        if !sc.alive() {
            bail!("the sidecar exited during \"{name}\":\n{}", sc.log_text());
        }
        let injected = up.injected() - injected_before;
        match sidecar {
            0 if injected != 0 => {
                bail!("\"{name}\" reached the upstream with the sidecar's credential: not direct")
            }
            0 => {}
            1 => checks.sidecar_requests_expected += (result.ok + client.warmup) as u64,
            _ => via_metrics += (result.ok + client.warmup) as u64,
        }
        scenarios.push(Scenario {
            name: name.to_string(),
            result,
            sidecar_cpu_us_per_request: cpu,
        });
    }
    if let Some((_, _, admin)) = &with_metrics {
        // The metrics the on-side recorded must match what went through it.
        let decisions = scrape_decisions(*admin)?;
        if decisions != via_metrics {
            bail!("the metrics sidecar counted {decisions} decisions for {via_metrics} requests");
        }
        eprintln!(
            "metrics sidecar: firma_sidecar_decisions_total = {decisions} (requests {via_metrics})"
        );
    }
    checks.upstream_requests = up.requests();
    checks.upstream_injected = up.injected();
    // Every completed request through the sidecar must have carried the injected credential.
    let measured_via: u64 = scenarios
        .iter()
        .filter(|s| s.name.starts_with("sidecar") && !s.name.contains("metrics on"))
        .map(|s| s.result.ok as u64)
        .sum();
    if checks.upstream_injected < measured_via {
        bail!(
            "the upstream saw {} injected requests but the sidecar scenarios completed {measured_via}",
            checks.upstream_injected
        );
    }
    // The file sink flushes on its fsync interval: wait for the events to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.audit_events() < measured_via as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    checks.audit_events = d.audit_events();
    if checks.audit_events < measured_via as usize {
        bail!(
            "only {} audit events for {measured_via} requests through the sidecar",
            checks.audit_events
        );
    }
    drop(sc);
    d.verify_audit()?;

    let mut ratios = vec![
        Ratio::new(
            "sidecar / direct, keep-alive",
            &scenarios[0].result,
            &scenarios[1].result,
        ),
        Ratio::new(
            "sidecar / direct, new connection",
            &scenarios[2].result,
            &scenarios[3].result,
        ),
    ];
    let off_on = |off: &str, on: &str| {
        let find = |n: &str| scenarios.iter().find(|s| s.name == n).map(|s| &s.result);
        find(off).zip(find(on))
    };
    for (what, off, on) in [
        (
            "metrics on / off, keep-alive",
            "sidecar keep-alive, metrics off",
            "sidecar keep-alive, metrics on",
        ),
        (
            "metrics on / off, keep-alive #2",
            "sidecar keep-alive, metrics off #2",
            "sidecar keep-alive, metrics on #2",
        ),
    ] {
        if let Some((a, b)) = off_on(off, on) {
            ratios.push(Ratio::new(what, a, b));
        }
    }
    let find = |n: &str| scenarios.iter().find(|s| s.name == n).map(|s| &s.result);
    if let Some((a, b)) = find("sidecar http_proxy, keep-alive").zip(find(ABORT_SCENARIO)) {
        ratios.push(Ratio::new(
            "with aborted handshakes / without, keep-alive",
            a,
            b,
        ));
    }
    drop(with_metrics);
    let peers = if args.skip_peers {
        Vec::new()
    } else {
        crate::peers::measure(args, &up, tmp.path())
    };
    let issuance = if args.issuance_requests == 0 {
        None
    } else {
        eprintln!(
            "running: sequential issuance ({} calls)",
            args.issuance_requests
        );
        Some(crate::issuance::run(args.issuance_requests).context("issuance latency")?)
    };
    let transparent = if args.skip_transparent {
        Transparent::Skipped("--skip-transparent".into())
    } else {
        crate::transparent::outer(args, &firma)
    };
    let mut report = Report {
        date_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        requests: args.requests,
        concurrency: args.concurrency,
        warmup: args.warmup,
        new_connection_requests: args.new_connection_requests,
        scenarios,
        ratios,
        checks,
        costs,
        peers,
        issuance,
        transparent,
    };
    let peer_ratios = report.peer_ratios();
    report.ratios.extend(peer_ratios);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{}", report.table());
    println!("written: {}", args.out.display());
    let errors: usize = report.scenarios.iter().map(|s| s.result.errors).sum();
    if errors > 0 {
        bail!("{errors} requests failed; figures above are not trustworthy");
    }
    if let Transparent::Failed(why) = &report.transparent {
        bail!("transparent mode failed: {why}");
    }
    Ok(())
}

/// User + system CPU time of process `pid` so far, in microseconds (`/proc/PID/stat`).
fn cpu_time_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // /proc reports clock ticks of USER_HZ, which Linux fixes at 100 for user space.
    Some(ticks * 10_000)
}

/// The sum of `firma_sidecar_decisions_total` on the admin listener at `admin`.
fn scrape_decisions(admin: std::net::SocketAddr) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).context("connect to the admin listener")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("firma_sidecar_decisions_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Runs `firma-bench client` as a child process (moved into `cgroup` first when given, via
/// `sh`, so this process never joins it), bounded by the client's time limit plus a margin.
pub fn spawn_client(
    args: &ClientArgs,
    cgroup: Option<&Path>,
    scratch: &Path,
) -> anyhow::Result<ClientResult> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut argv: Vec<String> = vec![
        "client".into(),
        "--connect".into(),
        args.connect.to_string(),
        "--host".into(),
        args.host.clone(),
        "--requests".into(),
        args.requests.to_string(),
        "--concurrency".into(),
        args.concurrency.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--time-limit-secs".into(),
        args.time_limit_secs.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--duration-secs".into(),
        args.duration_secs.to_string(),
    ];
    if let Some(p) = &args.proxy_connect {
        argv.extend(["--proxy-connect".into(), p.clone()]);
    }
    if args.new_connection {
        argv.push("--new-connection".into());
    }
    for ca in &args.cas {
        argv.extend(["--ca".into(), deploy::path_str(ca)?.to_string()]);
    }
    let mut cmd = firma_testing::client::in_cgroup_command(cgroup, &exe, &argv);
    let out_path = scratch.join("client.json");
    let err_path = scratch.join("client.err");
    let mut child = cmd
        .stdout(Stdio::from(std::fs::File::create(&out_path)?))
        .stderr(Stdio::from(std::fs::File::create(&err_path)?))
        .spawn()
        .context("spawn client")?;
    let deadline = Instant::now() + Duration::from_secs(args.time_limit_secs + 30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("client did not finish within its time limit + 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    if !status.success() {
        bail!(
            "client failed ({status}): {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    serde_json::from_str(stdout.trim()).with_context(|| format!("client output: {stdout}"))
}
