//! The free-space watermark of the file sink's filesystem.
//!
//! Every [`CHECK_EVERY`] (and after each rotation) the writer thread calls `statvfs` on the
//! audit file's directory: one syscall, no I/O. The space available to the sidecar's user is
//! `firma_sidecar_audit_disk_free_bytes`; below `[sidecar.audit] free_space_warn_bytes`
//! (default 1 GiB) `firma_sidecar_audit_disk_low` is 1 and the log says `AUDIT DISK LOW` at
//! once and every [`WARN_EVERY`] while it lasts, then when it is over. This is a warning only:
//! a disk that does fill up still fails closed (`AuditUnavailable`, see [`super::writer`]).

use super::health::Health;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const CHECK_EVERY: Duration = Duration::from_secs(5);
pub const WARN_EVERY: Duration = Duration::from_secs(60);

pub struct SpaceWatch {
    dir: PathBuf,
    warn_below: u64,
    next_check: Instant,
    low_logged: Option<Instant>,
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

impl SpaceWatch {
    /// Watches the filesystem of the audit file `path`; `warn_below` 0: gauge only.
    pub fn new(path: &Path, warn_below: u64) -> Self {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self {
            dir,
            warn_below,
            next_check: Instant::now(),
            low_logged: None,
        }
    }

    /// Checks when due (or now with `force`), updating `health` and logging.
    pub fn tick(&mut self, health: &Health, force: bool) {
        let now = Instant::now();
        if !force && now < self.next_check {
            return;
        }
        self.next_check = now + CHECK_EVERY;
        let free = match free_bytes(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(target: "firma_sidecar::audit", "statvfs {}: {e}", self.dir.display());
                return;
            }
        };
        health.disk_free.store(free, Ordering::Relaxed);
        let low = self.warn_below > 0 && free < self.warn_below;
        health.disk_low.store(low, Ordering::Relaxed);
        match (low, self.low_logged) {
            (true, last) if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) => {
                self.low_logged = Some(now);
                tracing::warn!(
                    target: "firma_sidecar::audit",
                    "AUDIT DISK LOW: {} bytes free on the filesystem of {} (warning below free_space_warn_bytes = {}); when it is full, allowed requests are denied AuditUnavailable: free space, or rotate with max_files",
                    free,
                    self.dir.display(),
                    self.warn_below
                );
            }
            (false, Some(_)) => {
                self.low_logged = None;
                tracing::info!(
                    target: "firma_sidecar::audit",
                    "audit disk space back above free_space_warn_bytes: {free} bytes free"
                );
            }
            _ => {}
        }
    }
}
