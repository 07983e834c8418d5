//! The second, independent load client: Go `hey` (Debian package `hey`), run against every
//! target with the same concurrency and duration as `firma-bench client`. Its summary is parsed
//! into the same [`ClientResult`]; every response must be a 200 or the run fails.
//!
//! No DNS: direct and transparent runs connect to the upstream's address and send the upstream's
//! name as `Host` (`-host`), which hey also uses as TLS SNI; proxied runs send the name in
//! `CONNECT` (`-x`), which the proxy resolves by its own configuration. hey does not verify
//! server certificates (its transport sets `InsecureSkipVerify`); `SSL_CERT_FILE` still names
//! the CAs of the run, and the upstream's credential count proves the path either way.

use crate::client::{CLIENT_AUTH, ClientResult, REQUEST_BODY};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `hey` executable, when installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/hey", "/usr/local/bin/hey"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Where and how hey sends its requests for one target.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeyTarget {
    /// `https://ADDR/v1/chat/completions` (direct, transparent) or
    /// `https://api.openai.com/...` (through a CONNECT proxy).
    pub url: String,
    /// The `Host` header and SNI.
    pub host: String,
    /// `http://PROXY` for the CONNECT proxies.
    pub proxy: Option<String>,
    /// PEM bundle of the CAs of the run (`SSL_CERT_FILE`).
    pub ca_bundle: PathBuf,
}

/// One hey run: `warmup` unmeasured requests first (skipped below `concurrency`), then
/// `duration_secs` measured (or `requests` when the duration is 0). Returns the measured
/// result and the number of responses of the warmup (the proxy served them too).
#[allow(clippy::too_many_arguments)]
pub fn run(
    hey: &Path,
    t: &HeyTarget,
    new_conn: bool,
    concurrency: usize,
    duration_secs: u64,
    requests: usize,
    warmup: usize,
    cgroup: Option<&Path>,
    scratch: &Path,
) -> anyhow::Result<(ClientResult, usize)> {
    let mut warm = 0;
    if warmup >= concurrency {
        let (w, _) = once(hey, t, new_conn, concurrency, None, warmup, cgroup, scratch)
            .context("hey warmup")?;
        warm = w.ok + w.errors;
    }
    let (mut r, _) = once(
        hey,
        t,
        new_conn,
        concurrency,
        (duration_secs > 0).then_some(duration_secs),
        requests.max(concurrency),
        cgroup,
        scratch,
    )?;
    r.requests = if duration_secs > 0 {
        r.ok + r.errors
    } else {
        requests
    };
    r.time_limited = false;
    Ok((r, warm))
}

#[allow(clippy::too_many_arguments)]
fn once(
    hey: &Path,
    t: &HeyTarget,
    new_conn: bool,
    concurrency: usize,
    duration_secs: Option<u64>,
    requests: usize,
    cgroup: Option<&Path>,
    scratch: &Path,
) -> anyhow::Result<(ClientResult, String)> {
    let mut argv: Vec<String> = Vec::new();
    match duration_secs {
        Some(d) => argv.extend(["-z".into(), format!("{d}s")]),
        None => argv.extend(["-n".into(), requests.to_string()]),
    }
    argv.extend([
        "-c".into(),
        concurrency.to_string(),
        "-t".into(),
        "10".into(),
        "-m".into(),
        "POST".into(),
        "-T".into(),
        "application/json".into(),
        "-d".into(),
        REQUEST_BODY.into(),
        "-H".into(),
        format!("Authorization: {CLIENT_AUTH}"),
        "-host".into(),
        t.host.clone(),
    ]);
    if new_conn {
        argv.push("-disable-keepalive".into());
    }
    if let Some(p) = &t.proxy {
        argv.extend(["-x".into(), p.clone()]);
    }
    argv.push(t.url.clone());
    let mut cmd = firma_testing::client::in_cgroup_command(cgroup, hey, &argv);
    cmd.env("SSL_CERT_FILE", &t.ca_bundle);
    let limit = Duration::from_secs(duration_secs.unwrap_or(60) + 60);
    let text = crate::measure::run_bounded(cmd, scratch, "hey", limit)?;
    let mut r = parse(&text).with_context(|| format!("hey output:\n{text}"))?;
    r.concurrency = concurrency;
    r.new_connection = new_conn;
    r.requests = requests;
    Ok((r, text))
}

/// Seconds in hey's summary (`0.0012 secs`) as microseconds.
fn secs_us(s: &str) -> Option<u64> {
    let v: f64 = s.trim().trim_end_matches("secs").trim().parse().ok()?;
    Some((v * 1e6).round() as u64)
}

/// Parses hey's default summary: Requests/sec, Total, Average, Slowest, the latency
/// distribution's 50/90/99 %, the status code distribution and the error distribution.
pub fn parse(text: &str) -> anyhow::Result<ClientResult> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .context("no Requests/sec")?
        .parse()
        .context("Requests/sec")?;
    let total = field("Total:").and_then(secs_us).context("no Total")?;
    // hey prints `0% in 0.0000 secs` for a percentile it has too few samples for.
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{p}% in ")))
            .and_then(secs_us)
            .unwrap_or(0)
    };
    let (mut ok, mut errors, mut first_error) = (0usize, 0usize, None);
    let mut section = "";
    for line in text.lines() {
        let l = line.trim();
        if l.ends_with("distribution:") {
            section = if l.starts_with("Status code") {
                "status"
            } else if l.starts_with("Error") {
                "error"
            } else {
                ""
            };
            continue;
        }
        // `[200]	12345 responses` / `[12]	Post "...": dial tcp ...`
        let Some((tag, rest)) = l.strip_prefix('[').and_then(|r| r.split_once(']')) else {
            continue;
        };
        let Ok(n) = tag.parse::<usize>() else {
            continue;
        };
        match section {
            "status" => {
                let count: usize = rest
                    .split_whitespace()
                    .next()
                    .and_then(|c| c.parse().ok())
                    .context("status count")?;
                if n == 200 {
                    ok += count;
                } else {
                    errors += count;
                    first_error.get_or_insert_with(|| format!("HTTP {n} ({count} responses)"));
                }
            }
            "error" => {
                errors += n;
                first_error.get_or_insert_with(|| rest.trim().to_string());
            }
            _ => {}
        }
    }
    if ok + errors == 0 {
        bail!("hey reported no responses");
    }
    Ok(ClientResult {
        requests: ok + errors,
        concurrency: 0,
        new_connection: false,
        ok,
        errors,
        first_error,
        time_limited: false,
        elapsed_secs: total as f64 / 1e6,
        throughput_rps: rps,
        p50_us: pct("50"),
        p90_us: pct("90"),
        p99_us: pct("99"),
        mean_us: field("Average:").and_then(secs_us).unwrap_or(0),
        max_us: field("Slowest:").and_then(secs_us).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "
Summary:
  Total:	2.0049 secs
  Slowest:	0.0410 secs
  Fastest:	0.0003 secs
  Average:	0.0019 secs
  Requests/sec:	8431.6431

  Total data:	100 bytes
  Size/request:	54 bytes

Latency distribution:
  10% in 0.0008 secs
  50% in 0.0015 secs
  90% in 0.0031 secs
  99% in 0.0085 secs

Status code distribution:
  [200]	16900 responses
  [502]	3 responses

Error distribution:
  [2]	Post \"https://api.openai.com/v1/chat/completions\": EOF
";

    #[test]
    fn parses_the_summary_and_counts_every_non_200() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.ok, 16900);
        assert_eq!(r.errors, 5);
        assert_eq!(r.p50_us, 1500);
        assert_eq!(r.p90_us, 3100);
        assert_eq!(r.p99_us, 8500);
        assert!((r.throughput_rps - 8431.6431).abs() < 1e-6);
        assert_eq!(r.first_error.as_deref(), Some("HTTP 502 (3 responses)"));
    }

    #[test]
    fn a_summary_without_responses_is_an_error() {
        assert!(parse("Summary:\n  Requests/sec:\t0\n  Total:\t1 secs\n").is_err());
    }
}
