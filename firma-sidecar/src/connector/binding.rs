//! Destination binding: the upstream address comes from the decided name, never from the agent.
//!
//! The pipeline decides on a *name* (TLS SNI, `Host`, a `CONNECT` or absolute-form authority).
//! Where the client also chose an *address* (transparent mode: the original destination of its
//! `connect()`), that address proves nothing about the name: an agent can send `Host:
//! api.example.com` to any server. So before anything leaves ([`Binder::bind`]):
//!
//! - the name is resolved by the sidecar ([`Resolver`]: the addresses the DNS guard answered
//!   the workloads for it from its upstream resolvers, else the system resolver, `getaddrinfo`
//!   via `tokio::net::lookup_host`; cached per name for [`RESOLVE_TTL`]), or taken from the
//!   host's configured `[[sidecar.connector.hosts]] address`;
//! - the client's address must be one of those addresses, and its port one a mapping rule for
//!   the name allows (`ports`, default 443; a configured address's port counts too);
//! - an IP literal (no name at all: TLS without SNI, unknown protocols, `Host: 10.0.0.5`) is
//!   allowed only where a mapping rule names that address exactly (`10.0.0.5` or
//!   `10.0.0.5:5432`);
//! - the upstream is then that address (the one the client chose, now known to be the name's),
//!   or, when the client chose none (`http_proxy` with a name), the name's first address.
//!
//! Anything else is [`Unbound::Mismatch`]: the request or tunnel is denied
//! `DestinationMismatch` and nothing is sent. One function for every interceptor: HTTP requests
//! bind in `interceptor::http` right after the decision (`Connector::bind`, before
//! `Connector::prepare`), tunnels in `interceptor::tunnel::decide_and_connect`.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a name's addresses are reused before the system resolver is asked again.
/// `getaddrinfo` gives no TTL; 30 s bounds how stale a binding can be.
pub const RESOLVE_TTL: Duration = Duration::from_secs(30);
/// A cached answer older than this is refreshed once before a mismatch is declared (DNS
/// rotation: the client may hold a newer answer); younger ones are not, so a client cannot make
/// the sidecar resolve on every request.
pub const MISMATCH_REFRESH: Duration = Duration::from_secs(1);
/// Most names cached; past it expired entries go, then everything.
const CACHE_MAX: usize = 4096;

/// Why a destination could not be bound.
#[derive(Debug, Clone)]
pub enum Unbound {
    /// The client's destination is not the decision's: deny `DestinationMismatch`.
    Mismatch(Mismatch),
    /// The name does not resolve and the client chose no address: an upstream failure (502).
    Unresolved(String),
}

/// A `DestinationMismatch` denial: the detail for the client and `envelope.intent.destination`
/// for the audit (the decided name, port, its addresses and allowed ports, the client's
/// original destination).
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub detail: String,
    pub record: Value,
}

/// Per name: when it was resolved and its addresses.
type Cache = HashMap<String, (Instant, Arc<[IpAddr]>)>;

/// The sidecar's own view of names: system resolver + a small TTL-bounded cache.
#[derive(Default)]
pub struct Resolver {
    cache: Mutex<Cache>,
}

impl Resolver {
    /// The addresses of `host` (cached for [`RESOLVE_TTL`]) and the age of that answer.
    pub async fn addresses(&self, host: &str) -> Result<(Arc<[IpAddr]>, Duration), String> {
        if let Some((at, ips)) = self.lock().get(host)
            && at.elapsed() < RESOLVE_TTL
        {
            return Ok((ips.clone(), at.elapsed()));
        }
        self.refresh(host).await.map(|ips| (ips, Duration::ZERO))
    }

    /// Asks the system resolver now and caches the answer.
    pub async fn refresh(&self, host: &str) -> Result<Arc<[IpAddr]>, String> {
        let found = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        let mut ips: Vec<IpAddr> = found.map(|a| a.ip().to_canonical()).collect();
        ips.dedup();
        if ips.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        let ips: Arc<[IpAddr]> = ips.into();
        self.insert(host, ips.clone());
        Ok(ips)
    }

    /// Adds addresses the DNS guard answered for `host` (from its upstream resolvers) to the
    /// fresh answer, if any, and restarts the entry's lifetime.
    pub fn learn(&self, host: &str, ips: &[IpAddr]) {
        if ips.is_empty() {
            return;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut all: Vec<IpAddr> = ips.iter().map(|i| i.to_canonical()).collect();
        if let Some((at, old)) = self.lock().get(&host)
            && at.elapsed() < RESOLVE_TTL
        {
            all.extend(old.iter().copied());
        }
        all.sort_unstable();
        all.dedup();
        self.insert(&host, all.into());
    }

    /// Puts an answer in the cache (startup seeding, benches).
    pub fn insert(&self, host: &str, ips: Arc<[IpAddr]>) {
        let mut c = self.lock();
        if c.len() >= CACHE_MAX {
            c.retain(|_, (at, _)| at.elapsed() < RESOLVE_TTL);
            if c.len() >= CACHE_MAX {
                c.clear();
            }
        }
        c.insert(host.to_string(), (Instant::now(), ips));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one binding looks at.
#[derive(Debug, Clone, Copy)]
pub struct BindRequest<'a> {
    /// The decided name (lowercase), or `None` when the connection has none (TLS without SNI,
    /// an unknown protocol): then the client's address is the destination.
    pub name: Option<&'a str>,
    /// The destination port the decision is for.
    pub port: u16,
    /// The address the client chose itself (transparent mode's original destination).
    pub claimed: Option<SocketAddr>,
    /// `[[sidecar.connector.hosts]] address` of the name.
    pub configured: Option<SocketAddr>,
}

/// Ports a rule allows when it names none, and the ports of a name no rule matches: HTTPS.
/// Plain HTTP (80) and any other port only where a rule says so.
pub const DEFAULT_PORTS: [u16; 1] = [443];

/// What binding needs of the mapping rules (`pipeline::mapping::MappingRules` implements it;
/// the connector sits below the pipeline and does not see the rules themselves).
pub trait DestinationRules: Send + Sync {
    /// Whether `port` is a destination port for `host`.
    fn allows_port(&self, host: &str, port: u16) -> bool;
    /// Every port [`Self::allows_port`] allows for `host`, ascending.
    fn ports_for(&self, host: &str) -> Vec<u16>;
    /// Whether a rule names `host` exactly (what an IP-literal destination needs).
    fn names_exactly(&self, host: &str) -> bool;
}

/// No rules loaded: [`DEFAULT_PORTS`] for every name, no IP literal.
struct NoRules;

impl DestinationRules for NoRules {
    fn allows_port(&self, _: &str, port: u16) -> bool {
        DEFAULT_PORTS.contains(&port)
    }
    fn ports_for(&self, _: &str) -> Vec<u16> {
        DEFAULT_PORTS.to_vec()
    }
    fn names_exactly(&self, _: &str) -> bool {
        false
    }
}

/// Checks destinations against the mapping rules and the sidecar's resolution.
pub struct Binder {
    rules: Arc<dyn DestinationRules>,
    resolver: Resolver,
}

impl Default for Binder {
    /// No rules: 443 only and no IP literal, until [`Binder::new`] with the loaded rules.
    fn default() -> Self {
        Self::new(Arc::new(NoRules))
    }
}

impl Binder {
    pub fn new(rules: Arc<dyn DestinationRules>) -> Self {
        Self {
            rules,
            resolver: Resolver::default(),
        }
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The upstream address for `req`, or why there is none (see the module docs).
    pub async fn bind(&self, req: BindRequest<'_>) -> Result<SocketAddr, Unbound> {
        let literal = match req.name {
            None => match req.claimed {
                Some(c) => Some(c.ip()),
                None => {
                    return Err(Unbound::Unresolved(
                        "no destination known for this connection".into(),
                    ));
                }
            },
            Some(n) => n.trim_matches(['[', ']']).parse::<IpAddr>().ok(),
        };
        if let Some(ip) = literal {
            return self.bind_literal(req, ip.to_canonical());
        }
        let name = req.name.unwrap_or_default();
        let port_mismatch = |ips: &[IpAddr], c: SocketAddr| {
            self.mismatch(
                req,
                ips,
                format!(
                    "port {} is not a destination port of {name} (allowed: {}; a mapping rule's `ports` names others)",
                    c.port(),
                    self.allowed_ports(name, req.configured)
                ),
            )
        };
        if let Some(a) = req.configured {
            return match req.claimed {
                Some(c) if !self.port_allowed(name, c.port(), req.configured) => {
                    Err(port_mismatch(&[a.ip()], c))
                }
                Some(c) if c.ip().to_canonical() != a.ip().to_canonical() => Err(self.mismatch(
                    req,
                    &[a.ip()],
                    format!(
                        "the connection's destination {c} is not {name}'s configured address {a}"
                    ),
                )),
                _ => Ok(a),
            };
        }
        let Some(c) = req.claimed else {
            let (ips, _) = self
                .resolver
                .addresses(name)
                .await
                .map_err(Unbound::Unresolved)?;
            return Ok(SocketAddr::new(ips[0], req.port));
        };
        let want = c.ip().to_canonical();
        let unresolved =
            |e: String| self.mismatch(req, &[], format!("{e}: cannot check the destination {c}"));
        let ips = match self.resolver.addresses(name).await {
            Ok((ips, age)) if ips.contains(&want) || age < MISMATCH_REFRESH => ips,
            Ok(_) => self.resolver.refresh(name).await.map_err(unresolved)?,
            Err(e) => return Err(unresolved(e)),
        };
        if !self.port_allowed(name, c.port(), None) {
            return Err(port_mismatch(&ips, c));
        }
        if ips.contains(&want) {
            return Ok(SocketAddr::new(want, c.port()));
        }
        Err(self.mismatch(
            req,
            &ips,
            format!(
                "the connection's destination {c} is not an address of {name} ({}): the upstream is the decided name's, never one the client chose",
                list(&ips)
            ),
        ))
    }

    /// An IP with no name: allowed only where a rule names it exactly.
    fn bind_literal(&self, req: BindRequest<'_>, ip: IpAddr) -> Result<SocketAddr, Unbound> {
        let addr = SocketAddr::new(ip, req.port);
        let (with_port, bare) = (addr.to_string(), ip.to_string());
        if !self.rules.names_exactly(&with_port) && !self.rules.names_exactly(&bare) {
            return Err(self.mismatch(
                req,
                &[],
                format!(
                    "{addr} is an IP address with no name; only a mapping rule naming {bare} (or {with_port}) exactly allows it"
                ),
            ));
        }
        if let Some(c) = req.claimed {
            if c.ip().to_canonical() != ip {
                return Err(self.mismatch(
                    req,
                    &[ip],
                    format!("the connection's destination {c} is not the named address {ip}"),
                ));
            }
            if !self.rules.names_exactly(&with_port) && !self.rules.allows_port(&bare, c.port()) {
                return Err(self.mismatch(
                    req,
                    &[ip],
                    format!(
                        "port {} is not a destination port of {bare} (allowed: {})",
                        c.port(),
                        list(&self.rules.ports_for(&bare))
                    ),
                ));
            }
        }
        Ok(addr)
    }

    fn port_allowed(&self, name: &str, port: u16, configured: Option<SocketAddr>) -> bool {
        configured.is_some_and(|a| a.port() == port) || self.rules.allows_port(name, port)
    }

    fn allowed_ports(&self, name: &str, configured: Option<SocketAddr>) -> String {
        let mut p = self.rules.ports_for(name);
        p.extend(configured.map(|a| a.port()));
        p.sort_unstable();
        p.dedup();
        list(&p)
    }

    fn mismatch(&self, req: BindRequest<'_>, addresses: &[IpAddr], detail: String) -> Unbound {
        let name = req.name.unwrap_or_default();
        Unbound::Mismatch(Mismatch {
            record: json!({
                "name": req.name,
                "port": req.port,
                "addresses": addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "allowed_ports": self.rules.ports_for(name),
                "configured": req.configured.map(|a| a.to_string()),
                "original_dst": req.claimed.map(|a| a.to_string()),
            }),
            detail,
        })
    }
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::mapping::MappingRules;
    use std::path::Path;

    fn binder(text: &str) -> Binder {
        let f = Path::new("t.toml");
        let rules =
            MappingRules::from_rules(MappingRules::parse_file(text, f).unwrap(), vec![f.into()])
                .unwrap();
        Binder::new(Arc::new(rules))
    }

    const RULES: &str = r#"
        [[rule]]
        host = "api.example.com"
        path = "/v1/*"
        action_class = "a"
        [[rule]]
        host = "plain.example.com"
        ports = [80, 8080]
        action_class = "a"
        [[rule]]
        host = "10.0.0.5:5432"
        action_class = "a"
    "#;

    fn req<'a>(name: Option<&'a str>, claimed: &str) -> BindRequest<'a> {
        let c: SocketAddr = claimed.parse().unwrap();
        BindRequest {
            name,
            port: c.port(),
            claimed: Some(c),
            configured: None,
        }
    }

    fn reason(r: Result<SocketAddr, Unbound>) -> String {
        match r {
            Err(Unbound::Mismatch(m)) => m.detail,
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_original_destination_must_be_the_names() {
        let b = binder(RULES);
        let ips: Arc<[IpAddr]> = vec!["10.0.0.1".parse().unwrap()].into();
        b.resolver().insert("api.example.com", ips.clone());
        b.resolver().insert("plain.example.com", ips);
        let ok = b
            .bind(req(Some("api.example.com"), "10.0.0.1:443"))
            .await
            .unwrap();
        assert_eq!(ok, "10.0.0.1:443".parse().unwrap());
        let d = reason(b.bind(req(Some("api.example.com"), "10.0.0.66:443")).await);
        assert!(d.contains("10.0.0.66:443") && d.contains("10.0.0.1"), "{d}");
        // Port: 443 by default, others only where a rule says so.
        let d = reason(b.bind(req(Some("api.example.com"), "10.0.0.1:8081")).await);
        assert!(d.contains("port 8081"), "{d}");
        assert!(
            b.bind(req(Some("plain.example.com"), "10.0.0.1:80"))
                .await
                .is_ok()
        );
        let d = reason(b.bind(req(Some("plain.example.com"), "10.0.0.1:443")).await);
        assert!(d.contains("allowed: 80, 8080"), "{d}");
        // IPv4-mapped original destinations compare as IPv4.
        assert!(
            b.bind(req(Some("api.example.com"), "[::ffff:10.0.0.1]:443"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn ip_literals_need_a_rule_naming_them() {
        let b = binder(RULES);
        assert!(b.bind(req(None, "10.0.0.5:5432")).await.is_ok());
        let d = reason(b.bind(req(None, "10.0.0.5:5433")).await);
        assert!(d.contains("no name"), "{d}");
        let d = reason(b.bind(req(Some("10.0.0.66"), "10.0.0.66:443")).await);
        assert!(d.contains("no name"), "{d}");
        // A Host naming a ruled address while connected elsewhere.
        let d = reason(b.bind(req(Some("10.0.0.5"), "10.0.0.6:5432")).await);
        assert!(d.contains("10.0.0.6:5432"), "{d}");
    }

    #[tokio::test]
    async fn a_configured_address_is_the_names_only_address() {
        let b = binder(RULES);
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let configured = Some(addr);
        let mut r = req(Some("api.example.com"), "127.0.0.1:8443");
        r.configured = configured;
        assert_eq!(b.bind(r).await.unwrap(), addr);
        let mut r = req(Some("api.example.com"), "10.0.0.9:8443");
        r.configured = configured;
        assert!(reason(b.bind(r).await).contains("configured address"));
        // No claim (http_proxy): the configured address, whatever the URL's port.
        let r = BindRequest {
            name: Some("api.example.com"),
            port: 443,
            claimed: None,
            configured,
        };
        assert_eq!(b.bind(r).await.unwrap(), addr);
    }
}
