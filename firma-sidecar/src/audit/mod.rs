//! One signed audit event per decision, allow or deny.
//!
//! CONTRACT STUB: the audit work replaces the body (event JSON, signing, sinks); the
//! signatures of [`AuditLog::start`] and [`AuditLog::record`] are what interceptors call.

use crate::pipeline::{ConnectionInfo, Decision};
use firma_common::config::AuditConfig;
use std::sync::Arc;

/// What the connector did after an allow (absent for denials: nothing was sent).
#[derive(Debug, Clone, Default)]
pub struct ConnectorOutcome {
    pub credential_injected: bool,
    /// `"basic"` or `"vault"` when a credential was injected.
    pub credential_source: Option<&'static str>,
    /// Upstream response status, when one arrived.
    pub upstream_status: Option<u16>,
    /// Set when the upstream failed after the allow (502/504 to the client).
    pub aborted: Option<String>,
    /// Time from sending the request upstream to the response head.
    pub upstream_us: u64,
}

/// Everything one audit event is made from.
#[derive(Debug, Clone)]
pub struct AuditInput<'a> {
    pub conn: &'a ConnectionInfo,
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
    pub path: Option<&'a str>,
    pub decision: &'a Decision,
    pub connector: Option<ConnectorOutcome>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Startup(String),
}

/// The configured sink. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    _inner: Arc<()>,
}

impl AuditLog {
    pub async fn start(_cfg: &AuditConfig) -> Result<Self, AuditError> {
        Ok(Self {
            _inner: Arc::new(()),
        })
    }

    /// Records one decision. Never blocks the request path on I/O for long.
    pub fn record(&self, input: AuditInput<'_>) {
        tracing::info!(target: "firma_audit", decision = ?input.decision.outcome, "audit (stub)");
    }

    /// Flushes buffered events (called on shutdown).
    pub async fn flush(&self) {}
}
