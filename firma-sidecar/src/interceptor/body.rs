//! Request bodies read before the decision, and answers sent while a client is still uploading.
//!
//! A rule that `extract`s attributes needs the body before Cedar runs, so the body is buffered:
//!
//! - **Per request** at most `[sidecar.mapping] extract_max_body_bytes` (32 MiB: a chat request
//!   with a few base64 images). A larger body is denied `BodyTooLarge` (413), from its
//!   `Content-Length` before a byte is read when the client declares it.
//! - **Across requests** the buffered bytes count against one budget,
//!   `extract_body_budget_bytes` (256 MiB). A body that does not fit is refused 503
//!   `BodyBudgetExhausted` with `Retry-After: 1` (SDKs retry 503), from its `Content-Length`
//!   before it is read when declared. We refuse rather than spool to disk: a spooled body would
//!   still have to be parsed, and a retry costs the client one round trip while a disk spool
//!   costs every request a write and read of its body. A body's share is held until the
//!   forwarded copy has been handed to the upstream connection.
//!
//! Answering early: a response to a request whose body is still arriving (a denial, a 413)
//! first reads and discards what is left of it (nothing is kept) up to [`DRAIN_MAX`] bytes or
//! [`DRAIN_TIME`], because clients such as httpx send their whole body before they read
//! anything and treat a reset during the upload as an error. If the body ends, the answer is
//! clean on every protocol. If not, the request body is kept open until the response has been
//! sent: over HTTP/2 the stream then ends with RST_STREAM(NO_ERROR) after the complete
//! response (RFC 9113 8.1; the h2 crate picks NO_ERROR only when the response was sent before
//! the body was dropped, CANCEL otherwise, which curl reports as a framing error; curl 7.88
//! still reports NO_ERROR during its upload as one, Node and curl 8 show the response); over
//! HTTP/1.1 the response says `Connection: close`. A request with `Expect: 100-continue` whose body was
//! never read is answered at once: the client has not sent it and will not.

use crate::connector::RespBody;
use crate::connector::dial::ReqBody;
pub use crate::pipeline::body_budget::{BodyBudget, Share};
use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Most of a refused body read and discarded before answering (a declared size above it is
/// not drained at all).
pub const DRAIN_MAX: u64 = 128 * 1024 * 1024;
/// Longest we spend discarding it (nginx's `lingering_time` default).
pub const DRAIN_TIME: Duration = Duration::from_secs(30);
/// Slices the buffered body is forwarded in (the budget share is released after the last).
const FORWARD_CHUNK: usize = 1024 * 1024;

/// Why a body was not buffered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Over the per-request limit (`declared`: what `Content-Length` said, if it said).
    TooLarge { limit: usize, declared: Option<u64> },
    /// The budget has no room for it now.
    Busy { budget: usize },
    /// Not received within the time allowed.
    Timeout(Duration),
    /// The client's body stream failed (reset, aborted upload, bad chunking).
    Client(String),
}

impl ReadError {
    /// The audit/response detail.
    pub fn detail(&self) -> String {
        match self {
            Self::TooLarge {
                limit,
                declared: Some(n),
            } => format!(
                "request body of {n} bytes is larger than {limit} bytes ([sidecar.mapping] extract_max_body_bytes); this endpoint's mapping rule reads attributes from it"
            ),
            Self::TooLarge { limit, .. } => format!(
                "request body larger than {limit} bytes ([sidecar.mapping] extract_max_body_bytes); this endpoint's mapping rule reads attributes from it"
            ),
            Self::Busy { budget } => format!(
                "the sidecar is buffering {budget} bytes of request bodies already ([sidecar.mapping] extract_body_budget_bytes); retry shortly"
            ),
            Self::Timeout(t) => format!("request body not received within {t:?}"),
            Self::Client(e) => format!("reading the request body: {e}"),
        }
    }
}

/// A body read into memory, with its share of the budget.
#[derive(Debug)]
pub struct Buffered {
    pub bytes: Bytes,
    share: Share,
}

impl Buffered {
    /// The body to forward: the same bytes, in [`FORWARD_CHUNK`] slices; the share is released
    /// when it is dropped (after the last slice went to the upstream connection).
    pub fn into_body(self) -> ReqBody {
        Replay {
            rest: self.bytes,
            _share: self.share,
        }
        .boxed()
    }
}

/// Admits a body of `declared` bytes (if declared) before reading it: over `limit` is
/// `TooLarge`, no room in `budget` is `Busy`. The share returned holds the declared size.
pub fn admit(
    declared: Option<u64>,
    limit: usize,
    budget: &Arc<BodyBudget>,
) -> Result<Share, ReadError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge { limit, declared });
    }
    let mut share = budget.share();
    if !share.grow(declared.map_or(0, |n| n as usize)) {
        return Err(ReadError::Busy {
            budget: budget.cap(),
        });
    }
    Ok(share)
}

/// Reads `body` into one buffer: at most `limit` bytes, within `time`, growing `share` (from
/// [`admit`]) as it goes when the body is larger than its share (chunked, or HTTP/2 DATA).
pub async fn read_buffered<B>(
    body: &mut B,
    mut share: Share,
    limit: usize,
    time: Duration,
) -> Result<Buffered, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let budget = share.budget_cap();
    let mut buf = BytesMut::with_capacity(share.held());
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ReadError::Client(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: nothing to extract from them
            };
            let needed = buf.len() + data.len();
            if needed > limit {
                return Err(ReadError::TooLarge {
                    limit,
                    declared: None,
                });
            }
            if needed > buf.capacity() {
                // Growing by doubling, the share with it.
                let cap = needed.max(buf.capacity() * 2).min(limit);
                if !share.grow(cap) {
                    return Err(ReadError::Busy { budget });
                }
                buf.reserve(cap - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(time, read).await {
        Err(_) => Err(ReadError::Timeout(time)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(Buffered {
            bytes: buf.freeze(),
            share,
        }),
    }
}

/// A buffered body forwarded in slices, holding its budget share until dropped.
struct Replay {
    rest: Bytes,
    _share: Share,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(FORWARD_CHUNK);
        let chunk = self.rest.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// `Expect: 100-continue`: the client waits for our go-ahead before sending the body.
pub fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// [`answer_unread`] for a whole request: `unread` says its body was never read by the sidecar,
/// so an `Expect: 100-continue` client is still waiting to send it (and is not asked to).
pub async fn answer_request<B>(
    req: http::Request<B>,
    unread: bool,
    resp: Response<RespBody>,
) -> Response<RespBody>
where
    B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
{
    let awaiting_continue = unread && expects_continue(req.headers());
    let http1 = req.version() < http::Version::HTTP_2;
    answer_unread(req.into_body(), awaiting_continue, http1, resp).await
}

/// Answers with `resp` a request whose body may still be arriving (see the module doc):
/// discards the rest of `body` up to [`DRAIN_MAX`] / [`DRAIN_TIME`] unless `awaiting_continue`
/// (an `Expect: 100-continue` body never read); if it did not end, keeps it open until `resp`
/// has been sent and, over HTTP/1, closes the connection after it.
pub async fn answer_unread<B>(
    mut body: B,
    awaiting_continue: bool,
    http1: bool,
    mut resp: Response<RespBody>,
) -> Response<RespBody>
where
    B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
{
    if body.is_end_stream() {
        return resp;
    }
    let small_enough = body.size_hint().exact().is_none_or(|n| n <= DRAIN_MAX);
    if !awaiting_continue && small_enough && drain(&mut body).await {
        return resp;
    }
    if http1 {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp.map(|inner| {
        KeepOpen {
            inner,
            _request_body: body,
        }
        .boxed()
    })
}

/// Reads and drops frames until the body ends (`true`), or [`DRAIN_MAX`] bytes, [`DRAIN_TIME`]
/// or an error.
async fn drain<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> bool {
    let mut seen = 0u64;
    tokio::time::timeout(DRAIN_TIME, async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if seen > DRAIN_MAX {
                        return false;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// A response body that keeps the request body alive until the response is done.
struct KeepOpen<B> {
    inner: RespBody,
    _request_body: B,
}

impl<B: Unpin> Body for KeepOpen<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a body that must be read before the decision was not: the denial to answer with.
pub fn body_refusal(e: &ReadError) -> crate::conn::Decision {
    let reason = match e {
        ReadError::TooLarge { .. } => crate::conn::DenyReason::BodyTooLarge,
        ReadError::Busy { .. } => crate::conn::DenyReason::BodyBudgetExhausted,
        ReadError::Timeout(_) | ReadError::Client(_) => crate::conn::DenyReason::MalformedRequest,
    };
    crate::conn::Decision::deny(reason, e.detail())
}

/// A request refused while reading its body for extraction.
pub struct Refused {
    pub req: http::Request<hyper::body::Incoming>,
    pub decision: crate::conn::Decision,
    /// No byte of the body was read (refused on its declared size).
    pub unread: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn chunks(parts: Vec<&'static [u8]>) -> impl Body<Data = Bytes, Error = String> + Unpin {
        StreamBody::new(tokio_stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, String>(Frame::data(Bytes::from_static(p)))),
        ))
    }

    #[tokio::test]
    async fn reads_within_limit_and_releases_the_share_when_forwarded() {
        let budget = BodyBudget::new(100);
        let mut body = chunks(vec![b"hello ", b"world"]);
        let share = admit(None, 50, &budget).unwrap();
        let got = read_buffered(&mut body, share, 50, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&got.bytes[..], b"hello world");
        assert!(budget.used() >= 11);
        let mut fwd = got.into_body();
        let mut out = Vec::new();
        while let Some(f) = fwd.frame().await {
            out.extend_from_slice(f.unwrap().data_ref().unwrap());
        }
        assert_eq!(out, b"hello world");
        drop(fwd);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn declared_too_large_is_refused_before_reading() {
        let budget = BodyBudget::new(1000);
        let err = admit(Some(51), 50, &budget).unwrap_err();
        assert_eq!(
            err,
            ReadError::TooLarge {
                limit: 50,
                declared: Some(51)
            }
        );
        assert!(err.detail().contains("extract_max_body_bytes"));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn undeclared_body_over_the_limit_is_too_large() {
        let budget = BodyBudget::new(1000);
        let mut body = chunks(vec![b"0123456789", b"0123456789", b"0123456789"]);
        let share = admit(None, 25, &budget).unwrap();
        let err = read_buffered(&mut body, share, 25, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { declared: None, .. }));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn budget_is_shared_and_refuses_what_does_not_fit() {
        let budget = BodyBudget::new(30);
        let mut a = Full::new(Bytes::from_static(&[1u8; 20]));
        let share = admit(Some(20), 25, &budget).unwrap();
        let held = read_buffered(&mut a, share, 25, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(budget.used(), 20);
        // Declared: refused up front.
        assert_eq!(
            admit(Some(20), 25, &budget).unwrap_err(),
            ReadError::Busy { budget: 30 }
        );
        // Undeclared: refused when it outgrows the room left.
        let mut c = chunks(vec![b"0123456789", b"0123456789"]);
        let share = admit(None, 25, &budget).unwrap();
        let err = read_buffered(&mut c, share, 25, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, ReadError::Busy { budget: 30 });
        assert_eq!(budget.used(), 20);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_body_that_stalls_times_out() {
        let budget = BodyBudget::new(100);
        let mut body = StreamBody::new(tokio_stream::pending::<Result<Frame<Bytes>, String>>());
        let share = admit(Some(10), 50, &budget).unwrap();
        let err = read_buffered(&mut body, share, 50, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err, ReadError::Timeout(Duration::from_millis(50)));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn expect_continue_is_recognised() {
        let mut h = http::HeaderMap::new();
        assert!(!expects_continue(&h));
        h.insert(http::header::EXPECT, "100-Continue".parse().unwrap());
        assert!(expects_continue(&h));
    }
}
