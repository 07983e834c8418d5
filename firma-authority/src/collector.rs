//! The audit collector: the `firma.audit.v1.AuditCollector` service behind the sidecar's
//! `grpc` audit sink. Served by `firma audit collect` and, when `[authority]
//! audit_collector_path` is set, by the Authority next to its own services (add
//! [`Collector::into_service`] to its tonic router).
//!
//! Each received line is appended, exactly as sent, to one JSON-lines file, which therefore
//! interleaves the chains of every sidecar and verifies with `firma audit verify`. With public
//! keys configured, a line is written only once a verified signature covers it: a signed line
//! that verifies, and the unsigned lines of its batch before it in the same submission, linked
//! to it by their hashes (sidecars sign the last line of each batch; see docs/architecture.md,
//! audit). Lines still waiting for their signature when a submission ends are not acknowledged,
//! so the sidecar sends them again with the rest of their batch. Anything else is refused
//! (logged, not written).
//! Sidecars re-send a batch whose acknowledgement they lost; a line whose `(chain_id, seq)` is
//! not beyond what the file already holds for that chain is acknowledged but not written again.
//! The accepted lines of a submission are written together at its end, and the file is synced
//! before the acknowledgement; a submission that breaks off writes nothing.
//!
//! Several collectors can run as replicas, each with its own file: a sidecar with several
//! collector URLs ships to one at a time and fails over to the next, so each file holds
//! stretches of each chain (`firma audit verify --part FILE` checks one on its own, `firma
//! audit verify FILE…` rebuilds every chain across the replicas' files; docs/scale-out.md).

pub use crate::error::CollectorError;
use firma_common::audit::{ChainPos, is_signed, line_hash, verify_line};
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

struct Output {
    path: PathBuf,
    file: File,
    /// Highest `seq` written (or staged) per chain.
    chains: HashMap<String, u64>,
    /// The accepted lines of the current submission, written with one `write` at its end so
    /// that a collector killed mid-submission leaves at most one torn submission at the end of
    /// its file (never acknowledged, so the sidecar sends it again, possibly to another replica).
    staged: Vec<u8>,
}

impl Output {
    /// Appends the staged lines and syncs the file; on failure the staged lines are forgotten
    /// and `before` restored, so that a re-send is written rather than skipped as a duplicate.
    fn commit(&mut self, before: HashMap<String, u64>) -> std::io::Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let done = if staged.is_empty() {
            Ok(())
        } else {
            self.file
                .write_all(&staged)
                .and_then(|()| self.file.sync_data())
        };
        if done.is_err() {
            self.chains = before;
        }
        done
    }
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
                staged: Vec::new(),
            })),
            keys: Arc::new(keys),
        })
    }

    /// The tonic service, to add to any server.
    pub fn into_service(self) -> AuditCollectorServer<Self> {
        AuditCollectorServer::new(self)
    }

    /// Handles line number `idx` of a submission; returns how many lines were written.
    fn accept(
        &self,
        out: &mut Output,
        pending: &mut Pending,
        idx: u64,
        line: &str,
    ) -> Result<u64, std::io::Error> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.contains('\n') {
            tracing::warn!(target: "firma_authority::collector", "refused audit record containing a newline");
            return Ok(0);
        }
        if self.keys.is_empty() {
            return Ok(u64::from(write_line(out, line, chain_pos(line))?));
        }
        if !is_signed(line) {
            let Some(p) = chain_pos(line) else {
                tracing::warn!(target: "firma_authority::collector", "refused unsigned audit record without a chain position");
                return Ok(0);
            };
            pending.hold(idx, line, p);
            return Ok(0);
        }
        let p = match verify_line(line, &self.keys).and_then(|b| ChainPos::of(&b)) {
            Ok(p) => p,
            Err(e) => {
                // The lines it was to cover are refused with it (and acknowledged, like it).
                let dropped = chain_pos(line).map_or(0, |p| pending.drop_chain(&p.chain_id));
                tracing::warn!(target: "firma_authority::collector", "refused audit record ({dropped} unsigned before it): {e}");
                return Ok(0);
            }
        };
        let covered = pending.take_covered(&p);
        let mut written = 0;
        for (l, lp) in covered {
            written += u64::from(write_line(out, &l, Some(lp))?);
        }
        written += u64::from(write_line(out, line, Some(p))?);
        Ok(written)
    }
}

/// Stages `line` unless the file already holds its `(chain_id, seq)` (a re-sent batch).
fn write_line(out: &mut Output, line: &str, pos: Option<ChainPos>) -> std::io::Result<bool> {
    if let Some(p) = pos {
        if out
            .chains
            .get(&p.chain_id)
            .is_some_and(|last| p.seq <= *last)
        {
            return Ok(false);
        }
        out.chains.insert(p.chain_id, p.seq);
    }
    out.staged.extend_from_slice(line.as_bytes());
    out.staged.push(b'\n');
    Ok(true)
}

/// Most records in one submission (a sidecar sends at most 512).
const MAX_SUBMISSION_LINES: usize = 4096;
/// Most bytes of records in one submission.
const MAX_SUBMISSION_BYTES: usize = 64 << 20;

/// Most unsigned lines held per submission (a sidecar batch is at most 256 lines).
const MAX_PENDING: usize = 4096;

/// Unsigned lines of one submission waiting for the signed line that covers them, per chain:
/// consecutive `seq`, each linked to the one before by `prev_hash`.
#[derive(Default)]
struct Pending {
    chains: HashMap<String, Vec<(u64, String, ChainPos)>>,
    held: usize,
}

impl Pending {
    fn hold(&mut self, idx: u64, line: &str, p: ChainPos) {
        let run = self.chains.entry(p.chain_id.clone()).or_default();
        let linked = run
            .last()
            .is_none_or(|(_, l, lp)| lp.seq + 1 == p.seq && line_hash(l) == p.prev_hash);
        if !linked {
            tracing::warn!(target: "firma_authority::collector", chain = %p.chain_id, "refused {} unsigned audit record(s): the next one does not link to them", run.len());
            self.held -= run.len();
            run.clear();
        }
        if self.held >= MAX_PENDING {
            tracing::warn!(target: "firma_authority::collector", "refused unsigned audit record: more than {MAX_PENDING} waiting for a signature");
            return;
        }
        run.push((idx, line.to_owned(), p));
        self.held += 1;
    }

    /// The held lines of `signed`'s chain if they link to it (it then proves them); otherwise
    /// they are refused.
    fn take_covered(&mut self, signed: &ChainPos) -> Vec<(String, ChainPos)> {
        let Some(run) = self.chains.remove(&signed.chain_id) else {
            return Vec::new();
        };
        self.held -= run.len();
        let linked = run
            .last()
            .is_some_and(|(_, l, lp)| lp.seq + 1 == signed.seq && line_hash(l) == signed.prev_hash);
        if !linked {
            tracing::warn!(target: "firma_authority::collector", chain = %signed.chain_id, "refused {} unsigned audit record(s) the signed one does not cover", run.len());
            return Vec::new();
        }
        run.into_iter().map(|(_, l, p)| (l, p)).collect()
    }

    /// Refuses the held lines of `chain_id`; returns how many.
    fn drop_chain(&mut self, chain_id: &str) -> usize {
        let n = self.chains.remove(chain_id).map_or(0, |run| run.len());
        self.held -= n;
        n
    }

    /// The first line still waiting: acknowledgement stops before it.
    fn first_waiting(&self) -> Option<u64> {
        self.chains
            .values()
            .filter_map(|run| run.first().map(|(idx, _, _)| *idx))
            .min()
    }
}

#[tonic::async_trait]
impl AuditCollector for Collector {
    async fn submit(
        &self,
        request: Request<Streaming<AuditRecord>>,
    ) -> Result<Response<SubmitAck>, Status> {
        // The whole submission is read before the file is locked: a slow or stalled sidecar
        // must not hold up every other sidecar's submissions (nor their flow-control windows).
        let mut stream = request.into_inner();
        let mut records = Vec::new();
        let mut bytes = 0usize;
        while let Some(rec) = stream.message().await? {
            bytes += rec.json.len();
            if records.len() >= MAX_SUBMISSION_LINES || bytes > MAX_SUBMISSION_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "an audit submission holds at most {MAX_SUBMISSION_LINES} records and {MAX_SUBMISSION_BYTES} bytes"
                )));
            }
            records.push(rec.json);
        }
        let mut received = 0u64;
        let mut written = 0u64;
        let mut out = self.out.lock().await;
        let fail = |path: &Path, e: std::io::Error| {
            tracing::error!(target: "firma_authority::collector", "{}: {e}", path.display());
            Status::internal("audit collector cannot write its output")
        };
        let mut pending = Pending::default();
        let before = out.chains.clone();
        out.staged.clear();
        for json in &records {
            match self.accept(&mut out, &mut pending, received, json) {
                Ok(w) => written += w,
                Err(e) => {
                    out.staged.clear();
                    out.chains = before;
                    return Err(fail(&out.path.clone(), e));
                }
            }
            received += 1;
        }
        if let Err(e) = out.commit(before) {
            return Err(fail(&out.path.clone(), e));
        }
        // Lines still waiting for their signature are not acknowledged: the sidecar re-sends
        // them (and anything after them; duplicates are skipped by `seq`).
        let accepted = pending.first_waiting().unwrap_or(received);
        tracing::debug!(target: "firma_authority::collector", "received {received} record(s), wrote {written}, acknowledged {accepted}");
        Ok(Response::new(SubmitAck { accepted }))
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
        .serve_with_incoming_shutdown(crate::listen::incoming(listener), shutdown)
        .await
        .map_err(|e| CollectorError::Serve {
            addr: local,
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use firma_common::audit::{GENESIS_HASH, seal, unsigned_line};
    use firma_common::keys::SigningKey;
    use serde_json::Map;

    fn key(dir: &Path, name: &str) -> SigningKey {
        let p = dir.join(name);
        firma_common::keys::generate(&p, false).unwrap();
        firma_common::keys::load_signing_key(&p).unwrap()
    }

    /// A sidecar batch of `n` lines from `seq`, last one signed.
    fn batch(k: &SigningKey, seq: u64, prev: &mut String, n: u64) -> Vec<String> {
        (seq..seq + n)
            .map(|i| {
                let mut b = Map::new();
                b.insert("chain_id".into(), "c".into());
                b.insert("seq".into(), i.into());
                b.insert("prev_hash".into(), prev.clone().into());
                let l = if i + 1 == seq + n {
                    seal(&b, k).unwrap()
                } else {
                    unsigned_line(&b).unwrap()
                };
                *prev = line_hash(&l);
                l
            })
            .collect()
    }

    /// One submission: (written, acknowledged).
    fn submit(c: &Collector, lines: &[String]) -> (u64, u64) {
        let mut out = c.out.try_lock().unwrap();
        let mut pending = Pending::default();
        let mut written = 0;
        let before = out.chains.clone();
        for (i, l) in lines.iter().enumerate() {
            written += c.accept(&mut out, &mut pending, i as u64, l).unwrap();
        }
        out.commit(before).unwrap();
        let received = lines.len() as u64;
        (written, pending.first_waiting().unwrap_or(received))
    }

    #[test]
    fn unsigned_lines_are_written_only_with_the_signature_that_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let k = key(dir.path(), "k");
        let c = Collector::open(&path, vec![k.verifying_key()]).unwrap();
        let mut prev = GENESIS_HASH.to_string();
        let mut lines = batch(&k, 0, &mut prev, 3);
        lines.extend(batch(&k, 3, &mut prev, 4));

        // A submission cut inside the second batch: its lines wait, unacknowledged.
        assert_eq!(submit(&c, &lines[..5]), (3, 3));
        // The sidecar re-sends from the first unacknowledged line.
        assert_eq!(submit(&c, &lines[3..]), (4, 4));
        // A re-sent whole file: nothing written twice.
        assert_eq!(submit(&c, &lines), (0, 7));

        // Unsigned lines whose signature never comes: not written, not acknowledged.
        let mut p2 = prev.clone();
        let next = batch(&k, 7, &mut p2, 3);
        assert_eq!(submit(&c, &next[..2]), (0, 0));
        // Another key's signed line covers nothing.
        let rogue = key(dir.path(), "rogue");
        let mut rp = prev.clone();
        assert_eq!(submit(&c, &batch(&rogue, 7, &mut rp, 2)), (0, 2));

        let text = std::fs::read_to_string(&path).unwrap();
        let mut v = firma_common::audit::ChainVerifier::new(vec![k.verifying_key()]);
        for l in text.lines() {
            v.push(l).unwrap();
        }
        v.finish().unwrap();
        assert_eq!(text.lines().count(), 7);
    }
}
