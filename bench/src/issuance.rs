//! Sequential issuance latency: one client calling `IssueCapability` on the real
//! `firma authority` over loopback, one call at a time, as a web app issuing a capability per
//! user session does. A delayed-ACK stall (a server socket without `TCP_NODELAY`) shows here as
//! a ~40 ms p50 where the work takes well under a millisecond; the Authority's CPU time per call
//! (from /proc, so it includes HTTP/2, gRPC, Cedar and signing) separates server time from
//! waiting.

use anyhow::{Context, anyhow, bail};
use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_client::AuthorityClient;
use firma_testing::authority::Deployment;
use firma_testing::shipped_policy;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Unmeasured calls on the same channel first.
const WARMUP: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct Issuance {
    pub requests: usize,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub min_us: u64,
    /// The Authority process's user + system CPU time per measured call.
    pub server_cpu_us_per_call: f64,
}

/// Runs `requests` sequential issuances against a fresh Authority (the `firma` binary
/// `FIRMA_BIN` names, shipped genai-app policies).
pub fn run(requests: usize) -> anyhow::Result<Issuance> {
    if requests == 0 {
        bail!("--issuance-requests must be positive");
    }
    let d = Deployment::new(
        &shipped_policy("issuance/genai-app/issuance.cedar"),
        &shipped_policy("runtime/genai-app/genai-app.cedar"),
    );
    let server = d.start();
    let pid = server.child.id();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut c = AuthorityClient::connect(url.clone())
            .await
            .with_context(|| format!("connect to the authority at {url}"))?;
        for _ in 0..WARMUP {
            issue(&mut c).await?;
        }
        let cpu_before = cpu_ticks(pid)?;
        let mut lat = Vec::with_capacity(requests);
        for _ in 0..requests {
            let t = Instant::now();
            issue(&mut c).await?;
            lat.push(t.elapsed());
        }
        let cpu = cpu_ticks(pid)? - cpu_before;
        lat.sort();
        let pct = |p: usize| lat[(lat.len() * p).div_ceil(100).saturating_sub(1)];
        let us = |d: Duration| d.as_micros() as u64;
        Ok(Issuance {
            requests,
            p50_us: us(pct(50)),
            p90_us: us(pct(90)),
            p99_us: us(pct(99)),
            min_us: us(lat[0]),
            server_cpu_us_per_call: cpu as f64 * 1e6 / ticks_per_sec() / requests as f64,
        })
    })
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

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// /proc reports CPU times in USER_HZ, fixed at 100 per second by the Linux ABI.
fn ticks_per_sec() -> f64 {
    100.0
}
