//! Idle tracking of client connections (`[sidecar.limits]` timeouts): each connection task
//! runs with its [`Timeouts`] in a task-local ([`scope`], set by
//! [`super::limits::Limits::scope`]), which the HTTP server ([`Activity`]) and blind tunnels
//! ([`copy_until_idle`]) read, so the code in between needs no extra parameters.

use crate::config::LimitsConfig;
use crate::http_body::RespBody;
use http::Response;
use http_body_util::BodyExt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Idle limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// HTTP with no request in flight.
    pub http_idle: Duration,
    /// Blind tunnel with no byte either way.
    pub tunnel_idle: Duration,
    /// HTTP/2 PING interval and answer timeout (`None`: no pings).
    pub h2_keepalive: Option<(Duration, Duration)>,
}

impl Timeouts {
    pub fn from_config(c: &LimitsConfig) -> Self {
        Self {
            http_idle: Duration::from_secs(c.idle_timeout_secs),
            tunnel_idle: Duration::from_secs(c.tunnel_idle_timeout_secs),
            h2_keepalive: (c.h2_keepalive_interval_secs > 0).then(|| {
                (
                    Duration::from_secs(c.h2_keepalive_interval_secs),
                    Duration::from_secs(c.h2_keepalive_timeout_secs),
                )
            }),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::from_config(&LimitsConfig::default())
    }
}

tokio::task_local! {
    static TIMEOUTS: Timeouts;
}

/// The timeouts of the connection this task serves (the defaults outside [`scope`]).
pub fn timeouts() -> Timeouts {
    TIMEOUTS.try_with(|t| *t).unwrap_or_default()
}

/// Runs `fut` (a connection task) with `t` as its [`timeouts`].
pub fn scope<F: Future>(t: Timeouts, fut: F) -> tokio::task::futures::TaskLocalFuture<Timeouts, F> {
    TIMEOUTS.scope(t, fut)
}

// ---------------------------------------------------------------------------------------------
// HTTP idle tracking.

/// Per-connection count of requests in flight and when the last one ended, so the server can
/// close a connection only when nothing is in flight (a request waiting minutes for its
/// response head, or a slow streaming response, is not idle).
pub struct Activity {
    inflight: AtomicUsize,
    /// Requests started on the connection so far.
    started: AtomicU64,
    base: Instant,
    /// Milliseconds since `base` at which the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            inflight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            base: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }
}

/// Held by one request and its response body: while any exists, the connection is busy.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.inflight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    /// A request started.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Acquire);
        self.started.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// How long the connection has been idle (`None`: a request is in flight).
    pub fn idle_for(&self) -> Option<Duration> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.base.elapsed().saturating_sub(since))
    }

    /// Resolves once the connection has been idle for `limit` without interruption.
    pub async fn idle_timeout(&self, limit: Duration) {
        loop {
            let wait = match self.idle_for() {
                Some(idle) if idle >= limit => return,
                Some(idle) => limit - idle,
                // Busy: look again later; a request that ends restarts the idle clock.
                None => limit,
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// Keeps `guard` alive until the response body has been sent (or dropped): a slow streaming
/// response (SSE) keeps its connection busy. Size hint and end of stream pass through, so
/// hyper still frames a known-length body with `content-length`.
pub fn hold_until_sent(resp: Response<RespBody>, guard: InFlight) -> Response<RespBody> {
    resp.map(|inner| {
        GuardedBody {
            inner,
            _guard: guard,
        }
        .boxed()
    })
}

/// A response body carrying an [`InFlight`] guard.
struct GuardedBody {
    inner: RespBody,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection closed for idleness gets to finish its shutdown (HTTP/2 GOAWAY and
/// PING exchange) before it is dropped: a dead peer must not keep it open.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Awaits a connection told to shut down gracefully, at most [`CLOSE_GRACE`].
pub async fn finish_closing<F>(conn: Pin<&mut F>) -> Result<(), hyper::Error>
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::time::timeout(CLOSE_GRACE, conn)
        .await
        .unwrap_or(Ok(()))
}

// ---------------------------------------------------------------------------------------------
// Blind tunnels.

/// Copies both ways like [`tokio::io::copy_bidirectional`] until either side closes, or until
/// no byte has moved in either direction for `idle`. Returns `true` when it stopped for idleness.
pub async fn copy_until_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::default();
    let mut a = Tracked {
        io: a,
        clock: &clock,
        upward: true,
    };
    let mut b = Tracked {
        io: b,
        clock: &clock,
        upward: false,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let left = idle.saturating_sub(clock.quiet_for());
        if left.is_zero() {
            return Ok(Moved {
                up: clock.up.load(Ordering::Relaxed),
                down: clock.down.load(Ordering::Relaxed),
                idle: true,
            });
        }
        tokio::select! {
            r = &mut copy => {
                // A side that ends with an error (a TLS peer closing without close_notify, a
                // reset) still moved what it moved: report the counts, not just the error.
                if let Err(e) = r {
                    tracing::debug!(error = %e, "relay ended with an error");
                }
                return Ok(Moved {
                    up: clock.up.load(Ordering::Relaxed),
                    down: clock.down.load(Ordering::Relaxed),
                    idle: false,
                });
            }
            _ = tokio::time::sleep(left) => {}
        }
    }
}

/// What a tunnel carried: bytes from the client (`up`) and back (`down`), and whether it
/// ended because nothing moved for the idle timeout.
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub up: u64,
    pub down: u64,
    pub idle: bool,
}

/// Last time bytes were read on either side of a tunnel, and how many each way.
struct Clock {
    base: Instant,
    last_ms: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }
}

impl Clock {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

struct Tracked<'a, T> {
    io: &'a mut T,
    clock: &'a Clock,
    /// Bytes read here go upstream (the client side).
    upward: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.clock.touch();
            let counter = if self.upward {
                &self.clock.up
            } else {
                &self.clock.down
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_flight_request_is_never_idle() {
        let a = Arc::new(Activity::default());
        let guard = a.begin();
        let limit = Duration::from_millis(200);
        let idle = a.idle_timeout(limit);
        tokio::pin!(idle);
        // A request in flight for 4x the limit: not idle.
        tokio::select! {
            _ = &mut idle => panic!("idle while a request was in flight"),
            _ = tokio::time::sleep(limit * 4) => {}
        }
        drop(guard);
        let started = Instant::now();
        idle.await;
        let waited = started.elapsed();
        assert!(waited >= limit && waited < limit * 3, "{waited:?}");
    }

    #[test]
    fn guarded_body_keeps_its_length_and_holds_the_connection_busy() {
        use hyper::body::Body;
        let a = Arc::new(Activity::default());
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed();
        let resp = hold_until_sent(Response::new(body), a.begin());
        assert_eq!(resp.body().size_hint().exact(), Some(5));
        assert!(a.idle_for().is_none());
        drop(resp);
        assert!(a.idle_for().is_some());
    }

    #[tokio::test]
    async fn tunnel_closes_when_quiet_and_not_while_bytes_flow() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let idle = Duration::from_millis(300);
        let pump = tokio::spawn(async move { copy_until_idle(&mut a, &mut b, idle).await });
        // Traffic every 100 ms for 900 ms keeps it open.
        for _ in 0..9 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!pump.is_finished());
        let started = Instant::now();
        let stopped_idle = pump.await.unwrap().unwrap();
        assert!(stopped_idle.idle);
        assert!(started.elapsed() < Duration::from_millis(600));
    }
}
