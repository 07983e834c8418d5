//! Revocation metrics of the authority client: how revocations arrived and how long after
//! their time at the authority they were applied here.

use super::RevocationUpdate;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

static METRICS: OnceLock<RevocationMetrics> = OnceLock::new();

/// Revocation lag buckets: 10 ms (a live push) up to an hour (a sidecar that was disconnected).
const REVOCATION_LAG_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

struct RevocationMetrics {
    /// stream, startup_replay, resync_replay.
    applied: [Counter; 3],
    lag: Histogram,
    lag_unknown: Counter,
    clock_skew: Counter,
}

/// Creates the revocation metrics in `r` and turns their hook on (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let applied_family = Family::<ViaLabel, Counter>::default();
    let applied = ["stream", "startup_replay", "resync_replay"]
        .map(|via| applied_family.get_or_create(&ViaLabel { via }).clone());
    r.register(
        "revocations_applied",
        "Revocations new to this sidecar, by how they arrived: stream (live), startup_replay (the first replay after start), resync_replay (a replay after a reconnect: revoked while disconnected)",
        applied_family,
    );
    let lag = Histogram::new(REVOCATION_LAG_BUCKETS.into_iter());
    r.register(
        "revocation_lag_seconds",
        "From the revocation's time at the authority to applied here, for revocations via stream or resync_replay that carry a time (clock skew clamped to 0)",
        lag.clone(),
    );
    let lag_unknown = Counter::default();
    r.register(
        "revocation_lag_unknown",
        "Revocations applied via stream or resync_replay without a revocation time (bare line in the revocation file, or an older authority): not in the lag histogram",
        lag_unknown.clone(),
    );
    let clock_skew = Counter::default();
    r.register(
        "revocation_clock_skew",
        "Revocations whose time at the authority is later than this sidecar's clock: observed as lag 0",
        clock_skew.clone(),
    );
    let _ = METRICS.set(RevocationMetrics {
        applied,
        lag,
        lag_unknown,
        clock_skew,
    });
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

/// A revocation new to this sidecar was applied (see [`RevocationUpdate`]).
pub fn revocation_applied(u: &RevocationUpdate<'_>) {
    let Some(m) = METRICS.get() else { return };
    let via = match (u.replay, u.startup) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => 2,
    };
    m.applied[via].inc();
    if u.startup {
        return;
    }
    match revocation_lag(now_unix_ms(), u.revoked_at_unix_ms) {
        RevocationLag::Unknown => {
            m.lag_unknown.inc();
        }
        RevocationLag::Skewed => {
            m.clock_skew.inc();
            m.lag.observe(0.0);
        }
        RevocationLag::Seconds(s) => m.lag.observe(s),
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
