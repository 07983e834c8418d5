//! The upstream connection pool shared by every client connection.
//!
//! A request reuses an upstream connection only when everything that decides *who* the
//! upstream thinks is speaking is identical (see `docs/upstream-pool.md`): the host the
//! decision was made for, the socket address, the TLS server name the certificate was
//! verified for, the `SO_MARK` of the socket, the wire protocol asked for (h2c is only dialled
//! for gRPC over plaintext) and the identity of the credential the connector injects (a keyed
//! hash of the header name and value, never the value). So a connection that carried one
//! credential is never handed a request carrying another, a transparent-mode connection
//! (marked, to the original destination once bound to the name) never serves a proxy-mode request, and a rotated Vault
//! secret starts fresh connections.
//!
//! HTTP/2 connections are shared: every request with the same key multiplexes on one
//! connection. HTTP/1.1 connections are exclusive: a connection returns to the pool when its
//! response body has been read to the end (an abandoned body closes it). Idle connections are
//! dropped after [`IDLE_TIMEOUT`]; at most [`MAX_IDLE_PER_KEY`] idle HTTP/1.1 connections and
//! [`MAX_KEYS`] keys are kept.

use crate::http_body::ReqBody;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::{http1, http2};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// An idle connection older than this is closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per key.
pub const MAX_IDLE_PER_KEY: usize = 32;
/// Distinct keys kept; beyond it, new connections are not pooled.
pub const MAX_KEYS: usize = 1024;
/// How often the pool looks for expired connections (on use; there is no background task).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What must match for a connection to be reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub host: String,
    pub addr: SocketAddr,
    pub tls_name: Option<String>,
    pub mark: Option<u32>,
    /// Plaintext HTTP/2 with prior knowledge (gRPC to an `http://` upstream).
    pub h2c: bool,
    /// Keyed SHA-256 (first 16 bytes) of the injected credential header, `None` without one.
    pub credential: Option<[u8; 16]>,
    /// The connection worker whose runtime drives the connection (`crate::workers`): reused
    /// only there, so a request never wakes another thread to reach its upstream.
    pub worker: Option<usize>,
}

/// Fingerprints credentials with a per-process random key: equal credentials compare equal,
/// and nothing derived from a secret is predictable outside this process.
pub struct CredentialFingerprint {
    salt: [u8; 32],
}

impl CredentialFingerprint {
    pub fn new() -> Self {
        Self {
            salt: rand::random(),
        }
    }

    pub fn of(&self, header: &http::HeaderName, value: &http::HeaderValue) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(header.as_str().as_bytes());
        h.update([0u8]);
        h.update(value.as_bytes());
        let d: [u8; 32] = h.finalize().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }
}

impl Default for CredentialFingerprint {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection's request sender.
pub enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

impl Sender {
    pub fn protocol(&self) -> &'static str {
        match self {
            Sender::H1(_) => "http/1.1",
            Sender::H2(_) => "h2",
        }
    }
}

#[derive(Default)]
struct Inner {
    h1: HashMap<PoolKey, Vec<(Instant, http1::SendRequest<ReqBody>)>>,
    h2: HashMap<PoolKey, (Instant, http2::SendRequest<ReqBody>)>,
    last_sweep: Option<Instant>,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub idle_h1: usize,
    pub h2: usize,
}

#[derive(Default)]
pub struct Pool {
    inner: Mutex<Inner>,
}

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A usable connection for `key`, if the pool has one.
    pub fn checkout(&self, key: &PoolKey) -> Option<Sender> {
        let now = Instant::now();
        let mut inner = self.lock();
        sweep(&mut inner, now);
        if let Some((used, s)) = inner.h2.get_mut(key) {
            if !s.is_closed() && now.duration_since(*used) < IDLE_TIMEOUT {
                *used = now;
                return Some(Sender::H2(s.clone()));
            }
            inner.h2.remove(key);
        }
        let list = inner.h1.get_mut(key)?;
        // Newest first; a connection still finishing its last response stays for later.
        let mut found = None;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let (used, s) = &list[i];
            if s.is_closed() || now.duration_since(*used) >= IDLE_TIMEOUT {
                list.swap_remove(i);
            } else if s.is_ready() {
                found = Some(list.swap_remove(i).1);
                break;
            }
        }
        if list.is_empty() {
            inner.h1.remove(key);
        }
        found.map(Sender::H1)
    }

    /// Makes a new HTTP/2 connection available to every request with `key`.
    pub fn share_h2(&self, key: PoolKey, s: &http2::SendRequest<ReqBody>) {
        let mut inner = self.lock();
        if inner.h2.len() >= MAX_KEYS && !inner.h2.contains_key(&key) {
            return;
        }
        inner.h2.insert(key, (Instant::now(), s.clone()));
    }

    /// Returns an HTTP/1.1 connection whose exchange completed.
    fn put_h1(&self, key: PoolKey, s: http1::SendRequest<ReqBody>) {
        if s.is_closed() {
            return;
        }
        let mut inner = self.lock();
        if inner.h1.len() >= MAX_KEYS && !inner.h1.contains_key(&key) {
            return;
        }
        let list = inner.h1.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((Instant::now(), s));
        }
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            idle_h1: inner.h1.values().map(Vec::len).sum(),
            h2: inner.h2.len(),
        }
    }
}

fn sweep(inner: &mut Inner, now: Instant) {
    if inner
        .last_sweep
        .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
    {
        return;
    }
    inner.last_sweep = Some(now);
    inner
        .h2
        .retain(|_, (used, s)| !s.is_closed() && now.duration_since(*used) < IDLE_TIMEOUT);
    inner.h1.retain(|_, list| {
        list.retain(|(used, s)| !s.is_closed() && now.duration_since(*used) < IDLE_TIMEOUT);
        !list.is_empty()
    });
}

/// A response body that gives its HTTP/1.1 connection back to the pool once read to the end.
pub struct Release {
    inner: BoxBody<Bytes, hyper::Error>,
    back: Option<(Arc<Pool>, PoolKey, http1::SendRequest<ReqBody>)>,
}

impl Release {
    pub fn new(
        inner: BoxBody<Bytes, hyper::Error>,
        back: Option<(Arc<Pool>, PoolKey, http1::SendRequest<ReqBody>)>,
    ) -> Self {
        let mut r = Self { inner, back };
        if r.inner.is_end_stream() {
            r.release();
        }
        r
    }

    fn release(&mut self) {
        if let Some((pool, key, s)) = self.back.take() {
            pool.put_h1(key, s);
        }
    }
}

impl Body for Release {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_equal_for_equal_credentials_only() {
        let f = CredentialFingerprint::new();
        let h = http::header::AUTHORIZATION;
        let a = f.of(&h, &http::HeaderValue::from_static("Bearer a"));
        assert_eq!(a, f.of(&h, &http::HeaderValue::from_static("Bearer a")));
        assert_ne!(a, f.of(&h, &http::HeaderValue::from_static("Bearer b")));
        let other = http::HeaderName::from_static("x-api-key");
        assert_ne!(a, f.of(&other, &http::HeaderValue::from_static("Bearer a")));
        // Another process (another salt) derives something else from the same secret.
        assert_ne!(
            a,
            CredentialFingerprint::new().of(&h, &http::HeaderValue::from_static("Bearer a"))
        );
    }
}
