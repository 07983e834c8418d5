//! The DNS guard (transparent mode, `redirect_dns`): tagged workloads resolve names only here.
//!
//! The eBPF programs send every UDP and TCP port-53 exchange of a tagged workload, whatever
//! resolver address it used, to this listener (127.0.0.1 and [::1], `[sidecar.dns] port`) and
//! record the resolver it asked and who asked (cgroup, pid): UDP queries are looked up by source
//! address in the DNS peer map, TCP connections like any redirected connection. Per query:
//!
//! 1. rate limit per workload cgroup (governor); over it the query is dropped unanswered and
//!    counted by the audit's aggregation: one `deny_summary` (`DnsDenied`,
//!    `dns.rate_limited` = the count) per workload per aggregation window (10 s by default);
//! 2. decode strictly ([`query::decode`]): malformed, oversized, multi-question, non-QUERY,
//!    signed or EDNS-version tricks get FORMERR/NOTIMP (or nothing, for responses and runts),
//!    audited as `MalformedRequest`;
//! 3. decide: a name outside the [`AllowList`] gets NXDOMAIN (`DnsDenied`), an allowed name with a
//!    type other than A, AAAA, CNAME, HTTPS gets REFUSED (`DnsDenied`); nothing leaves the host;
//! 4. allowed: the ALLOW decision is persisted, then a query of the guard's own making (the name
//!    and type only) goes to the upstream resolvers and their answer goes back unchanged under the
//!    client's id; an `outcome` event records rcode, answer count and CNAME chain.
//!
//! Every query is one audit `decision` (plus an `outcome` for allows) with `conn.intercept =
//! "dns"`, `envelope.intent.method = "DNS"`, `resource.host = qname` and `envelope.intent.dns`.
//! A query with no kernel record (sent to the listener directly) is audited and dropped.

mod allow;
pub mod metrics;
pub mod query;
mod upstream;

pub use allow::AllowList;
pub use upstream::{Upstream, UpstreamError, resolv_conf_servers};

use crate::audit::{AggregateKind, Denial, RequestAudit};
use crate::config::SidecarConfig;
use crate::conn::{ConnectorOutcome, Decision, DenyReason, InterceptKind, Outcome, Workload};
use crate::drain::Drain;
use crate::ebpf::Redirector;
use crate::interceptor::limits::Limits;
use crate::interceptor::redirect_listener::{self as listener, Redirected, Unredirected};
use crate::state::SidecarState;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use metrics::DnsOutcome;
use query::{Decoded, Question};
use serde_json::{Map, Value, json};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Queries being answered at once (all workloads); beyond it queries are dropped and counted.
const MAX_IN_FLIGHT: usize = 1024;
/// A TCP connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "[sidecar.dns] port {port}: cannot listen on 127.0.0.1 and [::1] (UDP and TCP): {cause}"
    )]
    Bind { port: u16, cause: std::io::Error },
}

/// How a query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// Who sent a query, as the kernel recorded it.
#[derive(Debug, Clone)]
struct Origin {
    peer: SocketAddr,
    /// The resolver the workload asked; `None`: no kernel record.
    original_dst: Option<SocketAddr>,
    workload: Option<Workload>,
    /// Rate-limit key: the cgroup id, 0 for queries with no record.
    cgroup: u64,
}

/// The `qtype` label of the DNS query counter: a small fixed set.
fn qtype_class(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        _ => "other",
    }
}

/// The A/AAAA/CNAME/HTTPS questions an allowed name is resolved for; other types are REFUSED.
fn forwarded(t: RecordType) -> bool {
    matches!(
        t,
        RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::HTTPS
    )
}

pub struct DnsGuard {
    state: Arc<SidecarState>,
    redirector: Arc<Redirector>,
    allow: AllowList,
    upstream: Upstream,
    limiter: DefaultKeyedRateLimiter<u64>,
    /// Why queries are dropped, for the audit summaries of rate-limited queries.
    drop_detail: String,
    in_flight: Arc<Semaphore>,
}

impl DnsGuard {
    /// The allow list from every host the configuration names, the upstream resolvers, the rate.
    pub fn new(state: Arc<SidecarState>, cfg: &SidecarConfig, redirector: Arc<Redirector>) -> Self {
        let allow = allow_list(cfg, &state.pipeline.mapping_hosts());
        let servers: Vec<SocketAddr> = if cfg.dns.upstream.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| resolv_conf_servers(&t))
                .unwrap_or_default()
        } else {
            cfg.dns
                .upstream
                .iter()
                .filter_map(|u| crate::config::parse_dns_server(u))
                .collect()
        };
        let d = &cfg.dns;
        let qps = NonZeroU32::new(d.queries_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(d.burst).unwrap_or(qps);
        let upstream = Upstream::new(
            servers,
            Duration::from_millis(d.upstream_timeout_ms),
            cfg.interceptor.transparent.socket_mark,
        );
        Self {
            state,
            redirector,
            allow,
            upstream,
            limiter: RateLimiter::keyed(Quota::per_second(qps).allow_burst(burst)),
            drop_detail: format!(
                "queries_per_second = {}, burst = {}, or {MAX_IN_FLIGHT} in flight",
                d.queries_per_second, d.burst
            ),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    fn udp_origin(&self, peer: SocketAddr) -> Origin {
        match self.redirector.dns_origin(peer) {
            Some(orig) => Origin {
                peer,
                original_dst: Some(orig.socket_addr()),
                workload: self.redirector.workload(&orig),
                cgroup: orig.cgroup_id,
            },
            None => Origin {
                peer,
                original_dst: None,
                workload: None,
                cgroup: 0,
            },
        }
    }

    /// Rate limit and concurrency cap; `None` (counted, reported later) when over either.
    fn admit(&self, o: &Origin) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.limiter.check_key(&o.cgroup).is_ok()
            && let Ok(p) = self.in_flight.clone().try_acquire_owned()
        {
            return Some(p);
        }
        metrics::query(DnsOutcome::RateLimited, "unknown");
        // Counted, never written one by one: the audit's aggregation writes one summary per
        // workload per window with `dns.rate_limited` = the count (docs/architecture.md).
        self.state.audit.count_denial(&Denial {
            kind: AggregateKind::DnsRateLimited,
            intercept: InterceptKind::Dns,
            conn_id: None,
            peer: o.peer,
            original_dst: o.original_dst,
            workload: o.workload.as_ref(),
            reason: DenyReason::DnsDenied,
            method: Some("DNS"),
            host: None,
            port: o.original_dst.map_or(53, |a| a.port()),
            path: None,
            detail: &self.drop_detail,
        });
        None
    }

    /// Decodes, decides, audits and (when allowed) resolves one query; the bytes to send back.
    /// Counted and timed here (`firma_sidecar_dns_*`).
    async fn answer(&self, raw: &[u8], o: &Origin, t: Transport) -> Option<Vec<u8>> {
        let started = Instant::now();
        let (reply, outcome, qtype) = self.answer_counted(raw, o, t).await;
        metrics::query(outcome, qtype);
        if reply.is_some() {
            metrics::answer(started.elapsed(), outcome == DnsOutcome::Allowed);
        }
        reply
    }

    async fn answer_counted(
        &self,
        raw: &[u8],
        o: &Origin,
        t: Transport,
    ) -> (Option<Vec<u8>>, DnsOutcome, &'static str) {
        let conn = self.state.new_conn(
            InterceptKind::Dns,
            o.peer,
            o.original_dst,
            o.workload.clone(),
        );
        let port = o.original_dst.map_or(53, |a| a.port());
        let mut fields = Map::new();
        fields.insert("transport".into(), t.as_str().into());
        let audit = RequestAudit::new(&self.state.audit, &conn)
            .method(Some("DNS"))
            .target(None, port, None);
        if o.original_dst.is_none() {
            tracing::warn!(peer = %o.peer, "DNS query without a redirect record; dropped");
            audit.dns(fields).deny(&Decision::deny(
                DenyReason::MalformedRequest,
                format!(
                    "query from {} reached the DNS listener without a redirect record (not redirected by the kernel, or its entry expired); dropped",
                    o.peer
                ),
            ));
            return (None, DnsOutcome::Dropped, "unknown");
        }
        match query::decode(raw) {
            Decoded::Drop { why } => {
                fields.insert("malformed".into(), why.clone().into());
                audit.dns(fields).deny(&Decision::deny(
                    DenyReason::MalformedRequest,
                    format!("dropped: {why}"),
                ));
                (None, DnsOutcome::Dropped, "unknown")
            }
            Decoded::Reject {
                id,
                op_code,
                rcode,
                why,
            } => {
                fields.insert("malformed".into(), why.clone().into());
                fields.insert("rcode".into(), rcode.to_str().into());
                audit.dns(fields).deny(&Decision::deny(
                    DenyReason::MalformedRequest,
                    format!("{why}; answered {}", rcode.to_str()),
                ));
                (
                    Some(query::header_only(id, op_code, rcode)),
                    DnsOutcome::Malformed,
                    "unknown",
                )
            }
            Decoded::Query(q) => {
                let qtype = qtype_class(q.qtype);
                let (reply, outcome) = self.decide(q, audit, fields, o, t).await;
                (Some(reply), outcome, qtype)
            }
        }
    }

    async fn decide(
        &self,
        q: Question,
        audit: RequestAudit,
        mut fields: Map<String, Value>,
        o: &Origin,
        t: Transport,
    ) -> (Vec<u8>, DnsOutcome) {
        fields.insert("qname".into(), q.qname.clone().into());
        fields.insert("qtype".into(), q.qtype.to_string().into());
        let port = o.original_dst.map_or(53, |a| a.port());
        let deny = |audit: RequestAudit,
                    mut fields: Map<String, Value>,
                    reason,
                    detail: String,
                    rcode: ResponseCode| {
            fields.insert("rcode".into(), rcode.to_str().into());
            audit.dns(fields).deny(&Decision::deny(reason, detail));
            let outcome = if rcode == ResponseCode::NXDomain {
                DnsOutcome::Denied
            } else {
                DnsOutcome::Refused
            };
            (query::reply(&q, rcode), outcome)
        };
        let audit = audit.target(Some(&q.qname), port, None);
        if o.workload.is_none() {
            return deny(
                audit,
                fields,
                DenyReason::WorkloadMismatch,
                format!(
                    "query from {} was redirected but its cgroup has no workload binding any more; refused",
                    o.peer
                ),
                ResponseCode::Refused,
            );
        }
        let Some(pattern) = self.allow.matches(&q.qname) else {
            return deny(
                audit,
                fields,
                DenyReason::DnsDenied,
                format!(
                    "name {} is not one this configuration sends traffic to (intercept, mapping-rule, connector or credential host, or [sidecar.dns] allow); answered NXDOMAIN, nothing was sent upstream",
                    q.qname
                ),
                ResponseCode::NXDomain,
            );
        };
        if !forwarded(q.qtype) {
            return deny(
                audit,
                fields,
                DenyReason::DnsDenied,
                format!(
                    "query type {} is not answered for allowed names (A, AAAA, CNAME, HTTPS only); answered REFUSED, nothing was sent upstream",
                    q.qtype
                ),
                ResponseCode::Refused,
            );
        }
        let decision = Decision {
            outcome: Outcome::Allow,
            reason: None,
            detail: format!("allowed name (matches {pattern})"),
            action_class: None,
            passthrough: false,
            capability: None,
            matched_policies: Vec::new(),
            timings_us: Vec::new(),
        };
        let mut committed = match audit
            .dns(fields)
            .commit(&decision, ConnectorOutcome::default())
            .await
        {
            Ok(c) => c,
            Err((audit, e)) => {
                audit.deny_unaudited(&e);
                return (
                    query::reply(&q, ResponseCode::ServFail),
                    DnsOutcome::AuditFailed,
                );
            }
        };
        let started = Instant::now();
        let result = self.upstream.resolve(&q, t == Transport::Tcp).await;
        let upstream_us = started.elapsed().as_micros() as u64;
        match result {
            Ok((bytes, a, server)) => {
                // What the workload was told is where the name is: the destination binding
                // accepts these addresses for it (connector::binding).
                self.state
                    .connector
                    .binder()
                    .resolver()
                    .learn(&q.qname, &a.addresses);
                let mut f = Map::new();
                f.insert("rcode".into(), a.rcode.to_str().into());
                f.insert("answers".into(), a.answers.into());
                f.insert("truncated".into(), a.truncated.into());
                f.insert("cname_chain".into(), json!(a.cname_chain));
                f.insert("upstream".into(), server.to_string().into());
                committed.dns_result(f);
                committed.finish(ConnectorOutcome {
                    upstream_us,
                    bytes_up: Some(0),
                    bytes_down: Some(bytes.len() as u64),
                    ..ConnectorOutcome::default()
                });
                (bytes, DnsOutcome::Allowed)
            }
            Err(e) => {
                tracing::warn!(qname = %q.qname, error = %e, "DNS upstream failed");
                metrics::upstream_error(e.kind());
                let mut f = Map::new();
                f.insert("rcode".into(), ResponseCode::ServFail.to_str().into());
                f.insert("upstream_error".into(), e.to_string().into());
                committed.dns_result(f);
                committed.finish(ConnectorOutcome {
                    upstream_us,
                    aborted: Some(e.abort_reason().into()),
                    ..ConnectorOutcome::default()
                });
                (
                    query::reply(&q, ResponseCode::ServFail),
                    DnsOutcome::Allowed,
                )
            }
        }
    }
}

/// Every host the configuration can send traffic to, plus `[sidecar.dns] allow`.
pub fn allow_list(cfg: &SidecarConfig, mapping_hosts: &[String]) -> AllowList {
    let mitm = &cfg.interceptor.https_mitm;
    AllowList::new(
        mitm.intercept_hosts
            .iter()
            .chain(&mitm.strict_hosts)
            .chain(mapping_hosts)
            .chain(cfg.connector.hosts.iter().map(|h| &h.host))
            .chain(cfg.credentials.iter().map(|c| &c.host))
            .chain(&cfg.dns.allow),
    )
}

/// Binds the DNS listeners (UDP and TCP on 127.0.0.1:port and [::1]:port) and serves them under
/// `drain`. Fails if any cannot be bound: half a guard would refuse some workloads' DNS without
/// saying why.
pub async fn serve(
    guard: Arc<DnsGuard>,
    port: u16,
    drain: Drain,
    limits: Arc<Limits>,
) -> Result<(), DnsError> {
    let bind_err = |source| DnsError::Bind {
        port,
        cause: source,
    };
    let addrs = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for a in addrs {
        udp.push(UdpSocket::bind(a).await.map_err(bind_err)?);
        tcp.push(TcpListener::bind(a).await.map_err(bind_err)?);
    }
    tracing::info!(
        target: "firma_sidecar",
        port,
        upstream = ?guard.upstream.servers(),
        allow = ?guard.allow.patterns(),
        "DNS guard listening on 127.0.0.1:{port} and [::1]:{port} (UDP and TCP)"
    );
    if guard.upstream.servers().is_empty() {
        tracing::warn!(
            "DNS guard: no upstream resolver ([sidecar.dns] upstream empty and none in /etc/resolv.conf); allowed names get SERVFAIL"
        );
    }
    for s in udp {
        drain.spawn(udp_loop(guard.clone(), Arc::new(s), drain.clone()));
    }
    for l in tcp {
        let (g, r) = (guard.clone(), guard.clone());
        drain.spawn(listener::accept_loop(
            l,
            guard.redirector.clone(),
            drain.clone(),
            limits.clone(),
            move |c| tcp_conn(g.clone(), c),
            move |u: Unredirected| {
                let o = Origin {
                    peer: u.peer,
                    original_dst: None,
                    workload: None,
                    cgroup: 0,
                };
                if r.admit(&o).is_some() {
                    let r = r.clone();
                    tokio::spawn(async move { r.answer(&[], &o, Transport::Tcp).await });
                }
            },
        ));
    }
    Ok(())
}

async fn udp_loop(guard: Arc<DnsGuard>, sock: Arc<UdpSocket>, drain: Drain) {
    // One byte more than any datagram, so an oversized one is seen whole (and refused).
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            _ = drain.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
        };
        let origin = guard.udp_origin(peer);
        let Some(permit) = guard.admit(&origin) else {
            continue;
        };
        let bytes = buf[..n].to_vec();
        let (g, s) = (guard.clone(), sock.clone());
        drain.spawn(async move {
            let _permit = permit;
            if let Some(reply) = g.answer(&bytes, &origin, Transport::Udp).await
                && let Err(e) = s.send_to(&reply, origin.peer).await
            {
                tracing::debug!(peer = %origin.peer, error = %e, "DNS UDP reply not sent");
            }
        });
    }
}

/// One redirected TCP connection: length-prefixed queries, answered in turn.
async fn tcp_conn(guard: Arc<DnsGuard>, c: Redirected) {
    let Redirected {
        mut stream,
        peer,
        original_dst,
        workload,
    } = c;
    let origin = Origin {
        peer,
        original_dst: Some(original_dst),
        cgroup: workload.as_ref().map_or(0, |w| w.cgroup_id),
        workload,
    };
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            // Closed between queries, or idle: nothing to audit.
            _ => return,
        };
        let mut body = vec![0u8; len];
        let mut got = 0;
        // A stall leaves `got` at what did arrive.
        let _ = tokio::time::timeout(TCP_IDLE, read_full(&mut stream, &mut body, &mut got)).await;
        let Some(_permit) = guard.admit(&origin) else {
            return;
        };
        if got < len {
            // The length prefix promised more than arrived: audited, connection closed.
            let mut f = Map::new();
            f.insert("transport".into(), "tcp".into());
            let why = format!(
                "TCP length prefix says {len} bytes, the connection delivered {got} before closing or stalling"
            );
            f.insert("malformed".into(), why.clone().into());
            let conn = guard.state.new_conn(
                InterceptKind::Dns,
                origin.peer,
                origin.original_dst,
                origin.workload.clone(),
            );
            RequestAudit::new(&guard.state.audit, &conn)
                .method(Some("DNS"))
                .target(None, original_dst.port(), None)
                .dns(f)
                .deny(&Decision::deny(DenyReason::MalformedRequest, why));
            metrics::query(DnsOutcome::Dropped, "unknown");
            return;
        }
        let Some(reply) = guard.answer(&body, &origin, Transport::Tcp).await else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// Reads until `buf` is full or the peer stops, counting what arrived in `got`.
async fn read_full(s: &mut TcpStream, buf: &mut [u8], got: &mut usize) {
    while *got < buf.len() {
        match s.read(&mut buf[*got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => *got += n,
        }
    }
}
