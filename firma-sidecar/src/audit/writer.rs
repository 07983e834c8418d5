//! The single writer thread: receives event bodies, chains and signs them in arrival order,
//! and hands the lines to the sink. One thread means one chain order and no lock on the
//! request path (`record` only sends on a channel).
//!
//! File sink fsync policy (`[sidecar.audit] fsync`): `always` calls `fdatasync` after every
//! line; `interval` (default) at most every 100 ms while there are unsynced lines, and on
//! flush/shutdown; `never` leaves it to the OS (flush still syncs).

use super::chain::Sealer;
use super::grpc::GrpcQueue;
use firma_common::config::FsyncPolicy;
use serde_json::{Map, Value};
use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const SYNC_INTERVAL: Duration = Duration::from_millis(100);

pub enum Msg {
    Event(Map<String, Value>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Where sealed lines go.
pub enum Sink {
    File {
        file: File,
        fsync: FsyncPolicy,
        dirty: bool,
        last_sync: Instant,
    },
    Stdout,
    Grpc(GrpcQueue),
}

impl Sink {
    pub fn file(file: File, fsync: FsyncPolicy) -> Self {
        Sink::File {
            file,
            fsync,
            dirty: false,
            last_sync: Instant::now(),
        }
    }

    fn write(&mut self, line: String) -> std::io::Result<()> {
        match self {
            Sink::File {
                file,
                fsync,
                dirty,
                last_sync,
            } => {
                let mut buf = line.into_bytes();
                buf.push(b'\n');
                // One write per line: concurrent readers never see half of a line.
                file.write_all(&buf)?;
                *dirty = true;
                if *fsync == FsyncPolicy::Always {
                    file.sync_data()?;
                    *dirty = false;
                    *last_sync = Instant::now();
                }
                Ok(())
            }
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()
            }
            Sink::Grpc(q) => {
                q.push(line);
                Ok(())
            }
        }
    }

    fn tick(&mut self, force: bool) -> std::io::Result<()> {
        if let Sink::File {
            file,
            fsync,
            dirty,
            last_sync,
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

/// Runs until every sender is gone.
pub fn run(rx: Receiver<Msg>, mut sealer: Sealer, mut sink: Sink) {
    loop {
        match rx.recv_timeout(SYNC_INTERVAL) {
            Ok(Msg::Event(body)) => {
                let result = sealer
                    .seal(body)
                    .map_err(|e| e.to_string())
                    .and_then(|line| sink.write(line).map_err(|e| e.to_string()));
                if let Err(e) = result {
                    tracing::error!(target: "firma_sidecar::audit", "audit event lost: {e}");
                }
                if let Err(e) = sink.tick(false) {
                    tracing::error!(target: "firma_sidecar::audit", "audit fsync failed: {e}");
                }
            }
            Ok(Msg::Flush(done)) => {
                if let Err(e) = sink.tick(true) {
                    tracing::error!(target: "firma_sidecar::audit", "audit fsync failed: {e}");
                }
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = sink.tick(false) {
                    tracing::error!(target: "firma_sidecar::audit", "audit fsync failed: {e}");
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sink.tick(true);
                return;
            }
        }
    }
}
