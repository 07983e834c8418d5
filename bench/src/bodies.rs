//! `firma-bench bodies`: the big-bodies scenario (docs/benchmarks.md, "Big bodies").
//!
//! The streams scenario's upstream and sidecar recipe (shipped genai-app + `llm` budget
//! policies). One keep-alive connection per path (direct, through the sidecar) uploads
//! `--sizes-mb` JSON chat requests (`POST /v1/chat/completions`, the rule that extracts: the
//! sidecar reads, bounds and parses the whole body before deciding) and downloads bodies of the
//! same sizes (`GET /v1/models/bytes-N`, streamed through). Each transfer is timed from sending
//! the request to the last response byte; the upstream's reply proves every uploaded byte
//! arrived. Paths interleave, `--repetitions` transfers each; medians of MB/s, and the
//! sidecar's CPU seconds per GB moved.

use crate::deploy;
use crate::report::median;
use crate::scenario;
use crate::streams::SseUpstream;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, clap::Args)]
pub struct BodiesArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Body sizes in MB (10^6 bytes; at most 33, the sidecar's 32 MiB extraction bound); 12 is
    /// a chat request with a few base64 images.
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 12, 32])]
    pub sizes_mb: Vec<usize>,
    /// Transfers of each (path, direction, size), interleaved; medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    #[arg(long, default_value = "target/bench/bodies.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub direction: &'static str,
    pub size_mb: usize,
    pub direct_mb_s: f64,
    pub sidecar_mb_s: f64,
    /// sidecar / direct.
    pub ratio: f64,
    /// Sidecar CPU seconds (user + system) per GB through it.
    pub sidecar_cpu_s_per_gb: f64,
    pub direct_runs_mb_s: Vec<f64>,
    pub sidecar_runs_mb_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BodiesReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub repetitions: usize,
    /// Sidecar peak RSS (VmHWM) after every transfer.
    pub sidecar_peak_rss_mb: f64,
    pub rows: Vec<Row>,
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One transfer on `c`; returns the seconds it took.
pub(crate) async fn transfer(
    c: &mut Conn,
    host: &str,
    upload: bool,
    n: usize,
) -> anyhow::Result<f64> {
    let req = if upload {
        // A chat request whose one message holds the payload: valid JSON of exactly n bytes.
        let head =
            r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":""#;
        let tail = r#""}]}"#;
        let mut body = Vec::with_capacity(n);
        body.extend_from_slice(head.as_bytes());
        body.resize(n - tail.len(), b'a');
        body.extend_from_slice(tail.as_bytes());
        hyper::Request::post(crate::client::PATH)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, crate::client::CLIENT_AUTH)
            .body(Full::new(Bytes::from(body)))?
    } else {
        hyper::Request::get(format!("/v1/models/bytes-{n}"))
            .header(hyper::header::HOST, host)
            .header(hyper::header::AUTHORIZATION, crate::client::CLIENT_AUTH)
            .body(Full::new(Bytes::new()))?
    };
    c.ready().await?;
    let t0 = Instant::now();
    let resp = c.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let secs = t0.elapsed().as_secs_f64();
    if status != hyper::StatusCode::OK {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    let ok = if upload {
        body.as_ref() == format!("{{\"received\":{n}}}").as_bytes()
    } else {
        body.len() == n
    };
    if !ok {
        bail!(
            "{} of {n} bytes: the body did not arrive whole ({} bytes back)",
            if upload { "upload" } else { "download" },
            body.len()
        );
    }
    Ok(secs)
}

pub fn run(args: &BodiesArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 || args.sizes_mb.is_empty() {
        bail!("--repetitions and --sizes-mb must not be empty");
    }
    if let Some(s) = args.sizes_mb.iter().find(|&&s| s == 0 || s > 33) {
        bail!("--sizes-mb {s}: each size must be 1..=33 (the 32 MiB extraction bound)");
    }
    let firma = scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let up = SseUpstream::start(tmp.path(), 1, Duration::from_millis(1))?;
    let root = tmp.path().join("sidecar");
    let (d, mut sc) = scenario::llm_sidecar(&firma, &root, up.addr, &up.ca_path, |_| {})?;
    let pid = sc.child.id();
    eprintln!(
        "upstream https://{}, sidecar {} (pid {pid})",
        up.addr, sc.addr
    );
    let rt = scenario::client_runtime()?;
    let direct = scenario::direct_target(up.addr, &up.ca_path)?;
    let via = scenario::sidecar_target(sc.addr, &d)?;
    let (mut dc, mut vc) = rt.block_on(async {
        anyhow::Ok((
            crate::client::open(&direct).await?,
            crate::client::open(&via).await?,
        ))
    })?;
    let mut rows = Vec::new();
    let mut uploads_via = 0u64;
    for upload in [true, false] {
        let direction = if upload { "upload" } else { "download" };
        for &mb in &args.sizes_mb {
            let n = mb * 1_000_000;
            let (mut dr, mut vr, mut cpu) = (Vec::new(), Vec::new(), 0.0);
            // One unmeasured transfer each (connection pools, allocator).
            rt.block_on(transfer(&mut dc, deploy::HOST, upload, n))?;
            rt.block_on(transfer(&mut vc, deploy::HOST, upload, n))?;
            uploads_via += u64::from(upload);
            for _ in 0..args.repetitions {
                let s = rt.block_on(transfer(&mut dc, deploy::HOST, upload, n))?;
                dr.push(mb as f64 / s);
                let before = crate::peers::cpu_secs(pid)?;
                let s = rt
                    .block_on(transfer(&mut vc, deploy::HOST, upload, n))
                    .with_context(|| {
                        format!(
                            "through the sidecar:\n{}",
                            crate::measure::log_tail(&sc.log_text(), 10)
                        )
                    })?;
                cpu += crate::peers::cpu_secs(pid)? - before;
                uploads_via += u64::from(upload);
                vr.push(mb as f64 / s);
            }
            let (dm, vm) = (
                median(dr.clone()).unwrap_or(0.0),
                median(vr.clone()).unwrap_or(0.0),
            );
            let gb = (n * args.repetitions) as f64 / 1e9;
            eprintln!(
                "  {direction} {mb} MB: direct {dm:.0} MB/s, sidecar {vm:.0} MB/s (x{:.2}), sidecar {:.2} CPU-s/GB",
                vm / dm,
                cpu / gb
            );
            rows.push(Row {
                direction,
                size_mb: mb,
                direct_mb_s: dm,
                sidecar_mb_s: vm,
                ratio: vm / dm,
                sidecar_cpu_s_per_gb: cpu / gb,
                direct_runs_mb_s: dr,
                sidecar_runs_mb_s: vr,
            });
        }
    }
    if !sc.alive() {
        bail!("the sidecar died");
    }
    // Every upload through the sidecar reached the upstream with the injected credential.
    let injected = up.injected.load(Ordering::Relaxed);
    if injected < uploads_via {
        bail!("the upstream saw {injected} injected requests for {uploads_via} uploads");
    }
    let peak = crate::peers::peak_rss_mb(pid)?;
    drop(sc);
    d.verify_audit()?;
    let report = BodiesReport {
        date_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        repetitions: args.repetitions,
        sidecar_peak_rss_mb: peak,
        rows,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let mut t = format!(
        "big bodies: one keep-alive connection, medians of {}\n{:<9} {:>7} {:>11} {:>12} {:>8} {:>14}\n",
        report.repetitions,
        "direction",
        "MB",
        "direct MB/s",
        "sidecar MB/s",
        "ratio",
        "sidecar CPU-s/GB"
    );
    for r in &report.rows {
        t.push_str(&format!(
            "{:<9} {:>7} {:>11.0} {:>12.0} {:>8.2} {:>14.2}\n",
            r.direction, r.size_mb, r.direct_mb_s, r.sidecar_mb_s, r.ratio, r.sidecar_cpu_s_per_gb
        ));
    }
    t.push_str(&format!(
        "sidecar peak RSS {:.1} MB\n",
        report.sidecar_peak_rss_mb
    ));
    println!("\n{t}written: {}", args.out.display());
    Ok(())
}
