//! Everything a connection handler needs, built once at startup and shared.

use crate::audit::AuditLog;
use crate::config::SidecarConfig;
use crate::conn::{ConnectionInfo, InterceptKind, Workload};
use crate::connector::Connector;
use crate::drain::Drain;
use crate::error_shape::ErrorShapes;
use crate::pipeline::Pipeline;
use crate::tls::HostPatterns;
use crate::tls::leaf::LeafCache;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a non-strict intercepted host whose MITM handshake failed is tunnelled blind
/// instead of intercepted (see [`Mitm::note_failure`]).
pub const MITM_FALLBACK: Duration = Duration::from_secs(300);

/// Most (client, host) fallback entries kept; the oldest is forgotten first (it then gets
/// MITM again, the safe side).
const FALLBACK_ENTRIES: usize = 4096;

/// MITM settings and the leaf certificate cache.
pub struct Mitm {
    pub intercept: HostPatterns,
    pub strict: HostPatterns,
    /// `fallback_hosts`: the only hosts a certificate-rejecting client may be tunnelled to.
    pub fallback_hosts: HostPatterns,
    pub leaves: LeafCache,
    /// (client, host) pairs whose interception failed recently. Keyed by the client so that
    /// nothing one client does changes how another client's connections are treated.
    fallback: Mutex<lru::LruCache<(ClientKey, String), Instant>>,
}

/// Who a connection belongs to, for per-client state: the workload's cgroup in transparent
/// mode (the kernel's word), else the peer's IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Cgroup(u64),
    Ip(std::net::IpAddr),
}

impl ClientKey {
    pub fn of(conn: &ConnectionInfo) -> Self {
        match &conn.workload {
            Some(w) => Self::Cgroup(w.cgroup_id),
            None => Self::Ip(conn.peer.ip()),
        }
    }
}

/// What to do with TLS to a given host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPlan {
    /// Terminate TLS and run each request through the pipeline.
    Intercept { strict: bool },
    /// Destination-level decision and blind tunnel.
    Tunnel,
}

impl Mitm {
    pub fn new(cfg: &SidecarConfig, leaves: LeafCache) -> Self {
        let m = &cfg.interceptor.https_mitm;
        Self {
            intercept: HostPatterns::new(&m.intercept_hosts),
            strict: HostPatterns::new(&m.strict_hosts),
            fallback_hosts: HostPatterns::new(&m.fallback_hosts),
            leaves,
            fallback: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(FALLBACK_ENTRIES)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// MITM-fallback decision: strict hosts (which are intercepted even if not listed in
    /// `intercept_hosts`) are always intercepted. The fallback is opt-in per host
    /// (`fallback_hosts`): only there is an intercepted host whose interception a client
    /// rejected (a pinned client, or one that does not trust the Firma CA) tunnelled blind for
    /// that client with a destination-level decision for [`MITM_FALLBACK`], like a plain
    /// `CONNECT` proxy would: weaker (no per-request policy, no credential). Everywhere else a
    /// rejecting client just has its connection closed. The fallback is kept per (client,
    /// host): one client cannot switch a host to blind tunnelling for anyone else.
    pub fn plan(&self, client: &ClientKey, host: &str) -> TlsPlan {
        if self.strict.matches(host) {
            return TlsPlan::Intercept { strict: true };
        }
        if !self.intercept.matches(host) {
            return TlsPlan::Tunnel;
        }
        if !self.fallback_hosts.matches(host) {
            return TlsPlan::Intercept { strict: false };
        }
        let mut fb = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        let key = (client.clone(), host.to_string());
        match fb.get(&key) {
            Some(at) if at.elapsed() < MITM_FALLBACK => TlsPlan::Tunnel,
            Some(_) => {
                fb.pop(&key);
                TlsPlan::Intercept { strict: false }
            }
            None => TlsPlan::Intercept { strict: false },
        }
    }

    /// Whether a client that rejects the certificate for `host` may fall back (opt-in).
    pub fn may_fall_back(&self, host: &str) -> bool {
        !self.strict.matches(host) && self.fallback_hosts.matches(host)
    }

    pub fn note_failure(&self, client: &ClientKey, host: &str) {
        if self.may_fall_back(host) {
            let mut fb = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
            fb.put((client.clone(), host.to_string()), Instant::now());
        }
    }
}

pub struct SidecarState {
    pub pipeline: Pipeline,
    pub audit: AuditLog,
    pub connector: Connector,
    /// The error shape of Firma's own answers per host (read before any decision).
    pub error_shapes: ErrorShapes,
    /// `None` when `[sidecar.interceptor.https_mitm] enabled = false`.
    pub mitm: Option<Mitm>,
    pub drain: Drain,
    next_conn_id: AtomicU64,
}

impl SidecarState {
    pub fn new(
        pipeline: Pipeline,
        audit: AuditLog,
        connector: Connector,
        error_shapes: ErrorShapes,
        mitm: Option<Mitm>,
        drain: Drain,
    ) -> Self {
        Self {
            pipeline,
            audit,
            connector,
            error_shapes,
            mitm,
            drain,
            next_conn_id: AtomicU64::new(1),
        }
    }

    /// Continues connection ids after `first - 1`, so that ids stay unique within an audit
    /// chain resumed after a restart.
    pub fn resume_conn_ids(&self, first: u64) {
        self.next_conn_id.fetch_max(first, Ordering::Relaxed);
    }

    /// TLS plan for `host` as seen by `conn`'s client; without MITM everything is tunnelled.
    pub fn tls_plan(&self, conn: &ConnectionInfo, host: &str) -> TlsPlan {
        self.mitm
            .as_ref()
            .map_or(TlsPlan::Tunnel, |m| m.plan(&ClientKey::of(conn), host))
    }

    /// A fresh [`ConnectionInfo`] with a process-unique id.
    pub fn new_conn(
        &self,
        kind: InterceptKind,
        peer: SocketAddr,
        original_dst: Option<SocketAddr>,
        workload: Option<Workload>,
    ) -> ConnectionInfo {
        ConnectionInfo {
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            kind,
            peer,
            original_dst,
            workload,
        }
    }
}
