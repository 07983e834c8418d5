//! Token usage totals per session and per agent, for `context.session` / `context.agent`.
//!
//! The connector reads usage from LLM responses (`connector::usage`) and adds it here when a
//! response ends; Stage 2 reads the totals *before* a request, so the request that crosses a
//! budget completes and the next one is denied.
//!
//! Persistence (`[sidecar.llm] usage_state_path`, see `docs/llm-policies.md`): the totals are
//! a JSON snapshot written atomically (temporary file + rename) at most once a second when they
//! changed, and at shutdown; it is read at start. A corrupt snapshot stops the sidecar (budgets
//! would otherwise silently reset). A `kill -9` loses at most the last second of usage; each
//! response's usage is also in its audit `outcome` event, the durable record to reconcile from.

use firma_common::policy::UsageTotals;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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

#[derive(Default)]
struct Totals {
    sessions: HashMap<String, UsageTotals>,
    agents: HashMap<String, UsageTotals>,
}

/// One response's usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
}

fn add(map: &mut HashMap<String, UsageTotals>, key: &str, u: &Usage) {
    let key = if map.len() >= MAX_KEYS && !map.contains_key(key) {
        OVERFLOW
    } else {
        key
    };
    let t = map.entry(key.to_owned()).or_default();
    t.input_tokens = t.input_tokens.saturating_add(u.input_tokens);
    t.output_tokens = t.output_tokens.saturating_add(u.output_tokens);
    t.cost_nano_usd = t.cost_nano_usd.saturating_add(u.cost_nano_usd);
}

fn totals_json(m: &HashMap<String, UsageTotals>) -> Value {
    m.iter()
        .map(|(k, t)| {
            (
                k.clone(),
                json!([t.input_tokens, t.output_tokens, t.cost_nano_usd]),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn totals_from(v: &Value, what: &str) -> Result<HashMap<String, UsageTotals>, String> {
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
                    UsageTotals {
                        input_tokens: a,
                        output_tokens: b,
                        cost_nano_usd: c,
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

    /// (session totals, agent totals).
    pub fn totals(&self, session: &str, agent: &str) -> (UsageTotals, UsageTotals) {
        let t = self.lock();
        (
            t.sessions.get(session).copied().unwrap_or_default(),
            t.agents.get(agent).copied().unwrap_or_default(),
        )
    }

    pub fn add(&self, session: &str, agent: &str, u: &Usage) {
        let mut t = self.lock();
        add(&mut t.sessions, session, u);
        add(&mut t.agents, agent, u);
        self.dirty.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
