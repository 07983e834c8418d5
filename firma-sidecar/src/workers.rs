//! Connection workers: each accepted client connection is served, start to end, on one of N
//! single-threaded runtimes (`[sidecar.interceptor] workers`, default half the CPUs, see
//! [`count`]), as Envoy's workers do.
//!
//! Why: on the work-stealing runtime a keep-alive request hopped between threads (the client
//! connection's task, the upstream connection's driver, the pool) and every hop was a
//! cross-CPU wake-up, which on a VM is an IPI and a VM exit. Pinned, a connection's TLS, its
//! pipeline and its upstream connections (pooled per worker, see `connector::pool`) share one
//! thread: measured on the 2-core bench machine, sidecar CPU per keep-alive request fell from
//! 0.92-1.07 to 0.72-0.78 CPU-s per 10k requests (docs/benchmarks.md). Shared state
//! (sessions, rate limits, the audit writer) is unchanged: it was already `Sync`.
//!
//! The listeners stay on the main runtime; an accepted socket is moved to a worker
//! round-robin (`into_std` then `from_std` there: two `epoll_ctl` per connection). Tasks on
//! workers are tracked by the same [`Drain`], so shutdown waits for them as before. Without
//! [`start`] (unit tests, embedders), connections are served on the current runtime.

use crate::drain::Drain;
use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tokio::runtime::Handle;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

/// The worker running the current thread, `None` off the workers (upstream connections are
/// pooled per worker: a connection driven by another thread would bring the hops back).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many workers `configured` means: 0 is half the CPUs this process may use (cgroup
/// quota included), at least 1. A sidecar shares the host with the workload it polices: on
/// the 2-core bench machine one worker served keep-alive traffic at 0.72-0.78 CPU-s per 10k
/// requests against 0.87-0.92 with two (the client and upstream need the other core), and new
/// connections equally fast. Dedicated egress hosts set it to their core count.
pub fn count(configured: u16) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        n => usize::from(n),
    }
}

/// Starts `n` worker threads once per process (a second call keeps the first set: `firma run`
/// and tests may start the sidecar more than once in one process). Returns how many run.
pub fn start(n: usize) -> std::io::Result<usize> {
    if let Some(w) = WORKERS.get() {
        return Ok(w.handles.len());
    }
    let mut handles = Vec::with_capacity(n);
    for index in 0..n.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        std::thread::Builder::new()
            .name(format!("firma-conn-{index}"))
            .spawn(move || {
                INDEX.with(|i| i.set(Some(index)));
                // Runs the tasks spawned onto it until the process exits (its tasks are
                // tracked by the drain, which waits for them at shutdown).
                rt.block_on(std::future::pending::<()>());
            })?;
    }
    let started = handles.len();
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(WORKERS.get().map_or(started, |w| w.handles.len()))
}

/// Serves `stream` with `serve` on the next worker, tracked by `drain`; on the current runtime
/// when no workers were started.
pub fn dispatch<F, Fut>(drain: &Drain, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        drain.spawn(serve(stream));
        return;
    };
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot hand an accepted connection to a worker: {e}; closed");
            return;
        }
    };
    let i = w.next.fetch_add(1, Ordering::Relaxed) % w.handles.len();
    drain.spawn_on(
        async move {
            // `into_std` left the socket non-blocking, as `from_std` needs.
            match TcpStream::from_std(std) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!("cannot register a connection on its worker: {e}"),
            }
        },
        &w.handles[i],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections are served on the worker threads, round-robin, and the drain waits for them.
    #[tokio::test]
    async fn connections_run_on_workers_and_are_drained() {
        assert_eq!(start(2).unwrap(), 2);
        assert_eq!(current(), None, "the test's runtime is not a worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            dispatch(&drain, server, |mut s| async move {
                let who = current().map_or(255u8, |i| i as u8);
                let name = std::thread::current().name().map(str::to_owned);
                assert!(name.is_some_and(|n| n.starts_with("firma-conn-")));
                let _ = s.write_all(&[who]).await;
            });
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            seen.push(b[0]);
        }
        assert!(seen.iter().all(|w| *w < 2), "{seen:?}");
        assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
        assert_eq!(drain.drain(std::time::Duration::from_secs(5)).await, 0);
    }
}
