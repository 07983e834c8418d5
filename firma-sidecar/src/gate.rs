//! The decision for a request Firma does not carry itself: the embedded layer (`firma-embed`)
//! and Envoy's ext_authz (`crate::ext_authz`) hand a request's method, target, headers and
//! (optionally) body to [`Gate::check`] and get back what to do with it.
//!
//! The steps are the interceptors', from the same functions: the one sequence of
//! [`crate::sequence`] (normalise -> extract (query, then a supplied body) -> [`sequence::decide`]:
//! the pipeline, placeholder leak, plaintext credential -> [`crate::connector::Connector::admit`]
//! (credential, rate limit) -> the ALLOW decision persisted with [`RequestAudit::commit`] before
//! the caller may send anything). What the caller gets on allow is the header edit the
//! interceptor would have made: the agent's own credential headers and every `x-firma-*`
//! removed, Firma's credential set.
//!
//! Not here, by design: the upstream address (the caller connects: its resolver, its TLS), and
//! LLM token metering (Stage 2 still sees the session's totals, but a call decided here is not
//! charged: the response does not pass through Firma). MCP endpoints are decided per JSON-RPC
//! message only where Firma reads the body itself: a request to one is denied here.

use crate::audit::{Committed, RequestAudit};
use crate::conn::{ConnectionInfo, ConnectorOutcome, Decision, DenyReason};
use crate::connector::{Failure, UpstreamTarget};
use crate::pipeline::path::NormalPath;
use crate::pipeline::{RequestContext, extract};
use crate::sequence::{self, Decided};
use crate::state::SidecarState;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;

/// One request, as the caller will send it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: http::Method,
    /// Host name as the caller addresses it (normalised here: lowercase, no port).
    pub host: String,
    pub port: u16,
    /// Whether the request leaves over TLS verified for `host` (a credential only goes then).
    pub tls: bool,
    /// Path and query as sent (`/v1/x?y=1`).
    pub path_and_query: String,
    /// The request's headers, `x-firma-*` included (they select the capability).
    pub headers: HeaderMap,
    /// The body, when the caller has it; a rule that extracts from the body denies without it.
    pub body: Option<Bytes>,
    /// Whether the caller forwards [`Allowed::path_and_query`] (the normalised path). When it
    /// cannot (ext_authz), a path that normalisation would change is denied.
    pub may_rewrite_path: bool,
}

/// What to do with an allowed request.
pub struct Allowed {
    pub decision: Decision,
    /// Headers to remove before sending: every `x-firma-*` and the agent's own credential
    /// headers for this host.
    pub remove: Vec<HeaderName>,
    /// Headers to set (replace): Firma's credential, if the host has one.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// The path and query to send (normalised).
    pub path_and_query: String,
    /// What the decision event recorded of the connector (credential injected, its source):
    /// complete it (status, timings) for [`Committed::finish`].
    pub planned: ConnectorOutcome,
    /// The persisted decision; finish it with what the upstream answered (dropped unfinished:
    /// an `outcome` event with `aborted = "ClientGone"`).
    pub audit: Committed,
}

impl Allowed {
    /// Applies [`Self::remove`] and [`Self::set`] to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for h in &self.remove {
            headers.remove(h);
        }
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
    }
}

/// The verdict on one [`Call`]; every variant is already in the audit.
pub enum Verdict {
    Allow(Box<Allowed>),
    /// Denied: the reason is `decision.reason`, the JSON body `decision.deny_body()`.
    Deny(Decision),
    /// Allowed by policy but not sendable now (no rate-limit permit within the host's timeout):
    /// HTTP `status`, `reason` as in the sidecar's aborts.
    Abort {
        status: http::StatusCode,
        reason: &'static str,
        detail: String,
    },
}

/// The shared pipeline, connector and audit ([`SidecarState`]), for callers that carry
/// requests themselves. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    state: Arc<SidecarState>,
}

impl Gate {
    /// The sidecar's own state (ext_authz), or one built for an embedder (no MITM, no
    /// listeners).
    pub fn new(state: Arc<SidecarState>) -> Self {
        Self { state }
    }

    pub fn state(&self) -> &Arc<SidecarState> {
        &self.state
    }

    /// A fresh connection record for one caller (a process-unique id for the audit).
    pub fn new_conn(
        &self,
        kind: crate::conn::InterceptKind,
        peer: std::net::SocketAddr,
        workload: Option<crate::conn::Workload>,
    ) -> ConnectionInfo {
        self.state.new_conn(kind, peer, None, workload)
    }

    /// Decides `call` for the client `conn` (whose `workload`, if set, binds the agent).
    pub async fn check(&self, conn: &ConnectionInfo, call: Call) -> Verdict {
        let host = sequence::normalize_host(&call.host);
        let (raw_path, query) = match call.path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (call.path_and_query.clone(), None),
        };
        let rec = RequestAudit::new(&self.state.audit, conn)
            .method(Some(call.method.as_str()))
            .target(host.as_deref(), call.port, Some(&raw_path));
        let Some(host) = host else {
            return deny(
                rec,
                DenyReason::MalformedRequest,
                format!("invalid host {:?}", call.host),
            );
        };
        let path = match NormalPath::new(&raw_path) {
            Ok(p) => p,
            Err(e) => return deny(rec, DenyReason::MalformedRequest, e.to_string()),
        };
        if path != *raw_path && !call.may_rewrite_path {
            return deny(
                rec,
                DenyReason::MalformedRequest,
                format!(
                    "path {raw_path:?} is not in normal form ({path:?}) and the proxy forwards it as received (enable the proxy's path normalisation)"
                ),
            );
        }
        let rec = rec.target(Some(&host), call.port, Some(&path));
        if self
            .state
            .pipeline
            .mcp_endpoint(call.method.as_str(), &host, &path)
            .is_some()
        {
            return deny(
                rec,
                DenyReason::MalformedRequest,
                "an MCP endpoint is decided per JSON-RPC message, which only the proxy modes read; route it through the http_proxy or transparent sidecar",
            );
        }
        // Attributes for Cedar: the query string's, then the body's (bounded like the proxy's).
        let spec = self
            .state
            .pipeline
            .extraction(call.method.as_str(), &host, &path);
        let mut attrs = None;
        if !spec.is_empty() {
            let mut a = match extract::extract_query(&spec, query.as_deref()) {
                Ok(a) => a,
                Err(detail) => return deny(rec, DenyReason::MalformedRequest, detail),
            };
            if extract::reads_body(&spec) {
                let Some(body) = &call.body else {
                    return deny(
                        rec,
                        DenyReason::MalformedRequest,
                        "the mapping rule for this request reads its body, which the caller did not supply (ext_authz: with_request_body)",
                    );
                };
                let limit = self.state.pipeline.extract_limit();
                if body.len() > limit {
                    return deny(
                        rec,
                        DenyReason::BodyTooLarge,
                        format!(
                            "body of {} bytes is over extract_max_body_bytes = {limit}",
                            body.len()
                        ),
                    );
                }
                match extract::extract_measured(&spec, body) {
                    Ok((b, _)) => a.extend(b),
                    Err(detail) => return deny(rec, DenyReason::MalformedRequest, detail),
                }
            }
            attrs = Some(a);
        }
        let rec = rec.request_attrs(attrs.as_ref().map(extract::to_json));
        let path_and_query = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let up = UpstreamTarget {
            host: host.clone(),
            port: call.port,
            tls: call.tls,
        };
        let ctx = RequestContext {
            conn: conn.clone(),
            method: call.method.clone(),
            host: host.clone(),
            port: call.port,
            path,
            headers: call.headers,
            tls: call.tls,
            request: attrs,
        };
        let uri: http::Uri = path_and_query.parse().unwrap_or_default();
        let Decided {
            decision, cleared, ..
        } = sequence::decide(&self.state, &ctx, &up, &uri, async {
            (self.state.pipeline.decide(&ctx).await, ())
        })
        .await;
        let Some(cleared) = cleared else {
            rec.deny(&decision);
            return Verdict::Deny(decision);
        };
        let injection = match self.state.connector.admit(&cleared).await {
            Ok(i) => i,
            Err(Failure::CredentialUnavailable(d)) => {
                let d = decision.into_deny(DenyReason::CredentialUnavailable, d);
                rec.deny(&d);
                return Verdict::Deny(d);
            }
            Err(f) => {
                let (status, reason, detail) = sequence::abort_of(f);
                let outcome = ConnectorOutcome {
                    aborted: Some(reason.to_string()),
                    ..Default::default()
                };
                rec.abort_before_send(&decision, outcome);
                return Verdict::Abort {
                    status,
                    reason,
                    detail,
                };
            }
        };
        let mut planned = ConnectorOutcome::default();
        let mut set = Vec::new();
        if let Some(inj) = injection {
            planned.credential_injected = true;
            planned.credential_source = Some(inj.source);
            set.push((inj.header, inj.value));
        }
        let mut remove: Vec<HeaderName> = ctx
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-firma-"))
            .cloned()
            .collect();
        remove.extend(
            self.state
                .connector
                .agent_credential_headers(&host)
                .iter()
                .cloned(),
        );
        match rec.commit(&decision, planned.clone()).await {
            Ok(audit) => Verdict::Allow(Box::new(Allowed {
                decision,
                remove,
                set,
                path_and_query,
                planned,
                audit,
            })),
            Err((rec, e)) => Verdict::Deny(rec.deny_unaudited(&e)),
        }
    }
}

fn deny(rec: RequestAudit, reason: DenyReason, detail: impl Into<String>) -> Verdict {
    let d = Decision::deny(reason, detail);
    rec.deny(&d);
    Verdict::Deny(d)
}
