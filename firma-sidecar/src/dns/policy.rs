//! The DNS guard's policy, apart from its sockets, its audit and its upstream resolvers: which
//! queries are admitted (a rate per workload cgroup, a cap on queries in flight) and what a
//! decoded question gets (REFUSED for a workload with no binding, NXDOMAIN for a name the
//! configuration sends no traffic to, REFUSED for a type other than A, AAAA, CNAME, HTTPS, else
//! forwarded). Synchronous and free of I/O, so it is unit-tested without root, BPF or `dig`.

use super::allow::AllowList;
use super::query::Question;
use crate::conn::DenyReason;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Queries being answered at once (all workloads); beyond it queries are dropped and counted.
pub const MAX_IN_FLIGHT: usize = 1024;

/// What a decoded question gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answered with `rcode` (NXDOMAIN or REFUSED), nothing sent upstream.
    Deny {
        reason: DenyReason,
        rcode: ResponseCode,
        detail: String,
    },
    /// Forwarded upstream; `pattern` is the allow-list entry that matched.
    Forward { pattern: String },
}

pub struct Policy {
    allow: AllowList,
    limiter: DefaultKeyedRateLimiter<u64>,
    in_flight: Arc<Semaphore>,
    /// Why queries are dropped, for the audit summaries of rate-limited queries.
    drop_detail: String,
}

impl Policy {
    /// `queries_per_second` and `burst` per workload cgroup (0 counts as 1 and as the rate);
    /// `max_in_flight` over all workloads.
    pub fn new(
        allow: AllowList,
        queries_per_second: u32,
        burst: u32,
        max_in_flight: usize,
    ) -> Self {
        let qps = NonZeroU32::new(queries_per_second).unwrap_or(NonZeroU32::MIN);
        let burst_n = NonZeroU32::new(burst).unwrap_or(qps);
        Self {
            allow,
            limiter: RateLimiter::keyed(Quota::per_second(qps).allow_burst(burst_n)),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            drop_detail: format!(
                "queries_per_second = {queries_per_second}, burst = {burst}, or {max_in_flight} in flight"
            ),
        }
    }

    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    /// The detail of the audit summaries of dropped (rate-limited) queries.
    pub fn drop_detail(&self) -> &str {
        &self.drop_detail
    }

    /// Admission of one query of workload `cgroup` (0: no kernel record): a permit held while it
    /// is answered, or `None` when over the workload's rate or the in-flight cap.
    pub fn admit(&self, cgroup: u64) -> Option<OwnedSemaphorePermit> {
        if self.limiter.check_key(&cgroup).is_ok() {
            return self.in_flight.clone().try_acquire_owned().ok();
        }
        None
    }

    /// What `q` gets. `has_workload`: the kernel's record still names a bound workload;
    /// `peer` is named in the denial's detail.
    pub fn decide(&self, q: &Question, has_workload: bool, peer: SocketAddr) -> Verdict {
        if !has_workload {
            return Verdict::Deny {
                reason: DenyReason::WorkloadMismatch,
                rcode: ResponseCode::Refused,
                detail: format!(
                    "query from {peer} was redirected but its cgroup has no workload binding any more; refused"
                ),
            };
        }
        let Some(pattern) = self.allow.matches(&q.qname) else {
            return Verdict::Deny {
                reason: DenyReason::DnsDenied,
                rcode: ResponseCode::NXDomain,
                detail: format!(
                    "name {} is not one this configuration sends traffic to (intercept, mapping-rule, connector or credential host, or [sidecar.dns] allow); answered NXDOMAIN, nothing was sent upstream",
                    q.qname
                ),
            };
        };
        if !forwarded(q.qtype) {
            return Verdict::Deny {
                reason: DenyReason::DnsDenied,
                rcode: ResponseCode::Refused,
                detail: format!(
                    "query type {} is not answered for allowed names (A, AAAA, CNAME, HTTPS only); answered REFUSED, nothing was sent upstream",
                    q.qtype
                ),
            };
        }
        Verdict::Forward { pattern }
    }
}

/// The `qtype` label of the DNS query counter: a small fixed set.
pub fn qtype_class(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        _ => "other",
    }
}

/// The A/AAAA/CNAME/HTTPS questions an allowed name is resolved for; other types are REFUSED.
pub fn forwarded(t: RecordType) -> bool {
    matches!(
        t,
        RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::HTTPS
    )
}

#[cfg(test)]
mod tests {
    use super::super::query::{Decoded, decode};
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::Name;

    fn packet(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn question(name: &str, t: RecordType) -> Question {
        match decode(&packet(name, t)) {
            Decoded::Query(q) => q,
            other => panic!("{name} {t}: not a query: {other:?}"),
        }
    }

    fn policy() -> Policy {
        Policy::new(
            AllowList::new(["api.openai.com", "*.acme-vendor.com", "*"]),
            20,
            40,
            MAX_IN_FLIGHT,
        )
    }

    const PEER: &str = "127.0.0.1:40000";

    fn verdict(p: &Policy, name: &str, t: RecordType) -> Verdict {
        p.decide(&question(name, t), true, PEER.parse().unwrap())
    }

    #[test]
    fn allowed_names_are_forwarded_with_the_pattern_that_matched() {
        let p = policy();
        for t in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::CNAME,
            RecordType::HTTPS,
        ] {
            assert_eq!(
                verdict(&p, "API.OpenAI.com.", t),
                Verdict::Forward {
                    pattern: "api.openai.com".into()
                },
                "{t}"
            );
        }
        assert_eq!(
            verdict(&p, "eu.api.acme-vendor.com", RecordType::A),
            Verdict::Forward {
                pattern: "*.acme-vendor.com".into()
            }
        );
    }

    #[test]
    fn other_names_get_nxdomain_and_a_catch_all_opens_nothing() {
        let p = policy();
        for name in [
            "evil.example",
            "openai.com",
            "api.openai.com.evil.example",
            // `*.acme-vendor.com` is strictly below the suffix.
            "acme-vendor.com",
            // An exfiltration label under an allowed exact name.
            "c2VjcmV0.api.openai.com",
        ] {
            match verdict(&p, name, RecordType::A) {
                Verdict::Deny {
                    reason: DenyReason::DnsDenied,
                    rcode: ResponseCode::NXDomain,
                    detail,
                } => assert!(detail.contains(&name.to_ascii_lowercase()), "{detail}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn allowed_names_of_other_types_are_refused() {
        let p = policy();
        for t in [
            RecordType::TXT,
            RecordType::MX,
            RecordType::NULL,
            RecordType::ANY,
            RecordType::SRV,
        ] {
            match verdict(&p, "api.openai.com", t) {
                Verdict::Deny {
                    reason: DenyReason::DnsDenied,
                    rcode: ResponseCode::Refused,
                    ..
                } => {}
                other => panic!("{t}: {other:?}"),
            }
        }
        assert_eq!(qtype_class(RecordType::A), "A");
        assert_eq!(qtype_class(RecordType::AAAA), "AAAA");
        assert_eq!(qtype_class(RecordType::TXT), "other");
    }

    #[test]
    fn a_workload_without_binding_is_refused_even_for_allowed_names() {
        let p = policy();
        let v = p.decide(
            &question("api.openai.com", RecordType::A),
            false,
            PEER.parse().unwrap(),
        );
        match v {
            Verdict::Deny {
                reason: DenyReason::WorkloadMismatch,
                rcode: ResponseCode::Refused,
                detail,
            } => assert!(detail.contains(PEER), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_packets_never_reach_a_decision() {
        let ok = packet("api.openai.com", RecordType::A);
        let mut response = ok.clone();
        response[2] |= 0x80; // QR: a response, never answered (reflection).
        let mut two_questions = ok.clone();
        two_questions[5] = 2; // QDCOUNT 2, one question present.
        let mut truncated = ok.clone();
        truncated.truncate(ok.len() - 3);
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("runt", vec![0x42, 0x42, 1]),
            ("response", response),
            ("two questions", two_questions),
            ("truncated question", truncated),
            ("garbage", vec![0xff; 64]),
        ] {
            assert!(
                matches!(
                    decode(&bytes),
                    Decoded::Drop { .. } | Decoded::Reject { .. }
                ),
                "{what} decoded as a query"
            );
        }
    }

    #[test]
    fn rate_is_per_workload_and_in_flight_is_capped() {
        let p = Policy::new(AllowList::new(["api.openai.com"]), 1, 2, 3);
        let a1 = p.admit(7).expect("first of the burst");
        let a2 = p.admit(7).expect("second of the burst");
        assert!(p.admit(7).is_none(), "over workload 7's burst");
        // Another workload has its own bucket, but the in-flight cap (3) is shared.
        let b1 = p.admit(8).expect("workload 8");
        assert!(p.admit(9).is_none(), "three in flight: the cap");
        drop((a1, a2));
        assert!(p.admit(9).is_some(), "a finished query frees its slot");
        drop(b1);
        assert!(
            p.drop_detail()
                .contains("queries_per_second = 1, burst = 2")
        );
        assert!(p.drop_detail().contains("3 in flight"));
    }
}
