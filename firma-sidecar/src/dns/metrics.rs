//! The DNS guard's metrics (`firma_sidecar_dns_*`): queries by outcome and type, upstream
//! resolver failures, and answer latency by who answered.

use firma_common::admin::latency_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Duration;

static METRICS: OnceLock<DnsMetrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    outcome: &'static str,
    qtype: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredByLabel {
    answered_by: &'static str,
}

struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    /// timeout, unavailable, no_server.
    upstream_errors: [Counter; 3],
    /// guard, upstream.
    answer: [Histogram; 2],
}

/// What the DNS guard did with one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsOutcome {
    /// Forwarded upstream (the answer, or SERVFAIL when no resolver answered).
    Allowed,
    /// NXDOMAIN: the name is not allowed.
    Denied,
    /// REFUSED: the type is not forwarded, or the workload has no binding any more.
    Refused,
    /// FORMERR or NOTIMP: malformed, answered.
    Malformed,
    /// Dropped unanswered: a runt or response, a TCP length prefix that lies, no redirect record.
    Dropped,
    /// Dropped unanswered: over the per-workload rate or the in-flight cap.
    RateLimited,
    /// SERVFAIL: allowed, but the audit event could not be persisted.
    AuditFailed,
}

impl DnsOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Refused => "refused",
            Self::Malformed => "malformed",
            Self::Dropped => "dropped",
            Self::RateLimited => "rate_limited",
            Self::AuditFailed => "audit_failed",
        }
    }
}

/// Creates the DNS guard's metrics under `dns_` in `r` and turns its hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let r = r.sub_registry_with_prefix("dns");
    let queries = Family::<QueryLabels, Counter>::default();
    r.register(
        "queries",
        "DNS guard queries by outcome (allowed, denied, refused, malformed, dropped, rate_limited, audit_failed) and qtype (A, AAAA, other, unknown when not decoded)",
        queries.clone(),
    );
    let errors = Family::<KindLabel, Counter>::default();
    let upstream_errors = ["timeout", "unavailable", "no_server"]
        .map(|kind| errors.get_or_create(&KindLabel { kind }).clone());
    r.register(
        "upstream_errors",
        "Allowed DNS queries no upstream resolver answered (the client got SERVFAIL), by kind",
        errors,
    );
    let answer_family: Family<AnsweredByLabel, Histogram, fn() -> Histogram> =
        Family::new_with_constructor(|| Histogram::new(latency_buckets()));
    let answer = ["guard", "upstream"].map(|answered_by| {
        answer_family
            .get_or_create(&AnsweredByLabel { answered_by })
            .clone()
    });
    r.register(
        "answer_duration_seconds",
        "From a DNS query's arrival to its answer, by who answered: guard (denials, errors, answered locally) or upstream (allowed, forwarded)",
        answer_family,
    );
    let _ = METRICS.set(DnsMetrics {
        queries,
        upstream_errors,
        answer,
    });
}

/// One DNS query decided. `qtype`: `"A"`, `"AAAA"`, `"other"`, or `"unknown"` (not decoded).
pub fn query(outcome: DnsOutcome, qtype: &'static str) {
    if let Some(m) = METRICS.get() {
        m.queries
            .get_or_create(&QueryLabels {
                outcome: outcome.as_str(),
                qtype,
            })
            .inc();
    }
}

/// One DNS answer sent after `took`; `upstream`: forwarded to a resolver (else answered locally).
pub fn answer(took: Duration, upstream: bool) {
    if let Some(m) = METRICS.get() {
        m.answer[usize::from(upstream)].observe(took.as_secs_f64());
    }
}

/// No upstream resolver answered an allowed query: `kind` is `timeout`, `unavailable` or
/// `no_server`.
pub fn upstream_error(kind: &str) {
    if let Some(m) = METRICS.get() {
        let i = match kind {
            "timeout" => 0,
            "unavailable" => 1,
            _ => 2,
        };
        m.upstream_errors[i].inc();
    }
}
