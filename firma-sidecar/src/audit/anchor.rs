//! Audit anchoring (`[sidecar.audit.anchor]`): the writer records the chain head after every
//! persisted batch ([`HeadCell`]); a task signs it and puts it in etcd every `interval_ms` when
//! it moved (format and verification in [`firma_common::anchor`]). Publishing failures are
//! logged and retried on the next tick; they never hold up requests (an anchor proves, later,
//! what was already persisted; it is not part of the decision path).

use crate::config::AnchorConfig;
use firma_common::anchor::{Anchor, anchor_key, connect_options};
use firma_common::keys::SigningKey;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The last persisted line's `(chain_id, seq, hash)`.
#[derive(Default)]
pub struct HeadCell(Mutex<Option<(String, u64, String)>>);

impl HeadCell {
    pub fn set(&self, chain_id: &str, seq: u64, hash: &str) {
        let mut h = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match h.as_mut() {
            Some((c, s, x)) if c == chain_id => {
                *s = seq;
                hash.clone_into(x);
            }
            _ => *h = Some((chain_id.to_owned(), seq, hash.to_owned())),
        }
    }

    fn get(&self) -> Option<(String, u64, String)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Publishes the head every `cfg.interval_ms` when it moved, forever.
pub async fn publish(head: Arc<HeadCell>, key: SigningKey, cfg: AnchorConfig) {
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One member at a time, the next one after a failure (etcd-client's balancer kept picking
    // a dead member).
    let mut client: Option<etcd_client::Client> = None;
    let mut member = 0usize;
    let mut published: Option<(String, u64)> = None;
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some((chain_id, seq, hash)) = head.get() else {
            continue;
        };
        if published.as_ref() == Some(&(chain_id.clone(), seq)) {
            continue;
        }
        let c = match &mut client {
            Some(c) => c,
            None => {
                let ep = &cfg.endpoints[member % cfg.endpoints.len()];
                match etcd_client::Client::connect([ep.as_str()], Some(connect_options())).await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        tracing::warn!(target: "firma_sidecar::audit", "audit anchor: etcd {ep}: {e}");
                        member += 1;
                        continue;
                    }
                }
            }
        };
        let anchor = Anchor::new(&chain_id, seq, &hash, now_ms(), &key);
        let value = match serde_json::to_vec(&anchor) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(target: "firma_sidecar::audit", "audit anchor: {e}");
                continue;
            }
        };
        let put = c.put(anchor_key(&cfg.prefix, &chain_id), value, None);
        match tokio::time::timeout(Duration::from_secs(3), put).await {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!(target: "firma_sidecar::audit", "audit anchor: publishing again");
                    failing = false;
                }
                tracing::debug!(target: "firma_sidecar::audit", chain = %chain_id, seq, "audit chain head anchored");
                published = Some((chain_id, seq));
            }
            Ok(Err(e)) => {
                failing = true;
                client = None;
                member += 1;
                tracing::warn!(target: "firma_sidecar::audit", "audit anchor: etcd put failed: {e}");
            }
            Err(_) => {
                failing = true;
                client = None;
                member += 1;
                tracing::warn!(target: "firma_sidecar::audit", "audit anchor: etcd put timed out (no quorum?)");
            }
        }
    }
}
