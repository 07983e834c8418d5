//! The benchmark upstream, `api.openai.com` for every target: HTTPS, HTTP/1.1 keep-alive, one
//! small fixed JSON response, with its own CA. Two implementations (`--upstream`): nginx (Debian
//! `nginx-light`, a real server nobody here wrote; the default when installed) or the builtin
//! hyper server. Both count requests and how many carried the credential the sidecar injects,
//! so the harness can prove every "through a proxy" figure really went through the pipeline.

use anyhow::{Context, bail};
use bytes::Bytes;
use firma_testing::pki::TestCa;
use firma_testing::process::Process;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The fixed response body (small, like a short completion).
pub const BODY: &[u8] = br#"{"id":"bench","object":"chat.completion","choices":[]}"#;

/// Which server plays the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The in-process hyper + rustls server.
    Builtin,
    /// nginx from Debian `nginx-light` (`/usr/sbin/nginx`).
    Nginx,
}

impl Kind {
    /// `requested`, or nginx when installed and builtin otherwise, with the reason.
    pub fn choose(requested: Option<Kind>) -> (Kind, String) {
        match requested {
            Some(k) => (k, "chosen with --upstream".into()),
            None if nginx_binary().is_some() => (Kind::Nginx, "nginx is installed".into()),
            None => (
                Kind::Builtin,
                "nginx is not installed (firma-bench install-peers installs nginx-light as root)"
                    .into(),
            ),
        }
    }
}

/// The nginx executable, when installed.
pub fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Counters shared with the builtin server's tasks.
#[derive(Default)]
pub struct Counters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests whose `Authorization` equalled the injected credential.
    pub injected: AtomicU64,
    /// When the last request's head arrived, and whether it carried the credential (the
    /// `firma run` overhead scenario times its first enforced request by it).
    pub last_arrival: std::sync::Mutex<Option<(std::time::SystemTime, bool)>>,
}

enum Backend {
    /// Serves on its own threads so the client and the upstream never share a scheduler.
    Builtin {
        counters: Arc<Counters>,
        _rt: tokio::runtime::Runtime,
    },
    /// One access-log line per request: `I` when `Authorization` was the injected credential,
    /// `-` otherwise (an nginx `map`), counted by reading the log.
    Nginx { _process: Nginx, log: PathBuf },
}

/// The nginx master, stopped with SIGTERM on drop (nginx's fast shutdown, which also ends its
/// workers; a SIGKILL would leave the workers running), then killed by its handle if it lingers.
struct Nginx(Process);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.0.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the upstream certificate.
    pub ca_path: PathBuf,
    backend: Backend,
}

impl Upstream {
    /// Serves HTTPS on `bind` for the certificate names `names`; `expected_auth` is the full
    /// `Authorization` value the sidecar is configured to inject.
    pub fn start(
        kind: Kind,
        dir: &Path,
        names: &[&str],
        bind: SocketAddr,
        expected_auth: &str,
    ) -> anyhow::Result<Self> {
        match kind {
            Kind::Builtin => Self::builtin(dir, names, bind, expected_auth),
            Kind::Nginx => Self::nginx(dir, names, bind, expected_auth),
        }
    }

    fn builtin(
        dir: &Path,
        names: &[&str],
        bind: SocketAddr,
        expected_auth: &str,
    ) -> anyhow::Result<Self> {
        let (tls, ca_path) =
            firma_testing::pki::upstream_tls(dir, "firma bench upstream CA", names, &[b"http/1.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-upstream")
            .enable_all()
            .build()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .with_context(|| format!("bind upstream on {bind}"))?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let expected: Arc<[u8]> = expected_auth.as_bytes().into();
        let c2 = counters.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, counters, expected) =
                    (acceptor.clone(), c2.clone(), expected.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (counters, expected) = (counters.clone(), expected.clone());
                        async move {
                            let injected = req
                                .headers()
                                .get(hyper::header::AUTHORIZATION)
                                .is_some_and(|v| v.as_bytes() == &*expected);
                            if let Ok(mut last) = counters.last_arrival.lock() {
                                *last = Some((std::time::SystemTime::now(), injected));
                            }
                            // Read the body fully, as a real API would.
                            let _ = req.into_body().collect().await;
                            counters.requests.fetch_add(1, Ordering::Relaxed);
                            if injected {
                                counters.injected.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut resp =
                                hyper::Response::new(Full::new(Bytes::from_static(BODY)));
                            resp.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
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
            backend: Backend::Builtin { counters, _rt: rt },
        })
    }

    /// nginx in the foreground (`daemon off`, killed on drop), 2 workers, the bench CA's leaf,
    /// `return 200` with [`BODY`], keep-alive without a request cap.
    fn nginx(
        dir: &Path,
        names: &[&str],
        bind: SocketAddr,
        expected_auth: &str,
    ) -> anyhow::Result<Self> {
        let nginx = nginx_binary().context("nginx is not installed (Debian nginx-light)")?;
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let ca = TestCa::new("firma bench upstream CA");
        let ca_path = ca.write_pem(&dir.join("upstream-ca.crt"));
        let leaf = ca.leaf(names);
        let (cert, key) = (dir.join("leaf.crt"), dir.join("leaf.key"));
        std::fs::write(&cert, leaf.cert.pem())?;
        std::fs::write(&key, leaf.key.serialize_pem())?;
        // nginx cannot report an ephemeral port back: pick a free one when asked for port 0.
        let bind = if bind.port() == 0 {
            std::net::TcpListener::bind(bind)?.local_addr()?
        } else {
            bind
        };
        let log = dir.join("access.log");
        let body = std::str::from_utf8(BODY)?;
        let s = |p: &Path| crate::deploy::path_str(p).map(str::to_string);
        let tmp = s(&dir.join("tmp"))?;
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 2;
pid {pid};
error_log {err} warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    map $http_authorization $firma_injected {{
        "{expected_auth}" I;
        default -;
    }}
    log_format injected '$firma_injected';
    server {{
        listen {bind} ssl;
        server_name {names};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        access_log {log} injected;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"#,
            pid = s(&dir.join("nginx.pid"))?,
            err = s(&dir.join("error.log"))?,
            names = names.join(" "),
            cert = s(&cert)?,
            key = s(&key)?,
            log = s(&log)?,
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(&nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let mut process = Nginx(Process::spawn(cmd).context("spawn nginx")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(bind).is_err() {
            if !process.0.alive() || Instant::now() > deadline {
                bail!(
                    "nginx did not listen on {bind}: {}{}",
                    process.0.log_text(),
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            addr: bind,
            ca_path,
            backend: Backend::Nginx {
                _process: process,
                log,
            },
        })
    }

    /// (requests answered, of which with the injected credential) so far.
    fn counts(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Builtin { counters, .. } => (
                counters.requests.load(Ordering::Relaxed),
                counters.injected.load(Ordering::Relaxed),
            ),
            Backend::Nginx { log, .. } => {
                let bytes = std::fs::read(log).unwrap_or_default();
                let injected = bytes.iter().filter(|&&b| b == b'I').count() as u64;
                let requests = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
                (requests, injected)
            }
        }
    }

    pub fn requests(&self) -> u64 {
        self.counts().0
    }

    pub fn injected(&self) -> u64 {
        self.counts().1
    }

    /// When the last request's head arrived and whether it carried the injected credential;
    /// the builtin server only (nginx logs no arrival time here).
    pub fn last_arrival(&self) -> Option<(std::time::SystemTime, bool)> {
        match &self.backend {
            Backend::Builtin { counters, .. } => *counters.last_arrival.lock().ok()?,
            Backend::Nginx { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{CLIENT_AUTH, ClientArgs};

    /// 40 requests from the real load client: all answered, and counted as carrying the
    /// credential exactly when it is the one the upstream was told to expect.
    fn counts_with(kind: Kind) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for (expected, injected) in [(CLIENT_AUTH, 40), ("Bearer something-else", 0)] {
            let dir = tempfile::tempdir().unwrap();
            let up = Upstream::start(
                kind,
                dir.path(),
                &["api.openai.com"],
                "127.0.0.1:0".parse().unwrap(),
                expected,
            )
            .unwrap();
            let r = crate::client::run(&ClientArgs {
                connect: up.addr,
                host: "api.openai.com".into(),
                proxy_connect: None,
                cas: vec![up.ca_path.clone()],
                requests: 40,
                concurrency: 4,
                warmup: 0,
                new_connection: false,
                time_limit_secs: 30,
                duration_secs: 0,
                threads: 1,
                series: None,
            })
            .unwrap();
            assert_eq!((r.ok, r.errors), (40, 0), "{:?}", r.first_error);
            // nginx writes its log line after the response: allow it a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            while up.requests() < 40 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!((up.requests(), up.injected()), (40, injected));
        }
    }

    #[test]
    fn builtin_counts_requests_and_the_credential() {
        counts_with(Kind::Builtin);
    }

    #[test]
    fn nginx_counts_requests_and_the_credential() {
        if nginx_binary().is_none() {
            eprintln!("SKIP: nginx is not installed (apt-get install nginx-light)");
            return;
        }
        counts_with(Kind::Nginx);
    }
}
