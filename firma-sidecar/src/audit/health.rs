//! What the request path, readiness checks and metrics can see of the audit writer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the request path and readiness checks can see of the writer.
#[derive(Debug)]
pub struct Health {
    pub(super) healthy: AtomicBool,
    pub(super) written: AtomicU64,
    pub(super) lost: AtomicU64,
    /// Files rotated since start.
    pub(super) rotated: AtomicU64,
    /// Free bytes on the file sink's filesystem (`u64::MAX`: not known, or not a file sink).
    pub(super) disk_free: AtomicU64,
    /// Below `free_space_warn_bytes`.
    pub(super) disk_low: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            written: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            rotated: AtomicU64::new(0),
            disk_free: AtomicU64::new(u64::MAX),
            disk_low: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// `false` while the last write failed.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    /// Events persisted since start.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    /// Events that could not be persisted since start.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
    /// Audit files rotated since start.
    pub fn rotated(&self) -> u64 {
        self.rotated.load(Ordering::Relaxed)
    }
    /// Free bytes on the audit file's filesystem at the last check (file sink only).
    pub fn disk_free(&self) -> Option<u64> {
        Some(self.disk_free.load(Ordering::Relaxed)).filter(|f| *f != u64::MAX)
    }
    /// Whether that is below `free_space_warn_bytes`.
    pub fn disk_low(&self) -> bool {
        self.disk_low.load(Ordering::Relaxed)
    }
}
