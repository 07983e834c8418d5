//! Per-session call counters for Stage 2's `context.action_count`.
//!
//! `action_count` is the number of calls of one action class in one session *including the
//! current one*, so `context.action_count <= 100` allows exactly 100 calls. A counter only
//! moves when Stage 2 allows: denied attempts do not use up the budget. Two concurrent requests
//! cannot both be evaluated as call N: the counter advances with a compare-and-swap and a
//! request that loses the race is evaluated again with the new count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct ActionCounters {
    counters: Mutex<HashMap<(String, String), Arc<AtomicI64>>>,
}

impl ActionCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `(session, action_class)`, created at 0.
    pub fn counter(&self, session: &str, action_class: &str) -> Arc<AtomicI64> {
        let mut map = match self.counters.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry((session.to_owned(), action_class.to_owned()))
            .or_default()
            .clone()
    }

    /// Calls already allowed for `(session, action_class)`.
    pub fn get(&self, session: &str, action_class: &str) -> i64 {
        self.counter(session, action_class).load(Ordering::Acquire)
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

    #[test]
    fn counts_only_allowed_calls_including_current() {
        let c = ActionCounters::new();
        let ctr = c.counter("s", "a");
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
    }

    #[test]
    fn concurrent_calls_never_share_a_count() {
        let c = Arc::new(ActionCounters::new());
        let allowed = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, allowed) = (c.clone(), allowed.clone());
                std::thread::spawn(move || {
                    let ctr = c.counter("s", "a");
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
}
