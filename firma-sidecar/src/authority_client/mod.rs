//! The sidecar's side of the Authority's two server streams: runtime policy bundles and
//! revocations.
//!
//! Each stream runs in its own task and reconnects forever. With several Authorities
//! (`[sidecar.policy] authority_urls`), a stream that ends or fails moves to the next one at
//! once; only a whole round without a message backs off (100 ms doubling to 5 s, reset after a
//! message arrives). A dead Authority is noticed by the TCP reset (killed process), by HTTP/2
//! keep-alive pings (host gone: [`KEEPALIVE`] + [`KEEPALIVE_TIMEOUT`]), or, for the bundle
//! stream, by no bundle within the bundle TTL. Whichever Authority a stream lands on replays
//! every revocation, so a failover loses none, and the sidecar's own TTL check
//! (`PolicyBundleStale`) bounds how long any request can be decided on an old bundle. `https://` URLs are verified against
//! `[sidecar.authority] ca_cert_path` (required for https); `http://` is accepted only for a
//! loopback host, so streamed policy and revocations are never taken from an unauthenticated
//! peer across a network.

use firma_common::proto::authority::{
    BundleStreamRequest, PolicyBundle as PbBundle, RevocationStreamRequest,
    authority_client::AuthorityClient as GrpcClient,
};
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub mod metrics;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 ping period on Authority and collector channels, idle or not.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// A ping unanswered for this long closes the channel (the stream then fails over).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("authority_url {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("{path}: cannot read the Authority CA certificate: {cause}")]
    Ca {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("authority_url {url:?}: TLS setup failed: {message}")]
    Tls { url: String, message: String },
}

/// Where and how to reach the Authority.
#[derive(Clone)]
pub struct AuthorityEndpoint {
    endpoint: Endpoint,
    /// `host:port` as written in the URL (for logs).
    pub addr: String,
    /// Sent as `sidecar_id` so the Authority's logs can tell sidecars apart.
    pub sidecar_id: String,
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Builds a gRPC endpoint for `url` under the transport rules of this module: `https://`
/// verified with the PEM CA at `ca_cert_path` (named `ca_key` in errors), `http://` only to
/// loopback. Returns the endpoint and `host:port` for logs.
pub fn grpc_endpoint(
    url: &str,
    ca_cert_path: Option<&Path>,
    ca_key: &str,
) -> Result<(Endpoint, String), ClientError> {
    let bad = |message: &str| ClientError::Url {
        url: url.to_owned(),
        message: message.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let host = uri.host().ok_or_else(|| bad("expected a host"))?.to_owned();
    let port = uri
        .port_u16()
        .ok_or_else(|| bad("expected an explicit port"))?;
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(&e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        // The same socket options as every other sidecar socket (crate::sockopt).
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(
            crate::sockopt::KEEPALIVE_IDLE_SECS.into(),
        )))
        .tcp_keepalive_interval(Some(Duration::from_secs(
            crate::sockopt::KEEPALIVE_INTERVAL_SECS.into(),
        )))
        .tcp_keepalive_retries(Some(crate::sockopt::KEEPALIVE_PROBES))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match uri.scheme_str() {
        Some("https") => {
            let ca = ca_cert_path
                .ok_or_else(|| bad(&format!("https requires {ca_key} to verify the server")))?;
            let pem = std::fs::read(ca).map_err(|source| ClientError::Ca {
                path: ca.to_path_buf(),
                cause: source,
            })?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
            endpoint = endpoint.tls_config(tls).map_err(|e| ClientError::Tls {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        }
        Some("http") if is_loopback(&host) => {}
        Some("http") => {
            return Err(bad(&format!(
                "plain http is only allowed to a loopback address; use https with {ca_key}"
            )));
        }
        _ => return Err(bad("expected an http:// or https:// URL")),
    }
    Ok((endpoint, format!("{host}:{port}")))
}

impl AuthorityEndpoint {
    /// Validates `url` and prepares TLS. Does not connect.
    pub fn new(url: &str, ca_cert_path: Option<&Path>) -> Result<Self, ClientError> {
        let (endpoint, addr) =
            grpc_endpoint(url, ca_cert_path, "[sidecar.authority] ca_cert_path")?;
        Ok(Self {
            endpoint,
            addr,
            sidecar_id: format!("firma-sidecar-{}", std::process::id()),
        })
    }

    async fn connect(&self) -> Result<GrpcClient<Channel>, tonic::transport::Error> {
        Ok(GrpcClient::new(self.endpoint.connect().await?))
    }
}

/// Runs `session(i)` forever over the `n` Authorities, moving to the next one whenever a
/// session ends. `session` returns `true` if it received at least one message before ending
/// (which resets the backoff). It sleeps only after a whole round without progress (or, with a
/// single Authority, before every retry).
async fn reconnect_loop<F, Fut>(what: &'static str, n: usize, mut session: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = (bool, String)>,
{
    let n = n.max(1);
    let mut backoff = BACKOFF_START;
    let mut i = 0;
    let mut fruitless = 0;
    loop {
        let (progressed, why) = session(i).await;
        if progressed {
            backoff = BACKOFF_START;
            fruitless = 0;
        } else {
            fruitless += 1;
        }
        i = (i + 1) % n;
        if n == 1 || fruitless >= n {
            fruitless = 0;
            tracing::warn!(
                target: "firma_sidecar::authority",
                "{what} stream ended ({why}); reconnecting in {} ms",
                backoff.as_millis()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            tracing::warn!(
                target: "firma_sidecar::authority",
                "{what} stream ended ({why}); failing over to authority #{}",
                i + 1
            );
        }
    }
}

/// Streams bundles into `on_bundle` forever from the first Authority of `eps` that serves them.
/// Logs `connected to authority <addr>` on each successful subscription. A stream with no
/// bundle for `idle` (the bundle TTL: the Authority re-sends well within it) is dropped for the
/// next Authority.
pub async fn run_bundle_stream<F>(eps: Vec<AuthorityEndpoint>, idle: Duration, on_bundle: F)
where
    F: Fn(PbBundle) + Send + Sync + 'static,
{
    let n = eps.len();
    reconnect_loop("policy bundle", n, |i| {
        let ep = &eps[i % n];
        let on_bundle = &on_bundle;
        async move {
            let mut client = match ep.connect().await {
                Ok(c) => c,
                Err(e) => return (false, format!("connect {}: {e}", ep.addr)),
            };
            let req = BundleStreamRequest {
                sidecar_id: ep.sidecar_id.clone(),
            };
            let mut stream = match client.stream_policy_bundles(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => return (false, format!("subscribe {}: {}", ep.addr, s.message())),
            };
            tracing::info!(
                target: "firma_sidecar::startup::authority",
                "connected to authority {}",
                ep.addr
            );
            let mut got = false;
            loop {
                match tokio::time::timeout(idle, stream.message()).await {
                    Ok(Ok(Some(b))) => {
                        got = true;
                        on_bundle(b);
                    }
                    Ok(Ok(None)) => return (got, format!("closed by the authority {}", ep.addr)),
                    Ok(Err(s)) => return (got, format!("{}: {}", ep.addr, s.message())),
                    Err(_) => {
                        return (
                            got,
                            format!("{}: no bundle for {} s", ep.addr, idle.as_secs()),
                        );
                    }
                }
            }
        }
    })
    .await
}

/// One revocation as the stream delivered it.
#[derive(Debug, Clone, Copy)]
pub struct RevocationUpdate<'a> {
    pub token_id: &'a str,
    /// Sent during a (re)play of every known id rather than live.
    pub replay: bool,
    /// When the authority recorded it (Unix ms); 0 or less: unknown.
    pub revoked_at_unix_ms: i64,
    /// Part of the first replay this process received, before anything live: revoked before the
    /// sidecar was connected at all, so no lag of this sidecar's can be measured for it. Replays
    /// after a reconnect are not `startup`: they carry what was revoked while disconnected.
    pub startup: bool,
}

/// Streams revocations into `on_revoked` forever, from whichever Authority of `eps` serves
/// them (each replays the whole set on subscription).
pub async fn run_revocation_stream<F>(eps: Vec<AuthorityEndpoint>, on_revoked: F)
where
    F: Fn(RevocationUpdate<'_>) + Send + Sync + 'static,
{
    // Set once a live entry arrived or a subscribed stream ended: later replays are resyncs.
    let caught_up = AtomicBool::new(false);
    let n = eps.len();
    reconnect_loop("revocation", n, |i| {
        let ep = &eps[i % n];
        let caught_up = &caught_up;
        let on_revoked = &on_revoked;
        async move {
            let mut client = match ep.connect().await {
                Ok(c) => c,
                Err(e) => return (false, format!("connect {}: {e}", ep.addr)),
            };
            let req = RevocationStreamRequest {
                sidecar_id: ep.sidecar_id.clone(),
            };
            let mut stream = match client.stream_revocations(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => return (false, format!("subscribe {}: {}", ep.addr, s.message())),
            };
            tracing::debug!(target: "firma_sidecar::authority", "revocation stream open ({})", ep.addr);
            let mut got = false;
            let ended = |got: bool, why: String| {
                caught_up.store(true, Ordering::Relaxed);
                (got, why)
            };
            loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        got = true;
                        if !r.replay {
                            caught_up.store(true, Ordering::Relaxed);
                        }
                        on_revoked(RevocationUpdate {
                            token_id: &r.token_id,
                            replay: r.replay,
                            revoked_at_unix_ms: r.revoked_at_unix_ms,
                            startup: r.replay && !caught_up.load(Ordering::Relaxed),
                        });
                    }
                    Ok(None) => return ended(got, format!("closed by the authority {}", ep.addr)),
                    Err(s) => return ended(got, format!("{}: {}", ep.addr, s.message())),
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(AuthorityEndpoint::new("http://127.0.0.1:50051", None).is_ok());
        assert!(AuthorityEndpoint::new("http://[::1]:50051", None).is_ok());
        assert!(AuthorityEndpoint::new("http://localhost:50051", None).is_ok());
        let e = AuthorityEndpoint::new("http://10.1.2.3:50051", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        let e = AuthorityEndpoint::new("https://auth.internal:50051", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca_cert_path"), "{e}");
        assert!(AuthorityEndpoint::new("ftp://x:1", None).is_err());
        assert!(AuthorityEndpoint::new("http://127.0.0.1", None).is_err());
        assert_eq!(
            AuthorityEndpoint::new("http://[::1]:50051", None)
                .unwrap()
                .addr,
            "[::1]:50051"
        );
    }
}
