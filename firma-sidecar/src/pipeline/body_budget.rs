//! The budget of request-body bytes buffered for extraction across all requests
//! (`[sidecar.mapping] extract_body_budget_bytes`); the interceptor's `body` module takes a
//! [`Share`] per buffered body and gives it back when the body has been forwarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes buffered for extraction across all requests, at most `cap`.
#[derive(Debug)]
pub struct BodyBudget {
    cap: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            used: AtomicUsize::new(0),
        })
    }

    /// The configured total.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty share, grown with [`Share::grow`].
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            held: 0,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.cap)
            })
            .is_ok()
    }
}

/// Part of the [`BodyBudget`] held by one request; given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl Share {
    /// Bytes this share holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The total budget it is part of.
    pub fn budget_cap(&self) -> usize {
        self.budget.cap
    }

    /// Grows the share to `total` bytes; `false` (share unchanged) if the budget has no room.
    pub fn grow(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        if self.budget.take(total - self.held) {
            self.held = total;
            true
        } else {
            false
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_cap_and_are_given_back() {
        let b = BodyBudget::new(10);
        let mut x = b.share();
        assert!(x.grow(6));
        let mut y = b.share();
        assert!(!y.grow(5));
        assert!(y.grow(4));
        assert!(x.grow(6), "not growing is fine");
        assert_eq!(b.used(), 10);
        drop(x);
        assert_eq!(b.used(), 4);
        drop(y);
        assert_eq!(b.used(), 0);
    }
}
