//! `firma-bench streams`: the LLM streams scenario (docs/benchmarks.md, "LLM streams").
//!
//! An SSE upstream (hyper + rustls, its own runtime) answers every streamed chat request with
//! `--events` chunks `--interval-ms` apart, each stamped with the Unix microsecond it was
//! handed to the connection, then a usage chunk and `[DONE]`. `firma-bench streams-client`
//! (its own process) opens `--streams` connections, directly or through an http_proxy sidecar
//! (MITM, credential injection, the shipped genai-app policy plus the shipped `llm` token
//! budget policy, so every call is metered: reservation at decision, usage read from the SSE
//! tail), starts the streams staggered over one interval so the event load is even, and
//! records for every event `arrival - stamp`. The sidecar's added latency per event is the
//! difference of those percentiles between the two paths; its CPU and RSS are read from /proc
//! during the run. Direct and sidecar runs are interleaved, `--repetitions` times; medians.

use crate::deploy;
use crate::report::median;
use crate::scenario;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskCx, Poll};
use std::time::{Duration, Instant, SystemTime};

/// The streamed chat request (a `max_tokens` keeps each call's reservation small).
const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"stream please"}]}"#;

#[derive(Debug, Clone, clap::Args)]
pub struct StreamsArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Concurrent SSE responses.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Content events per stream (a usage event and `[DONE]` follow).
    #[arg(long, default_value_t = 50)]
    pub events: usize,
    /// Milliseconds between a stream's events.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// Runs of each path (direct, sidecar), interleaved; the table shows the medians.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/streams.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StreamsClientArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub proxy_connect: Option<String>,
    #[arg(long = "ca", required = true)]
    pub cas: Vec<PathBuf>,
    #[arg(long)]
    pub streams: usize,
    /// Content events each stream must deliver.
    #[arg(long)]
    pub events: usize,
    /// The starts are spread over this many milliseconds.
    #[arg(long)]
    pub stagger_ms: u64,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// What `streams-client` prints (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamsResult {
    pub streams: usize,
    pub completed: usize,
    pub events: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Stamp-to-arrival of every content event, microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// From the first connect to the last `[DONE]`.
    pub elapsed_secs: f64,
    /// Connections (CONNECT + TLS) opened before the streams start.
    pub connect_secs: f64,
}

/// One repetition of one path.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub path: String,
    pub rep: usize,
    pub result: StreamsResult,
    /// Sidecar CPU seconds (user + system) during the run.
    pub sidecar_cpu_s: Option<f64>,
    /// Highest sidecar VmRSS sampled every 50 ms during the run.
    pub sidecar_rss_max_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamsReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub streams: usize,
    pub events: usize,
    pub interval_ms: u64,
    pub repetitions: usize,
    pub direct_p50_ms: f64,
    pub direct_p99_ms: f64,
    pub sidecar_p50_ms: f64,
    pub sidecar_p99_ms: f64,
    /// Sidecar minus direct (medians of the runs).
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub sidecar_cpu_s: f64,
    /// Sidecar CPU as a share of one core over the run.
    pub sidecar_cpu_cores: f64,
    /// Sidecar CPU per content event delivered, microseconds.
    pub sidecar_cpu_us_per_event: f64,
    pub sidecar_rss_max_mb: f64,
    /// Sidecar VmRSS after it started, before any stream.
    pub sidecar_rss_idle_mb: f64,
    pub runs: Vec<Run>,
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An SSE body fed by a channel: the upstream's per-stream task writes the events into it.
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// The SSE upstream: counts streamed requests and those that carried the injected
/// credential.
pub(crate) struct SseUpstream {
    pub(crate) addr: SocketAddr,
    pub(crate) ca_path: PathBuf,
    requests: Arc<AtomicU64>,
    pub(crate) injected: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl SseUpstream {
    pub(crate) fn start(dir: &Path, events: usize, interval: Duration) -> anyhow::Result<Self> {
        let (tls, ca_path) = firma_testing::pki::upstream_tls(
            dir,
            "firma bench SSE upstream CA",
            &[deploy::HOST],
            &[b"http/1.1"],
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-sse-upstream")
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(AtomicU64::new(0));
        let expected: Arc<[u8]> = deploy::injected_auth().as_bytes().into();
        let (r2, i2) = (requests.clone(), injected.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, requests, injected, expected) =
                    (acceptor.clone(), r2.clone(), i2.clone(), expected.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (requests, injected, expected) =
                            (requests.clone(), injected.clone(), expected.clone());
                        async move {
                            if req
                                .headers()
                                .get(hyper::header::AUTHORIZATION)
                                .is_some_and(|v| v.as_bytes() == &*expected)
                            {
                                injected.fetch_add(1, Ordering::Relaxed);
                            }
                            requests.fetch_add(1, Ordering::Relaxed);
                            // The big-bodies scenario: downloads and uploads of N bytes.
                            if let Some(n) = req
                                .uri()
                                .path()
                                .strip_prefix("/v1/models/bytes-")
                                .and_then(|n| n.parse::<usize>().ok())
                            {
                                return Ok(sized(
                                    Bytes::from(vec![b'x'; n]),
                                    "application/octet-stream",
                                ));
                            }
                            let streamed = req
                                .headers()
                                .get(hyper::header::ACCEPT)
                                .is_some_and(|v| v.as_bytes() == b"text/event-stream");
                            let got = req
                                .into_body()
                                .collect()
                                .await
                                .map_or(0, |b| b.to_bytes().len());
                            if !streamed {
                                let body = format!("{{\"received\":{got}}}");
                                return Ok(sized(Bytes::from(body), "application/json"));
                            }
                            let (tx, rx) = tokio::sync::mpsc::channel(4);
                            tokio::spawn(stream_events(tx, events, interval));
                            let mut resp = hyper::Response::new(Either::Left(ChanBody(rx)));
                            let h = resp.headers_mut();
                            h.insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("text/event-stream"),
                            );
                            h.insert(
                                hyper::header::CACHE_CONTROL,
                                hyper::header::HeaderValue::from_static("no-cache"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_path,
            requests,
            injected,
            _rt: rt,
        })
    }
}

type UpBody = Either<ChanBody, Full<Bytes>>;

/// A whole-body response of `content_type`.
fn sized(body: Bytes, content_type: &'static str) -> hyper::Response<UpBody> {
    let mut resp = hyper::Response::new(Either::Right(Full::new(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// One OpenAI-shaped chat completion stream: `events` content chunks stamped with the
/// microsecond they are handed to hyper, the usage chunk, `[DONE]`.
async fn stream_events(tx: tokio::sync::mpsc::Sender<Bytes>, events: usize, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..events {
        tick.tick().await;
        let chunk = format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}],\"t\":{}}}\n\n",
            unix_us()
        );
        if tx.send(Bytes::from(chunk)).await.is_err() {
            return;
        }
    }
    let tail = format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        12 + events
    );
    let _ = tx.send(Bytes::from(tail)).await;
}

/// `streams-client`: opens every connection, then starts the streams staggered.
pub fn client(args: &StreamsClientArgs) -> anyhow::Result<StreamsResult> {
    if args.streams == 0 {
        bail!("--streams must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(client_async(args))
}

#[derive(Default)]
struct StreamOut {
    lat_us: Vec<u64>,
    error: Option<String>,
}

async fn client_async(args: &StreamsClientArgs) -> anyhow::Result<StreamsResult> {
    let target = Arc::new(crate::client::Target::new(
        args.connect,
        &args.host,
        args.proxy_connect.clone(),
        &args.cas,
    )?);
    let started = Instant::now();
    // Connect in bounded waves so the handshakes do not time each other out.
    let mut conns = Vec::with_capacity(args.streams);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut opening = Vec::with_capacity(args.streams);
    for _ in 0..args.streams {
        let (t, sem) = (target.clone(), sem.clone());
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            tokio::time::timeout(Duration::from_secs(30), crate::client::open(&t))
                .await
                .map_err(|_| anyhow::anyhow!("connect timed out"))?
        }));
    }
    for o in opening {
        conns.push(o.await.context("connect task")??);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let go = Instant::now();
    let step = Duration::from_micros(args.stagger_ms * 1000 / args.streams as u64);
    let mut tasks = Vec::with_capacity(args.streams);
    for (i, mut c) in conns.into_iter().enumerate() {
        let t = target.clone();
        let at = go + step * i as u32;
        let expect = args.events;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut out = StreamOut::default();
            match tokio::time::timeout(Duration::from_secs(120), one_stream(&t, &mut c, &mut out))
                .await
            {
                Ok(Ok(())) if out.lat_us.len() == expect => {}
                Ok(Ok(())) => out.error = Some(format!("{} of {expect} events", out.lat_us.len())),
                Ok(Err(e)) => out.error = Some(format!("{e:#}")),
                Err(_) => out.error = Some("stream timed out".into()),
            }
            out
        }));
    }
    let (mut lat, mut errors, mut first_error, mut completed) = (Vec::new(), 0, None, 0);
    for t in tasks {
        let out = t.await.context("stream task")?;
        match out.error {
            Some(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            None => completed += 1,
        }
        lat.extend(out.lat_us);
    }
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    Ok(StreamsResult {
        streams: args.streams,
        completed,
        events: lat.len(),
        errors,
        first_error,
        p50_us: pct(50.0),
        p99_us: pct(99.0),
        max_us: lat.last().copied().unwrap_or(0),
        elapsed_secs: started.elapsed().as_secs_f64(),
        connect_secs,
    })
}

/// Sends the streamed chat request and reads the SSE body, timing every stamped event.
async fn one_stream(
    t: &crate::client::Target,
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    out: &mut StreamOut,
) -> anyhow::Result<()> {
    c.ready().await?;
    let req = hyper::Request::post(crate::client::PATH)
        .header(hyper::header::HOST, t.host())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "text/event-stream")
        .header(hyper::header::AUTHORIZATION, crate::client::CLIENT_AUTH)
        .body(Full::new(Bytes::from_static(STREAM_BODY.as_bytes())))?;
    let resp = c.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = unix_us();
        pending.extend_from_slice(data);
        if status != hyper::StatusCode::OK {
            continue;
        }
        // Complete events end with a blank line.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event).context("SSE event is not UTF-8")?;
            if text.contains("[DONE]") {
                done = true;
            } else if let Some(stamp) = text
                .rsplit_once("\"t\":")
                .and_then(|(_, r)| r.split('}').next())
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                out.lat_us.push(now.saturating_sub(stamp));
            }
        }
    }
    if status != hyper::StatusCode::OK {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&pending[..pending.len().min(300)])
        );
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    Ok(())
}

struct Path_<'a> {
    name: &'static str,
    connect: SocketAddr,
    proxy_connect: Option<String>,
    ca: &'a Path,
    sidecar: Option<u32>,
}

fn measure_one(
    args: &StreamsArgs,
    p: &Path_<'_>,
    rep: usize,
    scratch: &Path,
) -> anyhow::Result<Run> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("streams-client")
        .arg("--connect")
        .arg(p.connect.to_string())
        .arg("--host")
        .arg(deploy::HOST)
        .arg("--ca")
        .arg(p.ca)
        .arg("--streams")
        .arg(args.streams.to_string())
        .arg("--events")
        .arg(args.events.to_string())
        .arg("--stagger-ms")
        .arg(args.interval_ms.to_string());
    if let Some(pc) = &p.proxy_connect {
        cmd.arg("--proxy-connect").arg(pc);
    }
    let cpu_before = p.sidecar.map(crate::peers::cpu_secs).transpose()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = p.sidecar.map(|pid| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max: f64 = 0.0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(crate::peers::rss_mb(pid).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        })
    });
    let limit = Duration::from_secs(180 + args.events as u64 * args.interval_ms / 1000 * 3);
    let out = crate::measure::run_bounded(cmd, scratch, &format!("streams-{}", p.name), limit);
    stop.store(true, Ordering::Relaxed);
    let rss = sampler.and_then(|s| s.join().ok());
    let result: StreamsResult = serde_json::from_str(out?.trim()).context("client output")?;
    let cpu = match (p.sidecar, cpu_before) {
        (Some(pid), Some(b)) => Some(crate::peers::cpu_secs(pid)? - b),
        _ => None,
    };
    eprintln!(
        "  {} #{rep}: {} streams, {} events, p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms, {} errors{}",
        p.name,
        result.completed,
        result.events,
        result.p50_us as f64 / 1000.0,
        result.p99_us as f64 / 1000.0,
        result.max_us as f64 / 1000.0,
        result.errors,
        match (cpu, rss) {
            (Some(c), Some(r)) => format!(", sidecar {c:.2} CPU-s, RSS max {r:.1} MB"),
            _ => String::new(),
        }
    );
    if result.errors > 0 {
        bail!(
            "{} #{rep}: {} failed streams (first: {:?})",
            p.name,
            result.errors,
            result.first_error
        );
    }
    Ok(Run {
        path: p.name.into(),
        rep,
        result,
        sidecar_cpu_s: cpu,
        sidecar_rss_max_mb: rss,
    })
}

pub fn run(args: &StreamsArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 || args.streams == 0 || args.events == 0 {
        bail!("--repetitions, --streams and --events must be at least 1");
    }
    let firma = scenario::firma_binary(&args.firma)?;
    let tmp = tempfile::tempdir()?;
    let interval = Duration::from_millis(args.interval_ms);
    let up = SseUpstream::start(tmp.path(), args.events, interval)?;
    eprintln!(
        "SSE upstream on https://{}: {} streams x {} events, {} ms apart",
        up.addr, args.streams, args.events, args.interval_ms
    );
    let root = tmp.path().join("sidecar");
    let (d, mut sc) = scenario::llm_sidecar(&firma, &root, up.addr, &up.ca_path, |_| {})?;
    let pid = sc.child.id();
    let rss_idle = crate::peers::rss_mb(pid)?;
    eprintln!(
        "sidecar {} ready (pid {pid}, RSS {rss_idle:.1} MB)",
        sc.addr
    );
    let firma_ca = d.firma_ca();
    let paths = [
        Path_ {
            name: "direct",
            connect: up.addr,
            proxy_connect: None,
            ca: &up.ca_path,
            sidecar: None,
        },
        Path_ {
            name: "sidecar",
            connect: sc.addr,
            proxy_connect: Some(scenario::sidecar_connect()),
            ca: &firma_ca,
            sidecar: Some(pid),
        },
    ];
    let mut runs = Vec::new();
    for rep in 1..=args.repetitions {
        eprintln!("repetition {rep}/{}", args.repetitions);
        for p in &paths {
            let before = up.injected.load(Ordering::Relaxed);
            let r = measure_one(args, p, rep, tmp.path())?;
            let injected = up.injected.load(Ordering::Relaxed) - before;
            let want = if p.sidecar.is_some() {
                args.streams as u64
            } else {
                0
            };
            if injected != want {
                bail!(
                    "{} #{rep}: the upstream saw {injected} requests with the injected credential, expected {want}",
                    p.name
                );
            }
            if !sc.alive() {
                bail!(
                    "the sidecar died:\n{}",
                    crate::measure::log_tail(&sc.log_text(), 20)
                );
            }
            runs.push(r);
        }
    }
    eprintln!(
        "upstream answered {} streamed requests",
        up.requests.load(Ordering::Relaxed)
    );
    // Every sidecar stream was decided and audited, and the audit chain verifies.
    let want = args.streams * args.repetitions;
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.audit_events() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if d.audit_events() < want {
        bail!("{} audit events for {want} streams", d.audit_events());
    }
    drop(sc);
    d.verify_audit()?;

    let col = |name: &str, f: &dyn Fn(&Run) -> f64| {
        median(runs.iter().filter(|r| r.path == name).map(f).collect()).unwrap_or(0.0)
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let (dp50, dp99) = (
        col("direct", &|r| ms(r.result.p50_us)),
        col("direct", &|r| ms(r.result.p99_us)),
    );
    let (sp50, sp99) = (
        col("sidecar", &|r| ms(r.result.p50_us)),
        col("sidecar", &|r| ms(r.result.p99_us)),
    );
    let cpu = col("sidecar", &|r| r.sidecar_cpu_s.unwrap_or(0.0));
    let elapsed = col("sidecar", &|r| r.result.elapsed_secs);
    let events = (args.streams * args.events) as f64;
    let report = StreamsReport {
        date_unix: unix_us() / 1_000_000,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        streams: args.streams,
        events: args.events,
        interval_ms: args.interval_ms,
        repetitions: args.repetitions,
        direct_p50_ms: dp50,
        direct_p99_ms: dp99,
        sidecar_p50_ms: sp50,
        sidecar_p99_ms: sp99,
        added_p50_ms: sp50 - dp50,
        added_p99_ms: sp99 - dp99,
        sidecar_cpu_s: cpu,
        sidecar_cpu_cores: if elapsed > 0.0 { cpu / elapsed } else { 0.0 },
        sidecar_cpu_us_per_event: cpu / events * 1e6,
        sidecar_rss_max_mb: col("sidecar", &|r| r.sidecar_rss_max_mb.unwrap_or(0.0)),
        sidecar_rss_idle_mb: rss_idle,
        runs,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("\n{}", table(&report));
    println!("written: {}", args.out.display());
    Ok(())
}

fn table(r: &StreamsReport) -> String {
    format!(
        "LLM streams: {} concurrent SSE responses x {} events {} ms apart, token budget policy on, medians of {}\n\
         {:<8} {:>12} {:>12}\n{:<8} {:>12.3} {:>12.3}\n{:<8} {:>12.3} {:>12.3}\n\
         added by the sidecar per event: p50 {:+.3} ms, p99 {:+.3} ms (target p99 <= 1 ms)\n\
         sidecar: {:.2} CPU-s per run ({:.2} cores, {:.1} us per event), RSS {:.1} MB idle, {:.1} MB max during the streams (target <= 64 MB)\n",
        r.streams,
        r.events,
        r.interval_ms,
        r.repetitions,
        "path",
        "p50 ms",
        "p99 ms",
        "direct",
        r.direct_p50_ms,
        r.direct_p99_ms,
        "sidecar",
        r.sidecar_p50_ms,
        r.sidecar_p99_ms,
        r.added_p50_ms,
        r.added_p99_ms,
        r.sidecar_cpu_s,
        r.sidecar_cpu_cores,
        r.sidecar_cpu_us_per_event,
        r.sidecar_rss_idle_mb,
        r.sidecar_rss_max_mb,
    )
}
