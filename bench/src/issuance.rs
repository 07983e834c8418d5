//! Issuance over gRPC: clients calling `IssueCapability` on the real `firma authority` over
//! loopback, one call at a time (as a web app issuing a capability per user session does) or
//! `concurrency` callers multiplexed on one channel. A delayed-ACK stall (a server socket
//! without `TCP_NODELAY`) shows here as a ~40 ms p50 where the work takes well under a
//! millisecond; the server's CPU time per call (its threads' scheduler run time, so it includes
//! HTTP/2, gRPC, Cedar, signing and logging) separates server time from waiting.
//!
//! The same measurement against `empty-authority` (bench/src/bin/empty-authority.rs: the same
//! service and serving setup answering a canned capability) is the RPC's own cost, so the
//! difference is Firma's work per call.

use anyhow::{Context, anyhow, bail};
use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_client::AuthorityClient;
use firma_testing::authority::Deployment;
use firma_testing::process::Process;
use firma_testing::shipped_policy;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Unmeasured calls on the same channel first.
const WARMUP: usize = 50;

/// Which server answers.
#[derive(Debug, Clone)]
pub enum Target {
    /// `firma authority` (`FIRMA_BIN`) with the shipped genai-app policies.
    Authority,
    /// The `empty-authority` binary at this path.
    Empty(PathBuf),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Authority => "authority",
            Target::Empty(_) => "empty",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Issuance {
    /// `authority` or `empty` (the baseline).
    pub server: &'static str,
    pub requests: usize,
    /// Callers in flight at once on the one channel (1: sequential).
    pub concurrency: usize,
    pub calls_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub min_us: u64,
    /// The server process's CPU time per measured call: the scheduler run time of its threads
    /// (`/proc/PID/task/*/schedstat`, nanoseconds; `/proc/PID/stat` counts 10 ms ticks).
    pub server_cpu_us_per_call: f64,
}

/// `requests` sequential issuances against a fresh Authority (the `firma` binary `FIRMA_BIN`
/// names, shipped genai-app policies).
pub fn run(requests: usize) -> anyhow::Result<Issuance> {
    measure(&Target::Authority, requests, 1)
}

/// `requests` issuances, `concurrency` at a time on one channel, against a fresh `target`.
pub fn measure(target: &Target, requests: usize, concurrency: usize) -> anyhow::Result<Issuance> {
    if requests == 0 || concurrency == 0 {
        bail!("issuance requests and concurrency must be positive");
    }
    // Kept alive (and the Authority's temp layout with it) until the measurement is done.
    let (_deployment, mut server) = start(target)?;
    let pid = server.child.id();
    let url = format!(
        "http://{}",
        server
            .logged::<std::net::SocketAddr>("gRPC listening on ")
            .context("listening address in the server's log")?
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let c = AuthorityClient::connect(url.clone())
            .await
            .with_context(|| format!("connect to the authority at {url}"))?;
        for _ in 0..WARMUP {
            issue(&mut c.clone()).await?;
        }
        let cpu_before = cpu_ns(pid)?;
        let t0 = Instant::now();
        let mut callers = Vec::with_capacity(concurrency);
        for i in 0..concurrency {
            // Spread the calls; the first callers take the remainder.
            let n = requests / concurrency + usize::from(i < requests % concurrency);
            let mut c = c.clone();
            callers.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    issue(&mut c).await?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            }));
        }
        let mut lat = Vec::with_capacity(requests);
        for caller in callers {
            lat.extend(caller.await??);
        }
        let wall = t0.elapsed();
        let cpu = cpu_ns(pid)?.saturating_sub(cpu_before);
        lat.sort();
        let pct = |p: usize| lat[(lat.len() * p).div_ceil(100).saturating_sub(1)];
        let us = |d: Duration| d.as_micros() as u64;
        Ok(Issuance {
            server: target.name(),
            requests,
            concurrency,
            calls_per_sec: requests as f64 / wall.as_secs_f64(),
            p50_us: us(pct(50)),
            p90_us: us(pct(90)),
            p99_us: us(pct(99)),
            min_us: us(lat[0]),
            server_cpu_us_per_call: cpu as f64 / 1e3 / requests as f64,
        })
    });
    if !server.alive() {
        bail!(
            "the {} server exited:\n{}",
            target.name(),
            server.log_text()
        );
    }
    result
}

/// Starts `target`; the deployment (the Authority's temp layout) lives as long as it is held.
fn start(target: &Target) -> anyhow::Result<(Option<Deployment>, Process)> {
    match target {
        Target::Authority => {
            let d = Deployment::new(
                &shipped_policy("issuance/genai-app/issuance.cedar"),
                &shipped_policy("runtime/genai-app/genai-app.cedar"),
            );
            let server = d.start();
            Ok((Some(d), server.process))
        }
        Target::Empty(bin) => {
            let mut p = Process::spawn(std::process::Command::new(bin))
                .with_context(|| format!("start {}", bin.display()))?;
            p.wait_for("authority ready", Duration::from_secs(20))
                .map_err(|e| anyhow!("{}: {e}", bin.display()))?;
            Ok((None, p))
        }
    }
}

/// `empty-authority` next to this executable (cargo builds both binaries of this package into
/// the same directory), when it is there.
pub fn empty_authority_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe
        .parent()
        .unwrap_or(Path::new("."))
        .join("empty-authority");
    bin.exists().then_some(bin)
}

async fn issue(c: &mut AuthorityClient<tonic::transport::Channel>) -> anyhow::Result<()> {
    let resp = c
        .issue_capability(pb::IssuanceRequest {
            agent_id: "tenant-acme".into(),
            session_id: "bench-session".into(),
            requested_actions: vec!["model.inference.chat".into()],
            resource_scope: "*".into(),
            requested_ttl_seconds: 900,
        })
        .await
        .map_err(|s| anyhow!("IssueCapability: {s}"))?
        .into_inner();
    match resp.result {
        Some(pb::issuance_response::Result::Allowed(_)) => Ok(()),
        other => bail!("IssueCapability was not allowed: {other:?}"),
    }
}

/// CPU time of every thread of `pid` so far, in ns (`/proc/PID/task/*/schedstat`, first
/// field). Threads that exited in between are not counted (the servers' runtime workers live
/// as long as the process).
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
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
