//! Token usage totals per session and per agent, for `context.session` / `context.agent`.
//!
//! The connector reads usage from LLM responses (`connector::usage`) and adds it here when a
//! response ends; Stage 2 reads the totals *before* a request, so the request that crosses a
//! budget completes and the next one is denied. Totals are rebuilt from the audit log at start
//! (see `docs/llm-policies.md`): the audit is the durable record of every response's usage.

use firma_common::policy::UsageTotals;
use std::collections::HashMap;
use std::sync::Mutex;

/// Sessions (and agents) tracked at most; beyond it the oldest-inserted are not evicted but
/// new ones share an overflow bucket, so a flood of sessions cannot grow memory without
/// bound and cannot escape accounting either.
const MAX_KEYS: usize = 100_000;
const OVERFLOW: &str = "\u{0}overflow";

#[derive(Default)]
pub struct UsageLedger {
    inner: Mutex<Totals>,
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
    pub cost_ten_thousandths_usd: i64,
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
    t.cost_ten_thousandths_usd = t
        .cost_ten_thousandths_usd
        .saturating_add(u.cost_ten_thousandths_usd);
}

impl UsageLedger {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_accumulate_per_session_and_agent() {
        let l = UsageLedger::default();
        let u = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cost_ten_thousandths_usd: 3,
        };
        l.add("s1", "a", &u);
        l.add("s2", "a", &u);
        let (s, a) = l.totals("s1", "a");
        assert_eq!((s.input_tokens, s.output_tokens), (10, 5));
        assert_eq!(
            (a.input_tokens, a.output_tokens, a.cost_ten_thousandths_usd),
            (20, 10, 6)
        );
        assert_eq!(l.totals("other", "b"), Default::default());
    }
}
