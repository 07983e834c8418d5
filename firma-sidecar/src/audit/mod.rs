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

mod chain;
mod event;
mod grpc;
mod writer;

pub use chain::{Sealer, read_tail};
pub use event::body as event_body;

use crate::pipeline::{ConnectionInfo, Decision};
use firma_common::config::{AuditConfig, AuditSink};
use firma_common::keys::SigningKey;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long [`AuditLog::flush`] waits for the collector to acknowledge queued events.
const GRPC_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// What the connector did after an allow (absent for denials: nothing was sent).
#[derive(Debug, Clone, Default)]
pub struct ConnectorOutcome {
    pub credential_injected: bool,
    /// `"basic"` or `"vault"` when a credential was injected.
    pub credential_source: Option<&'static str>,
    /// Upstream response status, when one arrived.
    pub upstream_status: Option<u16>,
    /// Set when the upstream failed after the allow (502/504 to the client).
    pub aborted: Option<String>,
    /// Time from sending the request upstream to the response head.
    pub upstream_us: u64,
}

/// Everything one audit event is made from.
#[derive(Debug, Clone)]
pub struct AuditInput<'a> {
    pub conn: &'a ConnectionInfo,
    pub method: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
    pub path: Option<&'a str>,
    pub decision: &'a Decision,
    pub connector: Option<ConnectorOutcome>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Startup(String),
    #[error("[sidecar.audit] signing_key_path: {0}")]
    Key(#[from] firma_common::keys::KeyError),
    #[error("[sidecar.audit] path {path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("[sidecar.audit] grpc_url: {0}")]
    Grpc(#[from] crate::authority_client::ClientError),
}

struct Inner {
    tx: Mutex<Sender<writer::Msg>>,
    grpc: Option<grpc::GrpcQueue>,
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
        let (sealer, sink, grpc) = match cfg.sink {
            AuditSink::File => {
                let path = cfg.path.clone().ok_or_else(|| {
                    AuditError::Startup("[sidecar.audit] path: required for sink = \"file\"".into())
                })?;
                let (sealer, file) = open_file(&path, key)?;
                (sealer, writer::Sink::file(file, cfg.fsync), None)
            }
            AuditSink::Stdout => (Sealer::new(key), writer::Sink::Stdout, None),
            AuditSink::Grpc => {
                let url = cfg.grpc_url.as_deref().ok_or_else(|| {
                    AuditError::Startup(
                        "[sidecar.audit] grpc_url: required for sink = \"grpc\"".into(),
                    )
                })?;
                let (endpoint, addr) = crate::authority_client::grpc_endpoint(
                    url,
                    cfg.ca_cert_path.as_deref(),
                    "[sidecar.audit] ca_cert_path",
                )?;
                let q = grpc::GrpcQueue::default();
                tokio::spawn(q.clone().ship(endpoint, addr));
                (Sealer::new(key), writer::Sink::Grpc(q.clone()), Some(q))
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("firma-audit".into())
            .spawn(move || writer::run(rx, sealer, sink))
            .map_err(|e| AuditError::Startup(format!("cannot start audit writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(tx),
                grpc,
            }),
        })
    }

    /// Records one decision. Never blocks the request path on I/O.
    pub fn record(&self, input: AuditInput<'_>) {
        let body = event::body(&input);
        self.send(writer::Msg::Event(body));
    }

    fn send(&self, msg: writer::Msg) {
        let tx = match self.inner.tx.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        if tx.send(msg).is_err() {
            tracing::error!(target: "firma_sidecar::audit", "audit writer has stopped; event lost");
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
}

/// Opens the audit file for appending (created 0600) and resumes its chain.
fn open_file(
    path: &std::path::Path,
    key: SigningKey,
) -> Result<(Sealer, std::fs::File), AuditError> {
    let err = |source| AuditError::File {
        path: path.to_path_buf(),
        source,
    };
    let tail = read_tail(path).map_err(err)?;
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    if tail.torn {
        tracing::warn!(
            target: "firma_sidecar::startup::audit",
            "{}: last line is incomplete (torn write); `firma audit verify` will report it",
            path.display()
        );
        file.write_all(b"\n").map_err(err)?;
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
    Ok((sealer, file))
}
