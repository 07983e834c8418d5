//! The audit funnel: the only way request handlers write audit events.
//!
//! A [`RequestAudit`] is made when a request (or a tunnel, or a connection that fails before
//! HTTP) is accepted, and ends in exactly one of:
//! - [`RequestAudit::deny`]: one `decision` event (DENY), or, over the workload's budget for
//!   the window, one count in its `deny_summary` ([`super::aggregate`]); nothing was sent
//!   upstream.
//! - [`RequestAudit::commit`]: one `decision` event (ALLOW), *persisted before it returns*;
//!   only then may the caller send anything upstream. If the sink cannot persist it, the caller
//!   gets the recorder back and must deny (`AuditUnavailable`). The [`Committed`] it returns
//!   ends in one `outcome` event: [`Committed::finish`], or, when the handler is dropped
//!   (client closed, stream reset, panic), an outcome with `aborted = "ClientGone"`.
//! - dropped undecided: one `abandoned` event.
//!
//! So "the upstream saw it" implies "the audit has its ALLOW decision", whatever the client
//! does, and a `kill -9` after the decision was acknowledged cannot lose it.

use super::{AuditInput, AuditLog, AuditUnavailable, ConnectorOutcome, event};
use crate::conn::{ConnectionInfo, Decision, DenyReason};
use serde_json::{Map, Value};

/// Where a request or tunnel was going, as far as known.
#[derive(Debug, Clone, Default)]
struct Intent {
    method: Option<String>,
    host: Option<String>,
    port: u16,
    path: Option<String>,
    /// DNS guard queries: `envelope.intent.dns` (`qname`, `qtype`, and after an answer `rcode`,
    /// `answers`, `cname_chain`, `upstream`).
    dns: Option<Map<String, Value>>,
    /// `envelope.intent.request`: attributes extracted from the body for Cedar.
    request: Option<Value>,
    /// `envelope.intent.destination`: a `DestinationMismatch`'s decided name, its addresses
    /// and ports, and the client's original destination.
    destination: Option<Value>,
}

impl Intent {
    /// `envelope.intent.dns` (DNS queries) and `envelope.intent.request` (extracted body
    /// attributes), when there are any.
    fn extra(&self) -> event::IntentExtra<'_> {
        event::IntentExtra {
            dns: self.dns.as_ref(),
            request: self.request.as_ref(),
            destination: self.destination.as_ref(),
        }
    }

    fn input<'a>(
        &'a self,
        conn: &'a ConnectionInfo,
        decision: &'a Decision,
        connector: Option<ConnectorOutcome>,
    ) -> AuditInput<'a> {
        AuditInput {
            conn,
            method: self.method.as_deref(),
            host: self.host.as_deref(),
            port: self.port,
            path: self.path.as_deref(),
            decision,
            connector,
        }
    }
}

/// The audit record of one request or tunnel, from acceptance to its decision.
pub struct RequestAudit {
    log: AuditLog,
    conn: ConnectionInfo,
    intent: Intent,
    done: bool,
}

impl RequestAudit {
    pub fn new(log: &AuditLog, conn: &ConnectionInfo) -> Self {
        Self {
            log: log.clone(),
            conn: conn.clone(),
            intent: Intent::default(),
            done: false,
        }
    }

    pub fn method(mut self, method: Option<&str>) -> Self {
        self.intent.method = method.map(str::to_owned);
        self
    }

    /// Attributes extracted from the request body (recorded with the decision and outcome).
    pub fn request_attrs(mut self, attrs: Option<serde_json::Value>) -> Self {
        self.intent.request = attrs;
        self
    }

    /// What is known of the destination so far (host may be unknown, path is for requests).
    pub fn target(mut self, host: Option<&str>, port: u16, path: Option<&str>) -> Self {
        self.intent.host = host.map(str::to_owned);
        self.intent.port = port;
        self.intent.path = path.map(str::to_owned);
        self
    }

    /// Why the destination could not be bound: becomes `envelope.intent.destination`.
    pub fn destination(mut self, record: Value) -> Self {
        self.intent.destination = Some(record);
        self
    }

    /// A DNS guard query: `fields` become `envelope.intent.dns`.
    pub fn dns(mut self, fields: Map<String, Value>) -> Self {
        self.intent.dns = Some(fields);
        self
    }

    fn input<'a>(
        &'a self,
        decision: &'a Decision,
        connector: Option<ConnectorOutcome>,
    ) -> AuditInput<'a> {
        self.intent.input(&self.conn, decision, connector)
    }

    fn body(
        &self,
        event_id: &str,
        decision: &Decision,
        connector: Option<ConnectorOutcome>,
    ) -> String {
        event::decision(
            &self.input(decision, connector),
            event_id,
            self.intent.extra(),
        )
    }

    /// Records a denial (nothing was or will be sent upstream).
    pub fn deny(mut self, decision: &Decision) {
        self.done = true;
        crate::pipeline::metrics::decision(decision);
        tracing::debug!(
            conn = self.conn.conn_id,
            method = self.intent.method.as_deref().unwrap_or("-"),
            host = self.intent.host.as_deref().unwrap_or("-"),
            port = self.intent.port,
            path = self.intent.path.as_deref().unwrap_or("-"),
            reason = decision.reason.map_or("-", DenyReason::as_str),
            detail = %decision.detail,
            "denied"
        );
        // Over its workload's budget in this window, the denial is counted for a summary
        // instead of written (docs/architecture.md, "Audit aggregation").
        let denial = super::Denial {
            kind: super::AggregateKind::Denied,
            intercept: self.conn.kind,
            conn_id: Some(self.conn.conn_id),
            peer: self.conn.peer,
            original_dst: self.conn.original_dst,
            workload: self.conn.workload.as_ref(),
            reason: decision.reason.unwrap_or(DenyReason::MalformedRequest),
            method: self.intent.method.as_deref(),
            host: self.intent.host.as_deref(),
            port: self.intent.port,
            path: self.intent.path.as_deref(),
            detail: &decision.detail,
        };
        if self.log.admit_denial(&denial) {
            self.log
                .record_body(self.body(&event::new_id(), decision, None));
        }
    }

    /// Persists the ALLOW decision; `planned` says which credential will be attached. On
    /// `Err` nothing may be sent: deny the request with [`DenyReason::AuditUnavailable`]
    /// through the returned recorder.
    pub async fn commit(
        mut self,
        decision: &Decision,
        planned: ConnectorOutcome,
    ) -> Result<Committed, (Self, AuditUnavailable)> {
        let id = event::new_id();
        let body = self.body(&id, decision, Some(planned.clone()));
        match self.log.persist_body(body).await {
            Ok(()) => {
                self.done = true;
                crate::pipeline::metrics::decision(decision);
                Ok(Committed {
                    log: self.log.clone(),
                    conn: self.conn.clone(),
                    intent: std::mem::take(&mut self.intent),
                    decision: decision.clone(),
                    decision_event_id: id,
                    outcome: planned,
                    done: false,
                })
            }
            Err(e) => Err((self, e)),
        }
    }

    /// Records an allowed decision that ended before anything was sent (no rate-limit permit,
    /// no upstream address): one `decision` event with `connector.aborted` set.
    pub fn abort_before_send(mut self, decision: &Decision, outcome: ConnectorOutcome) {
        self.done = true;
        crate::pipeline::metrics::decision(decision);
        crate::pipeline::metrics::outcome(&outcome);
        tracing::warn!(
            conn = self.conn.conn_id,
            host = self.intent.host.as_deref().unwrap_or("-"),
            aborted = outcome.aborted.as_deref().unwrap_or("-"),
            "aborted after allow, before sending"
        );
        self.log
            .record_body(self.body(&event::new_id(), decision, Some(outcome)));
    }

    /// Denies with [`DenyReason::AuditUnavailable`] after a failed [`Self::commit`].
    pub fn deny_unaudited(self, e: &AuditUnavailable) -> Decision {
        let d = Decision::deny(
            DenyReason::AuditUnavailable,
            format!("{e}; nothing is allowed unaudited"),
        );
        self.deny(&d);
        d
    }
}

impl Drop for RequestAudit {
    fn drop(&mut self) {
        if !self.done {
            let d = Decision::deny(DenyReason::MalformedRequest, "");
            self.log
                .record_body(event::abandoned(&self.input(&d, None)));
        }
    }
}

/// An allowed request or tunnel whose decision is persisted; ends in one `outcome` event.
pub struct Committed {
    log: AuditLog,
    conn: ConnectionInfo,
    intent: Intent,
    decision: Decision,
    decision_event_id: String,
    outcome: ConnectorOutcome,
    done: bool,
}

impl Committed {
    /// Records what happened upstream (fields of `outcome` override the planned ones).
    pub fn finish(mut self, outcome: ConnectorOutcome) {
        self.outcome = outcome;
        self.write();
    }

    /// Adds what a DNS answer said (`rcode`, `answers`, ...) to the outcome's
    /// `envelope.intent.dns`.
    pub fn dns_result(&mut self, fields: Map<String, Value>) {
        self.intent.dns.get_or_insert_with(Map::new).extend(fields);
    }

    /// The outcome so far, to update before [`Self::finish`] (or before a drop).
    pub fn outcome_mut(&mut self) -> &mut ConnectorOutcome {
        &mut self.outcome
    }

    fn write(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let input = self
            .intent
            .input(&self.conn, &self.decision, Some(self.outcome.clone()));
        crate::pipeline::metrics::outcome(&self.outcome);
        tracing::debug!(
            conn = self.conn.conn_id,
            method = self.intent.method.as_deref().unwrap_or("-"),
            host = self.intent.host.as_deref().unwrap_or("-"),
            port = self.intent.port,
            path = self.intent.path.as_deref().unwrap_or("-"),
            status = self.outcome.upstream_status,
            aborted = self.outcome.aborted.as_deref().unwrap_or("-"),
            credential_injected = self.outcome.credential_injected,
            "allowed"
        );
        let body = event::outcome(&input, &self.decision_event_id, self.intent.extra());
        self.log.record_body(body);
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if !self.done {
            self.outcome.client_gone = true;
            if self.outcome.aborted.is_none() && self.outcome.upstream_status.is_none() {
                self.outcome.aborted = Some("ClientGone".into());
            }
            self.write();
        }
    }
}
