//! The one decision sequence of an HTTP request, whichever way it reached Firma: the
//! interceptors (`interceptor::http`: http_proxy, MITM, transparent) and the callers that carry
//! the request themselves ([`crate::gate::Gate::check`]: embedded, ext_authz). Each step runs
//! once, in this order:
//!
//! 1. **target**: host ([`normalize_host`]) and path
//!    ([`NormalPath`](crate::pipeline::path::NormalPath)) normalised once; that form is decided,
//!    audited and forwarded. An ambiguous one is denied `MalformedRequest`.
//! 2. **attributes**: what the matching rule extracts, from the query string, then from the
//!    body (read within its limits by whoever holds it).
//! 3. **decide** ([`decide`]): the policy (the pipeline; an MCP body per JSON-RPC message),
//!    then what turns an allow into a denial whatever the policy said: a placeholder credential
//!    that would leave (`CredentialLeak`), then a credential that would leave in plaintext
//!    (`InsecureUpstream`). An allow comes out with a [`Cleared`] target, the only way into the
//!    connector.
//! 4. **connector** (only now, only for an allow): the interceptors bind the upstream address
//!    and prepare the request, the gate admits it (credential, rate limit); see
//!    [`crate::connector`].
//! 5. **commit**: the decision is persisted in the audit before anything leaves.
//!
//! How Firma's own answers look (gRPC status, the host's error shape) is read from the request
//! and the configuration ([`crate::response::Answer`]), never from the connector, so a request
//! can be answered at any step.

use crate::conn::{Decision, DenyReason};
use crate::connector::{Cleared, Failure, UpstreamTarget};
use crate::pipeline::RequestContext;
use crate::state::SidecarState;
use http::StatusCode;

/// Lowercase host without port or brackets, if it is a plausible DNS name or IP literal.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']')?;
        let ip: std::net::Ipv6Addr = rest[..end].parse().ok()?;
        return Some(ip.to_string());
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then_some(host)
}

/// Step 3's outcome: the decision to enforce, what the policy step gave besides it (a
/// reservation, an MCP audit record), and on allow the target the connector may be entered
/// with.
pub struct Decided<T> {
    pub decision: Decision,
    pub with: T,
    /// `Some` exactly when `decision` allows.
    pub cleared: Option<Cleared>,
}

/// Step 3: `policy` (the pipeline's decision of `ctx`, together with whatever it returns
/// besides), then the checks that deny an allowed request without asking the policy:
/// a placeholder credential in `uri` or `ctx.headers` that would leave for `up`, then a
/// credential that would leave `up` in plaintext.
pub async fn decide<T>(
    state: &SidecarState,
    ctx: &RequestContext,
    up: &UpstreamTarget,
    uri: &http::Uri,
    policy: impl Future<Output = (Decision, T)>,
) -> Decided<T> {
    let (mut decision, with) = policy.await;
    // The audit must show that the agent sends its key somewhere else, whatever the policy said.
    if let Some(detail) = state.connector.placeholder_leak(up, uri, &ctx.headers) {
        decision = decision.into_deny(DenyReason::CredentialLeak, detail);
    }
    let mut cleared = None;
    if decision.is_allow() {
        match state.connector.clear(up) {
            Ok(c) => cleared = Some(c),
            Err(detail) => decision = decision.into_deny(DenyReason::InsecureUpstream, detail),
        }
    }
    Decided {
        decision,
        with,
        cleared,
    }
}

/// Status, reason and detail of an abort after an allow (the connector could not carry it).
pub fn abort_of(failure: Failure) -> (StatusCode, &'static str, String) {
    match failure {
        Failure::RateLimited(d) => (StatusCode::TOO_MANY_REQUESTS, "RateLimited", d),
        Failure::UpstreamTimeout(d) => (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout", d),
        Failure::UpstreamUnavailable(d) | Failure::CredentialUnavailable(d) => {
            (StatusCode::BAD_GATEWAY, "UpstreamUnavailable", d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn hosts_normalize() {
        assert_eq!(
            normalize_host("API.OpenAI.com:443").unwrap(),
            "api.openai.com"
        );
        assert_eq!(normalize_host("[::1]:8080").unwrap(), "::1");
        assert_eq!(normalize_host("127.0.0.1").unwrap(), "127.0.0.1");
        assert!(normalize_host("a b").is_none());
        assert!(normalize_host("").is_none());
        assert!(normalize_host("evil.com/x").is_none());
    }
}
