//! Denial aggregation: a workload that keeps being denied cannot flood the audit.
//!
//! Time is cut in fixed windows of `[sidecar.audit] aggregate_window_secs` (default 10 s). In
//! each window the first `aggregate_denials_after` (default 20) denials of a **workload** are
//! written one by one as usual; the workload's further denials in that window are counted, not
//! written, by group, and each group becomes one signed `deny_summary` event when the window
//! ends (or at flush/shutdown): `aggregate{count, first_timestamp, last_timestamp, sample}`
//! with up to [`SAMPLES`] of the counted denials in a compact form. Allows are never
//! aggregated: each ALLOW is its own event, persisted before anything leaves.
//!
//! Keys (docs/architecture.md, "Audit aggregation"):
//! - workload: the cgroup id the kernel reported (transparent mode, DNS guard), else the
//!   client's IP address without the port (http_proxy mode: every connection has a new port).
//!   Not the pid (a workload forks) nor anything the client sends (a token or header).
//! - group: (workload, kind, deny reason, `resource.host` bounded to 256 bytes).
//!
//! Bounded whatever the workloads do: at most [`MAX_INDIVIDUAL`] denials are written one by
//! one per window across all workloads, at most [`MAX_WORKLOADS`] workloads are tracked (the
//! others are aggregated at once), and at most [`MAX_GROUPS`] groups are kept; a denial past
//! that goes to one overflow group per (kind, reason) whose key names no workload or host.
//!
//! Counting stays exact: the denials of a window = its `decision` DENY events + the sum of its
//! summaries' `count`. A summary is written when its window ends, so a `kill -9` loses the
//! counts of the current window (never an ALLOW; `decisions_total` counted them anyway).
//!
//! The DNS guard's rate-limited queries (dropped unanswered, never decided one by one) use the
//! same groups ([`Kind::DnsRateLimited`]): one summary per workload per window, with
//! `envelope.intent.dns.rate_limited` = the count, as the guard wrote before.

use super::bound;
use crate::conn::{DenyReason, InterceptKind, Workload};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Counted denials kept as samples in each summary.
pub const SAMPLES: usize = 3;
/// Denials written one by one per window, all workloads together.
pub const MAX_INDIVIDUAL: u32 = 1_000;
/// Workloads whose individual budget is tracked per window.
pub const MAX_WORKLOADS: usize = 4_096;
/// Summary groups per window, before the overflow groups.
pub const MAX_GROUPS: usize = 1_024;

/// `[sidecar.audit]` aggregation settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub after: u32,
    pub window: Duration,
}

/// What was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Decided denials over the workload's individual budget.
    Denied,
    /// DNS queries dropped unanswered by the guard's rate limit (never decided one by one).
    DnsRateLimited,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::DnsRateLimited => "dns_rate_limited",
        }
    }
}

/// Which workload a denial counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkloadKey {
    Cgroup(u64),
    Peer(IpAddr),
    /// Past [`MAX_GROUPS`]: any workload.
    Overflow,
}

impl WorkloadKey {
    fn label(&self) -> String {
        match self {
            Self::Cgroup(id) => format!("cgroup:{id}"),
            Self::Peer(ip) => format!("peer:{ip}"),
            Self::Overflow => "overflow".into(),
        }
    }
}

/// Who was denied and what for: the fields a summary and its samples are made from.
#[derive(Debug, Clone, Copy)]
pub struct Denial<'a> {
    pub kind: Kind,
    pub intercept: InterceptKind,
    pub conn_id: Option<u64>,
    pub peer: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub workload: Option<&'a Workload>,
    pub reason: DenyReason,
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
    pub path: Option<&'a str>,
    pub detail: &'a str,
}

impl Denial<'_> {
    fn workload_key(&self) -> WorkloadKey {
        match self.workload {
            Some(w) => WorkloadKey::Cgroup(w.cgroup_id),
            None => WorkloadKey::Peer(self.peer.ip()),
        }
    }

    fn sample(&self, at: &str) -> Value {
        json!({
            "timestamp": at,
            "conn_id": self.conn_id,
            "peer": self.peer.to_string(),
            "original_dst": self.original_dst.map(|a| a.to_string()),
            "pid": self.workload.map(|w| w.pid),
            "method": bound::opt(self.method, bound::METHOD),
            "path": bound::opt(self.path, bound::PATH),
            "port": self.port,
            "detail": bound::text(self.detail, bound::DETAIL),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    workload: WorkloadKey,
    kind: Kind,
    reason: &'static str,
    host: Option<String>,
}

/// One group's counts and what its summary shows of the first denial.
struct Group {
    order: u64,
    count: u64,
    first: String,
    last: OffsetDateTime,
    reason: DenyReason,
    intercept: InterceptKind,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    workload: Option<Workload>,
    method: Option<String>,
    port: u16,
    detail: String,
    samples: Vec<Value>,
}

#[derive(Default)]
struct Window {
    individual: HashMap<WorkloadKey, u32>,
    individual_total: u32,
    groups: HashMap<GroupKey, Group>,
    next_order: u64,
}

/// Shared by every request handler (one short lock per denial) and the writer thread, which
/// turns each ended window into summaries ([`Self::take_due`]).
pub struct Aggregator {
    settings: Settings,
    epoch: Instant,
    /// Nanoseconds since `epoch` at which the current window ends.
    due: AtomicU64,
    window: Mutex<Window>,
    aggregated: AtomicU64,
}

fn now_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

impl Aggregator {
    pub fn new(settings: Settings) -> Self {
        let window = settings.window.max(Duration::from_millis(100));
        Self {
            settings: Settings { window, ..settings },
            epoch: Instant::now(),
            due: AtomicU64::new(window.as_nanos() as u64),
            window: Mutex::new(Window::default()),
            aggregated: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A decided denial: `true` when it is to be written as its own event, `false` when it was
    /// counted for this window's summary.
    pub fn admit(&self, d: &Denial<'_>) -> bool {
        let key = d.workload_key();
        let mut guard = self.lock();
        let w = &mut *guard;
        if w.individual_total < MAX_INDIVIDUAL
            && (w.individual.len() < MAX_WORKLOADS || w.individual.contains_key(&key))
        {
            let n = w.individual.entry(key.clone()).or_insert(0);
            if *n < self.settings.after {
                *n += 1;
                w.individual_total += 1;
                return true;
            }
        }
        self.count_locked(w, key, d);
        false
    }

    /// Counts `d` for this window's summary without writing it.
    pub fn count(&self, d: &Denial<'_>) {
        let key = d.workload_key();
        let mut w = self.lock();
        self.count_locked(&mut w, key, d);
    }

    fn count_locked(&self, w: &mut Window, workload: WorkloadKey, d: &Denial<'_>) {
        self.aggregated.fetch_add(1, Ordering::Relaxed);
        let host = d.host.map(|h| bound::text(h, bound::HOST).into_owned());
        let mut key = GroupKey {
            workload,
            kind: d.kind,
            reason: d.reason.as_str(),
            host,
        };
        if !w.groups.contains_key(&key) && w.groups.len() >= MAX_GROUPS {
            key.workload = WorkloadKey::Overflow;
            key.host = None;
        }
        let at = OffsetDateTime::now_utc();
        let order = w.next_order;
        let overflow = key.workload == WorkloadKey::Overflow;
        let g = w.groups.entry(key).or_insert_with(|| Group {
            order,
            count: 0,
            first: now_text(at),
            last: at,
            reason: d.reason,
            intercept: d.intercept,
            peer: d.peer,
            original_dst: d.original_dst,
            workload: if overflow { None } else { d.workload.cloned() },
            method: d.method.map(|m| bound::text(m, bound::METHOD).into_owned()),
            port: d.port,
            detail: bound::text(d.detail, bound::DETAIL).into_owned(),
            samples: Vec::new(),
        });
        if g.order == order {
            w.next_order += 1;
        }
        g.count += 1;
        g.last = at;
        if g.samples.len() < SAMPLES {
            g.samples.push(d.sample(&now_text(at)));
        }
    }

    /// Whether the current window has ended (one atomic load: called on every writer loop).
    pub fn is_due(&self) -> bool {
        self.epoch.elapsed().as_nanos() as u64 >= self.due.load(Ordering::Relaxed)
    }

    /// The summaries of the ended window (starting the next one), if it has ended.
    pub fn take_due(&self) -> Vec<String> {
        if !self.is_due() {
            return Vec::new();
        }
        let step = self.settings.window.as_nanos() as u64;
        let now = self.epoch.elapsed().as_nanos() as u64;
        // The next boundary after now (windows do not pile up after a stall).
        self.due.store(now - now % step + step, Ordering::Relaxed);
        self.take_all()
    }

    /// The summaries of everything counted so far (flush, shutdown), starting a new window.
    pub fn take_all(&self) -> Vec<String> {
        let ended = std::mem::take(&mut *self.lock());
        let mut groups: Vec<(GroupKey, Group)> = ended.groups.into_iter().collect();
        groups.sort_by_key(|(_, g)| g.order);
        if !groups.is_empty() {
            let counted: u64 = groups.iter().map(|(_, g)| g.count).sum();
            let mut workloads: Vec<&WorkloadKey> =
                groups.iter().map(|(k, _)| &k.workload).collect();
            workloads.sort_by_key(|w| w.label());
            workloads.dedup();
            // One line per window, however many workloads or groups.
            tracing::warn!(
                target: "firma_sidecar::audit",
                counted,
                workloads = workloads.len(),
                summaries = groups.len(),
                "denials over the per-workload audit rate counted into deny_summary events (aggregate_denials_after = {} per {} s)",
                self.settings.after,
                self.settings.window.as_secs_f64()
            );
        }
        groups
            .into_iter()
            .map(|(k, g)| self.summary(&k, g))
            .collect()
    }

    fn summary(&self, key: &GroupKey, g: Group) -> String {
        let window = self.settings.window.as_secs_f64();
        let detail = match key.kind {
            Kind::Denied => format!(
                "{} denial(s) over the individual limit ({} per workload per {window} s) counted, not written one by one; first: {}",
                g.count, self.settings.after, g.detail
            ),
            Kind::DnsRateLimited => format!(
                "rate limit: {} queries dropped unanswered in the last {window} s ({})",
                g.count, g.detail
            ),
        };
        let mut intent = Map::new();
        intent.insert("resource".into(), json!({ "host": key.host, "path": null }));
        intent.insert("method".into(), g.method.into());
        intent.insert("port".into(), g.port.into());
        if key.kind == Kind::DnsRateLimited {
            intent.insert("dns".into(), json!({ "rate_limited": g.count }));
        }
        let overflow = key.workload == WorkloadKey::Overflow;
        let body = json!({
            "event": "deny_summary",
            "event_id": super::event::new_id(),
            "timestamp": now_text(OffsetDateTime::now_utc()),
            "conn": {
                "intercept": g.intercept,
                "peer": if overflow { Value::Null } else { g.peer.ip().to_string().into() },
                "original_dst": g.original_dst.filter(|_| !overflow).map(|a| a.to_string()),
            },
            "workload": g.workload,
            "envelope": { "intent": intent },
            "decision": {
                "outcome": "DENY",
                "reason": g.reason,
                "detail": bound::text(&detail, bound::DETAIL * 2),
                "matched_policies": [],
            },
            "aggregate": {
                "kind": key.kind.as_str(),
                "count": g.count,
                "first_timestamp": g.first,
                "last_timestamp": now_text(g.last),
                "window_secs": window,
                "individual_limit": self.settings.after,
                "key": {
                    "workload": key.workload.label(),
                    "reason": key.reason,
                    "host": key.host,
                },
                "sample": g.samples,
            },
        });
        body.to_string()
    }

    /// Denials counted into summaries since start.
    pub fn aggregated(&self) -> u64 {
        self.aggregated.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial<'a>(w: Option<&'a Workload>, peer: &str, host: &'a str) -> Denial<'a> {
        Denial {
            kind: Kind::Denied,
            intercept: InterceptKind::Transparent,
            conn_id: Some(1),
            peer: peer.parse().unwrap(),
            original_dst: None,
            workload: w,
            reason: DenyReason::PolicyDenied,
            method: Some("GET"),
            host: Some(host),
            port: 443,
            path: Some("/x"),
            detail: "no",
        }
    }

    fn parse(s: &[String]) -> Vec<Value> {
        s.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn over_the_limit_denials_are_counted_exactly_per_workload_and_host() {
        let a = Aggregator::new(Settings {
            after: 5,
            window: Duration::from_secs(3600),
        });
        let w = Workload {
            cgroup_id: 7,
            cgroup_path: "/w".into(),
            pid: 1,
            agent_id: "a".into(),
            session_id: None,
        };
        let written = (0..1000)
            .filter(|i| a.admit(&denial(Some(&w), &format!("127.0.0.1:{}", 1000 + i), "h1")))
            .count();
        assert_eq!(written, 5);
        // Another host of the same workload: the workload's budget is spent.
        assert!(!a.admit(&denial(Some(&w), "127.0.0.1:1", "h2")));
        // Another workload (by peer IP, any port) has its own budget.
        assert!(a.admit(&denial(None, "127.0.0.2:5", "h1")));
        let s = parse(&a.take_all());
        assert_eq!(s.len(), 2, "{s:#?}");
        assert_eq!(s[0]["event"], "deny_summary");
        assert_eq!(s[0]["aggregate"]["count"], 995);
        assert_eq!(s[0]["aggregate"]["key"]["workload"], "cgroup:7");
        assert_eq!(s[0]["aggregate"]["key"]["host"], "h1");
        assert_eq!(
            s[0]["aggregate"]["sample"].as_array().unwrap().len(),
            SAMPLES
        );
        assert_eq!(s[0]["workload"]["cgroup_path"], "/w");
        assert_eq!(s[1]["aggregate"]["count"], 1);
        assert_eq!(s[1]["envelope"]["intent"]["resource"]["host"], "h2");
        assert_eq!(a.aggregated(), 996);
        // A new window: the budget is back.
        assert!(a.admit(&denial(Some(&w), "127.0.0.1:1", "h1")));
        assert!(a.take_all().is_empty());
    }

    #[test]
    fn groups_and_individual_lines_are_bounded_whatever_the_keys() {
        let a = Aggregator::new(Settings {
            after: 1_000_000,
            window: Duration::from_secs(3600),
        });
        let hosts: Vec<String> = (0..(MAX_GROUPS + 1000)).map(|i| format!("h{i}")).collect();
        let mut written = 0;
        for (i, h) in hosts.iter().enumerate() {
            let peer = format!("127.0.{}.{}:1", i / 250, i % 250);
            written += usize::from(a.admit(&denial(None, &peer, h)));
            written += usize::from(a.admit(&denial(None, &peer, h)));
        }
        assert_eq!(written, MAX_INDIVIDUAL as usize);
        let s = parse(&a.take_all());
        assert_eq!(s.len(), MAX_GROUPS + 1, "overflow group after MAX_GROUPS");
        let total: u64 = s
            .iter()
            .map(|e| e["aggregate"]["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            total as usize + written,
            2 * hosts.len(),
            "every denial counted"
        );
        let last = s.last().unwrap();
        assert_eq!(last["aggregate"]["key"]["workload"], "overflow");
        assert!(last["workload"].is_null() && last["conn"]["peer"].is_null());
    }

    #[test]
    fn windows_end_on_time() {
        let a = Aggregator::new(Settings {
            after: 0,
            window: Duration::from_millis(100),
        });
        let mut d = denial(None, "127.0.0.1:1", "h");
        d.kind = Kind::DnsRateLimited;
        a.count(&d);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.is_due() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = parse(&a.take_due());
        assert_eq!(s[0]["envelope"]["intent"]["dns"]["rate_limited"], 1);
        assert!(!a.is_due());
    }
}
