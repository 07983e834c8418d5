//! Stage 2's session state shared by several sidecars through one Redis primary
//! (`[sidecar.session_store] backend = "redis"`; the default keeps it in memory, see
//! [`super::sessions`] and [`super::usage`]).
//!
//! **Exact across sidecars.** A decision reads the session's call count and usage totals (one
//! script), evaluates Cedar against them, then commits with a second script that increments the
//! count and takes the token reservation only if nothing changed in between (the count and the
//! usage versions it evaluated against); otherwise the script returns the new state and the
//! decision evaluates again. Redis runs scripts one at a time, so call N+1 of a budget of N is
//! denied whichever sidecars the calls reach, however concurrent. Two round trips per allowed
//! decision, one per denied one.
//!
//! **Reservations that cannot leak.** A metered call's reservation is a member of a sorted set
//! scored by its deadline (Redis clock) plus its amount in the usage hash. Settling or releasing
//! it removes both; every script first drops members past their deadline. A live sidecar keeps
//! extending the reservations it holds ([`RedisStore::maintain`]), so a long stream keeps its
//! reservation while a sidecar that died mid-request releases it `reservation_ttl_seconds`
//! later.
//!
//! **Redis unreachable.** A failed or timed-out operation marks the store down; decisions are
//! then denied `SessionStoreUnavailable` without waiting on Redis (or, with
//! `on_unavailable = "local_allowance"`, allowed from a bounded per-session allowance counted
//! from the last count this sidecar saw). A probe every [`PROBE_EVERY`] marks it up again, after
//! replaying the locally allowed calls into the shared counts; no restart is needed.

pub mod config;
pub mod gate;
pub mod metrics;
mod scripts;

use super::usage::{Usage, Want};
use config::{OnUnavailable, SessionStoreConfig};
use firma_common::policy::UsageTotals;
use metrics::Op;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a down store is probed, and a live one's held reservations extended at the latest.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Sessions whose last seen counts are remembered for the local allowance.
const LAST_SEEN: usize = 65_536;
/// Seconds a session's keys outlive its last capability (as in memory).
const RETAIN_AFTER_EXPIRY_MS: i64 = super::sessions::RETAIN_AFTER_EXPIRY * 1000;

/// The store could not be reached (or answered something unusable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct Unavailable(pub String);

/// The store could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum StoreSetupError {
    #[error("[sidecar.session_store] url: {0}")]
    Url(redis::RedisError),
    #[error("[sidecar.session_store] ca_file: cannot read {path}: {cause}")]
    CaFile {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "[sidecar.session_store] password_env: environment variable {0} is not set (the Redis password)"
    )]
    PasswordEnv(String),
}

/// The keys of one decision (see [`scripts`] for the layout).
#[derive(Debug, Clone)]
pub struct Keys {
    count: String,
    us: String,
    ua: String,
    rs: String,
    ra: String,
}

/// What Stage 2 evaluates against: calls so far and usage totals (reservations included).
#[derive(Debug, Clone, Copy, Default)]
pub struct State {
    pub count: i64,
    pub session: UsageTotals,
    pub agent: UsageTotals,
    versions: (i64, i64),
}

impl State {
    fn parse(v: &[i64]) -> Result<Self, Unavailable> {
        if v.len() != 13 {
            return Err(Unavailable(format!(
                "unexpected script reply of {} values",
                v.len()
            )));
        }
        let totals = |o: usize| UsageTotals {
            input_tokens: v[o],
            output_tokens: v[o + 1],
            cost_nano_usd: v[o + 2],
            reserved_tokens: v[o + 3].max(0),
            reserved_cost_nano_usd: v[o + 4].max(0),
        };
        Ok(Self {
            count: v[0],
            session: totals(1),
            agent: totals(7),
            versions: (v[6], v[12]),
        })
    }
}

/// A commit's answer.
pub enum Commit {
    /// Counted; the reservation when one was asked.
    Done(Option<Held>),
    /// Something changed since the state evaluated: evaluate this one.
    Conflict(State),
}

/// Local allowance bookkeeping (`on_unavailable = "local_allowance"`).
#[derive(Default)]
struct Local {
    /// Calls allowed locally per session during this outage.
    used: HashMap<String, u32>,
    /// Calls allowed locally per count key, replayed into Redis on recovery.
    pending: HashMap<String, (i64, i64)>,
}

/// The Redis-backed store, one per sidecar, shared by every request.
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: scripts::Scripts,
    prefix: String,
    timeout: Duration,
    ttl: Duration,
    on_unavailable: OnUnavailable,
    allowance: u32,
    up: AtomicBool,
    /// Reservations this sidecar holds: id -> (session set, agent set), extended while held.
    held: Mutex<HashMap<String, (String, String)>>,
    /// Last count seen per count key (the local allowance counts from it).
    last_seen: Mutex<lru::LruCache<String, i64>>,
    local: Mutex<Local>,
    node: String,
    next_id: AtomicU64,
    metrics: Option<&'static metrics::StoreMetrics>,
    /// This sidecar's decisions queue per contended key ([`gate`]).
    gates: gate::Gates,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisStore {
    /// Connects lazily: a Redis that is down at startup denies (or uses the allowance) until it
    /// answers, like one that goes down later.
    pub fn connect(
        cfg: &SessionStoreConfig,
        metrics: Option<&'static metrics::StoreMetrics>,
    ) -> Result<Arc<Self>, StoreSetupError> {
        let url = cfg.url.as_deref().unwrap_or_default();
        let mut info =
            redis::IntoConnectionInfo::into_connection_info(url).map_err(StoreSetupError::Url)?;
        let mut settings = info.redis_settings().clone();
        if let Some(var) = &cfg.password_env {
            let pw = std::env::var(var).map_err(|_| StoreSetupError::PasswordEnv(var.clone()))?;
            settings = settings.set_password(pw);
        }
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        info = info.set_redis_settings(settings);
        let client = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|cause| StoreSetupError::CaFile {
                    path: path.clone(),
                    cause,
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(StoreSetupError::Url)?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(PROBE_EVERY);
        let conn =
            ConnectionManager::new_lazy_with_config(client, mc).map_err(StoreSetupError::Url)?;
        if let Some(m) = metrics {
            m.set_up(true);
        }
        Ok(Arc::new(Self {
            conn,
            scripts: scripts::Scripts::new(),
            prefix: cfg.key_prefix.clone(),
            timeout,
            ttl: Duration::from_secs(cfg.reservation_ttl_seconds),
            on_unavailable: cfg.on_unavailable,
            allowance: cfg.local_allowance,
            // Tried from the first decision; the first failure marks it down.
            up: AtomicBool::new(true),
            held: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LAST_SEEN).unwrap_or(NonZeroUsize::MIN),
            )),
            local: Mutex::new(Local::default()),
            node: format!("{:016x}", rand::random::<u64>()),
            next_id: AtomicU64::new(0),
            metrics,
            gates: gate::Gates::default(),
        }))
    }

    /// Connects and loads the scripts now, so that the first decisions do not pay for it;
    /// returns whether Redis answered (if not, the store starts down and the probe retries).
    pub async fn warm_up(&self) -> bool {
        let mut conn = self.conn.clone();
        let s = &self.scripts;
        let load = async {
            for script in [&s.read, &s.commit, &s.settle, &s.extend, &s.add_count] {
                script.prepare_invoke().load_async(&mut conn).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        // Connection setup included: allow a few round trips.
        let ok = matches!(
            tokio::time::timeout(self.timeout * 5, load).await,
            Ok(Ok(()))
        );
        self.mark(ok);
        ok
    }

    /// Whether Redis answered the last operation.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// `on_unavailable`.
    pub fn on_unavailable(&self) -> OnUnavailable {
        self.on_unavailable
    }

    /// The keys of `(session, counter key)` and `agent`.
    pub fn keys(&self, session: &str, counter: &str, agent: &str) -> Keys {
        let p = &self.prefix;
        Keys {
            count: format!("{p}:n:{}:{session}:{counter}", session.len()),
            us: format!("{p}:us:{session}"),
            ua: format!("{p}:ua:{agent}"),
            rs: format!("{p}:rs:{session}"),
            ra: format!("{p}:ra:{agent}"),
        }
    }

    fn mark(&self, up: bool) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if was != up {
            if up {
                tracing::info!(target: "firma_sidecar::session_store", "session store reachable again");
            } else {
                tracing::warn!(target: "firma_sidecar::session_store", "SESSION STORE UNAVAILABLE: decisions that need it are denied SessionStoreUnavailable{} until Redis answers", match self.on_unavailable {
                    OnUnavailable::Deny => "",
                    OnUnavailable::LocalAllowance => " (or allowed from the local allowance)",
                });
            }
        }
        if let Some(m) = self.metrics {
            m.set_up(up);
        }
    }

    /// Runs one script call with the store's timeout, recording latency and reachability.
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: Op,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut conn = self.conn.clone();
        let t0 = Instant::now();
        let r = match tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
            Err(_) => Err(Unavailable(format!(
                "no answer within timeout_ms = {}",
                self.timeout.as_millis()
            ))),
        };
        if let Some(m) = self.metrics {
            m.record(op, t0.elapsed(), r.is_ok());
        }
        match &r {
            Ok(_) => {
                if op != Op::Settle {
                    self.mark(true);
                }
            }
            Err(e) => {
                tracing::debug!(target: "firma_sidecar::session_store", "{e}");
                self.mark(false);
            }
        }
        r
    }

    /// Fails fast while the store is marked down (the probe brings it back).
    fn ensure_up(&self) -> Result<(), Unavailable> {
        if self.is_up() {
            Ok(())
        } else {
            Err(Unavailable(
                "Redis did not answer the last operation; retrying in the background".into(),
            ))
        }
    }

    /// Waits until no other decision of this sidecar is in flight on what a decision with
    /// `metered` commits against: the agent's usage for a metered call (its version is checked),
    /// else the call count. Hold it from [`Self::read`] to [`Self::commit`].
    pub async fn gate(&self, k: &Keys, metered: bool) -> gate::Gate<'_> {
        self.gates
            .enter(if metered { &k.ua } else { &k.count })
            .await
    }

    /// The state a decision evaluates against.
    pub async fn read(&self, k: &Keys) -> Result<State, Unavailable> {
        self.ensure_up()?;
        let mut inv = self.scripts.read.prepare_invoke();
        inv.key(&k.count)
            .key(&k.us)
            .key(&k.ua)
            .key(&k.rs)
            .key(&k.ra);
        let v: Vec<i64> = self.run(Op::Read, &inv).await?;
        let s = State::parse(&v)?;
        lock(&self.last_seen).put(k.count.clone(), s.count);
        Ok(s)
    }

    /// Counts the call evaluated against `seen` and takes `want`'s reservation, if nothing
    /// changed since. `check_usage`: the decision read usage totals that must still hold.
    pub async fn commit(
        self: &Arc<Self>,
        k: &Keys,
        seen: &State,
        want: Option<Want>,
        live_until: i64,
    ) -> Result<Commit, Unavailable> {
        self.ensure_up()?;
        let id = want.map(|_| {
            format!(
                "{}-{}",
                self.node,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            )
        });
        let w = want.unwrap_or_default();
        let (sv, av) = match want {
            Some(_) => (seen.versions.0, seen.versions.1),
            None => (-1, -1),
        };
        let keep_ms = live_until
            .saturating_mul(1000)
            .saturating_add(RETAIN_AFTER_EXPIRY_MS);
        let mut inv = self.scripts.commit.prepare_invoke();
        inv.key(&k.count)
            .key(&k.us)
            .key(&k.ua)
            .key(&k.rs)
            .key(&k.ra);
        inv.arg(seen.count)
            .arg(sv)
            .arg(av)
            .arg(id.as_deref().unwrap_or(""))
            .arg(w.tokens().max(0))
            .arg(w.cost_nano_usd.max(0))
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(keep_ms);
        let v: Vec<i64> = self.run(Op::Commit, &inv).await?;
        match v.first() {
            Some(1) => {
                lock(&self.last_seen).put(k.count.clone(), seen.count.saturating_add(1));
                let held = id.map(|id| {
                    lock(&self.held).insert(id.clone(), (k.rs.clone(), k.ra.clone()));
                    Held {
                        store: self.clone(),
                        keys: k.clone(),
                        id,
                    }
                });
                Ok(Commit::Done(held))
            }
            Some(0) => {
                let s = State::parse(&v[1..])?;
                lock(&self.last_seen).put(k.count.clone(), s.count);
                Ok(Commit::Conflict(s))
            }
            _ => Err(Unavailable("unexpected commit reply".into())),
        }
    }

    /// Settles (`usage`) or releases (`None`) a reservation; usage without one is added too.
    async fn settle_now(&self, k: &Keys, id: &str, u: Option<&Usage>) -> Result<bool, Unavailable> {
        let u = u.copied().unwrap_or_default();
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.key(&k.us).key(&k.ua).key(&k.rs).key(&k.ra);
        inv.arg(id)
            .arg(u.input_tokens.max(0))
            .arg(u.output_tokens.max(0))
            .arg(u.cost_nano_usd.max(0));
        let held: i64 = self.run(Op::Settle, &inv).await?;
        Ok(held == 1)
    }

    /// The local allowance decision for a store that is down (see the module docs):
    /// `Some(n)`: evaluate as call `n`, then [`Self::local_commit`] if allowed; `None`: the
    /// allowance is not available (deny mode, or used up).
    pub fn local_count(&self, session: &str, k: &Keys) -> Option<i64> {
        if self.on_unavailable != OnUnavailable::LocalAllowance {
            return None;
        }
        let local = lock(&self.local);
        if local.used.get(session).copied().unwrap_or(0) >= self.allowance
            || local.used.len() >= LAST_SEEN
        {
            return None;
        }
        let base = lock(&self.last_seen).get(&k.count).copied().unwrap_or(0);
        let extra = local.pending.get(&k.count).map_or(0, |p| p.0);
        Some(base.saturating_add(extra).saturating_add(1))
    }

    /// Records a call allowed as call `n` from the local allowance; `false` when a concurrent
    /// local call took that number or the allowance first (evaluate again).
    pub fn local_commit(&self, session: &str, k: &Keys, n: i64, live_until: i64) -> bool {
        let mut local = lock(&self.local);
        let base = lock(&self.last_seen).get(&k.count).copied().unwrap_or(0);
        let extra = local.pending.get(&k.count).map_or(0, |p| p.0);
        let used = local.used.get(session).copied().unwrap_or(0);
        if base.saturating_add(extra).saturating_add(1) != n || used >= self.allowance {
            return false;
        }
        *local.used.entry(session.to_owned()).or_default() += 1;
        let keep = live_until
            .saturating_mul(1000)
            .saturating_add(RETAIN_AFTER_EXPIRY_MS);
        let p = local.pending.entry(k.count.clone()).or_default();
        p.0 += 1;
        p.1 = p.1.max(keep);
        if let Some(m) = self.metrics {
            m.local_allowed();
        }
        true
    }

    /// Keeps the store current: probes it while down (replaying local allowances once it
    /// answers) and extends the reservations this sidecar holds. Runs until the pipeline stops.
    pub async fn maintain(self: Arc<Self>) {
        let extend_every = (self.ttl / 3).max(PROBE_EVERY);
        let mut last_extend = Instant::now();
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            if !self.is_up() {
                self.probe().await;
                continue;
            }
            if last_extend.elapsed() >= extend_every {
                last_extend = Instant::now();
                self.extend().await;
            }
        }
    }

    async fn probe(&self) {
        let mut conn = self.conn.clone();
        let t0 = Instant::now();
        let ping = redis::cmd("PING");
        let r = tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut conn)).await;
        let ok = matches!(r, Ok(Ok(_)));
        if let Some(m) = self.metrics {
            m.record(Op::Ping, t0.elapsed(), ok);
        }
        if ok && self.replay().await {
            self.extend().await;
            self.mark(true);
        }
    }

    /// Adds the calls allowed locally during the outage to the shared counts; `true` when all
    /// were written (the allowance then starts afresh for the next outage).
    async fn replay(&self) -> bool {
        let pending: Vec<(String, (i64, i64))> = {
            let local = lock(&self.local);
            local.pending.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        for (key, (n, keep)) in pending {
            let mut inv = self.scripts.add_count.prepare_invoke();
            inv.key(&key).arg(n).arg(keep);
            let mut conn = self.conn.clone();
            let t0 = Instant::now();
            let r = tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut conn)).await;
            let ok = matches!(r, Ok(Ok(_)));
            if let Some(m) = self.metrics {
                m.record(Op::Replay, t0.elapsed(), ok);
            }
            if !ok {
                return false;
            }
            let mut local = lock(&self.local);
            if let Some(p) = local.pending.get_mut(&key) {
                p.0 -= n;
                if p.0 <= 0 {
                    local.pending.remove(&key);
                }
            }
        }
        let mut local = lock(&self.local);
        if local.pending.is_empty() {
            local.used.clear();
            if self.allowance > 0 {
                tracing::info!(target: "firma_sidecar::session_store", "local allowance replayed into the shared counts");
            }
        }
        true
    }

    /// Pushes the deadline of every reservation this sidecar holds.
    async fn extend(&self) {
        let by_keys: HashMap<(String, String), Vec<String>> = {
            let mut m: HashMap<(String, String), Vec<String>> = HashMap::new();
            for (id, keys) in lock(&self.held).iter() {
                m.entry(keys.clone()).or_default().push(id.clone());
            }
            m
        };
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        for ((rs, ra), ids) in by_keys {
            let mut inv = self.scripts.extend.prepare_invoke();
            inv.key(&rs).key(&ra).arg(ttl_ms);
            for id in &ids {
                inv.arg(id);
            }
            if self.run::<i64>(Op::Extend, &inv).await.is_err() {
                return;
            }
        }
    }

    fn settle_later(self: Arc<Self>, keys: Keys, id: String, usage: Option<Usage>) {
        lock(&self.held).remove(&id);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (shutdown): the reservation expires by itself.
            return;
        };
        rt.spawn(async move {
            for attempt in 0..3u32 {
                match self.settle_now(&keys, &id, usage.as_ref()).await {
                    Ok(_) => return,
                    Err(e) if attempt == 2 => {
                        tracing::warn!(
                            target: "firma_sidecar::session_store",
                            "could not settle reservation {id} ({e}); it expires within reservation_ttl_seconds = {} and the usage is only in the audit outcome event",
                            self.ttl.as_secs()
                        );
                    }
                    Err(_) => tokio::time::sleep(PROBE_EVERY).await,
                }
            }
        });
    }
}

/// A reservation held in Redis (see [`super::usage::Reservation`], which wraps it).
pub struct Held {
    store: Arc<RedisStore>,
    keys: Keys,
    id: String,
}

impl super::usage::SharedHold for Held {
    /// Replaces the reservation with `usage` (or releases it), in the background.
    fn finish(self: Box<Self>, usage: Option<&Usage>) {
        let this = *self;
        this.store
            .clone()
            .settle_later(this.keys, this.id, usage.copied());
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("id", &self.id).finish()
    }
}
