//! The results file (`target/bench/e2e.json`) and the printed table.

use crate::client::ClientResult;
use crate::peers::PeerOutcome;
use serde::Serialize;

/// One measured scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub result: ClientResult,
    /// CPU time (user + system) the sidecar process spent per completed request, warmup
    /// included, when the scenario went through a sidecar of this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_cpu_us_per_request: Option<f64>,
}

/// `slow` relative to `base`: latency ratios (slow/base) and throughput ratio (base/slow),
/// so every figure reads "how many times worse".
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub what: String,
    pub latency_p50: f64,
    pub latency_p90: f64,
    pub latency_p99: f64,
    pub throughput: f64,
}

impl Ratio {
    pub fn new(what: &str, base: &ClientResult, slow: &ClientResult) -> Self {
        let r = |a: u64, b: u64| {
            if b == 0 {
                f64::NAN
            } else {
                a as f64 / b as f64
            }
        };
        Self {
            what: what.to_string(),
            latency_p50: r(slow.p50_us, base.p50_us),
            latency_p90: r(slow.p90_us, base.p90_us),
            latency_p99: r(slow.p99_us, base.p99_us),
            throughput: if slow.throughput_rps > 0.0 {
                base.throughput_rps / slow.throughput_rps
            } else {
                f64::NAN
            },
        }
    }
}

/// Proof that the measured traffic took the path its name says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Requests the upstream answered during the run.
    pub upstream_requests: u64,
    /// Of those, requests carrying the credential only the sidecar injects.
    pub upstream_injected: u64,
    /// Requests the sidecar scenarios completed (warmup included).
    pub sidecar_requests_expected: u64,
    /// Signed audit events in the sidecar's file sink at the end.
    pub audit_events: usize,
    /// Handshakes the robustness step aborted mid-way during its scenario.
    pub aborted_handshakes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date_unix: u64,
    pub cpus: usize,
    pub requests: usize,
    pub concurrency: usize,
    pub warmup: usize,
    pub new_connection_requests: usize,
    pub scenarios: Vec<Scenario>,
    pub ratios: Vec<Ratio>,
    pub checks: Checks,
    /// CPU per 10k requests and peak RSS of each proxy process, per scenario.
    pub costs: Vec<crate::peers::ProxyCost>,
    /// Envoy and mitmproxy, measured with the same client and upstream, or why not.
    pub peers: Vec<crate::peers::PeerOutcome>,
    /// Sequential issuance latency against the real Authority (`None` when skipped).
    pub issuance: Option<crate::issuance::Issuance>,
    /// Transparent-mode results, or why they were skipped.
    pub transparent: Transparent,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transparent {
    Measured {
        scenarios: Vec<Scenario>,
        ratios: Vec<Ratio>,
    },
    Skipped(String),
    Failed(String),
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn scenario_rows(out: &mut String, rows: &[Scenario]) {
    for s in rows {
        let r = &s.result;
        out.push_str(&format!(
            "{:<34} {:>6} {:>5} {:>10.0} {:>9} {:>9} {:>9} {:>6} {:>9}{}\n",
            s.name,
            r.ok,
            r.concurrency,
            r.throughput_rps,
            ms(r.p50_us),
            ms(r.p90_us),
            ms(r.p99_us),
            r.errors,
            s.sidecar_cpu_us_per_request
                .map_or_else(|| "-".to_string(), |c| format!("{c:.1}")),
            if r.time_limited {
                "  (time limit hit)"
            } else {
                ""
            },
        ));
    }
}

fn ratio_row(out: &mut String, r: &Ratio) {
    out.push_str(&format!(
        "{:<34} latency p50 x{:.2}  p90 x{:.2}  p99 x{:.2}   throughput x{:.2}\n",
        r.what, r.latency_p50, r.latency_p90, r.latency_p99, r.throughput
    ));
}

impl Report {
    fn all_scenarios(&self) -> Vec<&Scenario> {
        let mut all: Vec<&Scenario> = self.scenarios.iter().collect();
        if let Transparent::Measured { scenarios, .. } = &self.transparent {
            all.extend(scenarios);
        }
        for p in &self.peers {
            if let PeerOutcome::Measured { scenarios, .. } = p {
                all.extend(scenarios);
            }
        }
        all
    }

    /// Each peer against direct, and each Firma mode against each peer (same kind of run).
    pub fn peer_ratios(&self) -> Vec<Ratio> {
        let all = self.all_scenarios();
        let find = |n: &str| all.iter().find(|s| s.name == n).map(|s| &s.result);
        let mut out = Vec::new();
        for p in &self.peers {
            let PeerOutcome::Measured { peer, .. } = p else {
                continue;
            };
            for (kind, direct, mine, firma) in [
                (
                    "keep-alive",
                    "direct, keep-alive",
                    "keep-alive",
                    [
                        ("http_proxy", "sidecar http_proxy, keep-alive"),
                        ("transparent", "netns, tagged cgroup (transparent)"),
                    ],
                ),
                (
                    "new conn",
                    "direct, new connection each",
                    "new conn each",
                    [
                        ("http_proxy", "sidecar http_proxy, new conn each"),
                        ("transparent", "netns, transparent, new conn each"),
                    ],
                ),
            ] {
                let Some(theirs) = find(&format!("{peer}, {mine}")) else {
                    continue;
                };
                if let Some(d) = find(direct) {
                    out.push(Ratio::new(&format!("{peer} / direct, {kind}"), d, theirs));
                }
                for (mode, name) in firma {
                    if let Some(f) = find(name) {
                        out.push(Ratio::new(
                            &format!("firma {mode} / {peer}, {kind}"),
                            theirs,
                            f,
                        ));
                    }
                }
            }
        }
        out
    }

    /// The human table printed at the end of `cargo xtask bench`.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<34} {:>6} {:>5} {:>10} {:>9} {:>9} {:>9} {:>6} {:>9}\n",
            "scenario",
            "reqs",
            "conc",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "errors",
            "cpu us/rq"
        );
        out.push_str(&"-".repeat(106));
        out.push('\n');
        scenario_rows(&mut out, &self.scenarios);
        if let Transparent::Measured { scenarios, .. } = &self.transparent {
            scenario_rows(&mut out, scenarios);
        }
        for p in &self.peers {
            match p {
                PeerOutcome::Measured { scenarios, .. } => scenario_rows(&mut out, scenarios),
                PeerOutcome::Skipped { peer, why } => {
                    out.push_str(&format!("{peer}: SKIPPED ({why})\n"))
                }
            }
        }
        out.push_str(&format!(
            "\n{:<34} {:>12} {:>13}\n",
            "proxy process cost", "CPU-s/10k", "peak RSS MB"
        ));
        let peer_costs = self.peers.iter().flat_map(|p| match p {
            PeerOutcome::Measured { costs, .. } => costs.as_slice(),
            PeerOutcome::Skipped { .. } => &[],
        });
        for c in self.costs.iter().chain(peer_costs) {
            out.push_str(&format!(
                "{:<34} {:>12.2} {:>13.1}\n",
                c.scenario, c.cpu_s_per_10k, c.peak_rss_mb
            ));
        }
        out.push_str("\nratios (latency: slower/faster; throughput: faster/slower)\n");
        for r in &self.ratios {
            ratio_row(&mut out, r);
        }
        match &self.transparent {
            Transparent::Measured { ratios, .. } => {
                for r in ratios {
                    ratio_row(&mut out, r);
                }
            }
            Transparent::Skipped(why) => {
                out.push_str(&format!("transparent mode: SKIPPED ({why})\n"))
            }
            Transparent::Failed(why) => {
                out.push_str(&format!("transparent mode: FAILED ({why})\n"))
            }
        }
        if let Some(i) = &self.issuance {
            out.push_str(&format!(
                "\nsequential issuance ({} calls, one at a time): p50 {} ms  p90 {} ms  p99 {} ms  min {} ms; authority CPU {:.0} us per call\n",
                i.requests,
                ms(i.p50_us),
                ms(i.p90_us),
                ms(i.p99_us),
                ms(i.min_us),
                i.server_cpu_us_per_call
            ));
        }
        let c = &self.checks;
        out.push_str(&format!(
            "\nchecks: upstream answered {} requests, {} with the injected credential (sidecar sent {}); {} audit events, `firma audit verify` OK; {} handshakes aborted mid-way during \"sidecar http_proxy KA, aborters\"\n",
            c.upstream_requests,
            c.upstream_injected,
            c.sidecar_requests_expected,
            c.audit_events,
            c.aborted_handshakes
        ));
        out
    }
}
