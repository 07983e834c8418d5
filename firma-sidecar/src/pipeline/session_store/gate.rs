//! One decision at a time per contended key inside one sidecar.
//!
//! The commit script refuses a decision whose inputs changed since it read them, and the
//! decision then evaluates again (that check is what keeps budgets exact across sidecars). Left
//! alone, this sidecar's own concurrent decisions on one agent's budget would refuse each other:
//! every commit moves the agent's usage version, so 64 concurrent metered calls of one agent
//! spent most of their round trips on retries (about 330 decisions/s). Queuing them here per
//! key lets each read-evaluate-commit run once; only other sidecars (or a settlement landing
//! in between) can still make a commit retry. The gate is an optimisation only: exactness still
//! rests on the script's check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

type Cell = Arc<tokio::sync::Mutex<()>>;

/// Per-key async locks; an entry lives while someone holds or waits for it.
#[derive(Default)]
pub struct Gates {
    cells: Mutex<HashMap<String, Cell>>,
}

/// Held while a decision on the key is in flight; released on drop.
pub struct Gate<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    cell: Cell,
    key: String,
    gates: &'a Gates,
}

impl Gates {
    /// Waits for the gate of `key`.
    pub async fn enter(&self, key: &str) -> Gate<'_> {
        let cell = self.lock().entry(key.to_owned()).or_default().clone();
        let guard = cell.clone().lock_owned().await;
        Gate {
            guard: Some(guard),
            cell,
            key: key.to_owned(),
            gates: self,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cell>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut cells = self.gates.lock();
        // Ours and the map's: nobody else holds or waits for it.
        if Arc::strong_count(&self.cell) == 2 {
            cells.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_per_key_and_no_leftover_entries() {
        let gates = Arc::new(Gates::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (gates, inside) = (gates.clone(), inside.clone());
                tokio::spawn(async move {
                    let key = if i % 2 == 0 { "a" } else { "b" };
                    let _g = gates.enter(key).await;
                    assert!(inside.fetch_add(1, Ordering::SeqCst) < 2);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(gates.len(), 0);
    }
}
