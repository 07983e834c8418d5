//! The set of revoked token ids, fed by polling the revocation file and fanned out to every
//! `StreamRevocations` client.
//!
//! Polling (250 ms, metadata first, full re-read only on change) rather than inotify: it sees
//! appends by another process (`firma authority revocations add`), atomic replacements by
//! `compact` and edits on any filesystem, and keeps the 1 s propagation promise with margin.

pub mod metrics;

use crate::revocations::{RevocationEntry, RevocationFile};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How often the revocation file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    known: HashSet<String>,
    order: Vec<RevocationEntry>,
}

/// Revoked ids (with their revocation time, when recorded) in arrival order plus a broadcast of
/// new ones.
pub struct RevocationHub {
    state: Mutex<State>,
    tx: broadcast::Sender<RevocationEntry>,
}

impl RevocationHub {
    pub fn new(initial: impl IntoIterator<Item = RevocationEntry>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        let hub = Arc::new(Self {
            state: Mutex::new(State::default()),
            tx,
        });
        hub.insert(initial);
        hub
    }

    /// A consistent snapshot and a receiver for everything added after it (taken under one
    /// lock, so nothing falls between the replay and the live stream).
    pub fn subscribe(&self) -> (Vec<RevocationEntry>, broadcast::Receiver<RevocationEntry>) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.order.clone(), self.tx.subscribe())
    }

    /// Adds ids not seen before and broadcasts them; returns how many were new. An id keeps
    /// the revocation time it first came with.
    pub fn insert(&self, entries: impl IntoIterator<Item = RevocationEntry>) -> usize {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut added = 0;
        for e in entries {
            if state.known.insert(e.token_id.clone()) {
                state.order.push(e.clone());
                // No receivers is fine: the id is in the snapshot for future subscribers.
                let _ = self.tx.send(e);
                added += 1;
            }
        }
        added
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// (size, mtime ns, inode): changes on append, rewrite and atomic replacement.
fn fingerprint(file: &RevocationFile) -> Option<(u64, i64, i64, u64)> {
    std::fs::metadata(file.path())
        .ok()
        .map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

/// Polls `file` until `cancel`, feeding new ids into `hub`. Ids removed by compaction stay
/// revoked in memory (streams have no "un-revoke"; the tokens have expired anyway).
pub async fn watch_file(hub: Arc<RevocationHub>, file: RevocationFile, cancel: CancellationToken) {
    let mut last = fingerprint(&file);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = fingerprint(&file);
        if now == last {
            continue;
        }
        last = now;
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || f.read()).await;
        match read {
            Ok(Ok(list)) => {
                for (line, text) in &list.malformed {
                    tracing::warn!(
                        file = %file.path().display(),
                        line,
                        "ignoring malformed revocation line {text:?}"
                    );
                }
                let added = hub.insert(list.entries);
                if added > 0 {
                    metrics::recorded(added);
                    tracing::info!(added, total = hub.len(), "revocations updated");
                }
            }
            Ok(Err(e)) => tracing::warn!("keeping known revocations: {e}"),
            Err(e) => tracing::warn!("revocation reader failed: {e}"),
        }
    }
}
