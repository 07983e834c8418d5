//! After an allow: credential injection, per-host rate limit, upstream request.
//!
//! Order is fixed and matters: the credential is resolved first (a Vault failure denies
//! `CredentialUnavailable` before anything leaves), then the rate limit, then the upstream.
//! Firma headers (`x-firma-*`) and hop-by-hop headers never leave the sidecar.

pub mod binding;
pub mod credentials;
pub mod dial;
pub mod metrics;
pub mod placeholder;
pub mod pool;
pub mod ratelimit;
pub mod secret;
pub mod usage;
pub mod vault;

use crate::config::SidecarConfig;
use crate::conn::{ConnectionInfo, ConnectorOutcome, InterceptKind};
use credentials::{CredentialError, CredentialStore};
use dial::{DialError, Dialer, ReqBody};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use pool::{CredentialFingerprint, Pool, PoolKey, Release, Sender};
use ratelimit::HostLimiter;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::http_body::RespBody;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Roots(#[from] crate::tls::upstream::RootsError),
}

/// Why a request that was allowed did not get an upstream response.
#[derive(Debug)]
pub enum Failure {
    /// The credential could not be obtained: a denial (`CredentialUnavailable`), nothing sent.
    CredentialUnavailable(String),
    /// No rate-limit permit within the request's timeout: 429.
    RateLimited(String),
    /// Connect, TLS or protocol failure upstream: 502.
    UpstreamUnavailable(String),
    /// No response head within the timeout: 504.
    UpstreamTimeout(String),
}

/// A target a credential may go to (or that has none): made only by [`Connector::clear`],
/// right after the decision (`crate::sequence`); the connector is entered with it
/// ([`Connector::bind_request`], [`Connector::admit`]), so nothing reaches the upstream side
/// without that check.
#[derive(Debug, Clone)]
pub struct Cleared {
    target: UpstreamTarget,
}

impl Cleared {
    pub fn target(&self) -> &UpstreamTarget {
        &self.target
    }
}

/// Where an allowed HTTP request may go: made only by [`Connector::bind_request`], so
/// [`Connector::prepare`] never sees a request whose upstream was not checked.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    addr: SocketAddr,
}

/// An allowed request with its destination, credential and permit settled, not yet sent.
pub struct Prepared {
    req: Request<ReqBody>,
    key: PoolKey,
    /// `host[:port]` as the upstream is addressed (`Host` / `:authority`).
    authority: String,
    /// gRPC needs HTTP/2 end to end.
    grpc: bool,
    timeout: Duration,
    /// What the connector will do: the credential it attaches.
    pub planned: ConnectorOutcome,
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// Lowercase host name (TLS server name when `tls`).
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

struct HostSettings {
    address: Option<SocketAddr>,
    timeout: Duration,
    limiter: Option<HostLimiter>,
}

pub struct Connector {
    hosts: HashMap<String, HostSettings>,
    default_timeout: Duration,
    dialer: Dialer,
    credentials: CredentialStore,
    /// `SO_MARK` for upstream sockets of transparent-mode connections.
    transparent_mark: u32,
    /// Upstream connections shared by every client connection (see [`pool`]).
    pool: Arc<Pool>,
    fingerprint: CredentialFingerprint,
    /// Upstream addresses from the decided name (see [`binding`]).
    binder: binding::Binder,
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|;…]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

impl Connector {
    pub fn new(cfg: &SidecarConfig) -> Result<Self, ConnectorError> {
        let roots = crate::tls::upstream::root_store(&cfg.connector.extra_root_certs)?;
        let dialer = Dialer::new(crate::tls::upstream::client_config(roots));
        let credentials = CredentialStore::from_config(cfg)?;
        let default_timeout = Duration::from_millis(cfg.connector.default_timeout_ms.max(1));
        let hosts = cfg
            .connector
            .hosts
            .iter()
            .map(|h| {
                (
                    h.host.trim().to_ascii_lowercase(),
                    HostSettings {
                        // Validated as ip:port by the config loader.
                        address: h.address.as_deref().and_then(|a| a.parse().ok()),
                        timeout: h.timeout_ms.map_or(default_timeout, Duration::from_millis),
                        limiter: HostLimiter::new(h.rps, h.burst),
                    },
                )
            })
            .collect();
        Ok(Self {
            hosts,
            default_timeout,
            dialer,
            credentials,
            transparent_mark: cfg.interceptor.transparent.socket_mark,
            pool: Pool::new(),
            fingerprint: CredentialFingerprint::new(),
            binder: binding::Binder::default(),
        })
    }

    /// Binds destinations with the loaded mapping rules (their `ports` and exact IP names);
    /// without this only 443 and no IP literal are destinations.
    pub fn with_rules(mut self, rules: Arc<dyn binding::DestinationRules>) -> Self {
        self.binder = binding::Binder::new(rules);
        self
    }

    /// The destination binder (benches, tests).
    pub fn binder(&self) -> &binding::Binder {
        &self.binder
    }

    /// The shared upstream pool (for tests and metrics).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    pub fn timeout_for(&self, host: &str) -> Duration {
        self.hosts
            .get(host)
            .map_or(self.default_timeout, |h| h.timeout)
    }

    /// Why a request to `target` must not leave: it carries a placeholder credential that
    /// would leave the sidecar (`CredentialLeak`; see [`placeholder`]).
    pub fn placeholder_leak(
        &self,
        target: &UpstreamTarget,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Option<String> {
        self.credentials
            .placeholder_leak(&target.host, uri, headers)
    }

    /// `SO_MARK` to put on upstream sockets for this connection (transparent mode only).
    pub fn mark_for(&self, conn: &ConnectionInfo) -> Option<u32> {
        (conn.kind == InterceptKind::Transparent).then_some(self.transparent_mark)
    }

    /// Opens a blind tunnel's upstream TCP connection to `addr` (from [`Self::bind`]), within
    /// `host`'s connect timeout and with `conn`'s socket mark. `Err` says why, for the audit.
    pub async fn connect_tunnel(
        &self,
        host: Option<&str>,
        addr: SocketAddr,
        conn: &ConnectionInfo,
    ) -> Result<dial::UpstreamIo, String> {
        let timeout = self.timeout_for(host.unwrap_or_default());
        match tokio::time::timeout(
            timeout,
            self.dialer.connect(addr, None, self.mark_for(conn)),
        )
        .await
        {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connecting to {addr} timed out")),
        }
    }

    /// The upstream address of `host:port` for `conn` (see [`binding`]): in transparent mode
    /// the original destination once it is proven to be one of `host`'s addresses; otherwise the
    /// configured `address`, else `host` resolved. `host = None`: the connection has no name.
    pub async fn bind(
        &self,
        host: Option<&str>,
        port: u16,
        conn: &ConnectionInfo,
    ) -> Result<SocketAddr, binding::Unbound> {
        let claimed = match conn.kind {
            InterceptKind::Transparent => conn.original_dst,
            _ => None,
        };
        self.binder
            .bind(binding::BindRequest {
                name: host,
                port,
                claimed,
                configured: host.and_then(|h| self.hosts.get(h)).and_then(|h| h.address),
            })
            .await
    }

    /// Where an allowed HTTP request to the `cleared` target goes: the destination binding
    /// ([`Self::bind`]). The caller runs it right after the decision, so a refusal is denied like
    /// any decision, with the request body still in hand.
    pub async fn bind_request(
        &self,
        cleared: &Cleared,
        conn: &ConnectionInfo,
    ) -> Result<Bound, binding::Unbound> {
        let target = &cleared.target;
        self.bind(Some(&target.host), target.port, conn)
            .await
            .map(|addr| Bound { addr })
    }

    /// Whether a credential may go to `target`: not when its host has one and the request would
    /// not travel over TLS verified for that host (the connector verifies upstream TLS for
    /// `target.host`, the name the credential is configured for). `Err` is the
    /// `InsecureUpstream` detail.
    pub fn clear(&self, target: &UpstreamTarget) -> Result<Cleared, String> {
        if !target.tls && self.credentials.has(&target.host) {
            return Err(format!(
                "{host} has a credential, which is only sent over TLS verified for {host}; this request would leave in plaintext (use https://)",
                host = target.host
            ));
        }
        Ok(Cleared {
            target: target.clone(),
        })
    }

    /// The connector's admission of an allowed request, shared by [`Self::prepare`] and the
    /// callers that do not carry the request themselves ([`crate::gate`]): the credential
    /// (fail closed: nothing leaves without it), then the host's rate-limit permit.
    pub async fn admit(
        &self,
        cleared: &Cleared,
    ) -> Result<Option<credentials::Injection>, Failure> {
        let target = &cleared.target;
        let injection = self
            .credentials
            .resolve(&target.host)
            .await
            .map_err(|e| Failure::CredentialUnavailable(e.to_string()))?;
        let timeout = self.timeout_for(&target.host);
        if let Some(l) = self
            .hosts
            .get(&target.host)
            .and_then(|h| h.limiter.as_ref())
            && let Err(wait) = l.acquire(timeout).await
        {
            return Err(Failure::RateLimited(format!(
                "rate limit for {}: next permit in {} ms, beyond the {} ms timeout",
                target.host,
                wait.as_millis(),
                timeout.as_millis()
            )));
        }
        Ok(injection)
    }

    /// Headers of the agent's own credential for `host` (removed before anything leaves there;
    /// includes the injected header). Empty for a host without a credential.
    pub fn agent_credential_headers(&self, host: &str) -> &[http::HeaderName] {
        self.credentials.agent_headers(host)
    }

    /// Settles everything an allowed request needs before it may leave: where to, whether a
    /// credential may go there, the credential itself, the rate-limit permit; and rewrites the
    /// request for the upstream. Nothing is sent. The caller records the decision (persisted)
    /// and only then calls [`Self::send`].
    ///
    /// A credential is attached only to a request that leaves over TLS verified for the
    /// credential's host name: a credentialed host reached over plain HTTP (absolute-form
    /// `http://` through the proxy, `CONNECT host:80` followed by plaintext, h2c with
    /// `:scheme http`, transparent port 80) was refused by [`Self::clear`] (`InsecureUpstream`),
    /// which made `cleared`, before the credential is even fetched.
    ///
    /// `bound` is where to: an address of the decided name, never one the client chose.
    pub async fn prepare(
        &self,
        mut req: Request<ReqBody>,
        cleared: &Cleared,
        conn: &ConnectionInfo,
        bound: Bound,
    ) -> Result<Prepared, (Failure, ConnectorOutcome)> {
        let target = &cleared.target;
        let mut outcome = ConnectorOutcome::default();
        let timeout = self.timeout_for(&target.host);
        let addr = bound.addr;

        // 1. May a credential go there (`cleared`)? 2. Where to: `addr`, bound by the caller.
        // 3. Credential. 4. Rate limit.
        let injection = self
            .admit(cleared)
            .await
            .map_err(|f| (f, outcome.clone()))?;
        // 5. Rewrite for the upstream.
        let grpc = is_grpc(req.headers());
        let trailers = wants_trailers(req.headers());
        prepare_headers(req.headers_mut());
        // The agent's own credential headers and query parameters (its key, or a placeholder)
        // never leave for a credential host: only Firma's is set below.
        self.credentials
            .strip_agent_credentials(&target.host, &mut req);
        if trailers {
            // `te: trailers` is the one TE an HTTP/2 hop carries; gRPC servers require it.
            req.headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let host_header =
            if (target.tls && target.port == 443) || (!target.tls && target.port == 80) {
                target.host.clone()
            } else {
                format!("{}:{}", target.host, target.port)
            };
        if let Ok(v) = HeaderValue::from_str(&host_header) {
            req.headers_mut().insert(header::HOST, v);
        }
        let mut credential = None;
        if let Some(inj) = &injection {
            req.headers_mut()
                .insert(inj.header.clone(), inj.value.clone());
            outcome.credential_injected = true;
            outcome.credential_source = Some(inj.source);
            credential = Some(self.fingerprint.of(&inj.header, &inj.value));
        }
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        *req.version_mut() = http::Version::HTTP_11;
        Ok(Prepared {
            req,
            key: PoolKey {
                host: target.host.clone(),
                addr,
                tls_name: target.tls.then_some(target.host.clone()),
                mark: self.mark_for(conn),
                h2c: grpc && !target.tls,
                credential,
                worker: crate::workers::current(),
            },
            authority: host_header,
            grpc,
            timeout,
            planned: outcome,
        })
    }

    /// Sends a [`Prepared`] request and returns the response head (the body streams).
    ///
    /// The connection comes from the shared pool when one matches the request's
    /// [`PoolKey`], else it is dialled (ALPN `h2`, falling back to HTTP/1.1). A pooled
    /// connection that turns out to be closed before the request was written is replaced by a
    /// fresh one once; a request that reached the wire is never sent twice.
    pub async fn send(
        &self,
        p: Prepared,
    ) -> Result<(Response<RespBody>, ConnectorOutcome), (Failure, ConnectorOutcome)> {
        let Prepared {
            req,
            key,
            authority,
            grpc,
            timeout,
            planned: mut outcome,
        } = p;
        let started = Instant::now();
        let host = key.host.clone();
        let addr = key.addr;
        let sent = tokio::time::timeout(timeout, async {
            let mut req = req;
            let mut pooled = self.pool.checkout(&key);
            loop {
                let reused = pooled.is_some();
                let sender = match pooled.take() {
                    Some(s) => s,
                    None => self.dial(&key).await?,
                };
                if grpc && matches!(sender, Sender::H1(_)) {
                    return Err(Failure::UpstreamUnavailable(format!(
                        "upstream {host} ({addr}) does not offer HTTP/2 (ALPN h2), which gRPC requires"
                    )));
                }
                let protocol = sender.protocol();
                match self.try_send(sender, req, &key, &authority).await {
                    Ok(resp) => return Ok((resp, protocol, reused)),
                    Err((e, Some(back))) if reused => {
                        tracing::debug!(error = %e, host = %host, "pooled upstream connection was closed; dialling a new one");
                        req = back;
                    }
                    Err((e, _)) => {
                        return Err(Failure::UpstreamUnavailable(format!(
                            "upstream {addr} request failed: {e}"
                        )));
                    }
                }
            }
        })
        .await;
        outcome.upstream_us = started.elapsed().as_micros() as u64;
        let (resp, protocol, reused) = match within(sent, &host, addr, timeout) {
            Ok(r) => r,
            Err(f) => return Err((f, outcome)),
        };
        outcome.upstream_status = Some(resp.status().as_u16());
        outcome.upstream_protocol = Some(protocol);
        outcome.upstream_reused = Some(reused);
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok((Response::from_parts(parts, body), outcome))
    }

    /// Sends a [`Prepared`] WebSocket upgrade on its own HTTP/1.1 connection. On `101` the
    /// response comes back with the upstream's upgrade (the caller relays once the client's
    /// 101 is out); any other status is an ordinary response.
    pub async fn send_upgrade(
        &self,
        p: Prepared,
    ) -> Result<
        (Response<RespBody>, Option<OnUpgrade>, ConnectorOutcome),
        (Failure, ConnectorOutcome),
    > {
        let Prepared {
            mut req,
            key,
            timeout,
            planned: mut outcome,
            ..
        } = p;
        restore_upgrade_headers(req.headers_mut());
        req.headers_mut().remove(header::TE);
        let started = Instant::now();
        let (host, addr) = (key.host.clone(), key.addr);
        let sent = tokio::time::timeout(timeout, async {
            let mut s = self
                .dialer
                .open_upgradable(key.addr, key.tls_name.as_deref(), key.mark)
                .await
                .map_err(|e| Failure::UpstreamUnavailable(e.to_string()))?;
            s.send_request(req).await.map_err(|e| {
                Failure::UpstreamUnavailable(format!("upstream {addr} upgrade request failed: {e}"))
            })
        })
        .await;
        outcome.upstream_us = started.elapsed().as_micros() as u64;
        let mut resp = match within(sent, &host, addr, timeout) {
            Ok(r) => r,
            Err(f) => return Err((f, outcome)),
        };
        outcome.upstream_status = Some(resp.status().as_u16());
        outcome.upstream_protocol = Some("http/1.1");
        outcome.upstream_reused = Some(false);
        let upgrade = (resp.status() == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut resp));
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if upgrade.is_some() {
            outcome.upstream_protocol = Some("websocket");
            restore_upgrade_headers(&mut parts.headers);
        }
        Ok((Response::from_parts(parts, body.boxed()), upgrade, outcome))
    }

    async fn dial(&self, key: &PoolKey) -> Result<Sender, Failure> {
        let s = self
            .dialer
            .open(key.addr, key.tls_name.as_deref(), key.mark, key.h2c)
            .await
            .map_err(|e: DialError| Failure::UpstreamUnavailable(e.to_string()))?;
        if let Sender::H2(h2) = &s {
            self.pool.share_h2(key.clone(), h2);
        }
        Ok(s)
    }

    /// One attempt on `sender`; on failure, the request back if it never reached the wire.
    async fn try_send(
        &self,
        sender: Sender,
        mut req: Request<ReqBody>,
        key: &PoolKey,
        authority: &str,
    ) -> Result<Response<RespBody>, (String, Option<Request<ReqBody>>)> {
        match sender {
            Sender::H2(mut s) => {
                // HTTP/2 names the target in :scheme/:authority, not in Host.
                let scheme = if key.tls_name.is_some() {
                    "https"
                } else {
                    "http"
                };
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                if let Ok(uri) = format!("{scheme}://{authority}{pq}").parse() {
                    *req.uri_mut() = uri;
                }
                req.headers_mut().remove(header::HOST);
                *req.version_mut() = http::Version::HTTP_2;
                let resp = s.try_send_request(req).await.map_err(|mut e| {
                    let back = e.take_message();
                    (e.into_error().to_string(), back)
                })?;
                Ok(resp.map(|b| b.boxed()))
            }
            Sender::H1(mut s) => {
                req.headers_mut().remove(header::TE);
                let resp = s.try_send_request(req).await.map_err(|mut e| {
                    let back = e.take_message();
                    (e.into_error().to_string(), back)
                })?;
                let back = Some((self.pool.clone(), key.clone(), s));
                Ok(resp.map(|b| Release::new(b.boxed(), back).boxed()))
            }
        }
    }
}

/// `te: trailers` (the only transfer coding an HTTP/2 request may name).
fn wants_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(n);
    }
}

/// Removes Firma and hop-by-hop headers before forwarding.
fn prepare_headers(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    let firma: Vec<_> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-firma-"))
        .cloned()
        .collect();
    for k in firma {
        h.remove(k);
    }
}

/// The result of an upstream exchange bounded by `timeout`, its expiry as `UpstreamTimeout`.
fn within<T>(
    sent: Result<Result<T, Failure>, tokio::time::error::Elapsed>,
    host: &str,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<T, Failure> {
    sent.map_err(|_| {
        Failure::UpstreamTimeout(format!(
            "no response from {host} ({addr}) within {} ms",
            timeout.as_millis()
        ))
    })?
}

/// Puts back the two headers a WebSocket upgrade needs on its hop (they are hop-by-hop, so
/// they were stripped like any other).
fn restore_upgrade_headers(h: &mut http::HeaderMap) {
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firma_and_hop_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-firma-capability", "tok".parse().unwrap());
        h.insert("x-firma-session", "s".parse().unwrap());
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("authorization", "keep".parse().unwrap());
        prepare_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
