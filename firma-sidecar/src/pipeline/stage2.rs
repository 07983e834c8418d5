//! Stage 2: Cedar over the current runtime bundle, with session state.
//!
//! The [`PolicyStore`] holds the last installed bundle and when it was last refreshed. A
//! bundle is *refreshed* whenever the source delivers it again (the Authority re-sends at least
//! every `[authority] bundle_ttl_seconds`; the local directory is re-read periodically), even if
//! unchanged. No refresh for `[sidecar.constraint_enforcement] bundle_ttl_seconds` makes every
//! decision `PolicyBundleStale`; before the first bundle every decision is
//! `PolicyBundleNotReady`. A bundle that does not compile, or whose schema lacks an action
//! class the mapping rules produce, is refused and does not count as a refresh, so a broken
//! source ends in a fail-closed stale state rather than in evaluating something unchecked.

use super::mapping::{MappingError, MappingRules};
use super::session_store::{Commit, Keys, RedisStore, Unavailable};
use super::sessions::{ActionCounters, count_and_decide};
use super::usage::{Reservation, UsageLedger, Want};
use crate::conn::DenyReason;
use firma_common::policy::{CompiledPolicies, EvalRequest, PolicyBundle, PolicyError, UsageTotals};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("policy bundle does not compile: {0}")]
    Compile(PolicyError),
    #[error("policy bundle does not declare an action class the mapping rules use: {0}")]
    Mapping(MappingError),
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<PolicyError> for InstallError {
    fn from(e: PolicyError) -> Self {
        Self::Compile(e)
    }
}

impl From<MappingError> for InstallError {
    fn from(e: MappingError) -> Self {
        Self::Mapping(e)
    }
}

struct Installed {
    policies: Arc<CompiledPolicies>,
    refreshed: Instant,
}

/// The current bundle and its freshness.
pub struct PolicyStore {
    current: RwLock<Option<Installed>>,
    ttl: Duration,
    mapping: Arc<MappingRules>,
    /// Notified on every install or mapping refusal, so startup can wait for the first bundle.
    installed: tokio::sync::watch::Sender<u64>,
    /// The last bundle refused because the mapping rules use an action class it lacks.
    mapping_refusal: std::sync::Mutex<Option<String>>,
}

/// What Stage 2 needs from one request.
#[derive(Debug, Clone, Copy)]
pub struct Stage2Request<'a> {
    pub agent_id: &'a str,
    pub session_id: &'a str,
    pub action_class: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The Cedar resource id, `host` + `path` (made once per request, for Stage 1 too).
    pub resource: &'a str,
    pub method: &'a str,
    /// Unix second after which no capability of the session known to Stage 1 is valid
    /// (bounds how long its counters must be kept, see [`super::sessions`]).
    pub live_until: i64,
    /// The time Stage 1 checked the capability against.
    pub now: i64,
    /// `context.request` (rules that extract body attributes).
    pub request: Option<&'a super::extract::Attributes>,
    /// `context.session` / `context.agent` token usage so far.
    pub usage: Option<(UsageTotals, UsageTotals)>,
    /// `context.mcp` (MCP endpoints); its named calls are counted per tool.
    pub mcp: Option<&'a super::mcp::Message>,
}

/// Stage 2's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage2Result {
    /// `None` when allowed.
    pub deny: Option<(DenyReason, String)>,
    pub matched_policies: Vec<String>,
    /// The `action_count` the policies saw.
    pub action_count: i64,
    /// Allowed from the local allowance while the shared session store was unreachable.
    pub local_allowance: bool,
}

impl PolicyStore {
    pub fn new(ttl: Duration, mapping: Arc<MappingRules>) -> Self {
        Self {
            current: RwLock::new(None),
            ttl,
            mapping,
            installed: tokio::sync::watch::channel(0).0,
            mapping_refusal: std::sync::Mutex::new(None),
        }
    }

    /// Why the last bundle was refused for lacking a mapped action class, if it was.
    pub fn mapping_refusal(&self) -> Option<String> {
        match self.mapping_refusal.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Compiles and installs `bundle` as refreshed at `refreshed`; returns whether its version
    /// differs from the one it replaces.
    pub fn install_at(
        &self,
        bundle: &PolicyBundle,
        refreshed: Instant,
    ) -> Result<bool, InstallError> {
        let same = self
            .read()
            .as_ref()
            .filter(|i| i.policies.version() == bundle.version)
            .map(|i| i.policies.clone());
        let policies = match same {
            Some(p) => p,
            None => {
                let compiled = bundle.compile()?;
                if let Err(e) = self.mapping.check_actions(compiled.action_classes()) {
                    if let Ok(mut r) = self.mapping_refusal.lock() {
                        *r = Some(e.to_string());
                    }
                    self.installed.send_modify(|n| *n += 1);
                    return Err(e.into());
                }
                Arc::new(compiled)
            }
        };
        let (changed, replaced) = {
            let mut cur = match self.current.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let changed = cur
                .as_ref()
                .is_none_or(|i| i.policies.version() != policies.version());
            let replaced = cur.replace(Installed {
                policies: policies.clone(),
                refreshed,
            });
            (changed, replaced)
        };
        self.installed.send_modify(|n| *n += 1);
        // An unchanged bundle was re-installed as the same `Arc`: nothing to free.
        if let Some(old) = replaced.filter(|old| !Arc::ptr_eq(&old.policies, &policies)) {
            retire(old.policies);
        }
        Ok(changed)
    }

    /// [`PolicyStore::install_at`] now.
    pub fn install(&self, bundle: &PolicyBundle) -> Result<bool, InstallError> {
        self.install_at(bundle, Instant::now())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Installed>> {
        match self.current.read() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    /// Version of the installed bundle.
    pub fn version(&self) -> Option<String> {
        self.read()
            .as_ref()
            .map(|i| i.policies.version().to_owned())
    }

    /// Time since the installed bundle was last refreshed.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.read()
            .as_ref()
            .map(|i| now.saturating_duration_since(i.refreshed))
    }

    /// Waits until a bundle is installed, one is refused for the mapping rules, or `timeout`
    /// passes; returns whether one is installed.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.installed.subscribe();
        let ready = async {
            while self.read().is_none() && self.mapping_refusal().is_none() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, ready).await;
        self.read().is_some()
    }

    /// The policies to evaluate with, or why there are none usable.
    pub fn usable(&self, now: Instant) -> Result<Arc<CompiledPolicies>, (DenyReason, String)> {
        match self.read().as_ref() {
            None => Err((
                DenyReason::PolicyBundleNotReady,
                "no runtime policy bundle received yet".into(),
            )),
            Some(i) => {
                let age = now.saturating_duration_since(i.refreshed);
                if age > self.ttl {
                    Err((
                        DenyReason::PolicyBundleStale,
                        format!(
                            "policy bundle {} last refreshed {}s ago (bundle_ttl_seconds = {})",
                            short(i.policies.version()),
                            age.as_secs(),
                            self.ttl.as_secs()
                        ),
                    ))
                } else {
                    Ok(i.policies.clone())
                }
            }
        }
    }
}

/// Frees a replaced bundle on the installing thread. Freeing 10,000 compiled policies takes
/// milliseconds, which must not land on whichever request happens to drop the last reference;
/// a request holds it only for its synchronous decision, so it is released within
/// microseconds (the wait is bounded all the same).
fn retire(mut old: Arc<CompiledPolicies>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match Arc::try_unwrap(old) {
            Ok(policies) => return drop(policies),
            Err(shared) if Instant::now() < deadline => {
                old = shared;
                std::thread::yield_now();
            }
            Err(_) => return,
        }
    }
}

fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

/// Evaluates one request with `policies`, counting it against the session on allow.
pub fn evaluate(
    policies: &CompiledPolicies,
    counters: &ActionCounters,
    req: &Stage2Request<'_>,
) -> Stage2Result {
    let counter = match counter_of(counters, req) {
        Ok(c) => c,
        Err(denied) => return denied,
    };
    count_and_decide(
        &counter,
        |n| eval_once(policies, req, n, req.usage),
        |r| r.deny.is_none(),
    )
}

/// [`evaluate`] for a metered request: the policies see the ledger's totals (reservations in
/// flight included) and, on allow, the call is counted and `want` reserved in one step with
/// what was evaluated; a concurrent change in between makes it evaluate again (see
/// [`super::usage`]). `req.usage` is ignored.
pub fn evaluate_reserving(
    policies: &CompiledPolicies,
    counters: &ActionCounters,
    req: &Stage2Request<'_>,
    ledger: &Arc<UsageLedger>,
    want: Want,
) -> (Stage2Result, Option<Reservation>) {
    use std::sync::atomic::Ordering;
    let counter = match counter_of(counters, req) {
        Ok(c) => c,
        Err(denied) => return (denied, None),
    };
    loop {
        let snap = ledger.snapshot(req.session_id, req.agent_id);
        let done = counter.load(Ordering::Acquire);
        let r = eval_once(
            policies,
            req,
            done.saturating_add(1),
            Some((snap.session, snap.agent)),
        );
        if let Some((reason, detail)) = r.deny {
            // The totals the budget forbids saw, for the audit.
            let detail = format!(
                "{detail} (session tokens_used = {}, of which reserved {}; agent tokens_used = {})",
                snap.session.tokens_used(),
                snap.session.reserved_tokens,
                snap.agent.tokens_used()
            );
            let r = Stage2Result {
                deny: Some((reason, detail)),
                ..r
            };
            return (r, None);
        }
        let counted = || {
            counter
                .compare_exchange(
                    done,
                    done.saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        };
        if let Some(held) = ledger.reserve_if(&snap, req.session_id, req.agent_id, want, counted) {
            return (r, Some(held));
        }
    }
}

/// What `action_count` counts: the action class, or for MCP calls that name a tool
/// (resource, prompt) the name (see `docs/mcp.md`).
fn counter_key(req: &Stage2Request<'_>) -> String {
    req.mcp
        .map(super::mcp::Message::counter_key)
        .unwrap_or_else(|| req.action_class.to_owned())
}

fn counter_of(
    counters: &ActionCounters,
    req: &Stage2Request<'_>,
) -> Result<Arc<std::sync::atomic::AtomicI64>, Stage2Result> {
    let key = counter_key(req);
    counters
        .counter(req.session_id, &key, req.live_until, req.now)
        .map_err(|full| {
            // Fail closed: without a counter `action_count` limits could not hold.
            Stage2Result {
                deny: Some((
                    DenyReason::PolicyDenied,
                    format!(
                        "{} on {}: session {:?} cannot be counted: {full}",
                        req.action_class, req.resource, req.session_id
                    ),
                )),
                matched_policies: Vec::new(),
                action_count: 0,
                local_allowance: false,
            }
        })
}

/// Stage 2 against the shared session store (see [`super::session_store`]): the policies see
/// the counts and usage totals in Redis, and an allow is committed there (counted, and `want`
/// reserved when given) only if they did not change meanwhile; else it evaluates again with the
/// state the commit returned. `req.usage` is ignored. An unreachable store denies
/// `SessionStoreUnavailable` (or uses the local allowance for calls that reserve nothing).
pub async fn evaluate_shared(
    policies: &CompiledPolicies,
    store: &Arc<RedisStore>,
    req: &Stage2Request<'_>,
    want: Option<Want>,
) -> (Stage2Result, Option<Reservation>) {
    let keys = store.keys(req.session_id, &counter_key(req), req.agent_id);
    let _gate = store.gate(&keys, want.is_some()).await;
    let mut seen = match store.read(&keys).await {
        Ok(s) => s,
        Err(e) => return (unavailable(policies, store, req, &keys, want, &e), None),
    };
    loop {
        let r = eval_once(
            policies,
            req,
            seen.count.saturating_add(1),
            Some((seen.session, seen.agent)),
        );
        if let Some((reason, detail)) = r.deny {
            let detail = match want {
                Some(_) => format!(
                    "{detail} (session tokens_used = {}, of which reserved {}; agent tokens_used = {})",
                    seen.session.tokens_used(),
                    seen.session.reserved_tokens,
                    seen.agent.tokens_used()
                ),
                None => detail,
            };
            let r = Stage2Result {
                deny: Some((reason, detail)),
                ..r
            };
            return (r, None);
        }
        match store.commit(&keys, &seen, want, req.live_until).await {
            Ok(Commit::Done(held)) => {
                let held = held.map(|h| Reservation::shared(Box::new(h), want.unwrap_or_default()));
                return (r, held);
            }
            Ok(Commit::Conflict(now)) => seen = now,
            Err(e) => return (unavailable(policies, store, req, &keys, want, &e), None),
        }
    }
}

/// The decision while the shared store cannot be reached.
fn unavailable(
    policies: &CompiledPolicies,
    store: &RedisStore,
    req: &Stage2Request<'_>,
    keys: &Keys,
    want: Option<Want>,
    e: &Unavailable,
) -> Stage2Result {
    // Metered calls are never allowed locally: their token budgets live in the store.
    if want.is_none() {
        while let Some(n) = store.local_count(req.session_id, keys) {
            let r = eval_once(policies, req, n, None);
            if r.deny.is_some() {
                return r;
            }
            if store.local_commit(req.session_id, keys, n, req.live_until) {
                return Stage2Result {
                    local_allowance: true,
                    ..r
                };
            }
        }
    }
    let allowance = match store.on_unavailable() {
        super::session_store::config::OnUnavailable::Deny => "",
        _ if want.is_some() => " (metered calls get no local allowance)",
        _ => " (this session's local allowance is used up)",
    };
    Stage2Result {
        deny: Some((
            DenyReason::SessionStoreUnavailable,
            format!(
                "{} on {}: session {:?} cannot be counted: {e}{allowance}",
                req.action_class, req.resource, req.session_id
            ),
        )),
        matched_policies: Vec::new(),
        action_count: 0,
        local_allowance: false,
    }
}

fn eval_once(
    policies: &CompiledPolicies,
    req: &Stage2Request<'_>,
    n: i64,
    usage: Option<(UsageTotals, UsageTotals)>,
) -> Stage2Result {
    let resource_id = req.resource;
    let r = policies.evaluate(&EvalRequest {
        agent_id: req.agent_id,
        action: req.action_class,
        resource_id,
        host: Some(req.host),
        path: Some(req.path),
        action_count: n,
        session_id: req.session_id,
        method: req.method,
        request: req.request,
        usage,
        mcp: req.mcp.map(|m| &m.context),
    });
    let deny = (!r.allowed).then(|| {
        let why = if r.determining_policies.is_empty() {
            "no policy permits it".to_string()
        } else {
            format!("forbidden by {}", r.determining_policies.join(", "))
        };
        let errs = if r.errors.is_empty() {
            String::new()
        } else {
            format!(" (errors: {})", r.errors.join("; "))
        };
        (
            DenyReason::PolicyDenied,
            format!(
                "{} on {resource_id} (action_count = {n}): {why}{errs}",
                req.action_class
            ),
        )
    });
    Stage2Result {
        deny,
        matched_policies: r.determining_policies,
        action_count: n,
        local_allowance: false,
    }
}
