//! The decision pipeline shared by every interception mode.
//!
//! Contract between interceptors/connector and the decision stages. Interceptors build a
//! [`RequestContext`] per HTTP request (or a [`DestinationContext`] per opaque tunnel) and get a
//! [`Decision`]; they never decide anything themselves.
//!
//! Phases of [`Pipeline::decide`], in order:
//! 0. **normalised** ([`path`]): the request's path is a [`path::NormalPath`], normalised once
//!    by the caller (`crate::sequence`), which denied an ambiguous one (`%2F`, a backslash,
//!    NUL, ...) `MalformedRequest` and forwards the normalised form; the type keeps a raw path
//!    out of here;
//! 1. **classify** ([`mapping`]): method + host + path -> action class. Unmapped requests deny
//!    `UnclassifiedIntent` when `default_protected`, else pass through (`passthrough = true`);
//! 2. **bundle state** ([`stage2::PolicyStore`]): no bundle yet -> `PolicyBundleNotReady`, no
//!    refresh for `bundle_ttl_seconds` -> `PolicyBundleStale`. This applies to pass-through
//!    requests too: a stale sidecar denies everything;
//! 3. **Stage 1** ([`stage1`]): identity -> capability, scope, revocation, expiry;
//! 4. **Stage 2** ([`stage2`]): Cedar with `action_count`, `session_id`, `method`.
//!
//! The whole decision must finish within `enforcement_timeout_ms` or it is
//! `EnforcementTimeout`: the stages are synchronous CPU work, so the budget is checked when
//! they return (a decision that overran is never turned into an allow).

pub mod body_budget;
pub mod bundle_source;
pub mod extract;
pub mod mapping;
pub mod mcp;
pub mod metrics;
pub mod path;
pub mod revocations;
pub mod session_store;
pub mod sessions;
pub mod stage1;
pub mod stage2;
mod types;
pub mod usage;

pub use types::*;
// The decision types live on the ground floor; re-exported for the pipeline's callers.
pub use crate::conn::{
    CapabilitySummary, ConnectionInfo, Decision, DenyReason, InterceptKind, Outcome, Workload,
};

use crate::authority_client::{self, AuthorityEndpoint, ClientError};
use crate::config::SidecarConfig;
use firma_common::capability::now_unix;
use firma_common::policy::{PolicyBundle, PolicyError};
use mapping::{MappingError, MappingRules};
use revocations::RevocationSet;
use sessions::ActionCounters;
use stage1::{Caller, CapabilityStore, SeedError, Stage1Request};
use stage2::{InstallError, PolicyStore, Stage2Request};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long startup waits for the first bundle from the Authority before going on without
/// one (requests then deny `PolicyBundleNotReady` until it arrives).
const FIRST_BUNDLE_WAIT: Duration = Duration::from_secs(3);

/// Errors that stop the sidecar from starting (bad seed, bad mapping rules, ...).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Startup(String),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error("[sidecar.authority] public_key_path: {0}")]
    PublicKey(firma_common::keys::KeyError),
    #[error("[sidecar.policy] dir: {0}")]
    PolicyDir(PolicyError),
    #[error("[sidecar.policy] {0}")]
    Bundle(InstallError),
    #[error("[sidecar.policy] {0}")]
    Authority(ClientError),
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<firma_common::keys::KeyError> for PipelineError {
    fn from(e: firma_common::keys::KeyError) -> Self {
        Self::PublicKey(e)
    }
}

impl From<PolicyError> for PipelineError {
    fn from(e: PolicyError) -> Self {
        Self::PolicyDir(e)
    }
}

impl From<InstallError> for PipelineError {
    fn from(e: InstallError) -> Self {
        Self::Bundle(e)
    }
}

impl From<ClientError> for PipelineError {
    fn from(e: ClientError) -> Self {
        Self::Authority(e)
    }
}

struct Inner {
    mapping: Arc<MappingRules>,
    default_protected: bool,
    capabilities: CapabilityStore,
    policies: Arc<PolicyStore>,
    counters: ActionCounters,
    /// Token usage per session and agent (`context.session` / `context.agent`).
    usage: Arc<usage::UsageLedger>,
    /// `[sidecar.session_store] backend = "redis"`: counters and usage shared by sidecars
    /// (replaces `counters` and `usage` for Stage 2).
    store: Option<Arc<session_store::RedisStore>>,
    revoked: Arc<RevocationSet>,
    budget: Duration,
    /// `[sidecar.mapping] extract_max_body_bytes`.
    extract_limit: usize,
    /// `[sidecar.mcp]`.
    mcp: crate::config::McpConfig,
    /// `[sidecar.llm] reserve_output_tokens`.
    reserve_output_tokens: i64,
    /// `[[sidecar.llm.prices]]`: model -> USD per 1k (input, output) tokens (a metered call's
    /// reservation is priced before the decision, its usage after the response).
    prices: std::collections::HashMap<String, (f64, f64)>,
    /// `[sidecar.mapping] extract_body_budget_bytes`, shared by every request.
    body_budget: std::sync::Arc<body_budget::BodyBudget>,
    /// Background tasks (authority streams, directory reload), stopped with the pipeline.
    _tasks: Tasks,
}

/// Aborts the tasks it holds when dropped, so a dropped or failed pipeline leaves nothing
/// running.
#[derive(Default)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Tasks {
    fn spawn<F>(&mut self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.0.push(tokio::spawn(fut).abort_handle());
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// classify -> identify -> Stage 1 -> Stage 2. Cheap to clone (`Arc` inside).
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

impl Pipeline {
    /// Builds the pipeline from config: mapping rules, seeds, bundle source, revocations.
    /// Spawns background tasks (authority streams, local reload) on the current tokio runtime.
    pub async fn start(cfg: &SidecarConfig) -> Result<Self, PipelineError> {
        let mapping = Arc::new(MappingRules::load(&cfg.mapping.all_paths())?);
        tracing::info!(
            target: "firma_sidecar::startup::mapping",
            "loaded {} mapping rule(s) from {} file(s)",
            mapping.len(),
            mapping.files().len()
        );
        let key = firma_common::keys::load_verifying_key(&cfg.authority.public_key_path)?;
        let revoked = Arc::new(RevocationSet::new());
        let mut capabilities = CapabilityStore::new(
            key,
            cfg.capability_validation.clock_skew_tolerance_seconds,
            revoked.clone(),
        );
        capabilities.load_seeds(&cfg.capability_seed.paths, now_unix())?;
        let ttl = Duration::from_secs(cfg.constraint_enforcement.bundle_ttl_seconds);
        let policies = Arc::new(PolicyStore::new(ttl, mapping.clone()));
        let mut tasks = Tasks::default();
        let usage = Arc::new(
            usage::UsageLedger::open(cfg.llm.usage_state_path.as_deref())
                .map_err(|e| PipelineError::Startup(e.to_string()))?,
        );
        if cfg.llm.usage_state_path.is_some() {
            let ledger = usage.clone();
            tasks.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Err(e) = ledger.flush() {
                        tracing::warn!(target: "firma_sidecar::llm", "{e}");
                    }
                }
            });
        }

        let store = match cfg.session_store.backend {
            session_store::config::Backend::Memory => None,
            session_store::config::Backend::Redis => {
                let store = session_store::RedisStore::connect(
                    &cfg.session_store,
                    session_store::metrics::get(),
                )
                .map_err(|e| PipelineError::Startup(e.to_string()))?;
                let url = cfg.session_store.url.as_deref().unwrap_or_default();
                if store.warm_up().await {
                    tracing::info!(
                        target: "firma_sidecar::startup::session_store",
                        "session state shared on {url} (key prefix {:?}, on_unavailable = {:?})",
                        cfg.session_store.key_prefix,
                        cfg.session_store.on_unavailable
                    );
                }
                tasks.spawn(store.clone().maintain());
                Some(store)
            }
        };

        let authority_urls = cfg.policy.authority_urls();
        match authority_urls.first() {
            Some(_) => {
                let eps = authority_urls
                    .iter()
                    .map(|url| AuthorityEndpoint::new(url, cfg.authority.ca_cert_path.as_deref()))
                    .collect::<Result<Vec<_>, _>>()?;
                let ep = eps[0].clone();
                let cache = cfg.policy.dir.clone();
                if let Some(dir) = &cache
                    && let Err(e) = bundle_source::load_cache(&policies, dir)
                {
                    tracing::warn!(target: "firma_sidecar::policy", "ignoring cached bundle: {e}");
                }
                let store = policies.clone();
                tasks.spawn(authority_client::run_bundle_stream(
                    eps.clone(),
                    ttl,
                    move |b| bundle_source::on_streamed(&store, cache.as_deref(), b),
                ));
                let set = revoked.clone();
                tasks.spawn(authority_client::run_revocation_stream(
                    eps,
                    move |u| {
                        if set.insert(u.token_id) {
                            if !u.replay {
                                tracing::info!(target: "firma_sidecar::revocation", "revoked capability {}", u.token_id);
                            }
                            crate::authority_client::metrics::revocation_applied(&u);
                        }
                        if !u.replay {
                            set.mark_synced();
                        }
                    },
                ));
                if !policies.wait_ready(FIRST_BUNDLE_WAIT).await {
                    if let Some(why) = policies.mapping_refusal() {
                        return Err(PipelineError::Startup(format!(
                            "[sidecar.mapping]: the authority's bundle does not fit the mapping rules: {why}"
                        )));
                    }
                    tracing::warn!(
                        target: "firma_sidecar::startup::authority",
                        "no policy bundle from authority {} yet; denying PolicyBundleNotReady until one arrives",
                        ep.addr
                    );
                }
            }
            None => {
                let dir = cfg.policy.dir.clone().ok_or_else(|| {
                    PipelineError::Startup(
                        "[sidecar.policy]: expected `dir` or `authority_url`".into(),
                    )
                })?;
                let bundle = PolicyBundle::load_dir(&dir)?;
                policies.install(&bundle)?;
                tracing::info!(
                    target: "firma_sidecar::startup::policy",
                    "loaded runtime bundle ({} file(s)) from {}",
                    bundle.file_count(),
                    dir.display()
                );
                tasks.spawn(bundle_source::watch_dir(
                    dir,
                    policies.clone(),
                    bundle_source::reload_period(ttl),
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                mapping,
                default_protected: cfg.mapping.default_protected,
                capabilities,
                policies,
                counters: ActionCounters::new(),
                usage,
                store,
                revoked,
                budget: Duration::from_millis(cfg.constraint_enforcement.enforcement_timeout_ms),
                extract_limit: cfg.mapping.extract_max_body_bytes,
                mcp: cfg.mcp.clone(),
                reserve_output_tokens: cfg.llm.reserve_output_tokens(),
                prices: cfg
                    .llm
                    .prices
                    .iter()
                    .map(|p| (p.model.clone(), (p.input_per_1k_usd, p.output_per_1k_usd)))
                    .collect(),
                body_budget: body_budget::BodyBudget::new(cfg.mapping.extract_body_budget_bytes),
                _tasks: tasks,
            }),
        })
    }

    /// Decides one HTTP request.
    pub async fn decide(&self, req: &RequestContext) -> Decision {
        self.decide_reserving(req, None).await.0
    }

    /// [`Pipeline::decide`] for a metered LLM request: on allow, `want` is reserved against the
    /// session's and agent's budgets in the same step as the decision (see [`usage`]). The
    /// reservation is settled by the caller when the response ends; dropped, it is released.
    pub async fn decide_reserving(
        &self,
        req: &RequestContext,
        want: Option<usage::Want>,
    ) -> (Decision, Option<usage::Reservation>) {
        let t0 = Instant::now();
        let path = req.path.as_str();
        let class = self
            .inner
            .mapping
            .classify(req.method.as_str(), &req.host, path)
            .map(|m| m.action_class.to_owned());
        let (d, held) = self
            .run(
                t0,
                Subject {
                    class,
                    method: req.method.as_str(),
                    host: &req.host,
                    path,
                    headers: &req.headers,
                    caller: Caller::of(&req.conn),
                    workload: req.conn.workload.as_ref(),
                    request: req.request.as_ref(),
                    mcp: None,
                    reserve: want,
                },
            )
            .await;
        let d = self.bounded(t0, d);
        // A decision turned into a denial (too late) releases what it reserved.
        let held = held.filter(|_| d.is_allow());
        (d, held)
    }

    /// Decides one JSON-RPC message of a POST to an MCP endpoint (see [`mcp`]): its action
    /// class, resource and `context.mcp` come from the message.
    pub async fn decide_mcp(&self, req: &RequestContext, msg: &mcp::Message) -> Decision {
        let t0 = Instant::now();
        let path = req.path.as_str();
        let (d, _) = self
            .run(
                t0,
                Subject {
                    class: Some(msg.action_class.to_owned()),
                    method: req.method.as_str(),
                    host: &req.host,
                    path,
                    headers: &req.headers,
                    caller: Caller::of(&req.conn),
                    workload: req.conn.workload.as_ref(),
                    request: None,
                    mcp: Some(msg),
                    reserve: None,
                },
            )
            .await;
        self.bounded(t0, d)
    }

    /// Whether the caller of `req` could call tool `tool` on the MCP endpoint at `call_path`
    /// for some arguments: what a `tools/list` answer keeps (see `docs/mcp.md`, "Filtered
    /// tool lists"). Stage 1 as for the call (`mcp.tools.call` on `<host><call_path>/tools/
    /// <tool>`), then Cedar with `context.mcp.arguments` unknown and `action_count` the count
    /// the next call of the tool would have. Nothing is counted. Fails closed (false) when
    /// the call could not be decided at all.
    pub fn mcp_tool_listed(&self, req: &RequestContext, call_path: &str, tool: &str) -> bool {
        let inner = &*self.inner;
        let Ok(path) = path::normalize(call_path) else {
            return false;
        };
        let Some(msg) = mcp::Message::listed_tool(tool) else {
            return false;
        };
        if self.mcp_endpoint("POST", &req.host, &path).is_none() {
            return false;
        }
        let Ok(policies) = inner.policies.usable(Instant::now()) else {
            return false;
        };
        let resource = msg.resource(&req.host, &path);
        let now = now_unix();
        let Ok(cleared) = inner.capabilities.check(&Stage1Request {
            caller: Caller::of(&req.conn),
            headers: &req.headers,
            workload: req.conn.workload.as_ref(),
            action_class: msg.action_class,
            resource: &resource,
            now,
        }) else {
            return false;
        };
        let claims = &cleared.cap.claims;
        let done = inner.counters.get(&claims.session_id, &msg.counter_key());
        let usage = inner.usage.totals(&claims.session_id, &claims.agent_id);
        policies.could_allow(&firma_common::policy::EvalRequest {
            agent_id: &claims.agent_id,
            action: msg.action_class,
            resource_id: &resource,
            host: Some(&req.host),
            path: Some(&path),
            action_count: done.saturating_add(1),
            session_id: &claims.session_id,
            method: "POST",
            request: None,
            usage: Some(usage),
            mcp: Some(&msg.context),
        })
    }

    /// The MCP declaration of the rule matching a POST to `host` `path`, if it marks an MCP
    /// endpoint (other methods are decided by the rule's own action class).
    pub fn mcp_endpoint(&self, method: &str, host: &str, path: &str) -> Option<mcp::McpSpec> {
        if method != "POST" {
            return None;
        }
        self.inner
            .mapping
            .classify(method, host, path)
            .and_then(|m| m.mcp.cloned())
    }

    /// Whether a `GET` to `host` `path` opens the event stream of an MCP endpoint (its rule
    /// is marked `mcp`): the stream is followed like a POST's SSE answer (`docs/mcp.md`).
    pub fn mcp_stream(&self, method: &str, host: &str, path: &str) -> bool {
        method == "GET"
            && self
                .inner
                .mapping
                .classify(method, host, path)
                .is_some_and(|m| m.mcp.is_some())
    }

    /// `[sidecar.mcp]` settings.
    pub fn mcp_config(&self) -> &crate::config::McpConfig {
        &self.inner.mcp
    }

    /// Decides a connection that will be tunnelled without HTTP parsing (see
    /// [`mapping`] for which rules classify destinations).
    pub async fn decide_destination(&self, dst: &DestinationContext) -> Decision {
        self.decide_connect(dst, &http::HeaderMap::new()).await
    }

    /// [`Pipeline::decide_destination`] with the headers of the `CONNECT` request that opened
    /// the tunnel (http_proxy mode), so `x-firma-capability`/`x-firma-session` apply to it.
    pub async fn decide_connect(
        &self,
        dst: &DestinationContext,
        headers: &http::HeaderMap,
    ) -> Decision {
        let t0 = Instant::now();
        let host = match (&dst.host, dst.conn.original_dst) {
            (Some(h), _) => h.to_ascii_lowercase(),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => {
                return Decision::deny(
                    DenyReason::MalformedRequest,
                    "destination has neither a host name nor an address",
                );
            }
        };
        let class = self
            .inner
            .mapping
            .classify_destination(&host)
            .map(|m| m.action_class.to_owned());
        let (d, _) = self
            .run(
                t0,
                Subject {
                    class,
                    method: "CONNECT",
                    host: &host,
                    path: "",
                    headers,
                    caller: Caller::of(&dst.conn),
                    workload: dst.conn.workload.as_ref(),
                    request: None,
                    mcp: None,
                    reserve: None,
                },
            )
            .await;
        self.bounded(t0, d)
    }

    /// Applies the enforcement budget to a finished decision.
    fn bounded(&self, t0: Instant, mut d: Decision) -> Decision {
        let total = t0.elapsed();
        d.timings_us.push(("total_us", micros(total)));
        if total > self.inner.budget {
            let mut late = Decision::deny(
                DenyReason::EnforcementTimeout,
                format!(
                    "decision took {} us, over enforcement_timeout_ms = {}",
                    total.as_micros(),
                    self.inner.budget.as_millis()
                ),
            );
            late.action_class = d.action_class;
            late.capability = d.capability;
            late.timings_us = d.timings_us;
            return late;
        }
        d
    }

    async fn run(&self, t0: Instant, s: Subject<'_>) -> (Decision, Option<usage::Reservation>) {
        let mut held = None;
        let d = self.run_held(t0, s, &mut held).await;
        (d, held)
    }

    async fn run_held(
        &self,
        t0: Instant,
        s: Subject<'_>,
        held: &mut Option<usage::Reservation>,
    ) -> Decision {
        let inner = &*self.inner;
        let mut timings = vec![("classify_us", micros(t0.elapsed()))];
        let with = |mut d: Decision, timings: Vec<(&'static str, u64)>, class: &Option<String>| {
            d.action_class = class.clone();
            d.timings_us = timings;
            d
        };
        let Some(class) = s.class.as_deref() else {
            if inner.default_protected {
                let what = if s.method == "CONNECT" {
                    format!("no mapping rule claims destination {}", s.host)
                } else {
                    format!("no mapping rule for {} {}{}", s.method, s.host, s.path)
                };
                return with(
                    Decision::deny(DenyReason::UnclassifiedIntent, what),
                    timings,
                    &None,
                );
            }
            return match inner.policies.usable(Instant::now()) {
                Err((reason, detail)) => with(Decision::deny(reason, detail), timings, &None),
                Ok(_) => Decision {
                    outcome: Outcome::Allow,
                    reason: None,
                    detail: "unmapped; passed through (default_protected = false)".into(),
                    action_class: None,
                    passthrough: true,
                    capability: None,
                    matched_policies: Vec::new(),
                    timings_us: timings,
                },
            };
        };
        let policies = match inner.policies.usable(Instant::now()) {
            Ok(p) => p,
            Err((reason, detail)) => {
                return with(Decision::deny(reason, detail), timings, &s.class);
            }
        };

        let t1 = Instant::now();
        let resource = match s.mcp {
            Some(m) => m.resource(s.host, s.path),
            None => format!("{}{}", s.host, s.path),
        };
        let now = now_unix();
        let cleared = inner.capabilities.check(&Stage1Request {
            caller: s.caller,
            headers: s.headers,
            workload: s.workload,
            action_class: class,
            resource: &resource,
            now,
        });
        timings.push(("stage1_us", micros(t1.elapsed())));
        let (cap, live_until) = match cleared {
            Ok(c) => (c.cap, c.live_until),
            Err(d) => {
                return with(Decision::deny(d.reason, d.detail), timings, &s.class);
            }
        };

        let t2 = Instant::now();
        let mut req2 = Stage2Request {
            agent_id: &cap.claims.agent_id,
            session_id: &cap.claims.session_id,
            action_class: class,
            host: s.host,
            path: s.path,
            resource: &resource,
            method: s.method,
            live_until,
            now,
            request: s.request,
            usage: None,
            mcp: s.mcp,
        };
        let r = match (&inner.store, s.reserve) {
            (Some(store), want) => {
                let left = inner.budget.saturating_sub(t0.elapsed());
                let shared = stage2::evaluate_shared(&policies, store, &req2, want);
                match tokio::time::timeout(left, shared).await {
                    Ok((r, h)) => {
                        *held = h;
                        r
                    }
                    // Reported as `EnforcementTimeout` by `bounded`; nothing was committed
                    // that this request still holds.
                    Err(_) => stage2::Stage2Result {
                        deny: Some((
                            DenyReason::SessionStoreUnavailable,
                            "the session store did not decide within enforcement_timeout_ms".into(),
                        )),
                        matched_policies: Vec::new(),
                        action_count: 0,
                        local_allowance: false,
                    },
                }
            }
            (None, Some(want)) => {
                let (r, h) = stage2::evaluate_reserving(
                    &policies,
                    &inner.counters,
                    &req2,
                    &inner.usage,
                    want,
                );
                *held = h;
                r
            }
            (None, None) => {
                req2.usage = Some(
                    inner
                        .usage
                        .totals(&cap.claims.session_id, &cap.claims.agent_id),
                );
                stage2::evaluate(&policies, &inner.counters, &req2)
            }
        };
        timings.push(("stage2_us", micros(t2.elapsed())));
        let (outcome, reason, detail) = match r.deny {
            None => (
                Outcome::Allow,
                None,
                format!(
                    "allowed by {} (action_count = {}){}",
                    r.matched_policies.join(", "),
                    r.action_count,
                    if r.local_allowance {
                        " from the local allowance: the session store is unavailable"
                    } else {
                        ""
                    }
                ),
            ),
            Some((reason, detail)) => (Outcome::Deny, Some(reason), detail),
        };
        Decision {
            outcome,
            reason,
            detail,
            action_class: s.class.clone(),
            passthrough: false,
            capability: Some(cap.summary.clone()),
            matched_policies: r.matched_policies,
            timings_us: timings,
        }
    }

    /// The loaded mapping rules (the connector's destination binding reads their `ports`).
    pub fn mapping_rules(&self) -> Arc<MappingRules> {
        self.inner.mapping.clone()
    }

    /// Host patterns of the mapping rules (see [`MappingRules::host_patterns`]).
    pub fn mapping_hosts(&self) -> Vec<String> {
        self.inner.mapping.host_patterns()
    }

    /// What the rule matching this request extracts from its body (empty: nothing, the body
    /// streams). `path` as the interceptor normalized it.
    pub fn extraction(&self, method: &str, host: &str, path: &str) -> Vec<extract::Extract> {
        self.inner
            .mapping
            .classify(method, host, path)
            .map(|m| m.extract.to_vec())
            .unwrap_or_default()
    }

    /// Whether the rule matching this request asks for `stream_options.include_usage` in
    /// streamed requests (`inject_include_usage`, see `docs/llm-policies.md`).
    pub fn injects_include_usage(&self, method: &str, host: &str, path: &str) -> bool {
        self.inner
            .mapping
            .classify(method, host, path)
            .is_some_and(|m| m.inject_include_usage)
    }

    /// `[sidecar.llm] reserve_output_tokens`.
    pub fn reserve_output_tokens(&self) -> i64 {
        self.inner.reserve_output_tokens
    }

    /// USD per 1k (input, output) tokens of `model`, from `[[sidecar.llm.prices]]`.
    pub fn price(&self, model: &str) -> Option<(f64, f64)> {
        self.inner.prices.get(model).copied()
    }

    /// Largest body read for extraction.
    pub fn extract_limit(&self) -> usize {
        self.inner.extract_limit
    }

    /// The per-request limit and the shared budget of bodies read for extraction.
    pub fn extract_limits(&self) -> (usize, &std::sync::Arc<body_budget::BodyBudget>) {
        (self.inner.extract_limit, &self.inner.body_budget)
    }

    /// Writes the usage snapshot now (at shutdown).
    pub fn flush_usage(&self) {
        if let Err(e) = self.inner.usage.flush() {
            tracing::warn!(target: "firma_sidecar::llm", "{e}");
        }
    }

    /// The token usage ledger (reservations are settled through it).
    pub fn usage(&self) -> &usage::UsageLedger {
        &self.inner.usage
    }

    /// Version of the installed runtime bundle, if any (for status and health output).
    pub fn bundle_version(&self) -> Option<String> {
        self.inner.policies.version()
    }

    /// Time since the runtime bundle was last received or reloaded (metrics).
    pub fn bundle_age(&self) -> Option<Duration> {
        self.inner.policies.age(Instant::now())
    }

    /// `Ok` when a bundle is installed and fresh; else why every request is denied now
    /// (readiness).
    pub fn bundle_usable(&self) -> Result<(), String> {
        self.inner
            .policies
            .usable(Instant::now())
            .map(|_| ())
            .map_err(|(reason, detail)| format!("{reason}: {detail}"))
    }

    /// Number of revoked token ids known.
    pub fn revocation_count(&self) -> usize {
        self.inner.revoked.len()
    }

    /// Copies the bundle and revocation state into the pipeline's metrics (at scrape time).
    pub fn refresh_metrics(&self) {
        metrics::set_bundle_state(
            self.bundle_version(),
            self.bundle_age(),
            self.bundle_usable().is_ok(),
            self.revocation_count(),
        );
    }

    /// Calls of `action_class` already allowed in `session` (Stage 2's counter).
    pub fn action_count(&self, session: &str, action_class: &str) -> i64 {
        self.inner.counters.get(session, action_class)
    }

    /// Sessions whose Stage 2 counters are tracked now (bounded, see [`sessions`]).
    pub fn tracked_sessions(&self) -> usize {
        self.inner.counters.len()
    }

    /// Header-presented capabilities remembered now, over all callers (bounded, see
    /// [`stage1`]).
    pub fn presented_capabilities(&self) -> usize {
        self.inner.capabilities.presented_len()
    }
}

/// What the phases look at, for requests and destinations alike.
struct Subject<'a> {
    class: Option<String>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    headers: &'a http::HeaderMap,
    caller: Caller,
    workload: Option<&'a Workload>,
    request: Option<&'a extract::Attributes>,
    mcp: Option<&'a mcp::Message>,
    /// What a metered request reserves on allow.
    reserve: Option<usage::Want>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
