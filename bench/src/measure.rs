//! One measured run: a target (direct, a Firma mode, a peer), a load (keep-alive or a new
//! connection per request), a client (`firma-bench client` or `hey`), one repetition. The
//! proxy's CPU time (utime + stime from `/proc/PID/stat`) is read before and after, its peak RSS
//! (VmHWM) after, and the upstream's counters prove the path: a proxied run must deliver the
//! injected credential on every completed request, a direct one never.

use crate::client::{ClientArgs, ClientResult};
use crate::hey::HeyTarget;
use crate::run::{RunArgs, spawn_client};
use crate::upstream::Upstream;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    KeepAlive,
    NewConn,
}

impl Load {
    pub fn label(self) -> &'static str {
        match self {
            Load::KeepAlive => "keep-alive",
            Load::NewConn => "new conn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    FirmaBench,
    Hey,
}

impl Client {
    pub fn label(self) -> &'static str {
        match self {
            Client::FirmaBench => "firma-bench",
            Client::Hey => "hey",
        }
    }
}

/// Something the clients send their load to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// The `firma-bench client` arguments of the keep-alive run.
    pub fb: ClientArgs,
    /// How hey reaches it; `None`: measured with `firma-bench client` only.
    pub hey: Option<HeyTarget>,
    /// The loads measured (the robustness and metrics variants run keep-alive only).
    pub loads: Vec<Load>,
    /// The cgroup the client runs in (the tagged one for transparent mode).
    pub cgroup: Option<PathBuf>,
    /// The proxy process whose CPU and RSS are measured.
    pub pid: Option<u32>,
    /// Whether requests must reach the upstream with the injected credential (else: never).
    pub via: bool,
    /// Handshake-aborting clients run alongside: (proxy, CONNECT authority).
    pub aborters: Option<(SocketAddr, String)>,
}

impl Target {
    pub fn runs(&self, load: Load, client: Client) -> bool {
        self.loads.contains(&load) && (client == Client::FirmaBench || self.hey.is_some())
    }
}

/// One repetition of one (target, load, client).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub target: String,
    pub load: Load,
    pub client: Client,
    /// 1-based.
    pub rep: usize,
    pub result: ClientResult,
    /// Responses the proxy served, warmup included (the CPU reading spans both).
    pub served: usize,
    /// Requests that reached the upstream with the injected credential during the run.
    pub upstream_injected: u64,
    /// Proxy CPU seconds (user + system) per 10,000 served requests.
    pub cpu_s_per_10k: Option<f64>,
    /// Proxy peak RSS (VmHWM, since the process started) after the run.
    pub peak_rss_mb: Option<f64>,
    /// Proxy RSS (VmRSS) right after the run: what it holds, without its startup peak.
    pub rss_mb: Option<f64>,
    /// Handshakes the aborters cut off during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aborted_handshakes: Option<u64>,
}

/// The WARN and ERROR lines of a proxy's log (the last `n`), shown when a run had errors.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a run needs besides its target.
pub struct Env<'a> {
    pub args: &'a RunArgs,
    pub up: &'a Upstream,
    pub scratch: &'a Path,
    pub hey: Option<&'a Path>,
}

pub fn measure(
    env: &Env<'_>,
    t: &Target,
    load: Load,
    client: Client,
    rep: usize,
) -> anyhow::Result<Run> {
    let args = env.args;
    let injected_before = env.up.injected();
    let cpu_before = t.pid.map(crate::peers::cpu_secs).transpose()?;
    let aborters = t
        .aborters
        .as_ref()
        .map(|(proxy, authority)| crate::aborters::Aborters::start(*proxy, authority, 2));
    let measured = match client {
        Client::FirmaBench => {
            let a = match load {
                Load::KeepAlive => t.fb.clone(),
                Load::NewConn => args.new_conn(t.fb.clone()),
            };
            spawn_client(&a, t.cgroup.as_deref(), env.scratch).map(|r| {
                let served = r.ok + a.warmup;
                (r, served)
            })
        }
        Client::Hey => {
            let hey = env.hey.context("hey is not installed")?;
            let h = t.hey.as_ref().context("no hey target")?;
            let warmup = match load {
                Load::KeepAlive => args.warmup,
                Load::NewConn => args.concurrency,
            };
            crate::hey::run(
                hey,
                h,
                load == Load::NewConn,
                args.concurrency,
                args.duration_secs,
                match load {
                    Load::KeepAlive => args.requests,
                    Load::NewConn => args.new_connection_requests,
                },
                warmup,
                t.cgroup.as_deref(),
                env.scratch,
            )
            .map(|(r, warm)| {
                let served = r.ok + warm;
                (r, served)
            })
        }
    };
    let aborted_handshakes = aborters.map(|a| a.stop());
    let (result, served) = measured?;
    let (cpu_s_per_10k, peak_rss_mb, rss_mb) = match (t.pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let cpu = crate::peers::cpu_secs(pid)? - before;
            (
                (served > 0).then(|| cpu / served as f64 * 10_000.0),
                crate::peers::peak_rss_mb(pid).ok(),
                crate::peers::rss_mb(pid).ok(),
            )
        }
        _ => (None, None, None),
    };
    // nginx logs a request after its response is on the wire: let the counter catch up.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut injected = env.up.injected() - injected_before;
    while t.via && injected < result.ok as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        injected = env.up.injected() - injected_before;
    }
    let what = format!("{}, {}, {} #{rep}", t.name, load.label(), client.label());
    if t.via && injected < result.ok as u64 {
        bail!(
            "\"{what}\": the upstream saw {injected} requests with the injected credential for {} completed",
            result.ok
        );
    }
    if !t.via && injected != 0 {
        bail!("\"{what}\" reached the upstream with the injected credential: not direct");
    }
    eprintln!(
        "  {what}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors{}",
        result.throughput_rps,
        result.p50_us as f64 / 1000.0,
        result.p99_us as f64 / 1000.0,
        result.errors,
        cpu_s_per_10k.map_or(String::new(), |c| format!(", {c:.2} CPU-s/10k")),
    );
    if let Some(e) = &result.first_error {
        eprintln!("    first error: {e}");
    }
    Ok(Run {
        target: t.name.clone(),
        load,
        client,
        rep,
        result,
        served,
        upstream_injected: injected,
        cpu_s_per_10k,
        peak_rss_mb,
        rss_mb,
        aborted_handshakes,
    })
}

/// Runs `cmd` with its stdout and stderr in `scratch/NAME.out` / `NAME.err`, killing it after
/// `limit`; returns its stdout, or an error with its stderr when it failed. One shape for
/// every client the harness drives (`firma-bench client`, hey).
pub fn run_bounded(
    mut cmd: std::process::Command,
    scratch: &std::path::Path,
    name: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    use std::process::Stdio;
    let out_path = scratch.join(format!("{name}.out"));
    let err_path = scratch.join(format!("{name}.err"));
    let mut child = cmd
        .stdout(Stdio::from(std::fs::File::create(&out_path)?))
        .stderr(Stdio::from(std::fs::File::create(&err_path)?))
        .spawn()
        .with_context(|| format!("spawn {name}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    if !status.success() {
        bail!(
            "{name} failed ({status}): {}{stdout}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    Ok(stdout)
}
