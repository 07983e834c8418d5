//! Strict reading of an HTTP/1 request head before hyper sees the connection.
//!
//! hyper rejects most malformed input itself, but answers with a bare 400/431 and no hook to
//! audit it. Reading the first head ourselves lets every such case get a JSON
//! `MalformedRequest` denial and an audit record, and rejects request-smuggling shapes hyper
//! tolerates (both `Content-Length` and `Transfer-Encoding`, duplicate `Content-Length`,
//! transfer codings other than `chunked`). Later requests on a keep-alive connection are
//! checked the same way by [`super::framing::FramingGuard`] before hyper sees them, and
//! hyper's own parse errors are audited from the connection result (see `interceptor::http`).

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Duration, Instant};

/// Largest request head accepted (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The HTTP/2 connection preface (prior knowledge, no ALPN).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The parts of a head the interceptors need.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub host_header: Option<String>,
    /// Bytes of the head in the buffer (anything after belongs to the body or tunnel).
    pub len: usize,
    /// How the body that follows is framed.
    pub body: BodyLength,
    /// All headers (a `CONNECT`'s Firma headers select its capability).
    pub headers: http::HeaderMap,
}

/// Request body framing, once [`check_framing`] made it unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub enum HeadError {
    /// Closed (or idle until the deadline) before sending a byte: not a request.
    Closed,
    /// The HTTP/2 preface: hand the connection to the HTTP/2 server.
    H2Preface,
    /// Anything else: deny `MalformedRequest` with this detail.
    Malformed(String),
}

/// Room made in the buffer before each read.
const READ_CHUNK: usize = 4096;

/// Reads into `buf` (which may already hold bytes) until a complete head, and validates it.
/// `buf` keeps every byte read, head and any body bytes after it, for replay.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Head, HeadError> {
    let deadline = Instant::now() + timeout;
    loop {
        if buf.starts_with(H2_PREFACE) {
            return Err(HeadError::H2Preface);
        }
        // The preface begins with `PRI * HTTP/2.0\r\n\r\n`, which on its own is a complete
        // (invalid) HTTP/1 head: while the bytes so far are a prefix of the preface, wait for
        // the rest, or an h2c client whose preface was split after that blank line is refused.
        let maybe_h2 = buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf);
        if let Some(end) = find_head_end(buf).filter(|_| !maybe_h2) {
            if end > MAX_HEAD {
                return Err(too_large());
            }
            return parse(&buf[..end]).map(|h| Head { len: end, ..h });
        }
        if buf.len() > MAX_HEAD {
            return Err(too_large());
        }
        // Straight into `buf`'s spare room: no scratch array in the future (which would sit
        // in every connection task's state for the connection's whole life) and no zeroing.
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) if buf.is_empty() => return Err(HeadError::Closed),
            Err(_) => {
                return Err(HeadError::Malformed(format!(
                    "incomplete request head after {timeout:?}"
                )));
            }
            // A client that opens a connection (or a TLS session) and leaves without a request,
            // with or without close_notify, is not sending anything malformed.
            Ok(Err(e))
                if buf.is_empty()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(HeadError::Closed);
            }
            Ok(Err(e)) => return Err(HeadError::Malformed(format!("read error: {e}"))),
            Ok(Ok(0)) if buf.is_empty() => return Err(HeadError::Closed),
            Ok(Ok(0)) => {
                return Err(HeadError::Malformed(
                    "connection closed in the middle of a request head".into(),
                ));
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn too_large() -> HeadError {
    HeadError::Malformed(format!("request head larger than {} KiB", MAX_HEAD / 1024))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses and validates one complete head (`head` ends with the blank line).
pub fn parse(head: &[u8]) -> Result<Head, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HeadError::Malformed("incomplete request head".into()));
        }
        Err(e) => return Err(HeadError::Malformed(format!("invalid HTTP request: {e}"))),
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default().to_string();
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("invalid header name {:?}", h.name)))?;
        let value = http::HeaderValue::from_bytes(h.value)
            .map_err(|_| HeadError::Malformed(format!("invalid value for header {}", h.name)))?;
        map.append(name, value);
    }
    check_framing(&map).map_err(HeadError::Malformed)?;
    let body = if map.contains_key(http::header::TRANSFER_ENCODING) {
        BodyLength::Chunked
    } else if let Some(cl) = map.get(http::header::CONTENT_LENGTH) {
        let n = cl
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| HeadError::Malformed("Content-Length out of range".into()))?;
        if n == 0 {
            BodyLength::None
        } else {
            BodyLength::Length(n)
        }
    } else {
        BodyLength::None
    };
    let hosts: Vec<_> = map.get_all(http::header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(HeadError::Malformed("more than one Host header".into()));
    }
    let host_header = hosts
        .first()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Head {
        method,
        target,
        host_header,
        len: head.len(),
        body,
        headers: map,
    })
}

/// Request-smuggling checks on parsed headers: one unambiguous body length.
pub fn check_framing(h: &http::HeaderMap) -> Result<(), String> {
    let cls: Vec<_> = h.get_all(http::header::CONTENT_LENGTH).iter().collect();
    let tes: Vec<_> = h.get_all(http::header::TRANSFER_ENCODING).iter().collect();
    if cls.len() > 1 {
        return Err("duplicate Content-Length headers".into());
    }
    if !cls.is_empty() && !tes.is_empty() {
        return Err("both Content-Length and Transfer-Encoding (request smuggling)".into());
    }
    if let Some(cl) = cls.first() {
        let ok = cl
            .to_str()
            .ok()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err("Content-Length is not a decimal number".into());
        }
    }
    if tes.len() > 1 {
        return Err("more than one Transfer-Encoding header".into());
    }
    if let Some(te) = tes.first()
        && !te
            .to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked"))
    {
        return Err("Transfer-Encoding other than exactly \"chunked\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head(bytes: &[u8]) -> Result<Head, HeadError> {
        let mut s = bytes;
        let mut buf = Vec::new();
        read_head(&mut s, &mut buf, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn rejects_smuggling_and_garbage() {
        assert!(head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.is_ok());
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"\x00\x01garbage\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad).await, Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000));
        assert!(matches!(
            head(big.as_bytes()).await,
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(head(b"").await, Err(HeadError::Closed)));
    }

    /// `read_head` reads straight into the replay buffer: whatever the cut of the client's
    /// bytes (one read, one byte per read, some already in the buffer), the buffer ends up
    /// holding every byte read, the head and what followed it, for the replay.
    /// One byte per read, every other poll `Pending` (woken at once), then `Pending` for good.
    struct Trickle<'a>(&'a [u8], bool);

    impl tokio::io::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.1 = !self.1;
            if self.1 || self.0.is_empty() {
                if !self.0.is_empty() {
                    cx.waker().wake_by_ref();
                }
                return std::task::Poll::Pending;
            }
            let data = self.0;
            buf.put_slice(&data[..1]);
            self.0 = &data[1..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn keeps_every_byte_read_whatever_the_cut() {
        let input: &[u8] =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85frame";
        let head_len = input.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        for split in 0..input.len() {
            let (a, b) = input.split_at(split);
            // Some bytes already buffered (sniffed), the rest one byte per read.
            let mut buf = a.to_vec();
            let mut s = Trickle(b, false);
            let h = read_head(&mut s, &mut buf, Duration::from_secs(1))
                .await
                .unwrap_or_else(|e| panic!("split at {split}: {e:?}"));
            assert_eq!(h.len, head_len, "split at {split}");
            assert!(buf.starts_with(&input[..head_len]), "split at {split}");
            assert!(input.starts_with(&buf), "split at {split}");
            // Everything in one read: the bytes behind the head stay in the buffer.
            let mut buf = Vec::new();
            let mut s = input;
            read_head(&mut s, &mut buf, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(buf, input);
        }
    }

    /// Found by the `http_head` fuzz target: the HTTP/2 preface split after its first blank
    /// line was parsed as a malformed HTTP/1 head.
    #[tokio::test]
    async fn h2_preface_split_across_reads_is_still_h2() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x12\x04\x00");
        for split in 1..H2_PREFACE.len() {
            let (a, b) = input.split_at(split);
            let mut s = a.chain(b);
            let mut buf = Vec::new();
            let r = read_head(&mut s, &mut buf, Duration::from_secs(1)).await;
            assert!(
                matches!(r, Err(HeadError::H2Preface)),
                "split at {split}: {r:?}"
            );
        }
        // A client that stops in the middle of the preface is malformed, not h2.
        let r = head(&H2_PREFACE[..18]).await;
        assert!(matches!(r, Err(HeadError::Malformed(_))), "{r:?}");
    }
}
