//! One signed audit event per decision, allow or deny.
//!
//! [`AuditLog::record`] builds the event body on the caller's thread and hands it to one writer
//! thread ([`writer`]) that chains, signs ([`chain`]) and writes it to the configured sink:
//! `file` (JSON lines, hash-chained, chain resumed from the last line on restart), `stdout`, or
//! `grpc` ([`grpc`], buffered and reconnecting). The line format is
//! [`firma_common::audit`]; `firma audit verify` checks it.
//!
//! Signing key: `[sidecar.audit] signing_key_path` (PKCS#8 PEM, 0600 enforced) is required for
//! the `file` and `grpc` sinks, whose output is meant to be verified later. The `stdout` sink
//! without a key signs with an ephemeral key generated at startup and logs its public key, so
//! events keep one shape everywhere.

mod aggregate;
mod anchor;
mod bound;
mod chain;
mod conn_ids;
mod event;
mod grpc;
mod health;
pub mod metrics;
mod recorder;
mod rotate;
mod space;
mod writer;

pub use aggregate::{Denial, Kind as AggregateKind};
pub use chain::{Sealer, read_tail};
pub use conn_ids::next_conn_id;
pub use event::AuditInput;
pub use event::body as event_body;
pub use event::new_id as new_event_id;
pub use health::Health;
pub use recorder::{Committed, RequestAudit};

use crate::config::{AuditConfig, AuditSink};
use firma_common::keys::SigningKey;
use serde_json::Value;
use sha2::Digest;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long [`AuditLog::flush`] waits for the collector to acknowledge queued events.
const GRPC_FLUSH_WAIT: Duration = Duration::from_secs(5);

pub use crate::conn::ConnectorOutcome;

/// The audit sink could not persist a decision: the request must not go anywhere.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit sink cannot persist events: {0}")]
pub struct AuditUnavailable(pub Arc<str>);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Startup(String),
    #[error("[sidecar.audit] signing_key_path: {0}")]
    Key(firma_common::keys::KeyError),
    #[error("[sidecar.audit] path {path}: {cause}")]
    File {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("[sidecar.audit] grpc_url: {0}")]
    Grpc(crate::authority_client::ClientError),
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<firma_common::keys::KeyError> for AuditError {
    fn from(e: firma_common::keys::KeyError) -> Self {
        Self::Key(e)
    }
}

impl From<crate::authority_client::ClientError> for AuditError {
    fn from(e: crate::authority_client::ClientError) -> Self {
        Self::Grpc(e)
    }
}

struct Inner {
    tx: Mutex<Sender<writer::Msg>>,
    /// Denials over a workload's individual budget are counted here ([`aggregate`]).
    aggregator: Arc<aggregate::Aggregator>,
    /// The writer and its queues: lines nobody waits for (taken without a wake-up each) and
    /// lines somebody waits for (inline group commit, [`writer::Shared`]).
    shared: Arc<writer::Shared>,
    health: Arc<Health>,
    grpc: Option<grpc::GrpcQueue>,
    /// The grpc shipper task, stopped when the last handle goes (call `flush` first).
    shipper: Option<tokio::task::AbortHandle>,
    /// The anchor publisher task ([`anchor`]), stopped with the last handle.
    anchor_task: Option<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(s) = &self.shipper {
            s.abort();
        }
        if let Some(a) = &self.anchor_task {
            a.abort();
        }
    }
}

/// The configured sink. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl AuditLog {
    /// Opens the sink and starts the writer (and, for `grpc`, the shipper task on the current
    /// tokio runtime).
    pub async fn start(cfg: &AuditConfig) -> Result<Self, AuditError> {
        let key = match (&cfg.signing_key_path, cfg.sink) {
            (Some(p), _) => firma_common::keys::load_signing_key(p)?,
            (None, AuditSink::Stdout) => {
                let k = SigningKey::generate(&mut rand::rngs::OsRng);
                tracing::warn!(
                    target: "firma_sidecar::startup::audit",
                    "no [sidecar.audit] signing_key_path: signing with an ephemeral key, public key (hex) {}",
                    hex::encode(k.verifying_key().as_bytes())
                );
                k
            }
            (None, sink) => {
                return Err(AuditError::Startup(format!(
                    "[sidecar.audit] signing_key_path: required for sink = \"{}\" (generate one with `firma authority generate-key -o audit.key`)",
                    if sink == AuditSink::File {
                        "file"
                    } else {
                        "grpc"
                    }
                )));
            }
        };
        let sealer_key = key.clone();
        let mut anchor_task = None;
        let mut shipper = None;
        let mut recovered = None;
        let mut anchor = None;
        let mut space = None;
        let (sealer, sink, grpc) = match cfg.sink {
            AuditSink::File => {
                let path = cfg.path.clone().ok_or_else(|| {
                    AuditError::Startup("[sidecar.audit] path: required for sink = \"file\"".into())
                })?;
                let rotation = rotate::Rotation::new(&path, cfg.max_file_bytes, cfg.max_files)
                    .map_err(|cause| AuditError::File {
                        path: path.clone(),
                        cause,
                    })?;
                let (sealer, file, len, rec, continued) = open_file(&path, key, &rotation)?;
                recovered = rec;
                if continued {
                    anchor = Some(rotation.event(rotation.next_index));
                }
                space = Some(space::SpaceWatch::new(&path, cfg.free_space_warn_bytes));
                (
                    sealer,
                    writer::Sink::file(file, cfg.fsync, len).rotating(rotation),
                    None,
                )
            }
            AuditSink::Stdout => (Sealer::new(key), writer::Sink::Stdout, None),
            AuditSink::Grpc => {
                let urls = cfg.collector_urls();
                if urls.is_empty() {
                    return Err(AuditError::Startup(
                        "[sidecar.audit] grpc_url: required for sink = \"grpc\"".into(),
                    ));
                }
                let collectors = urls
                    .into_iter()
                    .map(|url| {
                        crate::authority_client::grpc_endpoint(
                            url,
                            cfg.ca_cert_path.as_deref(),
                            "[sidecar.audit] ca_cert_path",
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let q = grpc::GrpcQueue::default();
                shipper = Some(tokio::spawn(q.clone().ship(collectors)).abort_handle());
                (Sealer::new(key), writer::Sink::Grpc(q.clone()), Some(q))
            }
        };
        let health = Arc::new(Health::default());
        let aggregator = Arc::new(aggregate::Aggregator::new(aggregate::Settings {
            after: cfg.aggregate_denials_after,
            window: Duration::from_secs(cfg.aggregate_window_secs),
        }));
        let anchor_key = cfg.anchor.as_ref().map(|_| sealer_key.clone());
        let mut w = writer::Writer::new(sealer, sink, health.clone());
        w.aggregator = Some(aggregator.clone());
        if let (Some(a), Some(key)) = (&cfg.anchor, anchor_key) {
            let head = Arc::new(anchor::HeadCell::default());
            w.head = Some(head.clone());
            tracing::info!(target: "firma_sidecar::startup::audit",
                "anchoring the audit chain head to etcd {:?} every {} ms", a.endpoints, a.interval_ms);
            anchor_task = Some(tokio::spawn(anchor::publish(head, key, a.clone())).abort_handle());
        }
        w.space = space;
        w.space_check_now();
        if let Some(a) = anchor {
            w.persist(vec![a]).map_err(|e| {
                AuditError::Startup(format!(
                    "[sidecar.audit] path: cannot write the rotation event: {e}"
                ))
            })?;
        }
        if let Some(recovery) = recovered {
            w.persist(vec![recovery]).map_err(|e| {
                AuditError::Startup(format!(
                    "[sidecar.audit] path: cannot write the recovery event: {e}"
                ))
            })?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(writer::Shared::new(w));
        let queue = shared.clone();
        std::thread::Builder::new()
            .name("firma-audit".into())
            .spawn(move || writer::run(rx, queue))
            .map_err(|e| AuditError::Startup(format!("cannot start audit writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(tx),
                aggregator,
                shared,
                health,
                grpc,
                shipper,
                anchor_task,
            }),
        })
    }

    /// Queues an event without waiting for it to be persisted: for events after which nothing
    /// leaves the sidecar (denials, outcomes). Request handlers go through [`RequestAudit`].
    pub(crate) fn record_body(&self, body: String) {
        if self.inner.shared.side.push(body) {
            self.send(writer::Msg::Wake);
        }
    }

    /// Persists an event and waits until the sink has it (file: written, so it survives a
    /// `kill -9`; grpc: queued within its bound). Anything the caller is about to send may
    /// only leave after this returns `Ok`.
    pub(crate) async fn persist_body(&self, body: String) -> Result<(), AuditUnavailable> {
        let (ack, wait) = tokio::sync::oneshot::channel();
        let shared = &self.inner.shared;
        if shared.inline {
            shared.queue(body, ack);
            // The other requests this runtime has ready queue theirs meanwhile: one batch,
            // one signature, written here (writer.rs, `Shared`).
            tokio::task::yield_now().await;
            if shared.try_lead() == writer::Lead::WakeWriter {
                self.send(writer::Msg::Wake);
            }
        } else {
            self.send(writer::Msg::Event(body, ack));
        }
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditUnavailable(e)),
            Err(_) => Err(AuditUnavailable("the audit writer has stopped".into())),
        }
    }

    /// Records one decision body made from `input` without waiting (tests, tools).
    pub fn record(&self, input: AuditInput<'_>) {
        self.record_body(event::body(&input));
    }

    /// Whether the last write succeeded, and the counters.
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    /// A decided denial: `true` when it is to be written as its own event; `false` when it
    /// was counted for its workload's `deny_summary` ([`aggregate`]).
    pub(crate) fn admit_denial(&self, d: &Denial<'_>) -> bool {
        self.inner.aggregator.admit(d)
    }

    /// Counts a denial that is never written on its own (the DNS guard's rate-limited
    /// queries) for its workload's summary.
    pub fn count_denial(&self, d: &Denial<'_>) {
        self.inner.aggregator.count(d);
    }

    /// Denials counted into `deny_summary` events since start (not written one by one).
    pub fn denials_aggregated(&self) -> u64 {
        self.inner.aggregator.aggregated()
    }

    /// Copies the sink's counters into its metrics (at scrape time).
    pub fn refresh_metrics(&self) {
        let h = self.health();
        metrics::set_sink_state(metrics::SinkState {
            written: h.written(),
            lost: h.lost(),
            healthy: h.healthy(),
            disk_free: h.disk_free(),
            disk_low: h.disk_low(),
            rotated: h.rotated(),
            aggregated: self.denials_aggregated(),
            shipped: self.shipped(),
            failovers: self.collector_failovers(),
        });
    }

    fn send(&self, msg: writer::Msg) {
        let tx = match self.inner.tx.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        if let Err(std::sync::mpsc::SendError(msg)) = tx.send(msg) {
            tracing::error!(target: "firma_sidecar::audit", "audit writer has stopped; event lost");
            if let writer::Msg::Event(_, ack) = msg {
                let _ = ack.send(Err("the audit writer has stopped".into()));
            }
        }
    }

    /// Flushes buffered events (called on shutdown): the file is synced; the grpc queue is
    /// given up to 5 s to be acknowledged.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(writer::Msg::Flush(done));
        let _ = wait.await;
        if let Some(q) = &self.inner.grpc
            && !q.drain(GRPC_FLUSH_WAIT).await
        {
            tracing::warn!(
                target: "firma_sidecar::audit",
                "{} audit event(s) not acknowledged by the collector at flush",
                q.pending()
            );
        }
    }

    /// Events acknowledged by the grpc collector so far (0 for other sinks).
    pub fn shipped(&self) -> u64 {
        self.inner.grpc.as_ref().map_or(0, grpc::GrpcQueue::shipped)
    }

    /// Times the grpc sink moved to the next collector of its list (0 for other sinks).
    pub fn collector_failovers(&self) -> u64 {
        self.inner
            .grpc
            .as_ref()
            .map_or(0, grpc::GrpcQueue::failovers)
    }
}

/// The sealer resuming the file's chain, the file, its length, a recovery event to write, and
/// whether the chain continues from the newest rotated file (the file then starts with a
/// `rotation` event).
type OpenedFile = (Sealer, std::fs::File, u64, Option<String>, bool);

/// Opens the audit file for appending (created 0600) and resumes its chain. A torn last line
/// (crash or full disk mid-write) and complete lines after the last signed one are cut; the
/// returned recovery event, persisted before anything else, records what was cut. An empty
/// file with rotated files beside it continues the newest rotated file's chain.
fn open_file(
    path: &std::path::Path,
    key: SigningKey,
    rotation: &rotate::Rotation,
) -> Result<OpenedFile, AuditError> {
    let err = |source| AuditError::File {
        path: path.to_path_buf(),
        cause: source,
    };
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let mut len = file.metadata().map_err(err)?.len();
    // What a crash can leave behind the last batch: a torn line (cut), and complete lines no
    // signature covers (a batch whose write failed and whose cut failed too; cut as well, so
    // every line on disk stays covered by a signature). One recovery event records the bytes.
    let mut cut: Vec<u8> = Vec::new();
    let mut torn = false;
    let mut unsigned = 0u64;
    let tail = loop {
        let tail = read_tail(path).map_err(err)?;
        if tail.torn {
            let mut c = cut_torn_tail(&file, len).map_err(err)?;
            len -= c.len() as u64;
            c.extend_from_slice(&cut);
            cut = c;
            torn = true;
            continue;
        }
        match &tail.last_line {
            Some(line) if is_unsigned_chain_line(line) => {
                // Drop the newline, then cut the line as a torn one.
                file.set_len(len - 1).map_err(err)?;
                let mut c = cut_torn_tail(&file, len - 1).map_err(err)?;
                len -= c.len() as u64 + 1;
                c.push(b'\n');
                c.extend_from_slice(&cut);
                cut = c;
                unsigned += 1;
            }
            _ => break tail,
        }
    };
    let mut recovered = None;
    if !cut.is_empty() {
        let sha = hex::encode(sha2::Sha256::digest(&cut));
        tracing::warn!(
            target: "firma_sidecar::startup::audit",
            "{}: cut {} bytes after the last signed line (torn line: {torn}, unsigned lines: {unsigned}; sha256 {sha}); a recovery event records it",
            path.display(),
            cut.len()
        );
        recovered = Some(event::recovery(cut.len() as u64, &sha, torn, unsigned));
    }
    let mut continued = false;
    let mut tail = tail;
    if tail.last_line.is_none() && rotation.next_index > 1 {
        let previous = firma_common::audit_files::rotated_path(path, rotation.next_index - 1);
        tail = read_tail(&previous).map_err(|cause| AuditError::File {
            path: previous.clone(),
            cause,
        })?;
        continued = true;
    }
    let sealer = match &tail.last_line {
        None => Sealer::new(key),
        Some(line) => match Sealer::resume(key.clone(), line) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    target: "firma_sidecar::startup::audit",
                    "{}: cannot resume the chain from the last line ({e}); starting a new chain",
                    path.display()
                );
                Sealer::new(key)
            }
        },
    };
    tracing::info!(
        target: "firma_sidecar::startup::audit",
        "audit file {} (chain {} at seq {})",
        path.display(),
        sealer.chain_id(),
        sealer.next_seq()
    );
    Ok((sealer, file, len, recovered, continued))
}

/// A complete chained line without a signature: left by a batch that was never completed.
fn is_unsigned_chain_line(line: &str) -> bool {
    !firma_common::audit::is_signed(line)
        && matches!(serde_json::from_str::<Value>(line), Ok(Value::Object(m))
            if firma_common::audit::ChainPos::of(&m).is_ok())
}

/// Truncates `file` (of length `len`) after its last `\n`; returns the bytes cut.
fn cut_torn_tail(file: &std::fs::File, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut end = len;
    let mut cut = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.read_exact_at(&mut chunk[..n], start)?;
        match chunk[..n].iter().rposition(|b| *b == b'\n') {
            Some(p) => {
                let keep = start + p as u64 + 1;
                let mut tail = chunk[p + 1..n].to_vec();
                tail.extend_from_slice(&cut);
                file.set_len(keep)?;
                return Ok(tail);
            }
            None if start == 0 => {
                let mut tail = chunk[..n].to_vec();
                tail.extend_from_slice(&cut);
                file.set_len(0)?;
                return Ok(tail);
            }
            None => {
                let mut tail = chunk[..n].to_vec();
                tail.extend_from_slice(&cut);
                cut = tail;
                end = start;
            }
        }
    }
}
