//! The set of revoked capability `token_id`s, fed by the Authority's revocation stream.
//!
//! An exact set, not a bloom filter: revocations are few (the Authority compacts expired ones)
//! and a false positive would deny a legitimate session. Reads take a shared lock only.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct RevocationSet {
    ids: RwLock<HashSet<String>>,
    /// Whether the first replay from the Authority has been received.
    synced: AtomicBool,
}

impl RevocationSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token_id`; returns `true` if it was not already revoked.
    pub fn insert(&self, token_id: &str) -> bool {
        match self.ids.write() {
            Ok(mut ids) => ids.insert(token_id.to_owned()),
            Err(poisoned) => poisoned.into_inner().insert(token_id.to_owned()),
        }
    }

    pub fn contains(&self, token_id: &str) -> bool {
        match self.ids.read() {
            Ok(ids) => ids.contains(token_id),
            // A writer panicked mid-insert; the set itself is still consistent.
            Err(poisoned) => poisoned.into_inner().contains(token_id),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.read().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the initial replay as received (first live entry or end of replay).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_contains() {
        let r = RevocationSet::new();
        assert!(!r.contains("a"));
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        assert!(r.contains("a"));
        assert_eq!(r.len(), 1);
    }
}
