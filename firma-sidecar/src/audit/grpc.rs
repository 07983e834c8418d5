//! The `grpc` sink: a bounded in-memory queue shipped to `firma.audit.v1.AuditCollector`.
//!
//! Requests never wait for the collector: the writer thread only pushes onto the queue. A
//! shipper task sends batches (one `Submit` stream each) and removes lines only once the
//! collector acknowledged them, so a collector outage loses nothing until the queue is full;
//! then new lines are refused ([`QueueFull`]), which the writer reports as a failure to persist
//! (requests are denied `AuditUnavailable` until the queue drains). Reconnects back off
//! exponentially (100 ms to 5 s). A batch re-sent after a lost ack reaches the collector twice;
//! the collector drops lines whose `(chain_id, seq)` it already holds.

use firma_common::proto::audit::{AuditRecord, audit_collector_client::AuditCollectorClient};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

/// The queue is full (collector unreachable for a long time): nothing more can be persisted.
#[derive(Debug, thiserror::Error)]
#[error("audit collector unreachable and its queue of {QUEUE_CAPACITY} events is full")]
pub struct QueueFull;

/// Lines kept while the collector is unreachable.
pub const QUEUE_CAPACITY: usize = 100_000;
/// Lines per submission. At least one writer batch, so a submission starting at a batch always
/// holds the signed line a collector with keys waits for before it acknowledges the batch.
pub(super) const BATCH: usize = 512;

#[derive(Default)]
struct Shared {
    lines: Mutex<VecDeque<String>>,
    dropped: AtomicU64,
    shipped: AtomicU64,
    wake: Notify,
    drained: Notify,
}

/// Handle shared by the writer thread (push) and the shipper task.
#[derive(Clone, Default)]
pub struct GrpcQueue {
    shared: Arc<Shared>,
}

impl GrpcQueue {
    fn lines(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        match self.shared.lines.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Queues `lines` all together, or none of them when they do not fit: the writer then
    /// reports the events as not persisted and the requests they belong to are denied
    /// (`AuditUnavailable`), instead of being forwarded with their events dropped.
    pub fn push_all(&self, lines: Vec<String>) -> Result<(), QueueFull> {
        {
            let mut q = self.lines();
            if q.len() + lines.len() > QUEUE_CAPACITY {
                self.shared
                    .dropped
                    .fetch_add(lines.len() as u64, Ordering::Relaxed);
                return Err(QueueFull);
            }
            q.extend(lines);
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Lines waiting (including an unacknowledged batch).
    pub fn pending(&self) -> usize {
        self.lines().len()
    }

    /// Lines acknowledged by the collector.
    pub fn shipped(&self) -> u64 {
        self.shared.shipped.load(Ordering::Relaxed)
    }

    /// Waits until the queue is empty or `timeout` passes.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.shared.drained.notified();
                if self.pending() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Ships lines to the collector forever.
    pub async fn ship(self, endpoint: Endpoint, addr: String) {
        let mut backoff = Duration::from_millis(100);
        let mut client: Option<AuditCollectorClient<Channel>> = None;
        loop {
            let notified = self.shared.wake.notified();
            let batch: Vec<String> = self.lines().iter().take(BATCH).cloned().collect();
            if batch.is_empty() {
                self.shared.drained.notify_waiters();
                notified.await;
                continue;
            }
            let c = match &mut client {
                Some(c) => c,
                None => match endpoint.connect().await {
                    Ok(ch) => {
                        tracing::info!(target: "firma_sidecar::startup::audit", "connected to audit collector {addr}");
                        client.insert(AuditCollectorClient::new(ch))
                    }
                    Err(e) => {
                        tracing::warn!(target: "firma_sidecar::audit", "audit collector {addr}: {e}; retrying in {} ms", backoff.as_millis());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let n = batch.len();
            let records = batch.into_iter().map(|json| AuditRecord { json });
            match c.submit(tokio_stream::iter(records)).await {
                Ok(ack) => {
                    let acked = usize::try_from(ack.into_inner().accepted)
                        .unwrap_or(usize::MAX)
                        .min(n);
                    self.lines().drain(..acked);
                    self.shared
                        .shipped
                        .fetch_add(acked as u64, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                }
                Err(s) => {
                    tracing::warn!(target: "firma_sidecar::audit", "audit collector {addr}: {}; retrying in {} ms", s.message(), backoff.as_millis());
                    client = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
