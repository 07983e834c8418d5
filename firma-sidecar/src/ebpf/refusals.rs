//! Kernel refusals (closed UDP, closed loopback, foreign protocols) turned into aggregated,
//! signed audit events.
//!
//! The programs tally each refusal in `FIRMA_REFUSALS`, per workload cgroup, reason and IP
//! protocol (a per-CPU LRU map: a count, first and last time, the last destination and pid).
//! Every [`INTERVAL`] the sidecar reads the tallies and writes one `refused` event per key
//! whose count grew: `count` (new since the previous event of that key), `total`, `first_seen`,
//! `last_seen` and a `sample` destination. A flood of datagrams therefore costs one event per
//! workload, reason and protocol per interval, never one per datagram. What is already
//! audited is kept in the pinned `FIRMA_REFUSALS_SEEN`, updated only once the event is in the
//! sink: a restarted sidecar audits the refusals made while it was down (the programs keep
//! refusing and tallying without it) and repeats none.
//!
//! Event: `{"event":"refused", event_id, timestamp, workload{...}, decision{outcome:"DENY",
//! reason, detail}, refused{layer:"kernel", protocol, count, total, first_seen, last_seen,
//! sample{destination, pid}}}`.

use super::Redirector;
use super::refusal_maps::Pending;
use crate::audit::AuditLog;
use firma_common::maps::{
    REFUSED_EGRESS, REFUSED_LOOPBACK, REFUSED_QUIC, REFUSED_SIDECAR_PORT, REFUSED_UDP,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How often the tallies are read (and so the finest grain of the refusal events).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The audit name and explanation of a `REFUSED_*` reason.
pub fn reason(code: u8) -> (&'static str, &'static str) {
    match code {
        REFUSED_UDP => (
            "UdpRefused",
            "UDP is closed for tagged workloads: only DNS to the guard and allow_udp exceptions leave",
        ),
        REFUSED_QUIC => (
            "QuicRefused",
            "UDP/443 (QUIC) is refused so clients fall back to TCP, which the sidecar decides",
        ),
        REFUSED_LOOPBACK => (
            "LoopbackRefused",
            "loopback is closed for tagged workloads: only allow_loopback entries are reachable",
        ),
        REFUSED_SIDECAR_PORT => (
            "SidecarPortRefused",
            "a port of the sidecar itself: never reachable by tagged workloads",
        ),
        REFUSED_EGRESS => (
            "ProtocolRefused",
            "not TCP or UDP (ICMP ping, SCTP, MPTCP...), or a datagram to a closed destination dropped at egress",
        ),
        _ => ("KernelRefused", "refused by the kernel programs"),
    }
}

/// IANA protocol number -> a name for the audit.
pub fn protocol_name(p: u16) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        262 => "mptcp".into(),
        n => format!("ip-proto-{n}"),
    }
}

/// `CLOCK_BOOTTIME` nanoseconds (what `bpf_ktime_get_boot_ns` returns) -> wall-clock time.
fn wall_time(boot_ns: u64) -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0;
    let now_boot = if ok {
        (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
    } else {
        boot_ns
    };
    let ago = Duration::from_nanos(now_boot.saturating_sub(boot_ns));
    (OffsetDateTime::now_utc() - ago)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The `refused` audit event of one pending tally.
pub fn event_body(r: &Redirector, p: &Pending) -> String {
    let (name, detail) = reason(p.key.reason);
    let workload = match r.workload_of(p.key.cgroup_id, p.pid) {
        Some(w) => serde_json::to_value(w).unwrap_or_default(),
        None => json!({ "cgroup_id": p.key.cgroup_id, "pid": p.pid }),
    };
    json!({
        "event": "refused",
        "event_id": crate::audit::new_event_id(),
        "timestamp": wall_time(p.last_ns),
        "workload": workload,
        "decision": { "outcome": "DENY", "reason": name, "detail": detail },
        "refused": {
            "layer": "kernel",
            "protocol": protocol_name(p.key.protocol),
            "count": p.count,
            "total": p.total,
            "first_seen": wall_time(p.first_ns),
            "last_seen": wall_time(p.last_ns),
            "sample": { "destination": p.destination(), "pid": p.pid },
        },
    })
    .to_string()
}

/// Audits every pending tally (each persisted before it is marked audited). Returns how many
/// events were written; stops at the first the sink refuses (they stay pending).
pub async fn audit_pending(r: &Redirector, audit: &AuditLog) -> usize {
    let mut written = 0;
    for p in r.pending_refusals() {
        match audit.persist_body(event_body(r, &p)).await {
            Ok(()) => {
                r.mark_refusals_audited(&p.key, p.total);
                written += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot audit kernel refusals; retrying");
                break;
            }
        }
    }
    written
}

/// Audits pending refusals every [`INTERVAL`] until the runtime stops.
pub fn spawn(r: Arc<Redirector>, audit: AuditLog) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            audit_pending(&r, &audit).await;
        }
    })
}
