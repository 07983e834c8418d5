//! The benchmark upstream: HTTPS, HTTP/1.1 keep-alive only, one small fixed response, with its
//! own CA. It counts requests and how many carried the credential the sidecar injects, so the
//! harness can prove the "through the sidecar" figures really went through the pipeline.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The fixed response body (small, like a short completion).
pub const BODY: &[u8] = br#"{"id":"bench","object":"chat.completion","choices":[]}"#;

/// Counters shared with the serving tasks.
#[derive(Default)]
pub struct Counters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests whose `Authorization` equalled the injected credential.
    pub injected: AtomicU64,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the upstream certificate.
    pub ca_path: PathBuf,
    pub counters: Arc<Counters>,
    /// Serves on its own threads so the client and the upstream never share a scheduler.
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Serves HTTPS on `bind` for the certificate names `names`; `expected_auth` is the full
    /// `Authorization` value the sidecar is configured to inject.
    pub fn start(
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
            counters,
            _rt: rt,
        })
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn injected(&self) -> u64 {
        self.counters.injected.load(Ordering::Relaxed)
    }
}
