//! The local HTTPS upstream (HTTP/1.1 + HTTP/2) with its own CA, recording every request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercase names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// SNI the client sent.
    pub sni: Option<String>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the upstream's certificate (give to `extra_root_certs`).
    pub ca_path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Every raw byte the upstream received, decrypted (for canary checks).
    pub raw: Arc<Mutex<Vec<u8>>>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Serves HTTPS on 127.0.0.1 for `names` (certificate SANs). `GET /slow?ms=N` answers after
    /// N ms; everything else answers 200 `{"ok":true,"path":…}`.
    pub fn start(dir: &Path, names: &[&str]) -> Self {
        Self::start_at(dir, names, "127.0.0.1:0".parse().unwrap())
    }

    /// As [`Upstream::start`], listening on `bind` (transparent-mode tests put it at an
    /// address inside their network namespace, which is what the client connects to).
    pub fn start_at(dir: &Path, names: &[&str], bind: SocketAddr) -> Self {
        let (tls, ca_path) =
            crate::pki::upstream_tls(dir, "firma test upstream CA", names, &[b"h2", b"http/1.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (seen2, raw2) = (seen.clone(), raw.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, raw) = (acceptor.clone(), seen2.clone(), raw2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, raw, sni) = (seen.clone(), raw.clone(), sni.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut headers = BTreeMap::new();
                            for (k, v) in parts.headers.iter() {
                                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                                headers
                                    .entry(k.as_str().to_string())
                                    .and_modify(|e: &mut String| {
                                        e.push_str(", ");
                                        e.push_str(&v)
                                    })
                                    .or_insert(v);
                            }
                            {
                                let mut r = raw.lock().unwrap();
                                r.extend_from_slice(
                                    format!("{} {}\r\n", parts.method, parts.uri).as_bytes(),
                                );
                                for (k, v) in parts.headers.iter() {
                                    r.extend_from_slice(k.as_str().as_bytes());
                                    r.extend_from_slice(b": ");
                                    r.extend_from_slice(v.as_bytes());
                                    r.extend_from_slice(b"\r\n");
                                }
                                r.extend_from_slice(&body);
                            }
                            let path = parts.uri.path().to_string();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: path.clone(),
                                headers,
                                body: body.to_vec(),
                                sni,
                            });
                            if path == "/slow" {
                                let ms = parts
                                    .uri
                                    .query()
                                    .and_then(|q| q.strip_prefix("ms="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(2000);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let out = serde_json::json!({"ok": true, "path": path}).to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(out),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_path,
            seen,
            raw,
            _rt: rt,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn raw_contains(&self, needle: &str) -> bool {
        let raw = self.raw.lock().unwrap();
        raw.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}
