//! Graceful shutdown shared by every listener and connection.
//!
//! On SIGTERM the server cancels [`Drain::token`]: listeners stop accepting, HTTP connections
//! are told to finish their in-flight request and close (hyper graceful shutdown), and the
//! server waits for every tracked task until `drain_timeout_secs`. Whatever is still running
//! then (long downloads, blind tunnels) is cut when the process exits. Audit is flushed after.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A cheap, cloneable handle: spawn connection tasks through it and watch for shutdown.
#[derive(Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task the drain will wait for.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(fut);
    }

    /// As [`Drain::spawn`], on another runtime (a connection worker, see `crate::workers`).
    pub fn spawn_on<F>(&self, fut: F, runtime: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(fut, runtime);
    }

    /// Resolves once shutdown has begun.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins shutdown and waits up to `deadline` for tracked tasks. Returns how many were
    /// still running at the deadline (0: clean drain).
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}
