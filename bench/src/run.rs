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
    let d = Deployment::new(&firma, tmp.path(), up.addr, &up.ca_path, &Mode::HttpProxy)?;
    let mut sc = d.start_sidecar()?;
    let proxy = sc.addr;
    eprintln!(
        "upstream https://{} (as {}), sidecar http_proxy {proxy}, deployment {}",
        up.addr,
        deploy::HOST,
        tmp.path().display()
    );

    let direct = args.client(up.addr, vec![up.ca_path.clone()]);
    let mut via = args.client(proxy, vec![d.firma_ca()]);
    via.proxy_connect = Some(format!("{}:443", deploy::HOST));

    let plan = [
        ("direct, keep-alive", direct.clone(), false),
        ("sidecar http_proxy, keep-alive", via.clone(), true),
        ("direct, new connection each", args.new_conn(direct), false),
        (
            "sidecar http_proxy, new conn each",
            args.new_conn(via.clone()),
            true,
        ),
        // Robustness: the same keep-alive run while clients abort TLS handshakes mid-way.
        (ABORT_SCENARIO, via, true),
    ];
    let mut scenarios = Vec::new();
    let mut costs = Vec::new();
    let mut checks = Checks::default();
    let sidecar_pid = sc.process.child.id();
    for (name, client, through_sidecar) in plan {
        let injected_before = up.injected();
        let cpu_before = crate::peers::cpu_secs(sidecar_pid)?;
        eprintln!("running: {name}");
        let aborters = (name == ABORT_SCENARIO)
            .then(|| crate::aborters::Aborters::start(proxy, &format!("{}:443", deploy::HOST), 2));
        let result = spawn_client(&client, None, tmp.path())?;
        if let Some(a) = aborters {
            let n = a.stop();
            eprintln!("robustness: {n} TLS handshakes aborted mid-way during \"{name}\"");
            checks.aborted_handshakes = n;
        }
        if !sc.alive() {
            bail!("the sidecar exited during \"{name}\":\n{}", sc.log_text());
        }
        let injected = up.injected() - injected_before;
        if through_sidecar {
            costs.push(crate::peers::ProxyCost::new(
                name,
                "firma",
                sidecar_pid,
                cpu_before,
                result.ok + client.warmup,
            ));
            checks.sidecar_requests_expected += (result.ok + client.warmup) as u64;
        } else if injected != 0 {
            bail!("\"{name}\" reached the upstream with the sidecar's credential: not direct");
        }
        scenarios.push(Scenario {
            name: name.to_string(),
            result,
        });
    }
    checks.upstream_requests = up.requests();
    checks.upstream_injected = up.injected();
    // Every completed request through the sidecar must have carried the injected credential.
    let measured_via: u64 = scenarios
        .iter()
        .filter(|s| s.name.starts_with("sidecar"))
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

    let ratios = vec![
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
        Ratio::new(
            "with aborted handshakes / without, keep-alive",
            &scenarios[1].result,
            &scenarios[4].result,
        ),
    ];
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
