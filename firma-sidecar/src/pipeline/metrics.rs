//! Per-request metrics: each decision, the time spent in each stage, and what became of an
//! allowed request (upstream aborts, rate limits), plus the bundle and revocation state read at
//! scrape time.
//!
//! Registered on the sidecar's root registry (`firma_sidecar_decisions_total`, ...). Decisions
//! are counted where they are audited (one per decision event); the stage histogram is fed by
//! the pipeline's own timings and by the interceptor (connector and upstream stages).

use crate::conn::{ConnectorOutcome, Decision, Outcome};
use firma_common::admin::latency_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

static METRICS: OnceLock<PipelineMetrics> = OnceLock::new();

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
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// The pipeline's metrics: decisions and stages, and the bundle state (read at scrape time).
struct PipelineMetrics {
    decisions: Family<DecisionLabels, Counter>,
    stages: [Histogram; 5],
    upstream_timeout: Counter,
    upstream_unavailable: Counter,
    rate_limited: Counter,
    bundle_info: Family<VersionLabel, Gauge>,
    bundle_age: Gauge<f64, AtomicU64>,
    bundle_fresh: Gauge,
    revocations: Gauge,
}

/// Creates the pipeline's metrics in `r` and turns its hooks on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let decisions = Family::<DecisionLabels, Counter>::default();
    r.register(
        "decisions",
        "Decisions (one per audit decision event) by outcome, deny reason and action class",
        decisions.clone(),
    );
    let stage_family: Family<StageLabel, Histogram, fn() -> Histogram> =
        Family::new_with_constructor(|| Histogram::new(latency_buckets()));
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
    let bundle_info = Family::<VersionLabel, Gauge>::default();
    r.register(
        "bundle_info",
        "The installed runtime policy bundle (value 1, version label = content hash)",
        bundle_info.clone(),
    );
    let bundle_age = Gauge::<f64, AtomicU64>::default();
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
    let _ = METRICS.set(PipelineMetrics {
        decisions,
        stages,
        upstream_timeout,
        upstream_unavailable,
        rate_limited,
        bundle_info,
        bundle_age,
        bundle_fresh,
        revocations,
    });
}

fn seconds_of_micros(us: u64) -> f64 {
    us as f64 / 1e6
}

/// One decision event (allow or deny), with the stage timings the pipeline measured.
pub fn decision(d: &Decision) {
    let Some(m) = METRICS.get() else { return };
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
    let Some(m) = METRICS.get() else { return };
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
    if let Some(m) = METRICS.get() {
        m.stages[stage as usize].observe(took.as_secs_f64());
    }
}

/// The bundle and revocation state, as of a scrape.
pub(crate) fn set_bundle_state(
    version: Option<String>,
    age: Option<Duration>,
    fresh: bool,
    revocations: usize,
) {
    let Some(m) = METRICS.get() else { return };
    m.bundle_info.clear();
    if let Some(version) = version {
        m.bundle_info
            .get_or_create(&VersionLabel { version })
            .set(1);
    }
    m.bundle_age.set(age.map_or(f64::NAN, |a| a.as_secs_f64()));
    m.bundle_fresh.set(i64::from(fresh));
    m.revocations
        .set(i64::try_from(revocations).unwrap_or(i64::MAX));
}
