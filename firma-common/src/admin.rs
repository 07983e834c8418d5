//! The admin listener shared by the sidecar and the authority: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers) and `/readyz` (200, or 503 with a JSON body naming
//! each failing check). Plain HTTP/1.1 on a loopback address by default; operators put it
//! behind their own scraper, never on the data path.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The OpenMetrics text format `prometheus-client` writes (Prometheus negotiates it).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One readiness check: `ok` false makes `/readyz` answer 503 naming `name` and `detail`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Check {
    pub fn pass(name: &'static str) -> Self {
        Self {
            name,
            ok: true,
            detail: String::new(),
        }
    }

    pub fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
        }
    }
}

/// What a component exposes on its admin listener.
pub trait AdminSource: Send + Sync + 'static {
    /// The whole scrape in Prometheus/OpenMetrics text format (values read at scrape time
    /// are refreshed here).
    fn metrics(&self) -> String;
    /// Every readiness check, passing or not.
    fn readiness(&self) -> Vec<Check>;
}

#[derive(Debug, thiserror::Error)]
#[error("admin listener {addr}: {cause}")]
pub struct AdminError {
    pub addr: String,
    pub cause: std::io::Error,
}

/// Binds `addr` and serves `source` on it until the runtime stops. Returns the bound address.
pub async fn serve(addr: &str, source: Arc<dyn AdminSource>) -> Result<SocketAddr, AdminError> {
    let err = |cause| AdminError {
        addr: addr.to_string(),
        cause,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    if !local.ip().is_loopback() {
        tracing::warn!(%local, "admin listener is not on loopback: /metrics and /readyz are reachable from the network");
    }
    tokio::spawn(accept_loop(listener, source));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, source: Arc<dyn AdminSource>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(respond(&*source, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(source: &dyn AdminSource, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, METRICS_CONTENT_TYPE, source.metrics()),
        "/healthz" => reply(
            StatusCode::OK,
            "application/json",
            "{\"alive\":true}".into(),
        ),
        "/readyz" => {
            let (status, body) = readiness_body(&source.readiness());
            reply(status, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// 200 `{"ready":true,…}` when every check passes, else 503 with `failing` naming them.
pub fn readiness_body(checks: &[Check]) -> (StatusCode, String) {
    let failing: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    let ready = failing.is_empty();
    let body = serde_json::json!({ "ready": ready, "failing": failing, "checks": checks });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body.to_string())
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Latency buckets shared by every histogram (seconds): 5 us to about 8 s, factor 3.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(5e-6, 3.0, 14)
}

/// Encodes `registry` in the text format.
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_failing_checks() {
        let (s, body) = readiness_body(&[Check::pass("a"), Check::fail("bundle", "stale")]);
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["failing"][0], "bundle");
        assert_eq!(v["checks"][1]["detail"], "stale");
        let (s, _) = readiness_body(&[Check::pass("a")]);
        assert_eq!(s, StatusCode::OK);
    }
}
