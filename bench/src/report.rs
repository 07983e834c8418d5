//! The results file (`target/bench/e2e.json`: every repetition and the medians) and the
//! printed table (medians).

use crate::client::ClientResult;
use crate::measure::{Client, Load, Run};
use serde::Serialize;

/// The median over the repetitions of one (target, load, client), per column.
#[derive(Debug, Clone, Serialize)]
pub struct Median {
    pub target: String,
    pub load: Load,
    pub client: Client,
    pub repetitions: usize,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub cpu_s_per_10k: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    /// VmRSS right after the run (without the startup peak).
    pub rss_mb: Option<f64>,
    /// Sums over the repetitions.
    pub ok: usize,
    pub errors: usize,
}

/// The median of `v` (mean of the two middle values for an even count); `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Groups `runs` by (target, load, client), in first-seen order, and takes medians.
pub fn medians(runs: &[Run]) -> Vec<Median> {
    let mut keys: Vec<(String, Load, Client)> = Vec::new();
    for r in runs {
        let k = (r.target.clone(), r.load, r.client);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(target, load, client)| {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.target == target && r.load == load && r.client == client)
                .collect();
            let col =
                |f: &dyn Fn(&Run) -> Option<f64>| median(rs.iter().filter_map(|r| f(r)).collect());
            let ms = |f: fn(&ClientResult) -> u64| {
                col(&|r: &Run| Some(f(&r.result) as f64 / 1000.0)).unwrap_or(f64::NAN)
            };
            Median {
                repetitions: rs.len(),
                throughput_rps: col(&|r| Some(r.result.throughput_rps)).unwrap_or(f64::NAN),
                p50_ms: ms(|r| r.p50_us),
                p90_ms: ms(|r| r.p90_us),
                p99_ms: ms(|r| r.p99_us),
                cpu_s_per_10k: col(&|r| r.cpu_s_per_10k),
                peak_rss_mb: col(&|r| r.peak_rss_mb),
                rss_mb: col(&|r| r.rss_mb),
                ok: rs.iter().map(|r| r.result.ok).sum(),
                errors: rs.iter().map(|r| r.result.errors).sum(),
                target,
                load,
                client,
            }
        })
        .collect()
}

/// `slow` relative to `base` (medians): latency ratios (slow/base), throughput ratio
/// (base/slow) and CPU ratio (slow/base), so every figure reads "how many times worse".
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub client: Client,
    pub what: String,
    pub latency_p50: f64,
    pub latency_p90: f64,
    pub latency_p99: f64,
    pub throughput: f64,
    /// Only when both sides are proxies with a CPU reading.
    pub cpu: Option<f64>,
}

impl Ratio {
    pub fn new(what: &str, base: &Median, slow: &Median) -> Self {
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Self {
            client: base.client,
            what: what.to_string(),
            latency_p50: r(slow.p50_ms, base.p50_ms),
            latency_p90: r(slow.p90_ms, base.p90_ms),
            latency_p99: r(slow.p99_ms, base.p99_ms),
            throughput: r(base.throughput_rps, slow.throughput_rps),
            cpu: slow
                .cpu_s_per_10k
                .zip(base.cpu_s_per_10k)
                .map(|(s, b)| r(s, b)),
        }
    }
}

/// Target names, shared by the runner, the ratios and the docs.
pub mod names {
    pub const DIRECT: &str = "direct";
    pub const HTTP_PROXY: &str = "firma http_proxy";
    pub const ABORTERS: &str = "firma http_proxy + aborters";
    pub const METRICS_ON: &str = "firma http_proxy, metrics on";
    pub const NETNS_DIRECT: &str = "netns direct (untagged)";
    pub const TRANSPARENT: &str = "firma transparent";
    pub const ENVOY: &str = "envoy";
    pub const MITMPROXY: &str = "mitmproxy";
}

/// The ratios printed under the table, per client, from the medians.
pub fn ratios(medians: &[Median]) -> Vec<Ratio> {
    use names::*;
    let mut out = Vec::new();
    for client in [Client::FirmaBench, Client::Hey] {
        for load in [Load::KeepAlive, Load::NewConn] {
            let find = |t: &str| {
                medians
                    .iter()
                    .find(|m| m.target == t && m.load == load && m.client == client)
            };
            let kind = load.label();
            let mut push = |what: String, base: &str, slow: &str| {
                if let (Some(b), Some(s)) = (find(base), find(slow)) {
                    out.push(Ratio::new(&what, b, s));
                }
            };
            push(format!("http_proxy / direct, {kind}"), DIRECT, HTTP_PROXY);
            push(
                format!("transparent / netns direct, {kind}"),
                NETNS_DIRECT,
                TRANSPARENT,
            );
            push(
                format!("transparent / http_proxy, {kind}"),
                HTTP_PROXY,
                TRANSPARENT,
            );
            for peer in [ENVOY, MITMPROXY] {
                push(format!("{peer} / direct, {kind}"), DIRECT, peer);
                push(format!("http_proxy / {peer}, {kind}"), peer, HTTP_PROXY);
                push(format!("transparent / {peer}, {kind}"), peer, TRANSPARENT);
            }
            push(
                format!("with aborted handshakes / without, {kind}"),
                HTTP_PROXY,
                ABORTERS,
            );
            push(format!("metrics on / off, {kind}"), HTTP_PROXY, METRICS_ON);
        }
    }
    out
}

/// Proof that the measured traffic took the path its name says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Requests the (outer) upstream answered during the run.
    pub upstream_requests: u64,
    /// Of those, requests carrying the credential only the proxies inject.
    pub upstream_injected: u64,
    /// Requests the http_proxy sidecar completed (warmup included, both clients).
    pub sidecar_requests_expected: u64,
    /// Signed audit events in the http_proxy sidecar's file sink at the end.
    pub audit_events: usize,
    /// Signed audit events of the transparent sidecar, and the requests it served.
    pub transparent_audit_events: Option<usize>,
    pub transparent_requests: Option<u64>,
    /// `firma_sidecar_decisions_total` of the metrics-on sidecar, and its requests.
    pub metrics_decisions: Option<u64>,
    pub metrics_requests: Option<u64>,
    /// Handshakes the robustness step aborted mid-way (all repetitions).
    pub aborted_handshakes: u64,
}

/// A target or client not measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub what: String,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date_unix: u64,
    pub cpus: usize,
    pub concurrency: usize,
    /// Measured seconds per run (0: counted by requests).
    pub duration_secs: u64,
    pub warmup: usize,
    pub repetitions: usize,
    pub upstream: crate::upstream::Kind,
    pub upstream_why: String,
    /// Every repetition, in the order they ran (interleaved across targets).
    pub runs: Vec<Run>,
    pub medians: Vec<Median>,
    pub ratios: Vec<Ratio>,
    pub checks: Checks,
    pub skipped: Vec<Skip>,
    /// Sequential issuance latency against the real Authority (`None` when skipped).
    pub issuance: Option<crate::issuance::Issuance>,
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

impl Report {
    /// The human table printed at the end of `cargo xtask bench`: one section per client.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for client in [Client::FirmaBench, Client::Hey] {
            let rows: Vec<&Median> = self.medians.iter().filter(|m| m.client == client).collect();
            if rows.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "client {}: medians of {} repetition(s), {} s each after warmup, concurrency {}, upstream {}\n",
                client.label(),
                self.repetitions,
                self.duration_secs,
                self.concurrency,
                serde_json::to_value(self.upstream)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ));
            out.push_str(&format!(
                "{:<30} {:<10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>8} {:>7} {:>7}\n",
                "target",
                "load",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "CPU-s/10k",
                "peak MB",
                "RSS MB",
                "errors"
            ));
            out.push_str(&"-".repeat(114));
            out.push('\n');
            for load in [Load::KeepAlive, Load::NewConn] {
                for m in rows.iter().filter(|m| m.load == load) {
                    out.push_str(&format!(
                        "{:<30} {:<10} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>8} {:>7} {:>7}\n",
                        m.target,
                        load.label(),
                        m.throughput_rps,
                        m.p50_ms,
                        m.p90_ms,
                        m.p99_ms,
                        opt(m.cpu_s_per_10k, 2),
                        opt(m.peak_rss_mb, 1),
                        opt(m.rss_mb, 1),
                        m.errors,
                    ));
                }
            }
            out.push_str(&format!(
                "\nratios, {} (medians; latency: slower/faster, throughput: faster/slower, CPU: per request)\n",
                client.label()
            ));
            for r in self.ratios.iter().filter(|r| r.client == client) {
                out.push_str(&format!(
                    "{:<44} p50 x{:.2}  p90 x{:.2}  p99 x{:.2}  throughput x{:.2}{}\n",
                    r.what,
                    r.latency_p50,
                    r.latency_p90,
                    r.latency_p99,
                    r.throughput,
                    r.cpu.map_or(String::new(), |c| format!("  CPU x{c:.2}")),
                ));
            }
            out.push('\n');
        }
        for s in &self.skipped {
            out.push_str(&format!("SKIPPED {}: {}\n", s.what, s.why));
        }
        if let Some(i) = &self.issuance {
            out.push_str(&format!(
                "\nsequential issuance ({} calls, one at a time): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  min {:.3} ms; authority CPU {:.0} us per call\n",
                i.requests,
                i.p50_us as f64 / 1000.0,
                i.p90_us as f64 / 1000.0,
                i.p99_us as f64 / 1000.0,
                i.min_us as f64 / 1000.0,
                i.server_cpu_us_per_call
            ));
        }
        let c = &self.checks;
        out.push_str(&format!(
            "\nchecks: upstream answered {} requests, {} with the injected credential; http_proxy sidecar served {}, {} audit events, `firma audit verify` OK",
            c.upstream_requests, c.upstream_injected, c.sidecar_requests_expected, c.audit_events,
        ));
        if let (Some(e), Some(n)) = (c.transparent_audit_events, c.transparent_requests) {
            out.push_str(&format!(
                "; transparent sidecar served {n}, {e} audit events, verify OK"
            ));
        }
        if let (Some(d), Some(n)) = (c.metrics_decisions, c.metrics_requests) {
            out.push_str(&format!(
                "; metrics sidecar counted {d} decisions for {n} requests"
            ));
        }
        out.push_str(&format!(
            "; {} handshakes aborted mid-way during \"{}\"\n",
            c.aborted_handshakes,
            names::ABORTERS
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_ignores_nan() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(vec![]), None);
    }
}
