//! Connection admission and idle tracking (`[sidecar.limits]`).
//!
//! Every descriptor a client holds is one the sidecar cannot use for a policy reload, an audit
//! write or an upstream connect. So:
//! - [`Limits::admit`] caps concurrent connections in total and per client (peer IP in
//!   `http_proxy` mode, workload cgroup in `transparent` mode); a refused connection is closed
//!   at once and reported by one rate-limited WARN, never one line per connection.
//! - [`Limits::scope`] runs a connection task with its [`Timeouts`], which the HTTP server
//!   ([`Activity`]) and blind tunnels ([`copy_until_idle`]) read from a task-local, so the code in
//!   between needs no extra parameters.
//! - [`AcceptBackoff`] keeps an accept loop from spinning (and logging) on EMFILE.
//! - [`raise_nofile`] and [`Limits::from_config`] size `max_connections` so that two
//!   descriptors per connection plus a reserve fit in RLIMIT_NOFILE.

use crate::config::LimitsConfig;
use crate::http_body::RespBody;
use http::Response;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// The timeouts of the connection this task serves (the defaults outside [`Limits::scope`]).
pub fn timeouts() -> Timeouts {
    TIMEOUTS.try_with(|t| *t).unwrap_or_default()
}

/// Who a connection counts against for `max_connections_per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// `http_proxy` mode: the peer's IP address.
    Ip(IpAddr),
    /// `transparent` mode: the cgroup id of the workload that connected.
    Cgroup(u64),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Cgroup(id) => write!(f, "cgroup {id}"),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Total(usize),
    PerClient(usize),
}

impl Rejected {
    pub fn detail(&self) -> String {
        match self {
            Self::Total(n) => format!("the sidecar holds its maximum of {n} connections"),
            Self::PerClient(n) => format!("this client holds its maximum of {n} connections"),
        }
    }
}

/// The effective limits and the live counts.
pub struct Limits {
    timeouts: Timeouts,
    max_total: usize,
    max_per_client: usize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<ClientKey, usize>>,
    rejected_log: Throttle,
}

/// Held by an admitted connection; releases its slot when dropped.
pub struct Permit {
    limits: Arc<Limits>,
    key: ClientKey,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.limits.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Descriptors each connection may need: the client's and one upstream.
pub const FDS_PER_CONNECTION: usize = 2;

impl Limits {
    /// Applies `cfg`, lowering `max_connections` so the connections fit in `nofile` descriptors
    /// next to the `open_fds` already open and `cfg.fd_reserve`. Logs the effective limits.
    pub fn from_config(cfg: &LimitsConfig, nofile: Option<u64>, open_fds: usize) -> Arc<Self> {
        let fit = nofile.map(|n| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            (n.saturating_sub(open_fds + cfg.fd_reserve) / FDS_PER_CONNECTION).max(1)
        });
        let max_total = fit.map_or(cfg.max_connections, |f| f.min(cfg.max_connections));
        if max_total < cfg.max_connections {
            tracing::warn!(
                configured = cfg.max_connections,
                effective = max_total,
                nofile = ?nofile,
                open_fds,
                fd_reserve = cfg.fd_reserve,
                "max_connections lowered to fit RLIMIT_NOFILE ({FDS_PER_CONNECTION} descriptors per connection plus the reserve); raise the limit (e.g. LimitNOFILE=) to allow more"
            );
        }
        let this = Self::new(
            Timeouts::from_config(cfg),
            max_total,
            cfg.max_connections_per_client,
        );
        tracing::info!(
            max_connections = this.max_total,
            max_connections_per_client = this.max_per_client,
            idle_timeout_secs = cfg.idle_timeout_secs,
            tunnel_idle_timeout_secs = cfg.tunnel_idle_timeout_secs,
            h2_keepalive_interval_secs = cfg.h2_keepalive_interval_secs,
            nofile = ?nofile,
            "effective connection limits"
        );
        Arc::new(this)
    }

    pub fn new(timeouts: Timeouts, max_total: usize, max_per_client: usize) -> Self {
        Self {
            timeouts,
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            rejected_log: Throttle::new(REPORT_EVERY),
        }
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Connections currently admitted.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.per_client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more connection from `key`, or says why not (and reports refusals,
    /// rate-limited).
    pub fn admit(self: &Arc<Self>, key: ClientKey) -> Result<Permit, Rejected> {
        let verdict = {
            let mut map = self.lock();
            let mine = map.get(&key).copied().unwrap_or(0);
            if mine >= self.max_per_client {
                Err(Rejected::PerClient(self.max_per_client))
            } else if self.total.load(Ordering::Relaxed) >= self.max_total {
                Err(Rejected::Total(self.max_total))
            } else {
                self.total.fetch_add(1, Ordering::Relaxed);
                *map.entry(key).or_insert(0) += 1;
                Ok(Permit {
                    limits: self.clone(),
                    key,
                })
            }
        };
        if let Err(r) = &verdict
            && let Some(suppressed) = self.rejected_log.hit()
        {
            tracing::warn!(
                client = %key,
                open = self.open(),
                rejected_since_last_report = suppressed + 1,
                "connection limit reached: {}; refusing new connections (reported at most every {}s)",
                r.detail(),
                REPORT_EVERY.as_secs()
            );
        }
        verdict
    }

    /// Runs a connection task holding `permit`, with this sidecar's [`Timeouts`].
    pub fn scope<F>(&self, permit: Permit, fut: F) -> impl Future<Output = ()> + Send + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        TIMEOUTS.scope(self.timeouts, async move {
            let _permit = permit;
            fut.await
        })
    }
}

/// How often repeated WARNs (refusals, accept errors) are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Lets one event through per period and counts the ones it held back.
pub struct Throttle {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be reported, `n` being how many were held back since
    /// the last report; `None` when it is held back.
    pub fn hit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if at.elapsed() < self.period => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(Instant::now());
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accept errors.

/// Backoff for an accept loop: on EMFILE/ENFILE (and other resource errors) the pending
/// connection stays in the backlog and `accept` fails again at once, so sleep 10 ms doubling
/// to 1 s until an accept succeeds; log at most once per [`REPORT_EVERY`] with a count.
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    log: Throttle,
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            delay: BACKOFF_MIN,
            log: Throttle::new(REPORT_EVERY),
        }
    }

    /// An accept succeeded: the next error starts from the minimum delay again.
    pub fn reset(&mut self) {
        self.delay = BACKOFF_MIN;
    }

    /// Reports `e` (rate-limited) and sleeps as long as the error calls for.
    pub async fn failed(&mut self, e: &io::Error) {
        let delay = self.next_delay(e);
        if let Some(suppressed) = self.log.hit() {
            tracing::warn!(
                listener = self.what,
                error = %e,
                errors_since_last_report = suppressed + 1,
                backoff_ms = delay.as_millis() as u64,
                "accept failed (reported at most every {}s)",
                REPORT_EVERY.as_secs()
            );
        }
        tokio::time::sleep(delay).await;
    }

    fn next_delay(&mut self, e: &io::Error) -> Duration {
        if !is_resource_error(e) {
            // ECONNABORTED and friends concern one connection: try the next at once.
            return Duration::ZERO;
        }
        let d = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        d
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

// ---------------------------------------------------------------------------------------------
// Descriptors.

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit in force after
/// (`None` if it cannot be read or is unlimited).
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised RLIMIT_NOFILE soft limit");
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE");
                soft
            }
        }
    } else {
        soft
    };
    (soft != libc::RLIM_INFINITY).then_some(soft)
}

/// Descriptors this process has open now.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------------
// HTTP idle tracking.

/// Per-connection count of requests in flight and when the last one ended, so the server can
/// close a connection only when nothing is in flight (a request waiting minutes for its
/// response head, or a slow streaming response, is not idle).
pub struct Activity {
    inflight: AtomicUsize,
    base: Instant,
    /// Milliseconds since `base` at which the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            inflight: AtomicUsize::new(0),
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
        InFlight(self.clone())
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

/// A plain 503 with a JSON body for a refused `http_proxy` connection.
pub fn rejection_response(r: Rejected) -> Vec<u8> {
    let body = serde_json::json!({
        "denied": true,
        "reason": "ConnectionLimit",
        "detail": r.detail(),
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes what fits of `bytes` without waiting and closes: a refused connection must not cost
/// a task or time.
pub fn refuse(stream: tokio::net::TcpStream, bytes: &[u8]) {
    if !bytes.is_empty() {
        let _ = stream.try_write(bytes);
    }
    if let Ok(std) = stream.into_std() {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> Arc<Limits> {
        Arc::new(Limits::new(Timeouts::default(), total, per))
    }

    #[test]
    fn caps_total_and_per_client_and_releases() {
        let l = limits(3, 2);
        let a = ClientKey::Ip("127.0.0.1".parse().unwrap());
        let b = ClientKey::Cgroup(7);
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Rejected::PerClient(2)));
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Rejected::Total(3)));
        drop(p1);
        assert_eq!(l.open(), 2);
        assert!(l.admit(a).is_ok());
    }

    #[test]
    fn fd_limit_lowers_max_connections() {
        let cfg = LimitsConfig::default();
        let l = Limits::from_config(&cfg, Some(256), 20);
        assert_eq!(l.max_total(), (256 - 20 - 64) / 2);
        let l = Limits::from_config(&cfg, None, 20);
        assert_eq!(l.max_total(), cfg.max_connections);
    }

    #[test]
    fn throttle_reports_once_per_period_with_a_count() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.hit(), Some(2));
    }

    #[test]
    fn backoff_doubles_to_a_cap_only_for_resource_errors() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<_> = (0..9).map(|_| b.next_delay(&emfile)).collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert_eq!(delays[1], Duration::from_millis(20));
        assert_eq!(delays[8], Duration::from_secs(1));
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.next_delay(&aborted), Duration::ZERO);
        b.reset();
        assert_eq!(b.next_delay(&emfile), Duration::from_millis(10));
    }

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
