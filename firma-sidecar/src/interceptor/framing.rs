//! Every HTTP/1 request head on a connection gets the same checks, not just the first.
//!
//! hyper parses later requests on a keep-alive connection itself and tolerates shapes we refuse
//! (it drops `Content-Length` when `Transfer-Encoding` is present, and accepts heads up to its
//! read-buffer size). [`FramingGuard`] sits between the client stream and hyper: it holds each
//! request head until it is complete, validates it with [`head::parse`] (size, framing,
//! duplicate `Host`), releases it to hyper only when it passes, and then follows the body
//! (`Content-Length` or chunked) so it knows where the next head starts. A head that fails is
//! never seen by hyper: the guard marks the connection rejected, `serve_http` shuts hyper down
//! gracefully (earlier responses complete), and the guard writes the JSON 400 before closing.

use super::head::{self, MAX_HEAD};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Longest chunk-size line (size, extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the size line; `len` bytes of it so far, size accumulated.
    Size {
        len: usize,
        size: u64,
        digits: u8,
        ext: bool,
        cr: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines; `line` bytes of the current one.
    Trailer {
        line: usize,
        cr: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    Chunked(Chunk),
    Rejected,
    /// After a WebSocket upgrade request: what follows is the upgraded protocol (or, when the
    /// upgrade is refused, nothing: the refusal closes the connection, see `websocket`), so the
    /// bytes go to hyper unchecked.
    Passthrough,
}

/// Shared between the guard (inside hyper) and `serve_http`.
#[derive(Default)]
pub struct Verdict {
    detail: Mutex<Option<String>>,
    pub notify: Notify,
    /// The client shut down its write side right behind a complete request (see
    /// [`FramingGuard`]'s held EOF): `serve_http` answers what is in flight, then closes.
    pub half_closed: Notify,
    /// Where the guard stands, for parking an idle connection (see `park`): heads released to
    /// hyper so far, ...
    heads: AtomicU64,
    /// ... whether every byte read so far was handed over and the stream sits between two
    /// messages (a partial head held back does not count: it stays with the guard), ...
    between: AtomicBool,
    /// ... bytes written since the last completed flush, ...
    unflushed: AtomicBool,
    /// ... and whether the connection is being shut down.
    closing: AtomicBool,
}

impl Verdict {
    /// Why the connection was rejected, once it was.
    pub fn rejected(&self) -> Option<String> {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Heads released to hyper so far.
    pub fn heads(&self) -> u64 {
        self.heads.load(Ordering::Relaxed)
    }

    /// Nothing is in transit between the client and hyper on either side: every byte the
    /// guard read went to hyper and ended a message, every byte hyper wrote was flushed, and
    /// no shutdown started. With every released head answered, hyper then holds no state a
    /// fresh connection would not have.
    pub fn quiescent(&self) -> bool {
        self.between.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
    }
}

pub struct FramingGuard<S> {
    inner: S,
    state: State,
    /// The head being accumulated (held back from hyper until it passes).
    head: Vec<u8>,
    /// Bytes checked and ready for hyper.
    ready: Vec<u8>,
    ready_pos: usize,
    verdict: Arc<Verdict>,
    /// The 400 still to write before shutdown, and how much of it was written.
    reply: Option<(Vec<u8>, usize)>,
    eof: bool,
    /// Bytes arrived and no read has been pending since: an EOF now came right behind them.
    fresh: bool,
    /// An EOF read right behind a complete request, never shown to hyper (see `poll_read`).
    eof_held: bool,
}

impl<S> FramingGuard<S> {
    pub fn new(inner: S, verdict: Arc<Verdict>) -> Self {
        Self {
            inner,
            state: State::Head,
            head: Vec::new(),
            ready: Vec::new(),
            ready_pos: 0,
            verdict,
            reply: None,
            eof: false,
            fresh: false,
            eof_held: false,
        }
    }

    fn reject(&mut self, detail: String) {
        self.state = State::Rejected;
        self.head.clear();
        let d =
            crate::conn::Decision::deny(crate::conn::DenyReason::MalformedRequest, detail.clone());
        self.reply = Some((crate::response::raw_deny(&d), 0));
        *self
            .verdict
            .detail
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(detail);
        self.verdict.notify.notify_one();
    }

    /// Runs `input` through the state machine, moving what passed to `ready`.
    fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Rejected => return,
                State::Passthrough => {
                    self.ready.extend_from_slice(input);
                    return;
                }
                State::Head => {
                    // A head may arrive in pieces: search from a little before the new bytes.
                    let from = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(input);
                    input = &[];
                    let Some(end) = self.head[from..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| from + p + 4)
                    else {
                        if self.head.len() > MAX_HEAD {
                            self.reject(format!(
                                "request head larger than {} KiB",
                                MAX_HEAD / 1024
                            ));
                        }
                        continue;
                    };
                    if end > MAX_HEAD {
                        self.reject(format!("request head larger than {} KiB", MAX_HEAD / 1024));
                        return;
                    }
                    let (body, upgrade) = match head::parse(&self.head[..end]) {
                        Ok(h) => {
                            let upgrade = h.body == head::BodyLength::None
                                && super::websocket::is_upgrade_head(&h.method, &h.headers);
                            (h.body, upgrade)
                        }
                        Err(head::HeadError::Malformed(d)) => {
                            self.reject(d);
                            return;
                        }
                        Err(_) => {
                            self.reject("invalid HTTP request".into());
                            return;
                        }
                    };
                    let rest = self.head.split_off(end);
                    self.verdict.heads.fetch_add(1, Ordering::Relaxed);
                    if self.ready.is_empty() {
                        // Hand the head's buffer over, so none stays behind for an idle wait.
                        self.ready = std::mem::take(&mut self.head);
                    } else {
                        self.ready.append(&mut self.head);
                        self.head = Vec::new();
                    }
                    self.state = match body {
                        _ if upgrade => State::Passthrough,
                        head::BodyLength::None => State::Head,
                        head::BodyLength::Length(n) => State::Body(n),
                        head::BodyLength::Chunked => State::Chunked(Chunk::Size {
                            len: 0,
                            size: 0,
                            digits: 0,
                            ext: false,
                            cr: false,
                        }),
                    };
                    if !rest.is_empty() {
                        // Re-feed what followed the head (body or a pipelined request).
                        self.feed(&rest);
                    }
                    return self.feed(input);
                }
                State::Body(0) => self.state = State::Head,
                State::Body(n) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    self.ready.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if n == take as u64 {
                        State::Head
                    } else {
                        State::Body(n - take as u64)
                    };
                }
                State::Chunked(Chunk::Data(n)) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    self.ready.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = State::Chunked(if n == take as u64 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(n - take as u64)
                    });
                }
                State::Chunked(c) => {
                    let b = input[0];
                    match step(c, b) {
                        Ok(Some(next)) => self.state = State::Chunked(next),
                        Ok(None) => self.state = State::Head,
                        Err(detail) => {
                            self.reject(format!("invalid chunked body: {detail}"));
                            return;
                        }
                    }
                    self.ready.push(b);
                    input = &input[1..];
                }
            }
        }
    }
}

/// One byte of chunked framing (not chunk data). `Ok(None)`: the message ended.
fn step(c: Chunk, b: u8) -> Result<Option<Chunk>, &'static str> {
    Ok(Some(match c {
        Chunk::Size {
            len,
            size,
            digits,
            ext,
            cr,
        } => {
            if len >= MAX_CHUNK_LINE {
                return Err("chunk-size line too long");
            }
            let len = len + 1;
            match b {
                b'\r' if !cr => Chunk::Size {
                    len,
                    size,
                    digits,
                    ext,
                    cr: true,
                },
                b'\n' if cr && digits > 0 => {
                    if size == 0 {
                        Chunk::Trailer { line: 0, cr: false }
                    } else {
                        Chunk::Data(size)
                    }
                }
                _ if cr => return Err("bare CR in chunk-size line"),
                b';' if digits > 0 => Chunk::Size {
                    len,
                    size,
                    digits,
                    ext: true,
                    cr,
                },
                _ if ext => {
                    if b < 0x20 && b != b'\t' {
                        return Err("control character in chunk extension");
                    }
                    Chunk::Size {
                        len,
                        size,
                        digits,
                        ext,
                        cr,
                    }
                }
                _ => {
                    let d = (b as char).to_digit(16).ok_or("chunk size is not hex")?;
                    if digits >= 15 {
                        return Err("chunk size too large");
                    }
                    Chunk::Size {
                        len,
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                        ext,
                        cr,
                    }
                }
            }
        }
        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
        Chunk::DataLf if b == b'\n' => Chunk::Size {
            len: 0,
            size: 0,
            digits: 0,
            ext: false,
            cr: false,
        },
        Chunk::DataCr | Chunk::DataLf => return Err("chunk data not followed by CRLF"),
        Chunk::Trailer { line, cr } => {
            if line >= MAX_HEAD {
                return Err("trailer too long");
            }
            match b {
                b'\r' if !cr => Chunk::Trailer { line, cr: true },
                b'\n' if cr && line == 0 => return Ok(None),
                b'\n' if cr => Chunk::Trailer { line: 0, cr: false },
                _ if cr => return Err("bare CR in trailer"),
                _ => Chunk::Trailer {
                    line: line + 1,
                    cr: false,
                },
            }
        }
        Chunk::Data(_) => unreachable!("chunk data is handled by the caller"),
    }))
}

impl<S: AsyncRead + Unpin> FramingGuard<S> {
    /// Reads from the client until something is ready for hyper (bytes, or the EOF), or the
    /// connection is rejected or its EOF held. `Pending` for hyper in the last two cases.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.ready_pos < self.ready.len() {
                return Poll::Ready(Ok(()));
            }
            if self.state == State::Rejected || self.eof_held {
                return Poll::Pending;
            }
            if self.eof {
                // An incomplete head goes to hyper as-is: it reports the truncated message.
                if !self.head.is_empty() {
                    self.ready = std::mem::take(&mut self.head);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.fresh = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if !got.is_empty() {
                        self.fresh = true;
                        self.feed(got);
                    } else if self.fresh && self.state == State::Head && self.head.is_empty() {
                        // EOF right behind a complete request (`nc -N`, scripts): the client
                        // half-closed and waits for the answer. hyper (like nginx and Envoy)
                        // takes an EOF on a busy connection for a client that left and drops
                        // the response, so it never sees this one: the request is answered,
                        // then the connection closed. An EOF that comes later, after a read
                        // was pending, is a client going away and reaches hyper as before
                        // (the `outcome` then says `client_gone`).
                        self.eof_held = true;
                        self.verdict.half_closed.notify_one();
                        return Poll::Pending;
                    } else {
                        self.eof = true;
                    }
                }
            }
        }
    }

    /// Resolves once the next request (a complete, checked head), the client's EOF or a
    /// rejection is there: what a parked connection waits for before hyper takes it back.
    /// Reads nothing out of the guard, so hyper sees every byte.
    pub fn poll_next_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // `poll_fill` is `Pending` for hyper on a rejected head or a held EOF; here they end
        // the wait.
        let r = self.poll_fill(cx);
        if self.state == State::Rejected || self.eof_held {
            return Poll::Ready(Ok(()));
        }
        r
    }

    /// Puts back bytes hyper had read but not parsed when its connection was taken apart:
    /// they passed the guard already and go out again first.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut ready = Vec::with_capacity(bytes.len() + self.ready.len() - self.ready_pos);
        ready.extend_from_slice(bytes);
        ready.extend_from_slice(&self.ready[self.ready_pos..]);
        self.ready = ready;
        self.ready_pos = 0;
        self.verdict.between.store(false, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // hyper waits in `poll_fill` on a rejected connection or a held EOF until serve_http
        // shuts it down (after answering the request in flight, for a held EOF).
        let r = this.poll_fill(cx);
        if let Poll::Ready(Ok(())) = r
            && this.ready_pos < this.ready.len()
        {
            let n = (this.ready.len() - this.ready_pos).min(buf.remaining());
            buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
            this.ready_pos += n;
            if this.ready_pos == this.ready.len() {
                if this.state == State::Head && this.head.is_empty() {
                    // Between requests: a keep-alive connection may now idle for
                    // minutes, holding no buffer.
                    this.ready = Vec::new();
                } else {
                    this.ready.clear();
                }
                this.ready_pos = 0;
            }
        }
        this.verdict.between.store(
            this.state == State::Head && this.ready_pos == this.ready.len() && !this.eof,
            Ordering::Relaxed,
        );
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.verdict.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            // hyper flushes the stream only once its own write buffer is empty.
            self.verdict.unflushed.store(false, Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.verdict.closing.store(true, Ordering::Relaxed);
        if let Some((bytes, pos)) = &mut this.reply {
            while *pos < bytes.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &bytes[*pos..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        *pos = bytes.len();
                    }
                    Poll::Ready(Ok(n)) => *pos += n,
                    Poll::Pending => return Poll::Pending,
                }
            }
            if Pin::new(&mut this.inner).poll_flush(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.verdict.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pass(input: &[u8]) -> (Vec<u8>, Option<String>) {
        let v = Arc::new(Verdict::default());
        let mut g = FramingGuard::new(input, v.clone());
        let mut out = Vec::new();
        let mut buf = [0u8; 7]; // small reads exercise the split paths
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(50), g.read(&mut buf)).await
            {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("{e}"),
            }
        }
        (out, v.rejected())
    }

    #[tokio::test]
    async fn passes_keep_alive_requests_unchanged() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, rejected) = pass(input).await;
        assert_eq!(rejected, None);
        assert_eq!(out, input);
    }

    /// The head's buffer is handed to `ready` (not copied) and both are freed between requests;
    /// an upgrade request's head and the bytes behind it (in the same read or trickled) all
    /// reach hyper, in order, and nothing after it is parsed as a head.
    #[tokio::test]
    async fn buffer_handovers_keep_every_byte() {
        let upgrade: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85frameGET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, rejected) = pass(upgrade).await;
        assert_eq!(rejected, None);
        assert_eq!(out, upgrade);
        // Cut anywhere: the first part in one read, the rest in a second.
        for split in 1..upgrade.len() {
            let (a, b) = upgrade.split_at(split);
            let v = Arc::new(Verdict::default());
            let mut g = FramingGuard::new(a.chain(b), v.clone());
            let mut out = Vec::new();
            let mut buf = [0u8; 5];
            loop {
                match g.read(&mut buf).await.unwrap() {
                    0 => break,
                    n => out.extend_from_slice(&buf[..n]),
                }
            }
            assert_eq!(out, upgrade, "split at {split}");
            assert_eq!(v.rejected(), None);
        }

        // Between keep-alive requests the guard holds no buffer.
        let one = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut g = FramingGuard::new(&one[..], Arc::new(Verdict::default()));
        let mut buf = [0u8; 64];
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], one);
        assert_eq!(
            (g.ready.capacity(), g.head.capacity()),
            (0, 0),
            "nothing held while idle"
        );
    }

    #[tokio::test]
    async fn rejects_smuggling_on_a_later_request() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        let (out, rejected) = pass(&input).await;
        assert_eq!(out, first, "the bad head never reaches hyper");
        assert!(rejected.unwrap().contains("Transfer-Encoding"));
    }

    #[tokio::test]
    async fn rejects_an_oversized_later_head() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(
            format!("GET /b HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000)).as_bytes(),
        );
        let (out, rejected) = pass(&input).await;
        assert_eq!(out, first);
        assert!(rejected.unwrap().contains("64 KiB"));
    }

    #[tokio::test]
    async fn rejects_bad_chunk_framing() {
        let input = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let (_, rejected) = pass(input).await;
        assert!(rejected.unwrap().contains("chunk"));
    }

    /// What parking relies on: the guard says when the stream is between messages with
    /// nothing unflushed, waits for a whole next head without consuming it, and bytes put
    /// back come out first, unchecked and in order.
    #[tokio::test]
    async fn parking_state_next_message_and_unread() {
        use std::future::poll_fn;
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1024);
        let v = Arc::new(Verdict::default());
        let mut g = FramingGuard::new(server, v.clone());
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(v.heads(), 1);
        assert!(v.quiescent(), "between messages after a whole request");
        g.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(!v.quiescent(), "written, not flushed");
        g.flush().await.unwrap();
        assert!(v.quiescent());

        // Half a head: still between messages (the guard keeps it); the wait goes on.
        client.write_all(b"GET /b HTTP/1.1\r\nHo").await.unwrap();
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            poll_fn(|cx| g.poll_next_message(cx)),
        )
        .await;
        assert!(
            waited.is_err(),
            "a partial head must not wake a parked connection"
        );
        assert!(v.quiescent());
        client.write_all(b"st: x\r\n\r\n").await.unwrap();
        poll_fn(|cx| g.poll_next_message(cx)).await.unwrap();
        assert_eq!(v.heads(), 2);

        // Bytes hyper had read but not parsed go out first, then the guard's own.
        g.unread(b"XY");
        let want: &[u8] = b"XYGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut out = Vec::new();
        while out.len() < want.len() {
            let n = g.read(&mut buf).await.unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, want);

        // A rejected head and the client's EOF both end a parked wait.
        client
            .write_all(b"GET /c HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
            .await
            .unwrap();
        poll_fn(|cx| g.poll_next_message(cx)).await.unwrap();
        assert!(v.rejected().is_some());
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = FramingGuard::new(server, Arc::new(Verdict::default()));
        client.shutdown().await.unwrap();
        poll_fn(|cx| g.poll_next_message(cx)).await.unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 0);
    }
}
