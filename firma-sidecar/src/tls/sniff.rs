//! Classify the first bytes of a connection without consuming them for good.
//!
//! The bytes read are kept in the caller's buffer and replayed (see
//! [`crate::interceptor::rewind::Rewind`]) to whatever handles the connection next: the MITM
//! TLS acceptor, the HTTP server, or a blind tunnel.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Duration, Instant};

/// A ClientHello is at most a few KiB; more than this without a complete hello is not TLS
/// we are willing to parse.
const MAX_HELLO: usize = 64 * 1024;
const MAX_METHOD: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A complete, parseable TLS ClientHello; `sni` is the server name when sent.
    Tls { sni: Option<String> },
    /// Starts like an HTTP/1 request line (or the HTTP/2 preface).
    Http,
    /// Anything else, including TLS records that do not parse and silent clients.
    Unknown { detail: String },
    /// The client closed before sending anything.
    Closed,
}

fn looks_like_http(buf: &[u8]) -> Option<bool> {
    for (i, b) in buf.iter().enumerate() {
        match b {
            // A method is a token of capitals (and `-`, as in `M-SEARCH`), never starting with `-`.
            b'A'..=b'Z' if i < MAX_METHOD => continue,
            b'-' if i > 0 && i < MAX_METHOD => continue,
            b' ' if i > 0 => return Some(true),
            _ => return Some(false),
        }
    }
    if buf.len() >= MAX_METHOD {
        Some(false)
    } else {
        None
    }
}

/// Room made in the buffer before each read.
const READ_CHUNK: usize = 4096;

/// Reads from `stream` into `buf` until the protocol is known or `timeout` passes.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Sniffed {
    let deadline = Instant::now() + timeout;
    let mut acceptor = rustls::server::Acceptor::default();
    // How many bytes of `buf` the acceptor has seen (it keeps its own copy).
    let mut fed = 0;
    loop {
        if !buf.is_empty() {
            if buf[0] == 0x16 {
                let verdict = feed(&mut acceptor, &buf[fed..]);
                fed = buf.len();
                if let Some(done) = verdict {
                    return done;
                }
            } else {
                match looks_like_http(buf) {
                    Some(true) => return Sniffed::Http,
                    Some(false) => {
                        return Sniffed::Unknown {
                            detail: "neither TLS nor HTTP".into(),
                        };
                    }
                    None => {}
                }
            }
        }
        if buf.len() >= MAX_HELLO {
            return Sniffed::Unknown {
                detail: "TLS ClientHello larger than 64 KiB".into(),
            };
        }
        // Straight into `buf`'s spare room: no zeroed scratch buffer per connection.
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => {
                return Sniffed::Unknown {
                    detail: format!("no recognisable protocol within {timeout:?}"),
                };
            }
            Ok(Err(e)) => {
                return Sniffed::Unknown {
                    detail: format!("read error: {e}"),
                };
            }
            Ok(Ok(0)) if buf.is_empty() => return Sniffed::Closed,
            Ok(Ok(0)) => {
                return Sniffed::Unknown {
                    detail: "client closed before a complete ClientHello or request line".into(),
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn feed(acc: &mut rustls::server::Acceptor, mut bytes: &[u8]) -> Option<Sniffed> {
    while !bytes.is_empty() {
        if let Err(e) = acc.read_tls(&mut bytes) {
            return Some(Sniffed::Unknown {
                detail: format!("not a TLS ClientHello: {e}"),
            });
        }
    }
    match acc.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => Some(Sniffed::Tls {
            sni: accepted
                .client_hello()
                .server_name()
                .map(|s| s.to_ascii_lowercase()),
        }),
        Err((e, _alert)) => Some(Sniffed::Unknown {
            detail: format!("not a TLS ClientHello: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn a_method_starts_with_a_capital() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1"), Some(true));
        assert_eq!(looks_like_http(b"M-SEARCH * HTTP/1.1"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None);
        // Found by the tls_sniff fuzz target: "- " was taken for a request line.
        assert_eq!(looks_like_http(b"- -`\x16"), Some(false));
        assert_eq!(looks_like_http(b" GET"), Some(false));
    }
}
