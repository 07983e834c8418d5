//! Per-session call counters for Stage 2's `context.action_count`.
//!
//! `action_count` is the number of calls of one action class in one session *including the
//! current one*, so `context.action_count <= 100` allows exactly 100 calls. A counter only
//! moves when Stage 2 allows: denied attempts do not use up the budget. Two concurrent requests
//! cannot both be evaluated as call N: the counter advances with a compare-and-swap and a
//! request that loses the race is evaluated again with the new count.
//!
//! **Bounded memory.** Sessions come and go (the seeds' web app mints one per user), so the
//! table forgets them, but never in a way that hands a budget back to a session that can still
//! spend it:
//! - each session remembers `live_until`, the latest `exp + clock skew` of any capability that
//!   was used with it (Stage 1 reports every capability of the session it knows, so a
//!   longer-lived second capability extends it). Until then some capability of the session can
//!   pass Stage 1, and its counter is *live*;
//! - a session is dropped [`RETAIN_AFTER_EXPIRY`] after `live_until`. The grace keeps the count
//!   for an app that renews a session's capability only after the old one expired;
//! - at [`MAX_SESSIONS`] tracked sessions, a new session first displaces sessions that are
//!   already past `live_until` (oldest first). If every tracked session is live, the new
//!   session is refused ([`SessionTableFull`], a Stage 2 denial) instead of evicting one: an
//!   LRU would let anyone holding many capabilities push a victim's counter out and reset its
//!   budget to 0. Refusing new sessions is fail-closed and only lasts until live capabilities
//!   expire; filling the table needs that many Authority-signed capabilities.
//!
//! A session whose counter was dropped and that later presents a new capability starts at 0,
//! like every session after a sidecar restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Sessions tracked at most (each holds one counter per action class it used).
pub const MAX_SESSIONS: usize = 65_536;
/// Seconds a session's counters outlive its last capability.
pub const RETAIN_AFTER_EXPIRY: i64 = 3_600;

/// Every tracked session is live: a new one cannot be counted without evicting a live budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "session table full: {capacity} sessions with live capabilities are tracked; \
     new sessions are refused until some expire"
)]
pub struct SessionTableFull {
    pub capacity: usize,
}

#[derive(Debug, Default)]
struct Session {
    live_until: i64,
    classes: HashMap<String, Arc<AtomicI64>>,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<Arc<str>, Session>,
    /// `(live_until, session)` for every tracked session, oldest first.
    by_expiry: BTreeSet<(i64, Arc<str>)>,
}

impl Table {
    /// Drops sessions whose `live_until` is before `cutoff`, oldest first, while `more()`.
    fn drop_before(&mut self, cutoff: i64, mut more: impl FnMut(&Self) -> bool) {
        while more(self) {
            let Some((t, _)) = self.by_expiry.first() else {
                return;
            };
            if *t >= cutoff {
                return;
            }
            if let Some((_, s)) = self.by_expiry.pop_first() {
                self.sessions.remove(&s);
            }
        }
    }
}

#[derive(Debug)]
pub struct ActionCounters {
    table: Mutex<Table>,
    capacity: usize,
}

impl Default for ActionCounters {
    fn default() -> Self {
        Self::with_capacity(MAX_SESSIONS)
    }
}

impl ActionCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table that tracks at most `capacity` sessions.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        }
    }

    /// The counter of `(session, action_class)`, created at 0. `live_until` is the unix second
    /// after which no capability of `session` known to Stage 1 is valid; `now` is the time
    /// Stage 1 checked against (so the session is live at `now`).
    pub fn counter(
        &self,
        session: &str,
        action_class: &str,
        live_until: i64,
        now: i64,
    ) -> Result<Arc<AtomicI64>, SessionTableFull> {
        let mut t = self.lock();
        t.drop_before(now.saturating_sub(RETAIN_AFTER_EXPIRY), |_| true);
        let table = &mut *t;
        if let Some((key, s)) = table.sessions.get_key_value(session) {
            if live_until > s.live_until {
                let key = key.clone();
                table.by_expiry.remove(&(s.live_until, key.clone()));
                table.by_expiry.insert((live_until, key.clone()));
                if let Some(s) = table.sessions.get_mut(&key) {
                    s.live_until = live_until;
                }
            }
        } else {
            if table.sessions.len() >= self.capacity {
                let cap = self.capacity;
                table.drop_before(now, |t| t.sessions.len() >= cap);
                if table.sessions.len() >= cap {
                    return Err(SessionTableFull { capacity: cap });
                }
            }
            let key: Arc<str> = Arc::from(session);
            table.by_expiry.insert((live_until, key.clone()));
            table.sessions.insert(
                key,
                Session {
                    live_until,
                    classes: HashMap::new(),
                },
            );
        }
        let s = table.sessions.get_mut(session).ok_or(SessionTableFull {
            capacity: self.capacity,
        })?;
        Ok(s.classes
            .entry(action_class.to_owned())
            .or_default()
            .clone())
    }

    /// Calls already allowed for `(session, action_class)` (0 when not tracked).
    pub fn get(&self, session: &str, action_class: &str) -> i64 {
        self.lock()
            .sessions
            .get(session)
            .and_then(|s| s.classes.get(action_class))
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Sessions tracked now.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `eval(count)` with `count = done + 1` and, if it allows, records the call. Retries
/// when a concurrent call advanced the counter in between. Returns `eval`'s result.
pub fn count_and_decide<T>(
    counter: &AtomicI64,
    mut eval: impl FnMut(i64) -> T,
    allowed: impl Fn(&T) -> bool,
) -> T {
    loop {
        let done = counter.load(Ordering::Acquire);
        let result = eval(done.saturating_add(1));
        if !allowed(&result) {
            return result;
        }
        if counter
            .compare_exchange(
                done,
                done.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn spend(c: &ActionCounters, session: &str, live_until: i64, now: i64) -> i64 {
        let ctr = c.counter(session, "a", live_until, now).expect("tracked");
        count_and_decide(&ctr, |n| n, |_| true)
    }

    #[test]
    fn counts_only_allowed_calls_including_current() {
        let c = ActionCounters::new();
        let ctr = c.counter("s", "a", NOW + 60, NOW).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = count_and_decide(
                &ctr,
                |n| {
                    seen.push(n);
                    n <= 2
                },
                |ok| *ok,
            );
            let _ = r;
        }
        assert_eq!(seen, vec![1, 2, 3, 3]);
        assert_eq!(c.get("s", "a"), 2);
        assert_eq!(c.get("s", "b"), 0);
        assert_eq!(c.len(), 1, "get does not create sessions");
    }

    #[test]
    fn concurrent_calls_never_share_a_count() {
        let c = Arc::new(ActionCounters::new());
        let allowed = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, allowed) = (c.clone(), allowed.clone());
                std::thread::spawn(move || {
                    let ctr = c.counter("s", "a", NOW + 60, NOW).unwrap();
                    for _ in 0..50 {
                        if count_and_decide(&ctr, |n| n <= 100, |ok| *ok) {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::Relaxed), 100);
    }

    /// 100k short sessions, one after another (the seeds' per-user sessions with a 15-minute
    /// TTL, a second apart): the table holds only what is live or within the grace period.
    #[test]
    fn session_churn_keeps_the_table_bounded() {
        let c = ActionCounters::new();
        let ttl = 900;
        let mut peak = 0;
        for i in 0..100_000i64 {
            let now = NOW + i;
            assert_eq!(spend(&c, &format!("s-{i}"), now + ttl, now), 1);
            peak = peak.max(c.len());
        }
        // Live (ttl) plus retained (grace) sessions, one per second.
        let bound = usize::try_from(ttl + RETAIN_AFTER_EXPIRY + 1).unwrap();
        assert!(peak <= bound, "peak {peak} > {bound}");
        assert!(c.len() <= bound);
        // Long after the last expiry, one new session sweeps everything else.
        let later = NOW + 100_000 + ttl + RETAIN_AFTER_EXPIRY + 1;
        spend(&c, "fresh", later + 60, later);
        assert_eq!(c.len(), 1);
    }

    /// 100k live sessions against a full table: the table stays at capacity, new sessions are
    /// refused, and the victim's count is never reset by the flood.
    #[test]
    fn a_flood_of_live_sessions_cannot_evict_a_live_budget() {
        let c = ActionCounters::new();
        for _ in 0..100 {
            spend(&c, "victim", NOW + 600, NOW);
        }
        let mut refused = 0;
        for i in 0..100_000 {
            match c.counter(&format!("attacker-{i}"), "a", NOW + 600, NOW) {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.capacity, MAX_SESSIONS);
                    refused += 1;
                }
            }
        }
        assert_eq!(c.len(), MAX_SESSIONS);
        assert_eq!(refused, 100_000 - (MAX_SESSIONS - 1));
        assert_eq!(c.get("victim", "a"), 100);
        assert_eq!(spend(&c, "victim", NOW + 600, NOW + 1), 101);
        // Once the flood's capabilities expire, their sessions make room, oldest first, but a
        // victim renewed in time keeps its count.
        spend(&c, "victim", NOW + 1200, NOW + 2);
        assert!(c.counter("newcomer", "a", NOW + 1300, NOW + 700).is_ok());
        assert_eq!(c.get("victim", "a"), 102);
    }

    #[test]
    fn a_second_longer_capability_keeps_the_session_live() {
        let c = ActionCounters::with_capacity(2);
        spend(&c, "s", NOW + 10, NOW);
        // Stage 1 later reports a longer-lived capability of the same session.
        spend(&c, "s", NOW + 1000, NOW + 5);
        spend(&c, "other", NOW + 1000, NOW + 5);
        // Full, and "s" is live at NOW + 500 thanks to the second capability: refused.
        assert!(c.counter("third", "a", NOW + 2000, NOW + 500).is_err());
        assert_eq!(c.get("s", "a"), 2);
        // After both expire, the oldest makes room.
        assert!(c.counter("third", "a", NOW + 3000, NOW + 1001).is_ok());
        assert_eq!(c.len(), 2);
    }
}
