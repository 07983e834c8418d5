//! The ground floor: who a connection belongs to and what was decided about it. Every layer
//! (interceptor, pipeline, connector, audit, ebpf) imports these; this module imports none of
//! them, so no type dependency runs against the flow of a request.

use serde::Serialize;
use std::net::SocketAddr;

/// Why a request was denied. The name is what the client sees in the 403 body
/// (`{"denied":true,"reason":"…","detail":"…"}`) and what the audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DenyReason {
    CapabilityNotFound,
    CapabilityInvalid,
    CapabilityExpired,
    CapabilityRevoked,
    CapabilityScopeMismatch,
    PolicyDenied,
    PolicyBundleStale,
    PolicyBundleNotReady,
    UnclassifiedIntent,
    MalformedRequest,
    EnforcementTimeout,
    CredentialUnavailable,
    WorkloadMismatch,
    /// A credential would leave over plaintext or over TLS not verified for its host.
    InsecureUpstream,
    /// The audit sink cannot persist the decision: nothing is allowed unaudited.
    AuditUnavailable,
    /// A Firma placeholder credential (docs/run.md, "Placeholder credentials") would leave
    /// the sidecar: sent to a host other than its own, or in a header or query parameter that
    /// Firma does not replace on its own host. The agent is sending its key somewhere else.
    CredentialLeak,
    /// DNS guard: the name is not one the configuration can send traffic to (NXDOMAIN), the
    /// query type is not answered (REFUSED), or the workload is over its query rate.
    DnsDenied,
    /// The connection's destination is not one the decision allows: its address is not one of
    /// the decided name's (resolved by the sidecar), its port is not one a rule allows for that
    /// name, an IP literal no rule names, or a request that names two destinations.
    DestinationMismatch,
    /// A body a rule reads attributes from is larger than `extract_max_body_bytes` (413).
    BodyTooLarge,
    /// Bodies read for extraction already fill `extract_body_budget_bytes` (503, retryable).
    BodyBudgetExhausted,
    /// The shared session store (`[sidecar.session_store] backend = "redis"`) cannot be reached,
    /// so the session's counts and budgets cannot be checked (503, retryable).
    SessionStoreUnavailable,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CapabilityNotFound => "CapabilityNotFound",
            Self::CapabilityInvalid => "CapabilityInvalid",
            Self::CapabilityExpired => "CapabilityExpired",
            Self::CapabilityRevoked => "CapabilityRevoked",
            Self::CapabilityScopeMismatch => "CapabilityScopeMismatch",
            Self::PolicyDenied => "PolicyDenied",
            Self::PolicyBundleStale => "PolicyBundleStale",
            Self::PolicyBundleNotReady => "PolicyBundleNotReady",
            Self::UnclassifiedIntent => "UnclassifiedIntent",
            Self::MalformedRequest => "MalformedRequest",
            Self::EnforcementTimeout => "EnforcementTimeout",
            Self::CredentialUnavailable => "CredentialUnavailable",
            Self::WorkloadMismatch => "WorkloadMismatch",
            Self::InsecureUpstream => "InsecureUpstream",
            Self::AuditUnavailable => "AuditUnavailable",
            Self::CredentialLeak => "CredentialLeak",
            Self::DnsDenied => "DnsDenied",
            Self::DestinationMismatch => "DestinationMismatch",
            Self::BodyTooLarge => "BodyTooLarge",
            Self::BodyBudgetExhausted => "BodyBudgetExhausted",
            Self::SessionStoreUnavailable => "SessionStoreUnavailable",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the connection reached the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InterceptKind {
    HttpProxy,
    Transparent,
    /// A DNS query redirected to the DNS guard (transparent mode, `redirect_dns`).
    Dns,
    /// A request decided in the application's own process (`firma-embed`'s layer).
    Embedded,
    /// A request Envoy asked about through the ext_authz API (`[sidecar.ext_authz]`).
    ExtAuthz,
}

/// The workload that opened a connection, as the kernel reported it (transparent mode only).
/// Nothing here comes from the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub cgroup_id: u64,
    /// Path relative to the cgroup2 mount, e.g. `/firma-test/agent-a`.
    pub cgroup_path: String,
    pub pid: u32,
    /// The binding made at attach time.
    pub agent_id: String,
    pub session_id: Option<String>,
}

/// Per-connection facts every request on it shares.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Unique per accepted connection; ties audit events of one connection together.
    pub conn_id: u64,
    pub kind: InterceptKind,
    /// The client's address as the sidecar sees it.
    pub peer: SocketAddr,
    /// Where the client wanted to go (original destination, or resolved/configured upstream).
    pub original_dst: Option<SocketAddr>,
    pub workload: Option<Workload>,
}

/// Which capability cleared Stage 1 (recorded in the audit event, never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilitySummary {
    pub token_id: String,
    pub agent_id: String,
    pub session_id: String,
    pub action_set: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Allow,
    Deny,
}

/// The pipeline's answer for one request or tunnel.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// Set when `outcome == Deny`.
    pub reason: Option<DenyReason>,
    /// Human-readable explanation (never contains secrets).
    pub detail: String,
    /// Action class from the mapping rules; `None` when unmapped.
    pub action_class: Option<String>,
    /// `true` when no rule matched and `default_protected = false` let it through.
    pub passthrough: bool,
    pub capability: Option<CapabilitySummary>,
    /// Cedar policy ids that determined a Stage 2 result.
    pub matched_policies: Vec<String>,
    /// Microseconds spent in each stage (`stage1_us`, `stage2_us`, ...).
    pub timings_us: Vec<(&'static str, u64)>,
}

impl Decision {
    pub fn deny(reason: DenyReason, detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Deny,
            reason: Some(reason),
            detail: detail.into(),
            action_class: None,
            passthrough: false,
            capability: None,
            matched_policies: Vec::new(),
            timings_us: Vec::new(),
        }
    }

    /// Turns an allow into a denial after the pipeline (connector-level refusals), keeping
    /// what the stages found (action class, capability, matched policies, timings).
    pub fn into_deny(self, reason: DenyReason, detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Deny,
            reason: Some(reason),
            detail: detail.into(),
            ..self
        }
    }

    pub fn is_allow(&self) -> bool {
        self.outcome == Outcome::Allow
    }

    /// The 403 body clients receive for a denial.
    pub fn deny_body(&self) -> String {
        serde_json::json!({
            "denied": true,
            "reason": self.reason.map(DenyReason::as_str),
            "detail": self.detail,
        })
        .to_string()
    }
}

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
    /// The client went away after the request was committed (closed, reset its stream).
    pub client_gone: bool,
    /// Tunnels: bytes from the client to the upstream and back.
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
    /// `"h2"` or `"http/1.1"`: what the upstream connection spoke.
    pub upstream_protocol: Option<&'static str>,
    /// Whether the request went on a pooled (already open) upstream connection.
    pub upstream_reused: Option<bool>,
    /// Upgraded sessions (WebSocket): from the 101 to the close.
    pub duration_ms: Option<u64>,
    /// LLM calls: the tokens the response reported and their cost (with a price table).
    pub usage: Option<UsageOutcome>,
    /// MCP endpoints: what the answer contained (`pipeline::mcp::follow::Followed`).
    pub mcp: Option<serde_json::Value>,
}

/// Token usage charged for one LLM response (audit `connector.usage`).
#[derive(Debug, Clone, Default)]
pub struct UsageOutcome {
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// `None` when the model has no `[[sidecar.llm.prices]]` entry.
    pub cost_nano_usd: Option<i64>,
    /// `reported` (the response's usage), `reservation` (its reservation, see `note`) or
    /// `nothing` (a refused request that reported no usage).
    pub charged: &'static str,
    /// Tokens reserved at decision time.
    pub reserved_tokens: i64,
    /// Why the reservation was charged instead of the reported usage.
    pub note: Option<String>,
}
