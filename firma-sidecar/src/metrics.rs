//! Prometheus metrics of the sidecar, and what its admin listener serves.
//!
//! Recording is off unless `[sidecar.admin] listen_addr` is set ([`enable`]); every hook is then
//! one `OnceLock` load and returns. On the hot path hooks touch only atomics: label sets are
//! small fixed enums whose handles are created once at startup (stages, modes, kinds), except
//! the decision counter, whose `action_class` label comes from the mapping rules (a bounded,
//! configured set) and costs one hash lookup. Values that already exist elsewhere (audit
//! counters, bundle age, eBPF counters, leaf certificates minted) are read at scrape time, not
//! counted twice. Names and labels are listed in the README ("Metrics and health").

use crate::conn::{ConnectorOutcome, Decision, InterceptKind, Outcome};
use crate::ebpf::Redirector;
use crate::state::SidecarState;
use firma_common::admin::{AdminSource, Check, latency_buckets};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// A pipeline or connector stage with its own latency histogram.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Mapping = 0,
    Stage1,
    Stage2,
    Connector,
    Upstream,
}

const STAGES: [(Stage, &str); 5] = [
    (Stage::Mapping, "mapping"),
    (Stage::Stage1, "stage1"),
    (Stage::Stage2, "stage2"),
    (Stage::Connector, "connector"),
    (Stage::Upstream, "upstream"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    reason: &'static str,
    action_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    direction: &'static str,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    outcome: &'static str,
    qtype: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredByLabel {
    answered_by: &'static str,
}

/// Revocation lag buckets: 10 ms (a live push) up to an hour (a sidecar that was disconnected).
const REVOCATION_LAG_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// Every metric of the sidecar: the registry plus pre-created handles for the fixed labels.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    stages: [Histogram; 5],
    overhead: Histogram,
    upstream_timeout: Counter,
    upstream_unavailable: Counter,
    rate_limited: Counter,
    conns_active: [Gauge; 2],
    conns_total: [Counter; 2],
    mitm_ok: Counter,
    mitm_failed: Counter,
    leaf_lookups: AtomicU64,
    leaf_hits: Counter,
    leaf_minted: Counter,
    credentials: [Counter; 4],
    audit_write: Histogram,
    llm_tokens: Family<TokenLabels, Counter>,
    llm_cost: Family<ModelLabel, Counter<f64, AtomicU64>>,
    // Read at scrape time.
    audit_written: Counter,
    audit_failures: Counter,
    audit_healthy: Gauge,
    audit_disk_free: Gauge,
    audit_disk_low: Gauge,
    audit_rotated: Counter,
    audit_aggregated: Counter,
    bundle_info: Family<VersionLabel, Gauge>,
    bundle_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    bundle_fresh: Gauge,
    revocations: Gauge,
    revocations_applied: [Counter; 3],
    revocation_lag: Histogram,
    revocation_lag_unknown: Counter,
    revocation_clock_skew: Counter,
    dns_queries: Family<DnsLabels, Counter>,
    dns_upstream_errors: [Counter; 3],
    dns_answer: [Histogram; 2],
    ebpf_redirected: Counter,
    ebpf_udp443_refused: Counter,
    ebpf_side_doors: [Counter; 3],
    ebpf_workloads: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("firma_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        r.register(
            "decisions",
            "Decisions (one per audit decision event) by outcome, deny reason and action class",
            decisions.clone(),
        );
        let stage_family: HistogramFamily<StageLabel> =
            Family::new_with_constructor(latency_histogram);
        let stages = STAGES.map(|(_, name)| {
            stage_family
                .get_or_create(&StageLabel { stage: name })
                .clone()
        });
        r.register(
            "stage_duration_seconds",
            "Time spent per request in each stage: mapping, stage1, stage2, connector (credential, rate limit), upstream (to the response head)",
            stage_family,
        );
        let overhead = latency_histogram();
        r.register(
            "request_overhead_seconds",
            "Time the sidecar adds to a request: from its arrival to sending it upstream (or to the denial)",
            overhead.clone(),
        );
        let upstream_errors = Family::<KindLabel, Counter>::default();
        let upstream_timeout = upstream_errors
            .get_or_create(&KindLabel { kind: "timeout" })
            .clone();
        let upstream_unavailable = upstream_errors
            .get_or_create(&KindLabel {
                kind: "unavailable",
            })
            .clone();
        r.register(
            "upstream_errors",
            "Allowed requests aborted by the upstream: timeout (504) or unavailable (502)",
            upstream_errors,
        );
        let rate_limited = Counter::default();
        r.register(
            "rate_limited",
            "Allowed requests refused by a per-host rate limit (429)",
            rate_limited.clone(),
        );
        let active = Family::<ModeLabel, Gauge>::default();
        let total = Family::<ModeLabel, Counter>::default();
        let modes = ["http_proxy", "transparent"];
        let conns_active = modes.map(|m| active.get_or_create(&ModeLabel { mode: m }).clone());
        let conns_total = modes.map(|m| total.get_or_create(&ModeLabel { mode: m }).clone());
        r.register(
            "connections_active",
            "Client connections open now, by interception mode",
            active,
        );
        r.register(
            "connections",
            "Client connections accepted, by interception mode",
            total,
        );
        let mitm = Family::<ResultLabel, Counter>::default();
        let mitm_ok = mitm.get_or_create(&ResultLabel { result: "ok" }).clone();
        let mitm_failed = mitm
            .get_or_create(&ResultLabel { result: "failed" })
            .clone();
        r.register(
            "mitm_handshakes",
            "TLS handshakes with clients on intercepted names, by result",
            mitm,
        );
        let leaf_hits = Counter::default();
        let leaf_minted = Counter::default();
        r.register(
            "leaf_cache_hits",
            "MITM leaf certificate lookups served from the cache",
            leaf_hits.clone(),
        );
        r.register(
            "leaf_certificates_minted",
            "MITM leaf certificates minted (cache misses and renewals)",
            leaf_minted.clone(),
        );
        let creds = Family::<CredentialLabels, Counter>::default();
        let credentials = [
            ("basic", "ok"),
            ("basic", "error"),
            ("vault", "ok"),
            ("vault", "error"),
        ]
        .map(|(source, result)| {
            creds
                .get_or_create(&CredentialLabels { source, result })
                .clone()
        });
        r.register(
            "credential_fetches",
            "Credential lookups for allowed requests, by source (basic = env, vault) and result",
            creds,
        );
        let audit_write = latency_histogram();
        r.register(
            "audit_write_duration_seconds",
            "Time to write (and sync, per fsync policy) one batch of audit events",
            audit_write.clone(),
        );
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        r.register(
            "llm_tokens",
            "LLM tokens reported by upstream responses, by direction (input, output) and model (priced models by name, others as `other`)",
            llm_tokens.clone(),
        );
        let llm_cost = Family::<ModelLabel, Counter<f64, AtomicU64>>::default();
        r.register(
            "llm_cost_usd",
            "Cost of LLM usage in USD from [[sidecar.llm.prices]], by model",
            llm_cost.clone(),
        );
        let audit_written = Counter::default();
        let audit_failures = Counter::default();
        let audit_healthy = Gauge::default();
        r.register(
            "audit_events_written",
            "Audit events persisted by the sink",
            audit_written.clone(),
        );
        r.register(
            "audit_failures",
            "Audit events the sink could not persist (their requests were denied AuditUnavailable)",
            audit_failures.clone(),
        );
        r.register(
            "audit_sink_healthy",
            "1 while the audit sink's last write succeeded",
            audit_healthy.clone(),
        );
        let audit_disk_free = Gauge::default();
        let audit_disk_low = Gauge::default();
        let audit_rotated = Counter::default();
        let audit_aggregated = Counter::default();
        r.register(
            "audit_disk_free_bytes",
            "Free bytes on the audit file's filesystem at the last check (every 5 s; file sink only)",
            audit_disk_free.clone(),
        );
        r.register(
            "audit_disk_low",
            "1 while the audit filesystem has less free space than [sidecar.audit] free_space_warn_bytes",
            audit_disk_low.clone(),
        );
        r.register(
            "audit_files_rotated",
            "Audit files rotated ([sidecar.audit] max_file_bytes)",
            audit_rotated.clone(),
        );
        r.register(
            "audit_denials_aggregated",
            "Denials counted into deny_summary events instead of written one by one (also counted in decisions_total)",
            audit_aggregated.clone(),
        );
        let bundle_info = Family::<VersionLabel, Gauge>::default();
        r.register(
            "bundle_info",
            "The installed runtime policy bundle (value 1, version label = content hash)",
            bundle_info.clone(),
        );
        let bundle_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "bundle_age_seconds",
            "Seconds since the runtime bundle was last received or reloaded",
            bundle_age.clone(),
        );
        let bundle_fresh = Gauge::default();
        r.register(
            "bundle_fresh",
            "1 when a bundle is installed and younger than bundle_ttl_seconds",
            bundle_fresh.clone(),
        );
        let revocations = Gauge::default();
        r.register(
            "revocations",
            "Revoked capability ids known (from the authority's revocation stream)",
            revocations.clone(),
        );
        let applied = Family::<ViaLabel, Counter>::default();
        let revocations_applied = ["stream", "startup_replay", "resync_replay"]
            .map(|via| applied.get_or_create(&ViaLabel { via }).clone());
        r.register(
            "revocations_applied",
            "Revocations new to this sidecar, by how they arrived: stream (live), startup_replay (the first replay after start), resync_replay (a replay after a reconnect: revoked while disconnected)",
            applied,
        );
        let revocation_lag = Histogram::new(REVOCATION_LAG_BUCKETS.into_iter());
        r.register(
            "revocation_lag_seconds",
            "From the revocation's time at the authority to applied here, for revocations via stream or resync_replay that carry a time (clock skew clamped to 0)",
            revocation_lag.clone(),
        );
        let revocation_lag_unknown = Counter::default();
        r.register(
            "revocation_lag_unknown",
            "Revocations applied via stream or resync_replay without a revocation time (bare line in the revocation file, or an older authority): not in the lag histogram",
            revocation_lag_unknown.clone(),
        );
        let revocation_clock_skew = Counter::default();
        r.register(
            "revocation_clock_skew",
            "Revocations whose time at the authority is later than this sidecar's clock: observed as lag 0",
            revocation_clock_skew.clone(),
        );
        let dns_queries = Family::<DnsLabels, Counter>::default();
        r.register(
            "dns_queries",
            "DNS guard queries by outcome (allowed, denied, refused, malformed, dropped, rate_limited, audit_failed) and qtype (A, AAAA, other, unknown when not decoded)",
            dns_queries.clone(),
        );
        let dns_errors = Family::<KindLabel, Counter>::default();
        let dns_upstream_errors = ["timeout", "unavailable", "no_server"]
            .map(|kind| dns_errors.get_or_create(&KindLabel { kind }).clone());
        r.register(
            "dns_upstream_errors",
            "Allowed DNS queries no upstream resolver answered (the client got SERVFAIL), by kind",
            dns_errors,
        );
        let answer_family: HistogramFamily<AnsweredByLabel> =
            Family::new_with_constructor(latency_histogram);
        let dns_answer = ["guard", "upstream"].map(|answered_by| {
            answer_family
                .get_or_create(&AnsweredByLabel { answered_by })
                .clone()
        });
        r.register(
            "dns_answer_duration_seconds",
            "From a DNS query's arrival to its answer, by who answered: guard (denials, errors, answered locally) or upstream (allowed, forwarded)",
            answer_family,
        );
        let ebpf_redirected = Counter::default();
        let ebpf_udp443_refused = Counter::default();
        let ebpf_workloads = Gauge::default();
        r.register(
            "ebpf_redirected_connects",
            "TCP connects of tagged workloads redirected to the sidecar (kernel per-CPU counter)",
            ebpf_redirected.clone(),
        );
        r.register(
            "ebpf_udp443_refused",
            "UDP/443 (QUIC) connects and sends of tagged workloads refused (kernel per-CPU counter)",
            ebpf_udp443_refused.clone(),
        );
        let ebpf_side_doors: [Counter; 3] = Default::default();
        for (name, help, c) in [
            (
                "ebpf_udp_refused",
                "UDP and UDP-Lite connects and sends of tagged workloads refused, port 443 aside (closed UDP; kernel per-CPU counter)",
                &ebpf_side_doors[0],
            ),
            (
                "ebpf_loopback_refused",
                "Loopback connects and sends of tagged workloads refused (closed loopback, the sidecar's own ports; kernel per-CPU counter)",
                &ebpf_side_doors[1],
            ),
            (
                "ebpf_egress_dropped",
                "Packets of tagged workloads dropped at egress or sockets refused for their protocol (ICMP ping, SCTP...; kernel per-CPU counter)",
                &ebpf_side_doors[2],
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "ebpf_attached_workloads",
            "Workload cgroups attached (tagged) now",
            ebpf_workloads.clone(),
        );
        Self {
            registry: r,
            decisions,
            stages,
            overhead,
            upstream_timeout,
            upstream_unavailable,
            rate_limited,
            conns_active,
            conns_total,
            mitm_ok,
            mitm_failed,
            leaf_lookups: AtomicU64::new(0),
            leaf_hits,
            leaf_minted,
            credentials,
            audit_write,
            llm_tokens,
            llm_cost,
            audit_written,
            audit_failures,
            audit_healthy,
            audit_disk_free,
            audit_disk_low,
            audit_rotated,
            audit_aggregated,
            bundle_info,
            bundle_age,
            bundle_fresh,
            revocations,
            revocations_applied,
            revocation_lag,
            revocation_lag_unknown,
            revocation_clock_skew,
            dns_queries,
            dns_upstream_errors,
            dns_answer,
            ebpf_redirected,
            ebpf_udp443_refused,
            ebpf_side_doors,
            ebpf_workloads,
        }
    }
}

/// Turns recording on (idempotent). Until this is called every hook is a no-op.
pub fn enable() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

#[inline]
fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

fn seconds_of_micros(us: u64) -> f64 {
    us as f64 / 1e6
}

/// One decision event (allow or deny), with the stage timings the pipeline measured.
pub fn decision(d: &Decision) {
    let Some(m) = get() else { return };
    let labels = DecisionLabels {
        outcome: match d.outcome {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        },
        reason: d.reason.map_or("", |r| r.as_str()),
        action_class: d.action_class.clone().unwrap_or_default(),
    };
    m.decisions.get_or_create(&labels).inc();
    for (name, us) in &d.timings_us {
        let stage = match *name {
            "classify_us" => Stage::Mapping,
            "stage1_us" => Stage::Stage1,
            "stage2_us" => Stage::Stage2,
            _ => continue,
        };
        m.stages[stage as usize].observe(seconds_of_micros(*us));
    }
}

/// What happened after an allow: upstream latency, or the abort's kind.
pub fn outcome(o: &ConnectorOutcome) {
    let Some(m) = get() else { return };
    if o.upstream_status.is_some() {
        m.stages[Stage::Upstream as usize].observe(seconds_of_micros(o.upstream_us));
    }
    match o.aborted.as_deref() {
        Some("UpstreamTimeout") => m.upstream_timeout.inc(),
        Some("UpstreamUnavailable") => m.upstream_unavailable.inc(),
        Some("RateLimited") => m.rate_limited.inc(),
        _ => 0,
    };
}

/// Time spent in `stage` (the stages the pipeline does not time itself).
pub fn stage(stage: Stage, took: Duration) {
    if let Some(m) = get() {
        m.stages[stage as usize].observe(took.as_secs_f64());
    }
}

/// The time the sidecar added to one request, measured from `since`.
pub fn overhead(since: Instant) {
    if let Some(m) = get() {
        m.overhead.observe(since.elapsed().as_secs_f64());
    }
}

/// Counts an accepted connection; the guard keeps it in `connections_active` until dropped.
pub fn connection(kind: InterceptKind) -> ConnectionGuard {
    let i = match kind {
        InterceptKind::HttpProxy => 0,
        InterceptKind::Transparent => 1,
        // DNS queries are not client connections.
        InterceptKind::Dns => return ConnectionGuard(None),
        // Decided for a caller that carries the request itself: no Firma connection.
        InterceptKind::Embedded | InterceptKind::ExtAuthz => return ConnectionGuard(None),
    };
    if let Some(m) = get() {
        m.conns_total[i].inc();
        m.conns_active[i].inc();
        ConnectionGuard(Some(i))
    } else {
        ConnectionGuard(None)
    }
}

/// Held for the life of a client connection.
pub struct ConnectionGuard(Option<usize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let (Some(i), Some(m)) = (self.0, get()) {
            m.conns_active[i].dec();
        }
    }
}

/// A leaf certificate was looked up for a MITM handshake.
pub fn leaf_lookup() {
    if let Some(m) = get() {
        m.leaf_lookups.fetch_add(1, Ordering::Relaxed);
    }
}

/// A MITM handshake with a client ended.
pub fn mitm_handshake(ok: bool) {
    if let Some(m) = get() {
        if ok { &m.mitm_ok } else { &m.mitm_failed }.inc();
    }
}

/// A credential lookup for `source` (`"basic"` or `"vault"`) ended.
pub fn credential_fetch(source: &str, ok: bool) {
    if let Some(m) = get() {
        let i = usize::from(source == "vault") * 2 + usize::from(!ok);
        m.credentials[i].inc();
    }
}

/// Token usage of one LLM response (`model`: a priced model's name or `other`).
pub fn llm_usage(model: String, input: i64, output: i64, cost_nano_usd: Option<i64>) {
    let Some(m) = get() else { return };
    for (direction, n) in [("input", input), ("output", output)] {
        let labels = TokenLabels {
            direction,
            model: model.clone(),
        };
        m.llm_tokens
            .get_or_create(&labels)
            .inc_by(u64::try_from(n).unwrap_or(0));
    }
    if let Some(c) = cost_nano_usd {
        m.llm_cost
            .get_or_create(&ModelLabel { model })
            .inc_by(c as f64 / 1e9);
    }
}

/// One batch of audit events was written (or failed to be) in `took`.
pub fn audit_write(took: Duration) {
    if let Some(m) = get() {
        m.audit_write.observe(took.as_secs_f64());
    }
}

/// The lag of one revocation, from its time at the authority to `now_ms` (both Unix ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RevocationLag {
    /// No time recorded (0 or negative on the wire).
    Unknown,
    /// The authority's time is ahead of ours: clock skew, observed as 0.
    Skewed,
    Seconds(f64),
}

/// Lag of a revocation stamped `revoked_at_ms` seen at `now_ms`. Any i64 pair is fine: the
/// difference is taken in i128, so a hostile or broken timestamp cannot overflow or yield NaN.
pub fn revocation_lag(now_ms: i64, revoked_at_ms: i64) -> RevocationLag {
    if revoked_at_ms <= 0 {
        return RevocationLag::Unknown;
    }
    let diff = i128::from(now_ms) - i128::from(revoked_at_ms);
    if diff < 0 {
        RevocationLag::Skewed
    } else {
        RevocationLag::Seconds(diff as f64 / 1000.0)
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A revocation new to this sidecar was applied (see [`crate::authority_client::RevocationUpdate`]).
pub fn revocation_applied(u: &crate::authority_client::RevocationUpdate<'_>) {
    let Some(m) = get() else { return };
    let via = match (u.replay, u.startup) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => 2,
    };
    m.revocations_applied[via].inc();
    if u.startup {
        return;
    }
    match revocation_lag(now_unix_ms(), u.revoked_at_unix_ms) {
        RevocationLag::Unknown => {
            m.revocation_lag_unknown.inc();
        }
        RevocationLag::Skewed => {
            m.revocation_clock_skew.inc();
            m.revocation_lag.observe(0.0);
        }
        RevocationLag::Seconds(s) => m.revocation_lag.observe(s),
    }
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

/// One DNS query decided. `qtype`: `"A"`, `"AAAA"`, `"other"`, or `"unknown"` (not decoded).
pub fn dns_query(outcome: DnsOutcome, qtype: &'static str) {
    if let Some(m) = get() {
        m.dns_queries
            .get_or_create(&DnsLabels {
                outcome: outcome.as_str(),
                qtype,
            })
            .inc();
    }
}

/// One DNS answer sent after `took`; `upstream`: forwarded to a resolver (else answered locally).
pub fn dns_answer(took: Duration, upstream: bool) {
    if let Some(m) = get() {
        m.dns_answer[usize::from(upstream)].observe(took.as_secs_f64());
    }
}

/// No upstream resolver answered an allowed query: `kind` is `timeout`, `unavailable` or
/// `no_server`.
pub fn dns_upstream_error(kind: &str) {
    if let Some(m) = get() {
        let i = match kind {
            "timeout" => 0,
            "unavailable" => 1,
            _ => 2,
        };
        m.dns_upstream_errors[i].inc();
    }
}

/// What transparent mode's kernel side reports at scrape time.
pub trait KernelState: Send + Sync {
    /// (redirected connects, refused UDP/443), summed over CPUs.
    fn counters(&self) -> (u64, u64);
    /// Attached workload cgroups, and whether each has all its programs' links pinned.
    fn workloads(&self) -> Vec<bool>;
    /// (refused UDP but 443, refused loopback, dropped at egress), summed over CPUs.
    fn side_doors(&self) -> [u64; 3] {
        [0; 3]
    }
}

impl KernelState for Redirector {
    fn counters(&self) -> (u64, u64) {
        self.kernel_counters()
    }

    fn side_doors(&self) -> [u64; 3] {
        self.side_door_counters()
    }

    fn workloads(&self) -> Vec<bool> {
        self.status()
            .into_iter()
            .map(|(_, links)| links == crate::ebpf::LINKS_PER_CGROUP)
            .collect()
    }
}

/// The sidecar's `/metrics` and `/readyz`.
pub struct SidecarAdmin {
    pub metrics: &'static Metrics,
    pub state: Arc<SidecarState>,
    /// Transparent mode: the loaded eBPF redirector.
    pub kernel: Option<Arc<dyn KernelState>>,
}

impl AdminSource for SidecarAdmin {
    fn metrics(&self) -> String {
        let m = self.metrics;
        let health = self.state.audit.health();
        m.audit_written
            .inner()
            .store(health.written(), Ordering::Relaxed);
        m.audit_failures
            .inner()
            .store(health.lost(), Ordering::Relaxed);
        m.audit_healthy.set(i64::from(health.healthy()));
        if let Some(free) = health.disk_free() {
            m.audit_disk_free
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        m.audit_disk_low.set(i64::from(health.disk_low()));
        m.audit_rotated
            .inner()
            .store(health.rotated(), Ordering::Relaxed);
        m.audit_aggregated
            .inner()
            .store(self.state.audit.denials_aggregated(), Ordering::Relaxed);
        let p = &self.state.pipeline;
        m.bundle_info.clear();
        if let Some(v) = p.bundle_version() {
            m.bundle_info
                .get_or_create(&VersionLabel { version: v })
                .set(1);
        }
        m.bundle_age
            .set(p.bundle_age().map_or(f64::NAN, |a| a.as_secs_f64()));
        m.bundle_fresh.set(i64::from(p.bundle_usable().is_ok()));
        m.revocations
            .set(i64::try_from(p.revocation_count()).unwrap_or(i64::MAX));
        if let Some(mitm) = &self.state.mitm {
            let minted = mitm.leaves.minted();
            let lookups = m.leaf_lookups.load(Ordering::Relaxed);
            m.leaf_minted.inner().store(minted, Ordering::Relaxed);
            m.leaf_hits
                .inner()
                .store(lookups.saturating_sub(minted), Ordering::Relaxed);
        }
        if let Some(k) = &self.kernel {
            let (redirected, refused) = k.counters();
            m.ebpf_redirected
                .inner()
                .store(redirected, Ordering::Relaxed);
            m.ebpf_udp443_refused
                .inner()
                .store(refused, Ordering::Relaxed);
            for (c, v) in m.ebpf_side_doors.iter().zip(k.side_doors()) {
                c.inner().store(v, Ordering::Relaxed);
            }
            m.ebpf_workloads
                .set(i64::try_from(k.workloads().len()).unwrap_or(i64::MAX));
        }
        firma_common::admin::encode(&m.registry)
    }

    fn readiness(&self) -> Vec<Check> {
        let mut checks = Vec::with_capacity(3);
        checks.push(match self.state.pipeline.bundle_usable() {
            Ok(()) => Check::pass("policy_bundle"),
            Err(detail) => Check::fail("policy_bundle", detail),
        });
        checks.push(if self.state.audit.health().healthy() {
            Check::pass("audit_sink")
        } else {
            Check::fail(
                "audit_sink",
                "the last audit write failed: allows are denied AuditUnavailable",
            )
        });
        if let Some(k) = &self.kernel {
            let w = k.workloads();
            let partial = w.iter().filter(|ok| !**ok).count();
            checks.push(if partial == 0 {
                Check::pass("ebpf")
            } else {
                Check::fail(
                    "ebpf",
                    format!(
                        "{partial} of {} attached workload(s) miss program links",
                        w.len()
                    ),
                )
            });
        }
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_lag_survives_hostile_timestamps() {
        let now = 1_764_000_000_000;
        assert_eq!(revocation_lag(now, 0), RevocationLag::Unknown);
        assert_eq!(revocation_lag(now, -5), RevocationLag::Unknown);
        assert_eq!(revocation_lag(now, i64::MIN), RevocationLag::Unknown);
        assert_eq!(revocation_lag(now, now + 1), RevocationLag::Skewed);
        assert_eq!(revocation_lag(now, i64::MAX), RevocationLag::Skewed);
        assert_eq!(revocation_lag(now, now - 250), RevocationLag::Seconds(0.25));
        assert_eq!(revocation_lag(now, now), RevocationLag::Seconds(0.0));
        // A clock at the far end of i64 does not overflow.
        match revocation_lag(i64::MAX, 1) {
            RevocationLag::Seconds(s) => assert!(s.is_finite() && s > 0.0),
            other => panic!("{other:?}"),
        }
    }
}
