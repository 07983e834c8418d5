//! Stage 1: which capability applies to a request, and does it cover it?
//!
//! Identity, in order (docs/architecture.md, "Identity"):
//! 1. a raw token in `x-firma-capability`: verified on first sight against the Authority's
//!    public key and cached by SHA-256 of the token (bad tokens are cached too, so a flood of
//!    one bad token costs one verification). Presenting it also registers it for the
//!    presenting **caller** (below), so that caller's later requests can name its session with
//!    `x-firma-session`;
//! 2. a session named by `x-firma-session`: the seeded capabilities of that session, plus the
//!    ones *this caller* presented. A session id is a name, not a secret: it never selects a
//!    token another caller presented (otherwise anyone who learns or guesses a session id,
//!    which audit events and logs carry, would act with that session's capability);
//! 3. the transparent-mode workload binding (its `session_id`, or every capability of its
//!    `agent_id` when the binding names no session), with the same rule: seeded capabilities
//!    plus those the same workload presented;
//! 4. the one seeded session, when exactly one session was seeded.
//!
//! The **caller** ([`Caller`]) is the kernel-reported workload (its cgroup id) in transparent
//! mode, so every connection of one workload shares what it presented; in http_proxy mode,
//! where nothing but the connection identifies a client (every local process shares the
//! loopback address), it is the client connection. An app that spreads a session over several
//! proxy connections sends `x-firma-capability` on each request (a cache hit after the first).
//! Seeded capabilities are deployment configuration and stay visible to every caller.
//!
//! Session ids are still recorded in audit events (`capability.session_id`, docs/architecture.md,
//! "Audit events"): they are the seeds' join key for per-tenant and per-user accounting, and since a session
//! id alone no longer selects a presented capability, exposing it grants nothing.
//!
//! Registrations are bounded: per caller at most [`MAX_PRESENTED_PER_CALLER`] capabilities
//! (expired ones go first), and at most [`MAX_PRESENTED`] in all (least recently active callers
//! go first). Forgetting one only means the caller has to present its token again; it never
//! widens what anyone may do, and Stage 2's counters live elsewhere (`sessions`).
//!
//! When the connection has a workload binding, the capability's agent must be the bound agent
//! (`WorkloadMismatch`): the kernel's identity outranks anything the app sends.
//!
//! The candidates are then narrowed: holding the action class (else `CapabilityNotFound`), with
//! a resource scope covering `host + path` (else `CapabilityScopeMismatch`), not revoked (else
//! `CapabilityRevoked`), within `iat - skew ..= exp + skew` (else `CapabilityExpired`). The
//! path is already normalised (`super::path`), so dot segments cannot step out of a scope.

use super::revocations::RevocationSet;
use crate::conn::{CapabilitySummary, ConnectionInfo, DenyReason, Workload};
use firma_common::capability::{CapabilityClaims, CapabilityError, CapabilitySeed};
use firma_common::keys::VerifyingKey;
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Request header carrying a raw capability token.
pub const CAPABILITY_HEADER: &str = "x-firma-capability";
/// Request header naming a session whose capabilities apply.
pub const SESSION_HEADER: &str = "x-firma-session";

/// Distinct header tokens remembered (verified or rejected).
const TOKEN_CACHE_SIZE: usize = 4096;
/// Presented capabilities remembered per caller.
pub const MAX_PRESENTED_PER_CALLER: usize = 64;
/// Presented capabilities remembered in all.
pub const MAX_PRESENTED: usize = 65_536;

/// Who presented a header token: the unit a presented capability is private to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// Transparent mode: the workload's cgroup id, as the kernel reported it.
    Workload(u64),
    /// http_proxy mode: one client connection (`ConnectionInfo::conn_id`).
    Connection(u64),
}

impl Caller {
    pub fn of(conn: &ConnectionInfo) -> Self {
        match &conn.workload {
            Some(w) => Self::Workload(w.cgroup_id),
            None => Self::Connection(conn.conn_id),
        }
    }
}

/// A seed that stops startup.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{file}: cannot read capability seed: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{file}: not a capability seed file: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {cause}")]
    Invalid {
        file: PathBuf,
        cause: CapabilityError,
    },
}

/// A verified capability.
#[derive(Debug)]
pub struct Capability {
    pub claims: CapabilityClaims,
    pub summary: CapabilitySummary,
}

impl Capability {
    fn new(claims: CapabilityClaims) -> Arc<Self> {
        let summary = CapabilitySummary {
            token_id: claims.token_id.clone(),
            agent_id: claims.agent_id.clone(),
            session_id: claims.session_id.clone(),
            action_set: claims.action_set.clone(),
        };
        Arc::new(Self { claims, summary })
    }
}

/// A Stage 1 denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage1Deny {
    pub reason: DenyReason,
    pub detail: String,
}

fn deny(reason: DenyReason, detail: impl Into<String>) -> Stage1Deny {
    Stage1Deny {
        reason,
        detail: detail.into(),
    }
}

/// What Stage 1 looks at for one request.
#[derive(Debug, Clone, Copy)]
pub struct Stage1Request<'a> {
    pub caller: Caller,
    pub headers: &'a http::HeaderMap,
    pub workload: Option<&'a Workload>,
    pub action_class: &'a str,
    /// `host + path` (path empty for destination decisions).
    pub resource: &'a str,
    /// Unix seconds.
    pub now: i64,
}

/// Header tokens by SHA-256: the verified capability, or why verification failed.
type TokenCache = LruCache<[u8; 32], Result<Arc<Capability>, String>>;

/// Stage 1's answer when a capability applies.
#[derive(Debug, Clone)]
pub struct Cleared {
    pub cap: Arc<Capability>,
    /// The latest `exp + skew` among the capabilities of the same session that this request
    /// could use: until then the session can make calls, so its Stage 2 counters must live.
    pub live_until: i64,
}

/// Capabilities presented in `x-firma-capability`, per caller, most recently active last.
struct Presented {
    callers: LruCache<Caller, Vec<Arc<Capability>>>,
    /// Capabilities held over all callers.
    total: usize,
}

/// The capability map: seeded sessions, capabilities presented per caller, and the
/// header-token cache.
pub struct CapabilityStore {
    key: VerifyingKey,
    skew: u64,
    revoked: Arc<RevocationSet>,
    seeded_sessions: Vec<String>,
    /// Session -> seeded capabilities. Fixed after startup.
    seeded: HashMap<String, Vec<Arc<Capability>>>,
    presented: Mutex<Presented>,
    tokens: Mutex<TokenCache>,
}

impl CapabilityStore {
    pub fn new(key: VerifyingKey, skew: u64, revoked: Arc<RevocationSet>) -> Self {
        Self {
            key,
            skew,
            revoked,
            seeded_sessions: Vec::new(),
            seeded: HashMap::new(),
            presented: Mutex::new(Presented {
                callers: LruCache::unbounded(),
                total: 0,
            }),
            tokens: Mutex::new(LruCache::new(
                NonZeroUsize::new(TOKEN_CACHE_SIZE).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Reads and verifies every seed file; any failure stops startup. Logs one line per
    /// (agent, session): `seeded N capability (agent=… session=…)`.
    pub fn load_seeds(&mut self, paths: &[PathBuf], now: i64) -> Result<usize, SeedError> {
        let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
        for file in paths {
            let claims = self.verify_seed(file, now)?;
            *groups
                .entry((claims.agent_id.clone(), claims.session_id.clone()))
                .or_default() += 1;
            if !self.seeded_sessions.contains(&claims.session_id) {
                self.seeded_sessions.push(claims.session_id.clone());
            }
            let cap = Capability::new(claims);
            let v = self
                .seeded
                .entry(cap.claims.session_id.clone())
                .or_default();
            v.retain(|c| c.claims.token_id != cap.claims.token_id);
            v.push(cap);
        }
        for ((agent, session), n) in &groups {
            tracing::info!(
                target: "firma_sidecar::startup::capability",
                "seeded {n} capability (agent={agent} session={session})"
            );
        }
        Ok(paths.len())
    }

    fn verify_seed(&self, file: &Path, now: i64) -> Result<CapabilityClaims, SeedError> {
        let text = std::fs::read_to_string(file).map_err(|source| SeedError::Read {
            file: file.to_path_buf(),
            cause: source,
        })?;
        let seed: CapabilitySeed = toml::from_str(&text).map_err(|e| SeedError::Parse {
            file: file.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let invalid = |source| SeedError::Invalid {
            file: file.to_path_buf(),
            cause: source,
        };
        let claims = seed.verify(&self.key).map_err(invalid)?;
        claims.check_time(now, self.skew).map_err(invalid)?;
        Ok(claims)
    }

    fn skew_secs(&self) -> i64 {
        i64::try_from(self.skew).unwrap_or(i64::MAX)
    }

    fn lock_presented(&self) -> std::sync::MutexGuard<'_, Presented> {
        match self.presented.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Remembers that `caller` presented `cap`, within the per-caller and total bounds.
    fn register(&self, caller: Caller, cap: &Arc<Capability>, now: i64) {
        let skew = self.skew_secs();
        let mut p = self.lock_presented();
        if p.callers
            .get(&caller)
            .is_some_and(|v| v.iter().any(|c| c.claims.token_id == cap.claims.token_id))
        {
            return;
        }
        let p = &mut *p;
        let v = p.callers.get_or_insert_mut(caller, Vec::new);
        let before = v.len();
        v.retain(|c| c.claims.exp.saturating_add(skew) >= now);
        v.push(cap.clone());
        if v.len() > MAX_PRESENTED_PER_CALLER {
            // The one that expires first goes.
            if let Some(i) = (0..v.len()).min_by_key(|&i| v[i].claims.exp) {
                v.swap_remove(i);
            }
        }
        p.total = (p.total + v.len()).saturating_sub(before);
        while p.total > MAX_PRESENTED {
            match p.callers.pop_lru() {
                Some((_, gone)) => p.total = p.total.saturating_sub(gone.len()),
                None => break,
            }
        }
    }

    /// Presented capabilities remembered now, over all callers (for bounds tests and status).
    pub fn presented_len(&self) -> usize {
        self.lock_presented().total
    }

    /// Callers with presented capabilities remembered now.
    pub fn presented_callers(&self) -> usize {
        self.lock_presented().callers.len()
    }

    /// Sessions named by seed files, in file order.
    pub fn seeded_sessions(&self) -> &[String] {
        &self.seeded_sessions
    }

    /// Verifies (or recalls) a header token.
    fn resolve_token(&self, token: &str) -> Result<Arc<Capability>, Stage1Deny> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.lock_tokens().get(&digest).cloned();
        let result = match cached {
            Some(r) => r,
            None => {
                let r = CapabilityClaims::verify(token, &self.key)
                    .map(Capability::new)
                    .map_err(|e| e.to_string());
                self.lock_tokens().put(digest, r.clone());
                r
            }
        };
        result.map_err(|e| {
            deny(
                DenyReason::CapabilityInvalid,
                format!("{CAPABILITY_HEADER}: {e}"),
            )
        })
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        match self.tokens.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Seeded capabilities of `session`, then those `caller` presented for it.
    fn session(&self, caller: Caller, session: &str) -> Vec<Arc<Capability>> {
        let mut out = self.seeded.get(session).cloned().unwrap_or_default();
        if let Some(v) = self.lock_presented().callers.get(&caller) {
            out.extend(v.iter().filter(|c| c.claims.session_id == session).cloned());
        }
        out
    }

    /// Seeded capabilities of `agent`, then those `caller` presented for it.
    fn agent(&self, caller: Caller, agent: &str) -> Vec<Arc<Capability>> {
        let mut out: Vec<Arc<Capability>> = self
            .seeded
            .values()
            .flatten()
            .filter(|c| c.claims.agent_id == agent)
            .cloned()
            .collect();
        if let Some(v) = self.lock_presented().callers.get(&caller) {
            out.extend(v.iter().filter(|c| c.claims.agent_id == agent).cloned());
        }
        out
    }

    /// Runs Stage 1 for one request.
    pub fn check(&self, req: &Stage1Request<'_>) -> Result<Cleared, Stage1Deny> {
        let (candidates, who) = self.candidates(req)?;
        if let Some(w) = req.workload
            && !candidates.is_empty()
            && candidates.iter().all(|c| c.claims.agent_id != w.agent_id)
        {
            return Err(deny(
                DenyReason::WorkloadMismatch,
                format!(
                    "capability agent {:?} is not the agent {:?} bound to workload {}",
                    candidates[0].claims.agent_id, w.agent_id, w.cgroup_path
                ),
            ));
        }
        let bound =
            |c: &&Arc<Capability>| req.workload.is_none_or(|w| c.claims.agent_id == w.agent_id);
        let with_action: Vec<&Arc<Capability>> = candidates
            .iter()
            .filter(bound)
            .filter(|c| c.claims.action_set.iter().any(|a| a == req.action_class))
            .collect();
        if with_action.is_empty() {
            return Err(deny(
                DenyReason::CapabilityNotFound,
                format!("no capability for action {:?} ({who})", req.action_class),
            ));
        }
        let in_scope: Vec<&Arc<Capability>> = with_action
            .iter()
            .copied()
            .filter(|c| c.claims.covers(req.resource))
            .collect();
        if in_scope.is_empty() {
            let scopes: Vec<&str> = with_action
                .iter()
                .map(|c| c.claims.resource_scope.as_str())
                .collect();
            return Err(deny(
                DenyReason::CapabilityScopeMismatch,
                format!(
                    "resource {:?} is outside resource_scope {:?} ({who})",
                    req.resource, scopes
                ),
            ));
        }
        let mut last: Option<Stage1Deny> = None;
        for c in in_scope {
            if self.revoked.contains(&c.claims.token_id) {
                last = Some(deny(
                    DenyReason::CapabilityRevoked,
                    format!("capability {} is revoked", c.claims.token_id),
                ));
                continue;
            }
            match c.claims.check_time(req.now, self.skew) {
                Ok(()) => {
                    let skew = self.skew_secs();
                    let live_until = candidates
                        .iter()
                        .filter(|o| o.claims.session_id == c.claims.session_id)
                        .map(|o| o.claims.exp.saturating_add(skew))
                        .max()
                        .unwrap_or(c.claims.exp.saturating_add(skew));
                    return Ok(Cleared {
                        cap: (*c).clone(),
                        live_until,
                    });
                }
                Err(e) => {
                    let reason = match e {
                        CapabilityError::Expired { .. } => DenyReason::CapabilityExpired,
                        _ => DenyReason::CapabilityInvalid,
                    };
                    if last
                        .as_ref()
                        .is_none_or(|d| d.reason != DenyReason::CapabilityRevoked)
                    {
                        last = Some(deny(reason, e.to_string()));
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| deny(DenyReason::CapabilityNotFound, who)))
    }

    /// The capabilities the request's identity points at, and a description for details.
    fn candidates(
        &self,
        req: &Stage1Request<'_>,
    ) -> Result<(Vec<Arc<Capability>>, String), Stage1Deny> {
        if let Some(token) = single_header(req.headers, CAPABILITY_HEADER)? {
            let cap = self.resolve_token(token)?;
            if req
                .workload
                .is_none_or(|w| w.agent_id == cap.claims.agent_id)
            {
                self.register(req.caller, &cap, req.now);
            }
            let who = format!("token {}", cap.claims.token_id);
            return Ok((vec![cap], who));
        }
        if let Some(session) = single_header(req.headers, SESSION_HEADER)? {
            return Ok((
                self.session(req.caller, session),
                format!("session {session:?}"),
            ));
        }
        if let Some(w) = req.workload {
            return Ok(match &w.session_id {
                Some(s) => (
                    self.session(req.caller, s),
                    format!("workload session {s:?}"),
                ),
                None => (
                    self.agent(req.caller, &w.agent_id),
                    format!("workload agent {:?}", w.agent_id),
                ),
            });
        }
        match self.seeded_sessions.as_slice() {
            [only] => Ok((
                self.session(req.caller, only),
                format!("seeded session {only:?}"),
            )),
            many => Err(deny(
                DenyReason::CapabilityNotFound,
                format!(
                    "no session identified: no {CAPABILITY_HEADER} or {SESSION_HEADER} header, \
                     no workload binding, and {} seeded sessions",
                    many.len()
                ),
            )),
        }
    }
}

/// The value of a Firma header that may appear at most once.
fn single_header<'a>(
    headers: &'a http::HeaderMap,
    name: &str,
) -> Result<Option<&'a str>, Stage1Deny> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(deny(
            DenyReason::MalformedRequest,
            format!("header {name} appears more than once"),
        ));
    }
    first.to_str().map(|s| Some(s.trim())).map_err(|_| {
        deny(
            DenyReason::MalformedRequest,
            format!("header {name} is not ASCII"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use firma_common::capability::now_unix;
    use firma_common::keys::SigningKey;

    fn claims(
        token: &str,
        agent: &str,
        session: &str,
        actions: &[&str],
        scope: &str,
    ) -> CapabilityClaims {
        let now = now_unix();
        CapabilityClaims {
            token_id: token.into(),
            agent_id: agent.into(),
            session_id: session.into(),
            action_set: actions.iter().map(|s| s.to_string()).collect(),
            resource_scope: scope.into(),
            iat: now - 10,
            exp: now + 600,
            context_hash: "00".into(),
        }
    }

    struct Fixture {
        key: SigningKey,
        store: CapabilityStore,
        revoked: Arc<RevocationSet>,
        dir: tempfile::TempDir,
    }

    fn fixture(seeds: &[CapabilityClaims]) -> Fixture {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let revoked = Arc::new(RevocationSet::new());
        let mut store = CapabilityStore::new(key.verifying_key(), 5, revoked.clone());
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = seeds
            .iter()
            .map(|c| {
                let p = dir.path().join(format!("{}.toml", c.token_id));
                let seed = CapabilitySeed::new(c.sign(&key).unwrap(), c);
                std::fs::write(&p, toml::to_string(&seed).unwrap()).unwrap();
                p
            })
            .collect();
        store.load_seeds(&paths, now_unix()).unwrap();
        Fixture {
            key,
            store,
            revoked,
            dir,
        }
    }

    /// Connection 1 in http_proxy mode, or the workload's cgroup.
    fn caller_of(workload: Option<&Workload>) -> Caller {
        workload.map_or(Caller::Connection(1), |w| Caller::Workload(w.cgroup_id))
    }

    fn check(
        f: &Fixture,
        headers: &[(&str, &str)],
        workload: Option<&Workload>,
        action: &str,
        resource: &str,
    ) -> Result<String, DenyReason> {
        check_as(f, caller_of(workload), headers, workload, action, resource)
    }

    fn check_as(
        f: &Fixture,
        caller: Caller,
        headers: &[(&str, &str)],
        workload: Option<&Workload>,
        action: &str,
        resource: &str,
    ) -> Result<String, DenyReason> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        f.store
            .check(&Stage1Request {
                caller,
                headers: &h,
                workload,
                action_class: action,
                resource,
                now: now_unix(),
            })
            .map(|c| c.cap.claims.token_id.clone())
            .map_err(|d| d.reason)
    }

    const CHAT: &str = "model.inference.chat";
    const SEND: &str = "communication.external.send";

    #[test]
    fn single_seeded_session_applies_and_scope_is_checked() {
        let f = fixture(&[claims("t1", "a", "s1", &[CHAT], "api.openai.com")]);
        assert_eq!(
            check(&f, &[], None, CHAT, "api.openai.com/v1/chat/completions"),
            Ok("t1".into())
        );
        assert_eq!(
            check(&f, &[], None, CHAT, "api.openai.com.evil.com/v1"),
            Err(DenyReason::CapabilityScopeMismatch)
        );
        assert_eq!(
            check(&f, &[], None, SEND, "api.openai.com/x"),
            Err(DenyReason::CapabilityNotFound)
        );
    }

    #[test]
    fn two_seeded_sessions_need_a_session_header() {
        let f = fixture(&[
            claims("t1", "a", "s1", &[CHAT], "*"),
            claims("t2", "b", "s2", &[SEND], "*"),
        ]);
        assert_eq!(
            check(&f, &[], None, CHAT, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
        assert_eq!(
            check(&f, &[("x-firma-session", "s1")], None, CHAT, "h/p"),
            Ok("t1".into())
        );
        assert_eq!(
            check(&f, &[("x-firma-session", "s2")], None, SEND, "h/p"),
            Ok("t2".into())
        );
        assert_eq!(
            check(&f, &[("x-firma-session", "s3")], None, SEND, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
        assert_eq!(
            check(
                &f,
                &[("x-firma-session", "s1"), ("x-firma-session", "s2")],
                None,
                CHAT,
                "h/p"
            ),
            Err(DenyReason::MalformedRequest)
        );
    }

    #[test]
    fn header_token_verified_cached_and_joins_its_session() {
        let f = fixture(&[]);
        let c = claims("t9", "tenant-acme", "u-1", &[CHAT], "*");
        let tok = c.sign(&f.key).unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Ok("t9".into())
        );
        // Now the session header alone finds it, for the caller that presented it.
        assert_eq!(
            check(&f, &[("x-firma-session", "u-1")], None, CHAT, "h/p"),
            Ok("t9".into())
        );
        assert_eq!(
            check_as(
                &f,
                Caller::Connection(2),
                &[("x-firma-session", "u-1")],
                None,
                CHAT,
                "h/p"
            ),
            Err(DenyReason::CapabilityNotFound)
        );
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let forged = c.sign(&other).unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &forged)], None, CHAT, "h/p"),
            Err(DenyReason::CapabilityInvalid)
        );
        assert_eq!(
            check(&f, &[("x-firma-capability", "garbage")], None, CHAT, "h/p"),
            Err(DenyReason::CapabilityInvalid)
        );
        f.revoked.insert("t9");
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Err(DenyReason::CapabilityRevoked)
        );
    }

    #[test]
    fn expired_beyond_skew_denied_within_skew_allowed() {
        let f = fixture(&[]);
        let mut c = claims("t1", "a", "s", &[CHAT], "*");
        c.exp = now_unix() - 3;
        let tok = c.sign(&f.key).unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Ok("t1".into())
        );
        c.exp = now_unix() - 30;
        c.token_id = "t2".into();
        let tok = c.sign(&f.key).unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Err(DenyReason::CapabilityExpired)
        );
    }

    #[test]
    fn workload_binding_selects_and_constrains() {
        let f = fixture(&[
            claims("t1", "agent-a", "s1", &[CHAT], "*"),
            claims("t2", "agent-b", "s2", &[CHAT], "*"),
        ]);
        let w = |agent: &str, session: Option<&str>| Workload {
            cgroup_id: 7,
            cgroup_path: "/firma/x".into(),
            pid: 42,
            agent_id: agent.into(),
            session_id: session.map(str::to_owned),
        };
        let wa = w("agent-a", None);
        assert_eq!(check(&f, &[], Some(&wa), CHAT, "h/p"), Ok("t1".into()));
        let wb = w("agent-b", Some("s2"));
        assert_eq!(check(&f, &[], Some(&wb), CHAT, "h/p"), Ok("t2".into()));
        // App names another agent's session: the kernel binding wins.
        assert_eq!(
            check(&f, &[("x-firma-session", "s2")], Some(&wa), CHAT, "h/p"),
            Err(DenyReason::WorkloadMismatch)
        );
        let tok = claims("t3", "agent-b", "s3", &[CHAT], "*")
            .sign(&f.key)
            .unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], Some(&wa), CHAT, "h/p"),
            Err(DenyReason::WorkloadMismatch)
        );
        let wc = w("agent-c", None);
        assert_eq!(
            check(&f, &[], Some(&wc), CHAT, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
    }

    #[test]
    fn bad_seeds_stop_startup_with_the_seed_messages() {
        let f = fixture(&[]);
        let c = claims("t1", "a", "s", &[CHAT], "*");
        let mut seed = CapabilitySeed::new(c.sign(&f.key).unwrap(), &c);
        seed.action_set.push(SEND.into());
        let p = f.dir.path().join("edited.toml");
        std::fs::write(&p, toml::to_string(&seed).unwrap()).unwrap();
        let mut store =
            CapabilityStore::new(f.key.verifying_key(), 5, Arc::new(RevocationSet::new()));
        let e = store
            .load_seeds(std::slice::from_ref(&p), now_unix())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("raw_token claims do not match seed claims") && e.contains("edited.toml"),
            "{e}"
        );

        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let seed = CapabilitySeed::new(c.sign(&other).unwrap(), &c);
        std::fs::write(&p, toml::to_string(&seed).unwrap()).unwrap();
        let e = store
            .load_seeds(std::slice::from_ref(&p), now_unix())
            .unwrap_err()
            .to_string();
        assert!(e.contains("raw_token failed PASETO verification"), "{e}");

        let mut old = c.clone();
        old.exp = now_unix() - 100;
        let seed = CapabilitySeed::new(old.sign(&f.key).unwrap(), &old);
        std::fs::write(&p, toml::to_string(&seed).unwrap()).unwrap();
        let e = store
            .load_seeds(std::slice::from_ref(&p), now_unix())
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn a_session_id_is_not_a_bearer_token() {
        let f = fixture(&[claims("t1", "seeded", "shared", &[CHAT], "*")]);
        let tok = claims("g1", "tenant-globex", "globex-sess-1", &[CHAT], "*")
            .sign(&f.key)
            .unwrap();
        let (a, b) = (Caller::Connection(10), Caller::Connection(11));
        let by_session = [("x-firma-session", "globex-sess-1")];
        assert_eq!(
            check_as(&f, a, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Ok("g1".into())
        );
        // Another connection names the session: nothing, even though the token is cached.
        assert_eq!(
            check_as(&f, b, &by_session, None, CHAT, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
        assert_eq!(
            check_as(&f, a, &by_session, None, CHAT, "h/p"),
            Ok("g1".into())
        );
        // Seeded sessions stay visible to everyone.
        assert_eq!(
            check_as(&f, b, &[("x-firma-session", "shared")], None, CHAT, "h/p"),
            Ok("t1".into())
        );
        // Presenting the token on B makes it B's too.
        assert_eq!(
            check_as(&f, b, &[("x-firma-capability", &tok)], None, CHAT, "h/p"),
            Ok("g1".into())
        );
        assert_eq!(
            check_as(&f, b, &by_session, None, CHAT, "h/p"),
            Ok("g1".into())
        );
    }

    #[test]
    fn transparent_mode_shares_presented_tokens_per_workload_only() {
        let f = fixture(&[]);
        let w = |cgroup_id: u64| Workload {
            cgroup_id,
            cgroup_path: format!("/firma/{cgroup_id}"),
            pid: 42,
            agent_id: "agent-a".into(),
            session_id: None,
        };
        let (w1, w2) = (w(1), w(2));
        let tok = claims("p1", "agent-a", "s-p", &[CHAT], "*")
            .sign(&f.key)
            .unwrap();
        assert_eq!(
            check(&f, &[("x-firma-capability", &tok)], Some(&w1), CHAT, "h/p"),
            Ok("p1".into())
        );
        // Any later connection of the same cgroup: by session, and by the agent binding.
        assert_eq!(
            check(&f, &[("x-firma-session", "s-p")], Some(&w1), CHAT, "h/p"),
            Ok("p1".into())
        );
        assert_eq!(check(&f, &[], Some(&w1), CHAT, "h/p"), Ok("p1".into()));
        // Another cgroup bound to the same agent holds nothing.
        assert_eq!(
            check(&f, &[("x-firma-session", "s-p")], Some(&w2), CHAT, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
        assert_eq!(
            check(&f, &[], Some(&w2), CHAT, "h/p"),
            Err(DenyReason::CapabilityNotFound)
        );
    }

    #[test]
    fn live_until_covers_every_capability_of_the_session() {
        let f = fixture(&[]);
        let mut short = claims("a1", "a", "s", &[CHAT], "*");
        short.exp = now_unix() + 60;
        let mut long = claims("a2", "a", "s", &[CHAT], "*");
        long.exp = now_unix() + 6000;
        for c in [&short, &long] {
            let tok = c.sign(&f.key).unwrap();
            check(&f, &[("x-firma-capability", &tok)], None, CHAT, "h/p").unwrap();
        }
        let mut h = http::HeaderMap::new();
        h.insert("x-firma-session", "s".parse().unwrap());
        let cleared = f
            .store
            .check(&Stage1Request {
                caller: Caller::Connection(1),
                headers: &h,
                workload: None,
                action_class: CHAT,
                resource: "h/p",
                now: now_unix(),
            })
            .unwrap();
        assert_eq!(cleared.cap.claims.token_id, "a1");
        assert_eq!(cleared.live_until, long.exp + 5);
    }

    /// 100k callers presenting 100k sessions: what is remembered stays within the bounds.
    #[test]
    fn presented_capabilities_are_bounded() {
        let f = fixture(&[]);
        let now = now_unix();
        for i in 0..100_000u64 {
            let cap = Capability::new(claims(
                &format!("t{i}"),
                "a",
                &format!("s{i}"),
                &[CHAT],
                "*",
            ));
            f.store.register(Caller::Connection(i), &cap, now);
        }
        assert_eq!(f.store.presented_len(), MAX_PRESENTED);
        assert_eq!(f.store.presented_callers(), MAX_PRESENTED);
        // One caller churning through sessions keeps at most its own bound.
        let store = CapabilityStore::new(f.key.verifying_key(), 5, Arc::new(RevocationSet::new()));
        for i in 0..10_000 {
            let mut c = claims(&format!("u{i}"), "a", &format!("s{i}"), &[CHAT], "*");
            // Half of them already expired: those go first.
            if i % 2 == 0 {
                c.exp = now - 60;
            }
            store.register(Caller::Workload(9), &Capability::new(c), now);
        }
        assert!(store.presented_len() <= MAX_PRESENTED_PER_CALLER);
        assert_eq!(store.presented_callers(), 1);
    }
}
