//! The audit collector: the `firma.audit.v1.AuditCollector` service behind the sidecar's
//! `grpc` audit sink. Served by `firma audit collect` and, when `[authority]
//! audit_collector_path` is set, by the Authority next to its own services (add
//! [`Collector::into_service`] to its tonic router).
//!
//! Each received line is appended, exactly as sent, to one JSON-lines file, which therefore
//! interleaves the chains of every sidecar and verifies with `firma audit verify`. With public
//! keys configured, a line whose signature does not verify is refused (logged, not written).
//! Sidecars re-send a batch whose acknowledgement they lost; a line whose `(chain_id, seq)` is
//! not beyond what the file already holds for that chain is acknowledged but not written again.
//! The file is synced before each acknowledgement.

use firma_common::audit::{ChainPos, verify_line};
use firma_common::keys::VerifyingKey;
use firma_common::proto::audit::audit_collector_server::{AuditCollector, AuditCollectorServer};
use firma_common::proto::audit::{AuditRecord, SubmitAck};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("audit collector on {addr}: {message}")]
    Serve { addr: SocketAddr, message: String },
}

struct Output {
    path: PathBuf,
    file: File,
    /// Highest `seq` written per chain.
    chains: HashMap<String, u64>,
}

/// The collector service. Cheap to clone.
#[derive(Clone)]
pub struct Collector {
    out: Arc<Mutex<Output>>,
    keys: Arc<Vec<VerifyingKey>>,
}

fn chain_pos(line: &str) -> Option<ChainPos> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => ChainPos::of(&m).ok(),
        _ => None,
    }
}

impl Collector {
    /// Opens (or creates, 0600) `output` for appending and learns the chains it already holds.
    /// An empty `keys` accepts lines without checking signatures.
    pub fn open(output: &Path, keys: Vec<VerifyingKey>) -> Result<Self, CollectorError> {
        let io = |source| CollectorError::Io {
            path: output.to_path_buf(),
            cause: source,
        };
        let mut chains: HashMap<String, u64> = HashMap::new();
        if let Ok(f) = File::open(output) {
            for line in BufReader::new(f).lines() {
                if let Some(p) = chain_pos(&line.map_err(io)?) {
                    let e = chains.entry(p.chain_id).or_insert(p.seq);
                    *e = (*e).max(p.seq);
                }
            }
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(output)
                .map_err(io)?
        };
        Ok(Self {
            out: Arc::new(Mutex::new(Output {
                path: output.to_path_buf(),
                file,
                chains,
            })),
            keys: Arc::new(keys),
        })
    }

    /// The tonic service, to add to any server.
    pub fn into_service(self) -> AuditCollectorServer<Self> {
        AuditCollectorServer::new(self)
    }

    /// Handles one line; returns whether it was written.
    fn accept(&self, out: &mut Output, line: &str) -> Result<bool, std::io::Error> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.contains('\n') {
            tracing::warn!(target: "firma_authority::collector", "refused audit record containing a newline");
            return Ok(false);
        }
        if !self.keys.is_empty()
            && let Err(e) = verify_line(line, &self.keys)
        {
            tracing::warn!(target: "firma_authority::collector", "refused audit record: {e}");
            return Ok(false);
        }
        if let Some(p) = chain_pos(line) {
            if out
                .chains
                .get(&p.chain_id)
                .is_some_and(|last| p.seq <= *last)
            {
                return Ok(false);
            }
            out.chains.insert(p.chain_id, p.seq);
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        out.file.write_all(&buf)?;
        Ok(true)
    }
}

#[tonic::async_trait]
impl AuditCollector for Collector {
    async fn submit(
        &self,
        request: Request<Streaming<AuditRecord>>,
    ) -> Result<Response<SubmitAck>, Status> {
        let mut stream = request.into_inner();
        let mut received = 0u64;
        let mut written = 0u64;
        let mut out = self.out.lock().await;
        let fail = |path: &Path, e: std::io::Error| {
            tracing::error!(target: "firma_authority::collector", "{}: {e}", path.display());
            Status::internal("audit collector cannot write its output")
        };
        while let Some(rec) = stream.message().await? {
            received += 1;
            match self.accept(&mut out, &rec.json) {
                Ok(w) => written += u64::from(w),
                Err(e) => return Err(fail(&out.path.clone(), e)),
            }
        }
        if let Err(e) = out.file.sync_data() {
            return Err(fail(&out.path.clone(), e));
        }
        tracing::debug!(target: "firma_authority::collector", "received {received} record(s), wrote {written}");
        Ok(Response::new(SubmitAck { accepted: received }))
    }
}

/// Serves the collector alone on `listen` (plaintext; put it on loopback or behind TLS
/// termination) until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    collector: Collector,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), CollectorError> {
    let listener =
        tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| CollectorError::Serve {
                addr: listen,
                message: e.to_string(),
            })?;
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(target: "firma_authority::collector", "audit collector listening on {local}");
    tonic::transport::Server::builder()
        .add_service(collector.into_service())
        .serve_with_incoming_shutdown(crate::server::incoming(listener), shutdown)
        .await
        .map_err(|e| CollectorError::Serve {
            addr: local,
            message: e.to_string(),
        })
}
