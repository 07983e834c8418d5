//! The `grpc` sink: a bounded in-memory queue shipped to `firma.audit.v1.AuditCollector`.
//!
//! Requests never wait for the collector: the writer thread only pushes onto the queue. A
//! shipper task sends batches (one `Submit` stream each) and removes lines only once the
//! collector acknowledged them, so a collector outage loses nothing until the queue is full;
//! then new lines are refused ([`QueueFull`]), which the writer reports as a failure to persist
//! (requests are denied `AuditUnavailable` until the queue drains). Reconnects back off
//! exponentially (100 ms to 5 s). A batch re-sent after a lost ack reaches the collector twice;
//! the collector drops lines whose `(chain_id, seq)` it already holds.
//!
//! With several collectors (`grpc_url` + `grpc_urls`) the shipper sticks to one until it fails,
//! then moves to the next and sends it everything still unacknowledged. Each submission ends
//! with a signed line, so each replica's file holds whole signed stretches of a chain
//! (docs/scale-out.md, "Audit collection").

use firma_common::audit::is_signed;
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
/// Bytes per submission (beyond the first signed line): small submissions keep each round trip
/// short and within HTTP/2's initial flow-control window.
const BATCH_BYTES: usize = 48 * 1024;

#[derive(Default)]
struct Shared {
    lines: Mutex<VecDeque<String>>,
    dropped: AtomicU64,
    shipped: AtomicU64,
    failovers: AtomicU64,
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

    /// Collector failovers so far (a submission or connection to the current collector failed
    /// and the next one in the list took over).
    pub fn failovers(&self) -> u64 {
        self.shared.failovers.load(Ordering::Relaxed)
    }

    /// The next submission: up to [`BATCH`] lines and about [`BATCH_BYTES`] from the head of
    /// the queue (but at least through the first signed line), cut after the last signed line
    /// among them, so that every submission (and therefore every stretch of a chain a
    /// collector replica holds) ends with a signature that covers it.
    fn next_batch(&self) -> Vec<String> {
        let q = self.lines();
        let mut bytes = 0usize;
        let mut signed_seen = false;
        let mut end = 0usize;
        for l in q.iter().take(BATCH) {
            if bytes + l.len() > BATCH_BYTES && signed_seen {
                break;
            }
            bytes += l.len();
            signed_seen |= is_signed(l);
            end += 1;
        }
        let end = q
            .iter()
            .take(end)
            .rposition(|l| is_signed(l))
            .map_or(end, |i| i + 1);
        q.iter().take(end).cloned().collect()
    }

    /// Ships lines to the collectors forever: to one at a time, in list order, moving to the
    /// next when the current one fails (a failed connection or submission). Lines leave the
    /// queue only when a collector acknowledged them, so after a failover the next collector
    /// receives everything the failed one did not acknowledge. Backs off (100 ms to 5 s) only
    /// once every collector failed in a row.
    pub async fn ship(self, collectors: Vec<(Endpoint, String)>) {
        let n = collectors.len().max(1);
        let mut current = 0usize;
        let mut failed_in_row = 0usize;
        let mut backoff = Duration::from_millis(100);
        let mut client: Option<AuditCollectorClient<Channel>> = None;
        loop {
            let notified = self.shared.wake.notified();
            let batch = self.next_batch();
            if batch.is_empty() {
                self.shared.drained.notify_waiters();
                notified.await;
                continue;
            }
            let Some((endpoint, addr)) = collectors.get(current) else {
                return;
            };
            let error = match &mut client {
                Some(c) => {
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
                            failed_in_row = 0;
                            continue;
                        }
                        Err(s) => s.message().to_owned(),
                    }
                }
                None => match endpoint.connect().await {
                    Ok(ch) => {
                        tracing::info!(target: "firma_sidecar::startup::audit", "connected to audit collector {addr}");
                        client = Some(AuditCollectorClient::new(ch));
                        continue;
                    }
                    Err(e) => e.to_string(),
                },
            };
            client = None;
            failed_in_row += 1;
            if n > 1 {
                current = (current + 1) % n;
                self.shared.failovers.fetch_add(1, Ordering::Relaxed);
                let next = &collectors[current].1;
                tracing::warn!(target: "firma_sidecar::audit", "audit collector {addr}: {error}; failing over to {next} ({} event(s) not acknowledged are sent there)", self.pending());
            }
            if failed_in_row >= n {
                if n == 1 {
                    tracing::warn!(target: "firma_sidecar::audit", "audit collector {addr}: {error}; retrying in {} ms", backoff.as_millis());
                } else {
                    tracing::warn!(target: "firma_sidecar::audit", "every audit collector failed; retrying in {} ms", backoff.as_millis());
                }
                failed_in_row = 0;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
