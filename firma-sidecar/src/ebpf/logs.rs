//! Forwards `aya-log` records from the programs (ring buffer `AYA_LOGS`, pinned with the maps
//! so re-adopted programs still reach us) into `tracing` (via the `log` bridge).

use aya::Ebpf;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// Owns the log reader; [`LogPump::run`] drains it whenever the ring buffer becomes readable.
pub struct LogPump {
    fd: RawFd,
    flush: Box<dyn FnMut() + Send>,
}

impl LogPump {
    pub(super) fn new(ebpf: &mut Ebpf) -> Option<Self> {
        match aya_log::EbpfLogger::init(ebpf) {
            Ok(mut logger) => Some(Self {
                fd: logger.as_raw_fd(),
                flush: Box::new(move || logger.flush()),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                None
            }
        }
    }

    /// Drains records until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // SAFETY: the fd belongs to the logger captured in `self.flush`, which outlives `fd`
        // (a local of this function, dropped before `self`); nothing else closes it.
        let fd = match unsafe { AsyncFd::register(self.fd) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ready = fd.readable() => match ready {
                    Ok(mut guard) => {
                        (self.flush)();
                        guard.clear_ready();
                    }
                    Err(_) => return,
                }
            }
        }
    }
}
