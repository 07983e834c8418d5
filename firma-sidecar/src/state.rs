//! Everything a connection handler needs, built once at startup and shared.

use crate::audit::{AuditInput, AuditLog};
use crate::connector::Connector;
use crate::drain::Drain;
use crate::pipeline::{ConnectionInfo, InterceptKind, Pipeline, Workload};
use crate::tls::HostPatterns;
use crate::tls::leaf::LeafCache;
use firma_common::config::SidecarConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a non-strict intercepted host whose MITM handshake failed is tunnelled blind
/// instead of intercepted (see [`Mitm::note_failure`]).
pub const MITM_FALLBACK: Duration = Duration::from_secs(300);

/// MITM settings and the leaf certificate cache.
pub struct Mitm {
    pub intercept: HostPatterns,
    pub strict: HostPatterns,
    pub leaves: LeafCache,
    fallback: Mutex<HashMap<String, Instant>>,
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
            leaves,
            fallback: Mutex::new(HashMap::new()),
        }
    }

    /// MITM-fallback decision: strict hosts (which are intercepted even if not listed in
    /// `intercept_hosts`) are always intercepted, and a failed interception denies. A
    /// non-strict intercepted host whose interception failed (the client rejected our
    /// certificate, e.g. a pinned client) is tunnelled blind with a destination-level decision
    /// for [`MITM_FALLBACK`], like a plain `CONNECT` proxy would: weaker (no per-request policy,
    /// no credential), which is exactly what `strict_hosts` exists to forbid.
    pub fn plan(&self, host: &str) -> TlsPlan {
        if self.strict.matches(host) {
            return TlsPlan::Intercept { strict: true };
        }
        if !self.intercept.matches(host) {
            return TlsPlan::Tunnel;
        }
        let mut fb = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        match fb.get(host) {
            Some(at) if at.elapsed() < MITM_FALLBACK => TlsPlan::Tunnel,
            Some(_) => {
                fb.remove(host);
                TlsPlan::Intercept { strict: false }
            }
            None => TlsPlan::Intercept { strict: false },
        }
    }

    pub fn note_failure(&self, host: &str) {
        if !self.strict.matches(host) {
            let mut fb = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
            fb.insert(host.to_string(), Instant::now());
        }
    }
}

pub struct SidecarState {
    pub pipeline: Pipeline,
    pub audit: AuditLog,
    pub connector: Connector,
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
        mitm: Option<Mitm>,
        drain: Drain,
    ) -> Self {
        Self {
            pipeline,
            audit,
            connector,
            mitm,
            drain,
            next_conn_id: AtomicU64::new(1),
        }
    }

    /// TLS plan for `host`; without MITM everything is tunnelled.
    pub fn tls_plan(&self, host: &str) -> TlsPlan {
        self.mitm.as_ref().map_or(TlsPlan::Tunnel, |m| m.plan(host))
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

    /// Records one decision (exactly one call per decision).
    pub fn record(&self, input: AuditInput<'_>) {
        self.audit.record(input);
    }
}
