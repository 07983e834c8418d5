//! The writer: chains event bodies in the order they are written and hands them to the sink.
//! One [`Writer`] behind one lock means one chain order.
//!
//! Group commit: whatever is queued when a batch starts (up to [`MAX_BATCH`] events) is
//! chained and written with one `write` (and one `fdatasync` under `fsync = "always"`), then
//! every waiting caller gets its acknowledgement. Under load this is what keeps "persisted
//! before the request leaves" cheap. A batch is written by the request thread that finds the
//! writer free (inline, see [`Shared`]: no cross-thread wake-up per batch), or by the writer
//! thread, which also writes held lines on time, syncs, rotates and does the housekeeping.
//!
//! One signature per batch: only the batch's last line is signed; through the hash chain it
//! covers every line of the batch (docs/architecture.md, audit). The batch goes out in that
//! one `write`, so no caller is acknowledged before the signature covering its line is in the
//! sink, and there is no unsigned window on disk to close at shutdown: each batch is closed
//! by its own signature. Ed25519 signing (~20 µs here) was the writer's ceiling with one
//! signature per line. Lines nobody waits for (denials, outcomes) are held up to [`HOLD_MAX`]
//! to ride in the next batch that gates a request (see [`SideQueue`]).
//!
//! Fail closed: a batch that cannot be persisted (ENOSPC, EIO, a full grpc queue) is cut back
//! from the file (`ftruncate` to the last complete line, so there is never a torn line), the
//! chain is rolled back (the next line takes the lost ones' place, no gap), and its callers get
//! an error: an allowed request is then denied `AuditUnavailable` instead of being forwarded
//! unaudited. The thread logs the failure at once, every [`FAILING_LOG_EVERY`] while it lasts,
//! and the recovery.
//!
//! File sink fsync policy (`[sidecar.audit] fsync`): `always` calls `fdatasync` after every
//! batch; `interval` (default) at most every 100 ms while there are unsynced lines, and on
//! flush/shutdown; `never` leaves it to the OS (flush still syncs). A line that `write` accepted
//! is in the page cache: it survives a `kill -9` of the sidecar under every policy.

use super::aggregate::Aggregator;
use super::chain::Sealer;
use super::grpc::GrpcQueue;
use super::health::Health;
use super::rotate::Rotation;
use super::space::SpaceWatch;
use crate::config::FsyncPolicy;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Most events sealed and written together.
pub(super) const MAX_BATCH: usize = 256;
// A gRPC submission holds at least one batch (see `grpc::BATCH`).
const _: () = assert!(super::grpc::BATCH >= MAX_BATCH);
/// How often a sink that keeps failing is reported again.
const FAILING_LOG_EVERY: Duration = Duration::from_secs(10);

/// The reason an event was not persisted.
pub type Lost = Arc<str>;
/// Told whether the event was persisted.
pub type Ack = tokio::sync::oneshot::Sender<Result<(), Lost>>;

pub enum Msg {
    /// An event body (one JSON object's text, without chain members) and its waiter.
    Event(String, Ack),
    /// The [`SideQueue`] is full: write what it holds.
    Wake,
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Lines nobody waits for (denials, outcomes), queued without waking the writer: it takes
/// them with the next batch somebody waits for, at its next [`HOLD_MAX`] tick, or when the
/// queue reaches [`MAX_BATCH`] (the pusher then sends [`Msg::Wake`]). Half of the
/// cross-thread wake-ups per allowed request were outcome lines waking the writer.
#[derive(Default)]
pub struct SideQueue(std::sync::Mutex<Vec<String>>);

impl SideQueue {
    /// Queues `body`; `true` when the writer must be woken now.
    pub fn push(&self, body: String) -> bool {
        let mut q = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.push(body);
        q.len() >= MAX_BATCH
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Where sealed lines go.
pub enum Sink {
    File {
        file: File,
        fsync: FsyncPolicy,
        dirty: bool,
        last_sync: Instant,
        /// Length of the file up to its last complete, persisted line.
        good_len: u64,
        /// A failed write may have left part of a batch behind: cut it before writing again.
        needs_cut: bool,
        /// Where the file is and when it is rotated ([`super::rotate`]).
        rotation: Option<Rotation>,
    },
    Stdout,
    Grpc(GrpcQueue),
}

impl Sink {
    /// `len`: the file's length, which must end with a complete line (or be 0).
    pub fn file(file: File, fsync: FsyncPolicy, len: u64) -> Self {
        Sink::File {
            file,
            fsync,
            dirty: false,
            last_sync: Instant::now(),
            good_len: len,
            needs_cut: false,
            rotation: None,
        }
    }

    /// A file sink that rotates per `rotation`.
    pub fn rotating(mut self, r: Rotation) -> Self {
        if let Sink::File { rotation, .. } = &mut self {
            *rotation = Some(r);
        }
        self
    }

    /// Writes complete lines (each ending in `\n`) all together, or leaves the sink as it was.
    fn write_lines(&mut self, lines: Vec<String>) -> std::io::Result<()> {
        match self {
            Sink::File {
                file,
                fsync,
                dirty,
                last_sync,
                good_len,
                needs_cut,
                ..
            } => {
                if *needs_cut {
                    file.set_len(*good_len)?;
                    *needs_cut = false;
                }
                let buf: Vec<u8> = lines.concat().into_bytes();
                let written = file.write_all(&buf).and_then(|()| {
                    if *fsync == FsyncPolicy::Always {
                        file.sync_data()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = written {
                    // Never leave a torn line: cut back to the last complete one now, or before
                    // the next write if even that fails.
                    if file.set_len(*good_len).is_err() {
                        *needs_cut = true;
                    }
                    return Err(e);
                }
                *good_len += buf.len() as u64;
                if *fsync == FsyncPolicy::Always {
                    *last_sync = Instant::now();
                } else {
                    *dirty = true;
                }
                Ok(())
            }
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(lines.concat().as_bytes())?;
                out.flush()
            }
            Sink::Grpc(q) => q
                .push_all(
                    lines
                        .into_iter()
                        .map(|mut l| {
                            l.pop();
                            l
                        })
                        .collect(),
                )
                .map_err(std::io::Error::other),
        }
    }

    /// Whether a batch may be written on a request's thread: the write only copies into the
    /// page cache or an in-memory queue. `fsync = "always"` (an `fdatasync` per batch) and
    /// stdout (a pipe that may be full) stay on the writer thread.
    fn inline_ok(&self) -> bool {
        match self {
            Sink::File { fsync, .. } => *fsync != FsyncPolicy::Always,
            Sink::Stdout => false,
            Sink::Grpc(_) => true,
        }
    }

    /// `fsync = "interval"` and unsynced lines older than [`SYNC_INTERVAL`].
    fn sync_due(&self) -> bool {
        matches!(self, Sink::File { fsync: FsyncPolicy::Interval, dirty: true, last_sync, .. }
            if last_sync.elapsed() >= SYNC_INTERVAL)
    }

    fn tick(&mut self, force: bool) -> std::io::Result<()> {
        if let Sink::File {
            file,
            fsync,
            dirty,
            last_sync,
            ..
        } = self
            && *dirty
            && (force || (*fsync == FsyncPolicy::Interval && last_sync.elapsed() >= SYNC_INTERVAL))
        {
            file.sync_data()?;
            *dirty = false;
            *last_sync = Instant::now();
        }
        Ok(())
    }
}

/// The writer's state across batches.
pub struct Writer {
    pub sealer: Sealer,
    pub sink: Sink,
    pub health: Arc<Health>,
    failing_since: Option<(Instant, Instant)>,
    /// Denials counted instead of written; their summaries are written when a window ends.
    pub aggregator: Option<Arc<Aggregator>>,
    /// File sink: the free-space watermark.
    pub space: Option<SpaceWatch>,
    /// Where the head of the chain is recorded after each persisted batch (anchoring).
    pub head: Option<Arc<super::anchor::HeadCell>>,
}

impl Writer {
    pub fn new(sealer: Sealer, sink: Sink, health: Arc<Health>) -> Self {
        Self {
            sealer,
            sink,
            health,
            failing_since: None,
            aggregator: None,
            space: None,
            head: None,
        }
    }

    /// Checks free space now (after a rotation; at start).
    /// Rotates the file sink if it reached its size (called after each successful batch).
    pub(super) fn maybe_rotate(&mut self) {
        let Sink::File {
            file,
            good_len,
            dirty,
            rotation: Some(rot),
            ..
        } = &mut self.sink
        else {
            return;
        };
        if rot.rotate_if_full(file, good_len, dirty, &mut self.sealer, &self.health) {
            self.space_check_now();
        }
    }

    pub(super) fn space_check_now(&mut self) {
        if let Some(s) = &mut self.space {
            s.tick(&self.health, true);
        }
    }

    /// Housekeeping on every loop of the writer thread: summaries of an ended aggregation
    /// window, and the free-space check when due. Both are a clock read when not due.
    fn housekeeping(&mut self) {
        if let Some(a) = &self.aggregator
            && a.is_due()
        {
            let bodies = a.take_due();
            if !bodies.is_empty() {
                let _ = self.persist(bodies);
            }
        }
        if let Some(s) = &mut self.space {
            s.tick(&self.health, false);
        }
    }

    /// Writes every summary counted so far (flush, shutdown).
    fn flush_summaries(&mut self) {
        if let Some(a) = &self.aggregator {
            let bodies = a.take_all();
            if !bodies.is_empty() {
                let _ = self.persist(bodies);
            }
        }
    }

    /// Seals and persists `bodies` together; on failure nothing of them remains and the chain
    /// is where it was.
    pub fn persist(&mut self, bodies: Vec<String>) -> Result<(), Lost> {
        let n = bodies.len() as u64;
        let before = self.sealer.position();
        let mut lines = Vec::with_capacity(bodies.len());
        let mut result = Ok(());
        let last = bodies.len().saturating_sub(1);
        for (i, body) in bodies.into_iter().enumerate() {
            match self.sealer.chain(body, i == last) {
                Ok(mut line) => {
                    line.push('\n');
                    lines.push(line);
                }
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
        if result.is_ok() {
            let t0 = Instant::now();
            result = self.sink.write_lines(lines).map_err(|e| e.to_string());
            super::metrics::write(t0.elapsed());
        }
        match result {
            Ok(()) => {
                self.health.written.fetch_add(n, Ordering::Relaxed);
                if let Some(h) = &self.head {
                    let (next, hash) = self.sealer.position();
                    h.set(self.sealer.chain_id(), next.saturating_sub(1), &hash);
                }
                self.maybe_rotate();
                if let Some((since, _)) = self.failing_since.take() {
                    self.health.healthy.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        target: "firma_sidecar::audit",
                        "audit sink recovered after {:.1} s; {} event(s) lost in all since start",
                        since.elapsed().as_secs_f64(),
                        self.health.lost()
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.sealer.rollback(before);
                let lost = self.health.lost.fetch_add(n, Ordering::Relaxed) + n;
                self.health.healthy.store(false, Ordering::Relaxed);
                let now = Instant::now();
                match &mut self.failing_since {
                    None => {
                        self.failing_since = Some((now, now));
                        tracing::error!(
                            target: "firma_sidecar::audit",
                            "AUDIT FAILING: cannot persist audit events ({e}); allowed requests are denied AuditUnavailable until it recovers"
                        );
                    }
                    Some((since, last_log)) if last_log.elapsed() >= FAILING_LOG_EVERY => {
                        *last_log = now;
                        tracing::error!(
                            target: "firma_sidecar::audit",
                            "AUDIT STILL FAILING for {:.0} s ({e}): {lost} event(s) not persisted since start; requests are being denied AuditUnavailable",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    Some(_) => {}
                }
                Err(e.into())
            }
        }
    }
}

/// What the writer thread and the request threads share.
///
/// Inline group commit: a request queues its decision line on [`Shared::queue`], lets the
/// other ready tasks of its runtime queue theirs (one `yield`), then whoever finds the
/// [`Writer`] free writes everything queued as one batch under one signature and acknowledges
/// its waiters ([`Shared::try_lead`]). On a connection worker this writes on the worker's own
/// thread: no wake-up of the writer thread and none back per batch, and no wait for a third
/// thread to be scheduled on a busy machine. When the writer is busy (the writer thread holds
/// it for a sync, a side batch or housekeeping, or another worker is writing), the request
/// wakes the writer thread ([`Msg::Wake`]), which writes what is queued as soon as it can.
/// Sinks that may block (`fsync = "always"`, stdout) never take this path.
pub struct Shared {
    /// The chain, the signer and the sink: whoever holds it writes the next batch.
    writer: std::sync::Mutex<Writer>,
    /// Lines somebody waits for, queued for the next batch.
    pending: std::sync::Mutex<Vec<(String, Ack)>>,
    pub side: SideQueue,
    /// Batches may be written on a request's thread ([`Sink::inline_ok`]).
    pub inline: bool,
}

/// What [`Shared::try_lead`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Lead {
    /// Everything queued was written (or taken by another writer).
    Done,
    /// The writer was busy or lines remain: wake the writer thread.
    WakeWriter,
}

/// Most batches a request thread writes in one [`Shared::try_lead`] before it leaves the rest
/// to the writer thread (other workers may keep queueing).
const INLINE_BATCHES: usize = 2;

impl Shared {
    pub fn new(w: Writer) -> Self {
        let inline = w.sink.inline_ok();
        Self {
            writer: std::sync::Mutex::new(w),
            pending: std::sync::Mutex::default(),
            side: SideQueue::default(),
            inline,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<(String, Ack)>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a line somebody waits for; `ack` is answered when its batch is persisted (or
    /// failed). Follow with [`Self::try_lead`] or [`Msg::Wake`].
    pub fn queue(&self, body: String, ack: Ack) {
        self.pending().push((body, ack));
    }

    /// Writes what is queued on the calling thread if the writer is free.
    pub fn try_lead(&self) -> Lead {
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Lead::WakeWriter,
        };
        let drained = self.commit_pending(&mut w, INLINE_BATCHES);
        // The interval fsync and housekeeping stay on the writer thread (an `fdatasync` here
        // would stall every connection of this worker).
        if !drained || w.sink.sync_due() {
            Lead::WakeWriter
        } else {
            Lead::Done
        }
    }

    /// Writes queued lines, with the side lines, in batches of at most [`MAX_BATCH`] waiters,
    /// at most `batches` of them; `true` when nothing is left queued.
    fn commit_pending(&self, w: &mut Writer, batches: usize) -> bool {
        for _ in 0..batches {
            let batch: Vec<(String, Ack)> = {
                let mut p = self.pending();
                if p.is_empty() {
                    return true;
                }
                let n = p.len().min(MAX_BATCH);
                p.drain(..n).collect()
            };
            let mut bodies = self.side.take();
            bodies.reserve(batch.len());
            let mut acks = Vec::with_capacity(batch.len());
            for (b, a) in batch {
                bodies.push(b);
                acks.push(a);
            }
            let result = w.persist(bodies);
            for ack in acks {
                let _ = ack.send(result.clone());
            }
        }
        self.pending().is_empty()
    }
}

/// Runs until every sender is gone.
///
/// Every event on the channel or queued on [`Shared`] has a waiter (an ALLOW decision): it is
/// written at once, with whatever else is queued and the [`SideQueue`]'s lines, under one
/// signature. Side lines otherwise wait for the next such batch, a [`Msg::Wake`] (the queue is
/// full) or the [`HOLD_MAX`] timeout of an idle channel, so none waits longer than
/// [`HOLD_MAX`].
pub fn run(rx: Receiver<Msg>, shared: Arc<Shared>) {
    let mut pending: Option<Msg> = None;
    loop {
        let first = match pending.take() {
            Some(m) => Ok(m),
            None => rx.recv_timeout(HOLD_MAX),
        };
        let mut w = shared.lock();
        match first {
            Ok(Msg::Event(body, ack)) => {
                shared.queue(body, ack);
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Event(b, a)) => shared.queue(b, a),
                        Ok(Msg::Wake) => {}
                        Ok(flush) => {
                            pending = Some(flush);
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                shared.commit_pending(&mut w, usize::MAX);
                tick(&mut w, false);
            }
            Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {
                shared.commit_pending(&mut w, usize::MAX);
                write_side(&shared.side, &mut w);
                tick(&mut w, false);
            }
            Ok(Msg::Flush(done)) => {
                shared.commit_pending(&mut w, usize::MAX);
                write_side(&shared.side, &mut w);
                w.flush_summaries();
                tick(&mut w, true);
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Disconnected) => {
                shared.commit_pending(&mut w, usize::MAX);
                write_side(&shared.side, &mut w);
                w.flush_summaries();
                let _ = w.sink.tick(true);
                return;
            }
        }
        w.housekeeping();
    }
}

/// Writes the side lines, if any, as one batch (nobody waits for them: a failure is counted
/// and logged by [`Writer::persist`]).
fn write_side(side: &SideQueue, w: &mut Writer) {
    let bodies = side.take();
    if !bodies.is_empty() {
        let _ = w.persist(bodies);
    }
}

fn tick(w: &mut Writer, force: bool) {
    if let Err(e) = w.sink.tick(force) {
        tracing::error!(target: "firma_sidecar::audit", "audit fsync failed: {e}");
    }
}

/// Longest a line nobody waits for stays on the [`SideQueue`] before it is written.
pub(super) const HOLD_MAX: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use firma_common::audit::{ChainVerifier, is_signed};
    use firma_common::keys::SigningKey;

    fn body(n: u64) -> String {
        format!("{{\"n\":{n}}}")
    }

    #[test]
    fn a_batch_gets_one_signature_on_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let file = std::fs::File::create(&path).unwrap();
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut w = Writer::new(
            Sealer::new(k.clone()),
            Sink::file(file, FsyncPolicy::Never, 0),
            Arc::new(Health::default()),
        );
        w.persist((0..5).map(body).collect()).unwrap();
        w.persist(vec![body(5)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let signed: Vec<bool> = lines.iter().map(|l| is_signed(l)).collect();
        assert_eq!(signed, [false, false, false, false, true, true]);
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for l in &lines {
            v.push(l).unwrap();
        }
        v.finish().unwrap();
        assert_eq!(v.signatures(), 2);
    }

    /// Lines nobody waits for ride in the next batch somebody waits for (one signature), and
    /// are written on their own once held for `HOLD_MAX` at the latest.
    #[test]
    fn held_lines_ride_with_the_next_gating_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let file = std::fs::File::create(&path).unwrap();
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let w = Writer::new(
            Sealer::new(k.clone()),
            Sink::file(file, FsyncPolicy::Never, 0),
            Arc::new(Health::default()),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new(w));
        let queue = shared.clone();
        let t = std::thread::spawn(move || run(rx, queue));
        let side = &shared.side;
        for n in 0..3 {
            assert!(!side.push(body(n)));
        }
        // A flood of side lines asks for a wake-up once MAX_BATCH are queued (bounded memory).
        let flood = SideQueue::default();
        assert!((1..MAX_BATCH).all(|n| !flood.push(body(n as u64))));
        assert!(flood.push(body(0)));
        let (ack, acked) = tokio::sync::oneshot::channel();
        tx.send(Msg::Event(body(3), ack)).unwrap();
        acked.blocking_recv().unwrap().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let signed = text.lines().filter(|l| is_signed(l)).count();
        assert_eq!(
            text.lines().count(),
            4,
            "the waiter's batch carries the held lines"
        );
        // Normally 1; 2 only if this machine stalled past HOLD_MAX between the sends.
        assert!((1..=2).contains(&signed), "{signed} signatures");
        assert!(is_signed(text.lines().last().unwrap()));
        // A lone line nobody waits for is written within HOLD_MAX (generously bounded here).
        side.push(body(4));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 5 {
            assert!(Instant::now() < deadline, "held line never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(tx);
        t.join().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for l in text.lines() {
            v.push(l).unwrap();
        }
        v.finish().unwrap();
    }

    fn file_writer(path: &std::path::Path, fsync: FsyncPolicy) -> (Writer, SigningKey) {
        let file = std::fs::File::create(path).unwrap();
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let w = Writer::new(
            Sealer::new(k.clone()),
            Sink::file(file, fsync, 0),
            Arc::new(Health::default()),
        );
        (w, k)
    }

    fn verify(path: &std::path::Path, k: &SigningKey) -> u64 {
        let text = std::fs::read_to_string(path).unwrap();
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for l in text.lines() {
            v.push(l).unwrap();
        }
        v.finish().unwrap();
        v.signatures()
    }

    /// Lines queued by several requests are written by the one that finds the writer free,
    /// with the held side lines, under one signature; every waiter is answered.
    #[test]
    fn inline_commit_writes_every_queued_line_in_one_signed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let (w, k) = file_writer(&path, FsyncPolicy::Interval);
        let shared = Shared::new(w);
        assert!(shared.inline);
        shared.side.push(body(0));
        let mut waits = Vec::new();
        for n in 1..4 {
            let (ack, wait) = tokio::sync::oneshot::channel();
            shared.queue(body(n), ack);
            waits.push(wait);
        }
        assert_eq!(shared.try_lead(), Lead::Done);
        for mut w in waits {
            assert_eq!(w.try_recv().unwrap(), Ok(()));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(verify(&path, &k), 1);
        // Nothing queued: nothing written, no empty batch.
        assert_eq!(shared.try_lead(), Lead::Done);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    /// A request that finds the writer busy leaves its line queued, unanswered, for the
    /// writer thread, which writes it when woken.
    #[test]
    fn a_busy_writer_leaves_the_line_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let (w, k) = file_writer(&path, FsyncPolicy::Interval);
        let shared = Arc::new(Shared::new(w));
        let busy = shared.lock();
        let (ack, mut wait) = tokio::sync::oneshot::channel();
        shared.queue(body(1), ack);
        assert_eq!(shared.try_lead(), Lead::WakeWriter);
        assert!(wait.try_recv().is_err(), "answered before it was written");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        drop(busy);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let t = std::thread::spawn(move || run(rx, thread_shared));
        tx.send(Msg::Wake).unwrap();
        assert_eq!(wait.blocking_recv().unwrap(), Ok(()));
        drop(tx);
        t.join().unwrap();
        assert_eq!(verify(&path, &k), 1);
    }

    /// Fail closed on the inline path: a sink that cannot write answers every waiter of the
    /// batch with an error (their requests are denied `AuditUnavailable`), counts them lost,
    /// and leaves the chain where it was for the next batch.
    #[test]
    fn a_failing_sink_fails_every_inline_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "").unwrap();
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let health = Arc::new(Health::default());
        // Opened read-only: every write fails (EBADF).
        let file = std::fs::File::open(&path).unwrap();
        let w = Writer::new(
            Sealer::new(k.clone()),
            Sink::file(file, FsyncPolicy::Never, 0),
            health.clone(),
        );
        let shared = Shared::new(w);
        let mut waits = Vec::new();
        for n in 0..3 {
            let (ack, wait) = tokio::sync::oneshot::channel();
            shared.queue(body(n), ack);
            waits.push(wait);
        }
        assert_eq!(shared.try_lead(), Lead::Done);
        for mut w in waits {
            assert!(w.try_recv().unwrap().is_err());
        }
        assert_eq!(health.lost(), 3);
        assert!(!health.healthy());
        assert_eq!(shared.lock().sealer.position().0, 0, "chain rolled back");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    /// Sinks that may block the caller never write on a request's thread.
    #[test]
    fn blocking_sinks_stay_on_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _) = file_writer(&dir.path().join("a.jsonl"), FsyncPolicy::Always);
        assert!(!Shared::new(w).inline);
        let (w, _) = file_writer(&dir.path().join("b.jsonl"), FsyncPolicy::Never);
        assert!(Shared::new(w).inline);
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let w = Writer::new(Sealer::new(k), Sink::Stdout, Arc::new(Health::default()));
        assert!(!Shared::new(w).inline);
    }
}
