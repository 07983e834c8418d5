//! The load client: the same code drives every scenario so that the only difference between
//! "direct" and "through the sidecar" is the path the bytes take.
//!
//! Keep-alive mode: `concurrency` workers each open one connection (CONNECT first when going
//! through the proxy, then TLS, then HTTP/1.1), send their share of the warmup, wait at a
//! barrier, and then pull requests from a shared counter until `requests` are taken or the time
//! limit passes. New-connection mode: every measured request opens a fresh connection, so its
//! latency includes TCP + CONNECT + TLS handshake (the sidecar's MITM handshake included).
//! Both loops are bounded in count and in time; every request has its own timeout.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the client sends: a small chat completion, with the agent's own (placeholder) key that
/// the sidecar replaces with the injected credential.
pub const PATH: &str = "/v1/chat/completions";
pub const REQUEST_BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}]}"#;
pub const CLIENT_AUTH: &str = "Bearer agent-own-placeholder";

/// Per-request timeout: a stuck request counts as an error, it never stalls the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// TCP address to connect to (the upstream, the proxy, or the transparent destination).
    #[arg(long)]
    pub connect: SocketAddr,
    /// Host name: TLS SNI, certificate name, `Host` header.
    #[arg(long)]
    pub host: String,
    /// Send `CONNECT <authority>` first (http_proxy mode), e.g. `api.openai.com:443`.
    #[arg(long)]
    pub proxy_connect: Option<String>,
    /// PEM files with the CA certificates to trust.
    #[arg(long = "ca", required = true)]
    pub cas: Vec<PathBuf>,
    /// Measured requests.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Concurrent workers (one connection each in keep-alive mode).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Unmeasured requests sent first on the same connections.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// One request per connection.
    #[arg(long)]
    pub new_connection: bool,
    /// Stop taking new requests after this many seconds (warmup included).
    #[arg(long, default_value_t = 60)]
    pub time_limit_secs: u64,
    /// Measure for this many seconds after the warmup instead of counting `requests` (0: off).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
    /// Runtime worker threads for the client.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Write every measured request as a line `<start, Unix us> <latency us>` to this file
    /// (the many-tenants scenario finds the requests that overlapped a bundle reload).
    #[arg(long)]
    pub series: Option<PathBuf>,
}

/// The outcome of one scenario, as printed (JSON) by `firma-bench client`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientResult {
    pub requests: usize,
    pub concurrency: usize,
    pub new_connection: bool,
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// True when the time limit stopped the run before `requests` were sent.
    pub time_limited: bool,
    pub elapsed_secs: f64,
    pub throughput_rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub mean_us: u64,
    pub max_us: u64,
}

pub(crate) struct Target {
    connect: SocketAddr,
    host: String,
    server_name: ServerName<'static>,
    proxy_connect: Option<String>,
    tls: tokio_rustls::TlsConnector,
    /// How long the measured phase lasts after the warmup (`None`: until `requests` are taken).
    measure_for: Option<Duration>,
}

pub fn run(args: &ClientArgs) -> anyhow::Result<ClientResult> {
    if args.concurrency == 0 || args.requests == 0 {
        bail!("--requests and --concurrency must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

impl Target {
    /// A target without a measured duration (the streams scenario's client).
    pub(crate) fn new(
        connect: SocketAddr,
        host: &str,
        proxy_connect: Option<String>,
        cas: &[PathBuf],
    ) -> anyhow::Result<Self> {
        Ok(Self {
            connect,
            host: host.to_string(),
            server_name: ServerName::try_from(host.to_string())
                .with_context(|| format!("bad host name {host}"))?,
            proxy_connect,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls_config(cas)?)),
            measure_for: None,
        })
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }
}

fn tls_config(cas: &[PathBuf]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for path in cas {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("read CA {}", path.display()))?
        {
            roots.add(cert.with_context(|| format!("parse CA {}", path.display()))?)?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

async fn run_async(args: &ClientArgs) -> anyhow::Result<ClientResult> {
    let target = Arc::new(Target {
        connect: args.connect,
        host: args.host.clone(),
        server_name: ServerName::try_from(args.host.clone())
            .with_context(|| format!("bad host name {}", args.host))?,
        proxy_connect: args.proxy_connect.clone(),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls_config(&args.cas)?)),
        measure_for: (args.duration_secs > 0).then(|| Duration::from_secs(args.duration_secs)),
    });
    let deadline = Instant::now() + Duration::from_secs(args.time_limit_secs);
    let workers = args.concurrency;
    let record = args.series.is_some();
    let next = Arc::new(AtomicUsize::new(0));
    // Workers + this task: the measured phase starts when every connection is warm.
    let barrier = Arc::new(tokio::sync::Barrier::new(workers + 1));
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let warm = args.warmup / workers + usize::from(w < args.warmup % workers);
        let (target, next, barrier) = (target.clone(), next.clone(), barrier.clone());
        let (total, new_conn) = (args.requests, args.new_connection);
        tasks.push(tokio::spawn(async move {
            let limits = (total, new_conn, deadline, record);
            worker(&target, warm, &next, limits, &barrier).await
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let start_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut latencies = Vec::with_capacity(args.requests.min(1 << 20));
    let mut series = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let out = t.await.context("client worker panicked")?;
        series.extend(out.series.iter().zip(&out.latencies_us).map(|(at, lat)| {
            let offset = at.saturating_duration_since(start).as_micros() as u64;
            format!("{} {lat}\n", start_unix_us + offset)
        }));
        latencies.extend(out.latencies_us);
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(path) = &args.series {
        std::fs::write(path, series.concat())
            .with_context(|| format!("write {}", path.display()))?;
    }
    latencies.sort_unstable();
    let ok = latencies.len();
    let pct = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * ok as f64).ceil() as usize;
        latencies[rank.clamp(1, ok) - 1]
    };
    Ok(ClientResult {
        requests: args.requests,
        concurrency: args.concurrency,
        new_connection: args.new_connection,
        ok,
        errors,
        first_error,
        time_limited: if args.duration_secs > 0 {
            elapsed + 0.5 < args.duration_secs as f64
        } else {
            ok + errors < args.requests
        },
        elapsed_secs: elapsed,
        throughput_rps: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        p50_us: pct(50.0),
        p90_us: pct(90.0),
        p99_us: pct(99.0),
        mean_us: if ok == 0 {
            0
        } else {
            latencies.iter().sum::<u64>() / ok as u64
        },
        max_us: latencies.last().copied().unwrap_or(0),
    })
}

#[derive(Default)]
struct WorkerOut {
    latencies_us: Vec<u64>,
    /// When each measured request started (with `--series`).
    series: Vec<Instant>,
    errors: usize,
    first_error: Option<String>,
}

impl WorkerOut {
    fn error(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }
}

/// `limits`: (measured requests in all, one connection per request, deadline, record starts).
async fn worker(
    t: &Target,
    warmup: usize,
    next: &AtomicUsize,
    limits: (usize, bool, Instant, bool),
    barrier: &tokio::sync::Barrier,
) -> WorkerOut {
    let (total, new_conn, deadline, record) = limits;
    let mut out = WorkerOut::default();
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    // Warmup: same path, unmeasured (fills the sidecar's caches and upstream pool).
    for _ in 0..warmup {
        if Instant::now() >= deadline {
            break;
        }
        let r = if new_conn {
            fresh_request(t).await
        } else {
            keepalive_request(t, &mut conn).await
        };
        if r.is_err() {
            conn = None;
        }
    }
    if !new_conn && conn.is_none() && Instant::now() < deadline {
        // Open the measured connection before the clock starts.
        conn = timed(open(t)).await.ok();
    }
    barrier.wait().await;
    let deadline = t
        .measure_for
        .map_or(deadline, |d| deadline.min(Instant::now() + d));
    while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
        let t0 = Instant::now();
        let r = if new_conn {
            fresh_request(t).await
        } else {
            keepalive_request(t, &mut conn).await
        };
        match r {
            Ok(()) => {
                out.latencies_us.push(t0.elapsed().as_micros() as u64);
                if record {
                    out.series.push(t0);
                }
            }
            Err(e) => {
                conn = None;
                out.error(e);
            }
        }
    }
    out
}

async fn timed<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {REQUEST_TIMEOUT:?}"))?
}

async fn fresh_request(t: &Target) -> anyhow::Result<()> {
    timed(async {
        let mut c = open(t).await?;
        send(t, &mut c).await
    })
    .await
}

async fn keepalive_request(
    t: &Target,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
) -> anyhow::Result<()> {
    timed(async {
        let c = match conn {
            Some(c) if !c.is_closed() => c,
            _ => conn.insert(open(t).await?),
        };
        send(t, c).await
    })
    .await
}

/// TCP (+ CONNECT) + TLS + HTTP/1.1 handshake.
pub(crate) async fn open(t: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let mut tcp = TcpStream::connect(t.connect)
        .await
        .with_context(|| format!("connect {}", t.connect))?;
    tcp.set_nodelay(true)?;
    if let Some(authority) = &t.proxy_connect {
        tcp.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await?;
        read_connect_response(&mut tcp).await?;
    }
    let tls = t
        .tls
        .connect(t.server_name.clone(), tcp)
        .await
        .context("TLS handshake")?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Reads the proxy's reply to CONNECT byte by byte (so no tunnel byte is consumed) and checks
/// it is a 2xx.
async fn read_connect_response(tcp: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            bail!("CONNECT reply too long");
        }
        let b = tcp.read_u8().await.context("proxy closed during CONNECT")?;
        head.push(b);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("CONNECT refused: {}", line.lines().next().unwrap_or(""));
    }
    Ok(())
}

async fn send(t: &Target, c: &mut SendRequest<Full<Bytes>>) -> anyhow::Result<()> {
    c.ready().await?;
    let req = hyper::Request::post(PATH)
        .header(hyper::header::HOST, &t.host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::AUTHORIZATION, CLIENT_AUTH)
        .body(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())))?;
    let resp = c.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != hyper::StatusCode::OK {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    Ok(())
}
