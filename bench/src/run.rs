//! `firma-bench run`: one upstream, every target (direct, Firma http_proxy and transparent,
//! Envoy, mitmproxy), two clients (`firma-bench client`, Go `hey`), every scenario repeated
//! and interleaved in one run; medians in the table, every run in the JSON.

use crate::client::{ClientArgs, ClientResult};
use crate::deploy::{self, Deployment, Mode};
use crate::hey::HeyTarget;
use crate::measure::{Client, Env, Load, Run, Target, measure};
use crate::report::{Checks, Report, Skip};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
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
    /// Runs of every (target, load, client), interleaved across targets; the table shows the
    /// medians, the JSON keeps every run.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// The upstream server: nginx (Debian nginx-light) or the builtin hyper server; default
    /// nginx when installed, else builtin.
    #[arg(long, value_enum)]
    pub upstream: Option<crate::upstream::Kind>,
    /// Deploy Firma without `strict_hosts` (MITM failures fall back to a blind tunnel per
    /// client), to reproduce the fallback the robustness step guards against.
    #[arg(long)]
    pub mitm_fallback: bool,
    /// Do not measure with Go `hey` (the second client).
    #[arg(long)]
    pub skip_hey: bool,
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
            series: None,
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

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    use crate::report::names::*;
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let firma = crate::scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let (up, kind, upstream_why) = crate::scenario::upstream(tmp.path(), args.upstream)?;
    let d = Deployment::new(
        &firma,
        tmp.path(),
        up.addr,
        &up.ca_path,
        &Mode::HttpProxy,
        false,
        !args.mitm_fallback,
    )?;
    let mut sc = d.start_sidecar()?;
    let proxy = sc.addr;
    eprintln!(
        "sidecar http_proxy {proxy}, deployment {}",
        tmp.path().display()
    );
    let mut skipped = Vec::new();
    let hey_bin = if args.skip_hey {
        skipped.push(Skip {
            what: "hey".into(),
            why: "--skip-hey".into(),
        });
        None
    } else {
        let b = crate::hey::binary();
        if b.is_none() {
            let why = "hey is not installed (firma-bench install-peers installs it as root)";
            eprintln!("SKIP hey: {why}");
            skipped.push(Skip {
                what: "hey".into(),
                why: why.into(),
            });
        }
        b
    };

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
            !args.mitm_fallback,
        )?;
        let scm = dm.start_sidecar()?;
        let admin: std::net::SocketAddr = scm
            .logged("admin listening on ")
            .context("the metrics sidecar logged no admin address")?;
        with_metrics = Some((dm, scm, admin));
    }

    let mut peers = Vec::new();
    if !args.skip_peers {
        let (started, why) = crate::peers::start_all(args, &up, tmp.path());
        peers = started;
        skipped.extend(why);
    }

    // Every CA of the run in one bundle, for hey's SSL_CERT_FILE.
    let mut cas = vec![up.ca_path.clone(), d.firma_ca()];
    cas.extend(peers.iter().map(|p| p.ca.clone()));
    let bundle = tmp.path().join("ca-bundle.pem");
    write_bundle(&bundle, &cas)?;
    let hey = |proxy: Option<std::net::SocketAddr>, connect_to: Option<&str>| {
        hey_bin.as_ref().map(|_| HeyTarget {
            url: match (proxy, connect_to) {
                // Through a CONNECT proxy: the authority hey puts in CONNECT.
                (Some(_), Some(authority)) => {
                    format!(
                        "https://{}{}",
                        authority.trim_end_matches(":443"),
                        crate::client::PATH
                    )
                }
                _ => format!("https://{}{}", up.addr, crate::client::PATH),
            },
            host: deploy::HOST.into(),
            proxy: proxy.map(|p| format!("http://{p}")),
            ca_bundle: bundle.clone(),
        })
    };
    let authority = format!("{}:443", deploy::HOST);
    let both = vec![Load::KeepAlive, Load::NewConn];
    let mut via = args.client(proxy, vec![d.firma_ca()]);
    via.proxy_connect = Some(authority.clone());
    let mut targets = vec![
        Target {
            name: DIRECT.into(),
            fb: args.client(up.addr, vec![up.ca_path.clone()]),
            hey: hey(None, None),
            loads: both.clone(),
            cgroup: None,
            pid: None,
            via: false,
            aborters: None,
        },
        Target {
            name: HTTP_PROXY.into(),
            fb: via.clone(),
            hey: hey(Some(proxy), Some(&authority)),
            loads: both.clone(),
            cgroup: None,
            pid: Some(sc.child.id()),
            via: true,
            aborters: None,
        },
        // Robustness: the same keep-alive run while clients abort TLS handshakes mid-way.
        Target {
            name: ABORTERS.into(),
            fb: via.clone(),
            hey: None,
            loads: vec![Load::KeepAlive],
            cgroup: None,
            pid: Some(sc.child.id()),
            via: true,
            aborters: Some((proxy, authority.clone())),
        },
    ];
    if let Some((dm, scm, _)) = &with_metrics {
        let mut via_m = args.client(scm.addr, vec![dm.firma_ca()]);
        via_m.proxy_connect = Some(authority.clone());
        targets.push(Target {
            name: METRICS_ON.into(),
            fb: via_m,
            hey: None,
            loads: vec![Load::KeepAlive],
            cgroup: None,
            pid: Some(scm.child.id()),
            via: true,
            aborters: None,
        });
    }
    for p in &peers {
        let mut fb = args.client(p.addr, vec![p.ca.clone()]);
        fb.proxy_connect = Some(p.connect_to.clone());
        targets.push(Target {
            name: p.name.into(),
            fb,
            hey: hey(Some(p.addr), Some(&p.connect_to)),
            loads: both.clone(),
            cgroup: None,
            pid: Some(p.pid()),
            via: true,
            aborters: None,
        });
    }

    let mut inner = None;
    if args.skip_transparent {
        skipped.push(Skip {
            what: "transparent mode".into(),
            why: "--skip-transparent".into(),
        });
    } else {
        match crate::transparent::Inner::start(args, &firma, kind) {
            Ok(crate::transparent::Started::Ready(i)) => inner = Some(i),
            Ok(crate::transparent::Started::Skipped(why)) => {
                eprintln!("SKIP transparent mode: {why}");
                skipped.push(Skip {
                    what: "transparent mode".into(),
                    why,
                });
            }
            Err(e) => bail!("transparent mode failed to start: {e:#}"),
        }
    }
    let inner_targets = inner
        .as_ref()
        .map(|i| i.targets.clone())
        .unwrap_or_default();

    let env = Env {
        args,
        up: &up,
        scratch: tmp.path(),
        hey: hey_bin.as_deref(),
    };
    let mut runs: Vec<Run> = Vec::new();
    let mut failed_peers: Vec<String> = Vec::new();
    // Interleaved: each repetition runs every target once per (load, client), so drift in the
    // machine's load hits every target alike.
    for rep in 1..=args.repetitions {
        for load in [Load::KeepAlive, Load::NewConn] {
            for client in [Client::FirmaBench, Client::Hey] {
                if client == Client::Hey && hey_bin.is_none() {
                    continue;
                }
                eprintln!(
                    "repetition {rep}/{}: {}, {}",
                    args.repetitions,
                    load.label(),
                    client.label()
                );
                for t in &targets {
                    if !t.runs(load, client) || failed_peers.contains(&t.name) {
                        continue;
                    }
                    let r = measure(&env, t, load, client, rep);
                    if !sc.alive() {
                        bail!(
                            "the sidecar exited during \"{}\":\n{}",
                            t.name,
                            sc.log_text()
                        );
                    }
                    match r {
                        Ok(run) => {
                            if run.result.errors > 0 && t.name.starts_with("firma") {
                                let log = match (&with_metrics, t.name.as_str()) {
                                    (Some((_, scm, _)), METRICS_ON) => scm.log_text(),
                                    _ => sc.log_text(),
                                };
                                eprintln!(
                                    "sidecar log (WARN/ERROR, last 20):\n{}",
                                    crate::measure::log_tail(&log, 20)
                                );
                            }
                            runs.push(run)
                        }
                        Err(e) if peers.iter().any(|p| p.name == t.name) => {
                            // A peer that fails is reported, not fatal: Firma's figures stand.
                            let why = format!("{e:#}");
                            eprintln!("SKIP {}: {why}", t.name);
                            skipped.push(Skip {
                                what: t.name.clone(),
                                why,
                            });
                            failed_peers.push(t.name.clone());
                        }
                        Err(e) => return Err(e),
                    }
                }
                for (name, with_hey) in &inner_targets {
                    if client == Client::Hey && !with_hey {
                        continue;
                    }
                    let i = inner.as_mut().context("transparent run")?;
                    runs.push(
                        i.measure(name, load, client, rep)
                            .with_context(|| format!("transparent mode, \"{name}\""))?,
                    );
                }
            }
        }
    }
    drop(peers);

    let mut checks = Checks::default();
    let served = |name: &str| -> u64 {
        runs.iter()
            .filter(|r| r.target == name)
            .map(|r| r.served as u64)
            .sum()
    };
    checks.sidecar_requests_expected = served(HTTP_PROXY) + served(ABORTERS);
    checks.aborted_handshakes = runs.iter().filter_map(|r| r.aborted_handshakes).sum();
    if let Some((_, _, admin)) = &with_metrics {
        // The metrics the on-side recorded must match what went through it.
        let decisions = scrape_decisions(*admin)?;
        let requests = served(METRICS_ON);
        if decisions != requests {
            bail!("the metrics sidecar counted {decisions} decisions for {requests} requests");
        }
        checks.metrics_decisions = Some(decisions);
        checks.metrics_requests = Some(requests);
    }
    drop(with_metrics);
    checks.upstream_requests = up.requests();
    checks.upstream_injected = up.injected();
    // Every completed request through the sidecar has its signed audit event.
    let completed: u64 = runs
        .iter()
        .filter(|r| r.target == HTTP_PROXY || r.target == ABORTERS)
        .map(|r| r.result.ok as u64)
        .sum();
    // The file sink flushes on its fsync interval: wait for the events to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (d.audit_events() as u64) < completed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    checks.audit_events = d.audit_events();
    if (checks.audit_events as u64) < completed {
        bail!(
            "only {} audit events for {completed} requests through the sidecar",
            checks.audit_events
        );
    }
    drop(sc);
    d.verify_audit()?;
    if let Some(i) = inner {
        let (events, requests) = i.finish().context("transparent mode")?;
        checks.transparent_audit_events = Some(events);
        checks.transparent_requests = Some(requests);
    }

    let issuance = if args.issuance_requests == 0 {
        None
    } else {
        eprintln!(
            "running: sequential issuance ({} calls)",
            args.issuance_requests
        );
        Some(crate::issuance::run(args.issuance_requests).context("issuance latency")?)
    };
    let medians = crate::report::medians(&runs);
    let ratios = crate::report::ratios(&medians);
    let report = Report {
        date_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        concurrency: args.concurrency,
        duration_secs: args.duration_secs,
        warmup: args.warmup,
        repetitions: args.repetitions,
        upstream: kind,
        upstream_why,
        runs,
        medians,
        ratios,
        checks,
        skipped,
        issuance,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{}", report.table());
    println!("written: {}", args.out.display());
    let errors: usize = report.runs.iter().map(|r| r.result.errors).sum();
    if errors > 0 {
        let first = report
            .runs
            .iter()
            .find_map(|r| {
                r.result
                    .first_error
                    .as_ref()
                    .map(|e| format!("{} ({}): {e}", r.target, r.client.label()))
            })
            .unwrap_or_default();
        bail!("{errors} requests failed (first: {first}); figures above are not trustworthy");
    }
    Ok(())
}

/// Concatenates the PEM files `cas` into `path`.
pub fn write_bundle(path: &Path, cas: &[PathBuf]) -> anyhow::Result<()> {
    let mut pem = String::new();
    for ca in cas {
        pem.push_str(
            &std::fs::read_to_string(ca).with_context(|| format!("read CA {}", ca.display()))?,
        );
        pem.push('\n');
    }
    std::fs::write(path, pem).with_context(|| format!("write {}", path.display()))
}

/// The sum of `firma_sidecar_decisions_total` on the admin listener at `admin`.
fn scrape_decisions(admin: std::net::SocketAddr) -> anyhow::Result<u64> {
    Ok(scrape_sum(admin, "firma_sidecar_decisions_total{")?.unwrap_or(0.0) as u64)
}

/// The sum of the samples whose line starts with `series` on the sidecar's `/metrics`
/// (`None`: no such series, e.g. an older binary).
pub fn scrape_sum(admin: std::net::SocketAddr, series: &str) -> anyhow::Result<Option<f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).context("connect to the admin listener")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .collect();
    Ok((!samples.is_empty()).then(|| samples.iter().sum()))
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
    if let Some(series) = &args.series {
        argv.extend(["--series".into(), deploy::path_str(series)?.to_string()]);
    }
    for ca in &args.cas {
        argv.extend(["--ca".into(), deploy::path_str(ca)?.to_string()]);
    }
    let cmd = firma_testing::client::in_cgroup_command(cgroup, &exe, &argv);
    let limit = Duration::from_secs(args.time_limit_secs + 30);
    let stdout = crate::measure::run_bounded(cmd, scratch, "client", limit)?;
    serde_json::from_str(stdout.trim()).with_context(|| format!("client output: {stdout}"))
}
