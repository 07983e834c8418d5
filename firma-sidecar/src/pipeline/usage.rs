//! Token usage totals per session and per agent, for `context.session` / `context.agent`.
//!
//! **Budgets that hold** (`docs/llm-policies.md`). A metered request (an LLM call whose
//! response usage is read) *reserves* at decision time what it may spend: its body's length as
//! an upper bound of its input tokens, its `max_tokens` (times `n`) or `[sidecar.llm]
//! reserve_output_tokens` as its output, and their price. Stage 2 evaluates against settled
//! totals plus every reservation in flight and takes the reservation in the same step
//! ([`UsageLedger::reserve_if`]: optimistic, retried when the session's or agent's totals
//! changed in between), so N concurrent requests can overshoot a budget by at most one
//! reservation. When the response ends the [`Reservation`] is settled with the usage the
//! response reported; a reservation dropped unsettled (nothing was sent) is released.
//!
//! Persistence (`[sidecar.llm] usage_state_path`): the settled totals are a JSON snapshot
//! written atomically (temporary file + rename) at most once a second when they changed, and at
//! shutdown; it is read at start. A corrupt snapshot stops the sidecar (budgets would otherwise
//! silently reset). A `kill -9` loses at most the last second of usage and the reservations in
//! flight; each response's usage is also in its audit `outcome` event, the durable record to
//! reconcile from.

use firma_common::policy::UsageTotals;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Sessions (and agents) tracked at most; beyond it the oldest-inserted are not evicted but
/// new ones share an overflow bucket, so a flood of sessions cannot grow memory without
/// bound and cannot escape accounting either.
const MAX_KEYS: usize = 100_000;
const OVERFLOW: &str = "\u{0}overflow";

#[derive(Default)]
pub struct UsageLedger {
    inner: Mutex<Totals>,
    path: Option<PathBuf>,
    dirty: AtomicBool,
}

/// The snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum UsageStateError {
    #[error("{path}: cannot read the usage state: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path}: the usage state is corrupt ({detail}); budgets cannot be enforced from it. Restore it, or delete it to start every total at zero"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: cannot write the usage state: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// One session's or agent's totals; `version` moves on every change, so a decision can tell
/// whether what it evaluated is still current when it reserves.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    totals: UsageTotals,
    version: u64,
}

#[derive(Default)]
struct Totals {
    sessions: HashMap<String, Entry>,
    agents: HashMap<String, Entry>,
}

/// What a request reserves at decision time (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
}

impl Want {
    pub fn tokens(&self) -> i64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

pub use crate::config::DEFAULT_RESERVE_OUTPUT_TOKENS;
/// Most choices (`n`) a reservation multiplies by (the providers' own limit is 128).
const MAX_CHOICES: i64 = 128;

/// Tokens reserved for one inline base64 image (`data:image/…;base64,`): providers bill images
/// by their pixels after resizing (OpenAI at most ~1,500, Anthropic ~1,600 per image), never by
/// the bytes of the base64, so a 12 MB image must not reserve 12M tokens.
pub const INLINE_DATA_TOKENS: i64 = 4096;

/// The tokens a metered request reserves (cost filled in by the caller, which knows prices):
/// its body's length in bytes as input (a text token covers at least one byte, so this bounds
/// text input), except inline base64 images, which count [`INLINE_DATA_TOKENS`] each (inputs by
/// reference, such as files, images by URL or a previous response, are not bounded by it), and
/// `max_tokens` (the larger of the fields the rule reads) or `default_output` when absent or
/// not positive, times `n` when given.
pub fn want_for(
    attrs: &super::extract::Attributes,
    body_len: usize,
    inline: super::extract::InlineData,
    default_output: i64,
) -> Want {
    use super::extract::AttrValue;
    let long = |k: &str| match attrs.get(k) {
        Some(AttrValue::Long(v)) => Some(*v),
        _ => None,
    };
    let per_choice = long("max_tokens")
        .filter(|v| *v > 0)
        .unwrap_or(default_output);
    let choices = long("n").filter(|v| *v > 0).unwrap_or(1).min(MAX_CHOICES);
    Want {
        input_tokens: i64::try_from(body_len)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(inline.bytes).unwrap_or(i64::MAX))
            .max(0)
            .saturating_add(
                i64::try_from(inline.count)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(INLINE_DATA_TOKENS),
            ),
        output_tokens: per_choice.saturating_mul(choices),
        cost_nano_usd: 0,
    }
}

/// Totals read for one decision, with their generations.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub session: UsageTotals,
    pub agent: UsageTotals,
    gens: (u64, u64),
}

/// One response's usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
}

/// The key `key`'s totals live under: itself, or the shared overflow bucket once the map is
/// full (reads and writes resolve alike, so an overflowed id still sees what it spent).
fn resolve<'a>(map: &HashMap<String, Entry>, key: &'a str) -> &'a str {
    if map.len() >= MAX_KEYS && !map.contains_key(key) {
        OVERFLOW
    } else {
        key
    }
}

fn entry<'m>(map: &'m mut HashMap<String, Entry>, key: &str) -> &'m mut Entry {
    let key = resolve(map, key);
    let e = map.entry(key.to_owned()).or_default();
    e.version = e.version.wrapping_add(1);
    e
}

fn get(map: &HashMap<String, Entry>, key: &str) -> Entry {
    map.get(resolve(map, key)).copied().unwrap_or_default()
}

fn add(map: &mut HashMap<String, Entry>, key: &str, u: &Usage) {
    let t = &mut entry(map, key).totals;
    t.input_tokens = t.input_tokens.saturating_add(u.input_tokens);
    t.output_tokens = t.output_tokens.saturating_add(u.output_tokens);
    t.cost_nano_usd = t.cost_nano_usd.saturating_add(u.cost_nano_usd);
}

/// Adds (`sign` 1) or removes (`sign` -1) a reservation.
fn reserve(map: &mut HashMap<String, Entry>, key: &str, w: &Want, sign: i64) {
    let t = &mut entry(map, key).totals;
    t.reserved_tokens = t
        .reserved_tokens
        .saturating_add(sign.saturating_mul(w.tokens()))
        .max(0);
    t.reserved_cost_nano_usd = t
        .reserved_cost_nano_usd
        .saturating_add(sign.saturating_mul(w.cost_nano_usd))
        .max(0);
}

fn totals_json(m: &HashMap<String, Entry>) -> Value {
    m.iter()
        .map(|(k, e)| {
            let t = &e.totals;
            (
                k.clone(),
                json!([t.input_tokens, t.output_tokens, t.cost_nano_usd]),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn totals_from(v: &Value, what: &str) -> Result<HashMap<String, Entry>, String> {
    let obj = v
        .get(what)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("no `{what}` object"))?;
    obj.iter()
        .map(|(k, t)| {
            let n = |i: usize| t.get(i).and_then(Value::as_i64);
            match (n(0), n(1), n(2)) {
                (Some(a), Some(b), Some(c)) => Ok((
                    k.clone(),
                    Entry {
                        totals: UsageTotals {
                            input_tokens: a,
                            output_tokens: b,
                            cost_nano_usd: c,
                            ..UsageTotals::default()
                        },
                        version: 0,
                    },
                )),
                _ => Err(format!(
                    "{what}.{k}: expected [input, output, cost_nano_usd]"
                )),
            }
        })
        .collect()
}

impl UsageLedger {
    /// A ledger kept at `path` (loaded now when the file exists), or in memory only.
    pub fn open(path: Option<&Path>) -> Result<Self, UsageStateError> {
        let mut totals = Totals::default();
        if let Some(p) = path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let corrupt = |detail: String| UsageStateError::Corrupt {
                        path: p.to_path_buf(),
                        detail,
                    };
                    let v: Value =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                    totals.sessions = totals_from(&v, "sessions").map_err(corrupt)?;
                    totals.agents = totals_from(&v, "agents").map_err(corrupt)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(cause) => {
                    return Err(UsageStateError::Read {
                        path: p.to_path_buf(),
                        cause,
                    });
                }
            }
        }
        Ok(Self {
            inner: Mutex::new(totals),
            path: path.map(Path::to_path_buf),
            dirty: AtomicBool::new(false),
        })
    }

    /// Writes the snapshot if anything changed since the last write.
    pub fn flush(&self) -> Result<(), UsageStateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let text = {
            let t = self.lock();
            json!({
                "version": 1,
                "sessions": totals_json(&t.sessions),
                "agents": totals_json(&t.agents),
            })
            .to_string()
        };
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text.as_bytes())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|cause| {
            self.dirty.store(true, Ordering::Release);
            UsageStateError::Write {
                path: path.clone(),
                cause,
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (session totals, agent totals), reservations in flight included.
    pub fn totals(&self, session: &str, agent: &str) -> (UsageTotals, UsageTotals) {
        let s = self.snapshot(session, agent);
        (s.session, s.agent)
    }

    /// The totals a reserving decision evaluates against.
    pub fn snapshot(&self, session: &str, agent: &str) -> Snapshot {
        let t = self.lock();
        let (s, a) = (get(&t.sessions, session), get(&t.agents, agent));
        Snapshot {
            session: s.totals,
            agent: a.totals,
            gens: (s.version, a.version),
        }
    }

    /// Takes the reservation `want` if the totals of `session` and `agent` are still those of
    /// `snap` and `also` (the caller's own commit, e.g. Stage 2's call counter) succeeds, all
    /// under one lock; `None`: something changed, evaluate again.
    pub fn reserve_if(
        self: &Arc<Self>,
        snap: &Snapshot,
        session: &str,
        agent: &str,
        want: Want,
        also: impl FnOnce() -> bool,
    ) -> Option<Reservation> {
        let mut t = self.lock();
        let now = (
            get(&t.sessions, session).version,
            get(&t.agents, agent).version,
        );
        if now != snap.gens || !also() {
            return None;
        }
        reserve(&mut t.sessions, session, &want, 1);
        reserve(&mut t.agents, agent, &want, 1);
        Some(Reservation {
            held: Held::Local {
                ledger: self.clone(),
                session: session.to_owned(),
                agent: agent.to_owned(),
            },
            want,
            settled: false,
            sent: false,
        })
    }

    /// Adds settled usage (no reservation involved).
    pub fn add(&self, session: &str, agent: &str, u: &Usage) {
        let mut t = self.lock();
        add(&mut t.sessions, session, u);
        add(&mut t.agents, agent, u);
        self.dirty.store(true, Ordering::Release);
    }

    fn settle(&self, session: &str, agent: &str, want: &Want, u: Option<&Usage>) {
        let mut t = self.lock();
        reserve(&mut t.sessions, session, want, -1);
        reserve(&mut t.agents, agent, want, -1);
        if let Some(u) = u {
            add(&mut t.sessions, session, u);
            add(&mut t.agents, agent, u);
            self.dirty.store(true, Ordering::Release);
        }
    }
}

/// Where a reservation is held.
enum Held {
    /// In this sidecar's ledger.
    Local {
        ledger: Arc<UsageLedger>,
        session: String,
        agent: String,
    },
    /// In the shared store (`[sidecar.session_store] backend = "redis"`); taken out when
    /// finished.
    Shared(Option<Box<dyn SharedHold>>),
}

/// A reservation another store holds (the shared session store implements it): this file
/// sits below that store, so it names the interface rather than the type.
pub trait SharedHold: Send + Sync + std::fmt::Debug {
    /// Replaces the reservation with `usage` (or releases it on `None`).
    fn finish(self: Box<Self>, usage: Option<&Usage>);
}

/// A reservation in flight. [`Reservation::settle`] replaces it with what the response used;
/// dropped unsettled before the request was handed to the upstream, it is released and nothing
/// is charged. After [`Reservation::sending`], a drop charges the whole reservation: the client
/// that leaves while its request is in flight (before any response head) cannot tell the
/// provider to stop, so what it may have spent stays spent (fail closed for budgets).
pub struct Reservation {
    held: Held,
    want: Want,
    settled: bool,
    sent: bool,
}

impl Reservation {
    /// A reservation the shared store took for `want`.
    pub fn shared(held: Box<dyn SharedHold>, want: Want) -> Self {
        Self {
            held: Held::Shared(Some(held)),
            want,
            settled: false,
            sent: false,
        }
    }

    pub fn want(&self) -> Want {
        self.want
    }

    /// The request is being handed to the upstream: from now on a drop charges the reservation.
    pub fn sending(&mut self) {
        self.sent = true;
    }

    /// Releases the reservation: nothing reached a provider (the upstream could not be reached).
    pub fn release(mut self) {
        self.settled = true;
        self.finish(None);
    }

    /// Charges `u` to the session and agent in place of the reservation.
    pub fn settle(mut self, u: &Usage) {
        self.settled = true;
        self.finish(Some(u));
    }

    fn finish(&mut self, u: Option<&Usage>) {
        match &mut self.held {
            Held::Local {
                ledger,
                session,
                agent,
            } => ledger.settle(session, agent, &self.want, u),
            Held::Shared(h) => {
                if let Some(h) = h.take() {
                    h.finish(u);
                }
            }
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Reservation");
        if let Held::Local { session, agent, .. } = &self.held {
            d.field("session", session).field("agent", agent);
        }
        d.field("want", &self.want).finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if self.sent {
            let all = Usage {
                input_tokens: self.want.input_tokens,
                output_tokens: self.want.output_tokens,
                cost_nano_usd: self.want.cost_nano_usd,
            };
            self.finish(Some(&all));
        } else {
            self.finish(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_data_reserves_per_item_not_per_byte() {
        use super::super::extract::{AttrValue, Attributes, InlineData};
        let attrs = Attributes::from([("max_tokens".to_string(), AttrValue::Long(100))]);
        let none = want_for(&attrs, 1_000, InlineData::default(), 32_768);
        assert_eq!((none.input_tokens, none.output_tokens), (1_000, 100));
        // A 12 MB body that is one base64 image and 1,000 bytes of text.
        let image = InlineData {
            count: 1,
            bytes: 12_000_000,
        };
        let w = want_for(&attrs, 12_001_000, image, 32_768);
        assert_eq!(w.input_tokens, 1_000 + INLINE_DATA_TOKENS);
        // A lying measurement cannot go below zero.
        let odd = InlineData {
            count: 0,
            bytes: 50,
        };
        assert_eq!(want_for(&attrs, 10, odd, 32_768).input_tokens, 0);
    }

    #[test]
    fn totals_accumulate_per_session_and_agent() {
        let l = UsageLedger::open(None).unwrap();
        let u = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cost_nano_usd: 3,
        };
        l.add("s1", "a", &u);
        l.add("s2", "a", &u);
        let (s, a) = l.totals("s1", "a");
        assert_eq!((s.input_tokens, s.output_tokens), (10, 5));
        assert_eq!(
            (a.input_tokens, a.output_tokens, a.cost_nano_usd),
            (20, 10, 6)
        );
        assert_eq!(l.totals("other", "b"), Default::default());
    }

    #[test]
    fn reservations_count_until_settled_or_released() {
        let l = Arc::new(UsageLedger::open(None).unwrap());
        let want = Want {
            input_tokens: 10,
            output_tokens: 90,
            cost_nano_usd: 7,
        };
        let snap = l.snapshot("s", "a");
        let r = l.reserve_if(&snap, "s", "a", want, || true).unwrap();
        let (s, a) = l.totals("s", "a");
        assert_eq!((s.tokens_used(), s.reserved_tokens), (100, 100));
        assert_eq!(a.reserved_cost_nano_usd, 7);
        // A decision made on the old snapshot must evaluate again.
        assert!(l.reserve_if(&snap, "s", "a", want, || true).is_none());
        // Nor does a failed commit of the caller reserve anything.
        let fresh = l.snapshot("s", "a");
        assert!(l.reserve_if(&fresh, "s", "a", want, || false).is_none());
        assert_eq!(l.totals("s", "a").0.reserved_tokens, 100);
        r.settle(&Usage {
            input_tokens: 5,
            output_tokens: 20,
            cost_nano_usd: 3,
        });
        let (s, _) = l.totals("s", "a");
        assert_eq!(
            (s.tokens_used(), s.reserved_tokens, s.cost_nano_usd),
            (25, 0, 3)
        );
        // Dropped unsettled: released, nothing charged.
        let snap = l.snapshot("s", "a");
        drop(l.reserve_if(&snap, "s", "a", want, || true).unwrap());
        assert_eq!(l.totals("s", "a").0.tokens_used(), 25);
    }

    /// Many threads deciding against one budget: never more admitted than the budget allows
    /// plus one reservation.
    #[test]
    fn concurrent_reservations_hold_the_budget() {
        let l = Arc::new(UsageLedger::open(None).unwrap());
        let admitted = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (l, admitted) = (l.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..50 {
                        loop {
                            let snap = l.snapshot("s", "a");
                            if snap.session.tokens_used() >= 1000 {
                                break;
                            }
                            let w = Want {
                                output_tokens: 100,
                                ..Want::default()
                            };
                            if let Some(r) = l.reserve_if(&snap, "s", "a", w, || true) {
                                admitted.fetch_add(1, Ordering::Relaxed);
                                held.push(r);
                                break;
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        let held: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(admitted.load(Ordering::Relaxed), 10);
        assert_eq!(held.len(), 10);
    }

    #[test]
    fn overflowed_ids_read_what_they_spent() {
        let l = UsageLedger::open(None).unwrap();
        {
            let mut t = l.lock();
            for i in 0..MAX_KEYS {
                t.sessions.insert(format!("s{i}"), Entry::default());
            }
        }
        let u = Usage {
            input_tokens: 1,
            output_tokens: 1,
            cost_nano_usd: 0,
        };
        l.add("new-session", "a", &u);
        assert_eq!(l.totals("new-session", "a").0.tokens_used(), 2);
        assert_eq!(
            l.totals("another-new", "a").0.tokens_used(),
            2,
            "shared overflow"
        );
    }

    #[test]
    fn snapshot_survives_reopen_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("usage.json");
        let l = UsageLedger::open(Some(&p)).unwrap();
        let u = Usage {
            input_tokens: 7,
            output_tokens: 3,
            cost_nano_usd: 11,
        };
        l.add("s", "a", &u);
        l.flush().unwrap();
        let again = UsageLedger::open(Some(&p)).unwrap();
        assert_eq!(again.totals("s", "a"), l.totals("s", "a"));
        std::fs::write(&p, b"{\"sessions\":{\"s\":[1]},\"agents\":{}}").unwrap();
        let e = UsageLedger::open(Some(&p)).err().unwrap().to_string();
        assert!(e.contains("corrupt") && e.contains("usage.json"), "{e}");
    }
}
