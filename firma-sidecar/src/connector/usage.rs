//! Token usage from LLM responses, read while they stream to the client.
//!
//! [`UsageTap`] wraps a response body: every frame is passed on at once (no buffering, no
//! delay) and a copy is fed to a [`UsageParser`]:
//! - `application/json` bodies are kept (up to [`MAX_JSON`]) and parsed at the end;
//! - `text/event-stream` bodies are parsed line by line as they pass (only the current,
//!   unfinished line is kept, up to [`MAX_LINE`]), reading the usage from the events that carry
//!   it: OpenAI chat chunks with `usage` (`stream_options.include_usage`), the Responses API's
//!   `response.completed`, Anthropic's `message_start` and `message_delta`.
//!
//! Field names: `prompt_tokens`/`completion_tokens` (OpenAI chat, completions, embeddings) or
//! `input_tokens`/`output_tokens` (OpenAI Responses, Anthropic). Values are cumulative, so the
//! largest one seen counts (a later, smaller report cannot lower it). A value that is not an
//! integer in `0..=`[`MAX_REPORTED`] makes the whole report unusable ([`Reported::rejected`]):
//! the caller charges the reservation instead. When the body ends (or the client goes away, or
//! the upstream breaks off), `done` gets what was seen.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::RespBody;

/// Largest JSON body kept for usage (larger: usage unknown).
pub const MAX_JSON: usize = 4 * 1024 * 1024;
/// Longest SSE line kept (longer lines are skipped).
pub const MAX_LINE: usize = 1024 * 1024;

/// More tokens than any model serves in one response: a report above it is refused.
pub const MAX_REPORTED: i64 = 100_000_000;

/// The key every usage report is under (`usage`, `message.usage`, `response.usage`).
const USAGE_KEY: &[u8] = b"\"usage\"";

/// Whether `needle` (non-empty) occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let (first, tail) = (needle[0], &needle[1..]);
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|&b| b == first) {
        let at = from + i + 1;
        if hay[at..].starts_with(tail) {
            return true;
        }
        from = at;
    }
    false
}

/// What one response reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    /// The usage, when the response carried a usable one.
    pub tokens: Option<Tokens>,
    /// Why the usage the response carried was refused (negative, absurd, not an integer).
    pub rejected: Option<String>,
}

/// Tokens one response reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: i64,
    pub output: i64,
}

enum Kind {
    Json { buf: Vec<u8>, overflow: bool },
    Sse { line: Vec<u8>, skipping: bool },
    Other,
}

pub struct UsageParser {
    kind: Kind,
    input: Option<i64>,
    output: Option<i64>,
    rejected: Option<String>,
}

impl UsageParser {
    /// By the response's `content-type` (and `content-encoding`: a compressed body cannot be
    /// read, see `docs/llm-policies.md`).
    pub fn for_response(headers: &http::HeaderMap) -> Self {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let encoded = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
        let kind = if encoded {
            Kind::Other
        } else if ct.starts_with("text/event-stream") {
            Kind::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else if ct.starts_with("application/json") || ct.is_empty() {
            Kind::Json {
                buf: Vec::new(),
                overflow: false,
            }
        } else {
            Kind::Other
        };
        Self {
            kind,
            input: None,
            output: None,
            rejected: None,
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        match &mut self.kind {
            Kind::Json { buf, overflow } => {
                if buf.len() + data.len() > MAX_JSON {
                    *overflow = true;
                    buf.clear();
                } else if !*overflow {
                    buf.extend_from_slice(data);
                }
            }
            Kind::Sse { .. } => self.feed_sse(data),
            Kind::Other => {}
        }
    }

    /// Splits `data` into lines. A line that starts and ends inside `data` is read in place;
    /// only a line split across frames is copied (into `line`, freed once it is complete), so
    /// a stream between events holds no buffer.
    fn feed_sse(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (part, tail) = rest.split_at(nl);
            rest = &tail[1..];
            let Kind::Sse { line, skipping } = &mut self.kind else {
                return;
            };
            if std::mem::take(skipping) {
                line.clear();
            } else if line.len() + part.len() > MAX_LINE {
                *line = Vec::new();
            } else if line.is_empty() {
                self.sse_line(part);
            } else {
                let mut whole = std::mem::take(line);
                whole.extend_from_slice(part);
                self.sse_line(&whole);
            }
        }
        if let Kind::Sse { line, skipping } = &mut self.kind
            && !*skipping
        {
            if line.len() + rest.len() > MAX_LINE {
                *line = Vec::new();
                *skipping = true;
            } else {
                line.extend_from_slice(rest);
            }
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Most events carry content, not usage: only an event naming a `usage` object is
        // parsed (every shape read below has the key spelled out; an upstream that escaped
        // it would only hide its own report, and the reservation is charged instead).
        if !contains(data, USAGE_KEY) {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            self.observe(&v);
        }
    }

    /// Takes usage from one JSON object (a whole body or one event).
    fn observe(&mut self, v: &Value) {
        for ptr in ["/usage", "/message/usage", "/response/usage"] {
            let Some(u) = v.pointer(ptr).filter(|u| u.is_object()) else {
                continue;
            };
            let mut field = |k: &str| -> Option<i64> {
                let raw = u.get(k).filter(|v| !v.is_null())?;
                match raw.as_i64().filter(|n| (0..=MAX_REPORTED).contains(n)) {
                    Some(n) => Some(n),
                    None => {
                        self.rejected.get_or_insert_with(|| {
                            format!("upstream reported {k} = {raw}, not an integer in 0..={MAX_REPORTED}")
                        });
                        None
                    }
                }
            };
            let prompt = field("prompt_tokens");
            let input = prompt.or_else(|| field("input_tokens"));
            let output = field("completion_tokens").or_else(|| field("output_tokens"));
            let total = field("total_tokens");
            if let Some(i) = input {
                self.input = Some(self.input.map_or(i, |have| have.max(i)));
            }
            if let Some(o) = output {
                self.output = Some(self.output.map_or(o, |have| have.max(o)));
            } else if prompt.is_some() && total.is_some() {
                // Embeddings: prompt and total only.
                self.output.get_or_insert(0);
            }
        }
    }

    /// What the response reported.
    pub fn finish(&mut self) -> Reported {
        if let Kind::Json { buf, overflow } = &mut self.kind
            && !*overflow
            && !buf.is_empty()
        {
            let body = std::mem::take(buf);
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                self.observe(&v);
            }
        }
        if let Kind::Sse { line, .. } = &mut self.kind
            && !line.is_empty()
        {
            let last = std::mem::take(line);
            self.sse_line(&last);
        }
        if let Some(why) = self.rejected.take() {
            return Reported {
                tokens: None,
                rejected: Some(why),
            };
        }
        Reported {
            tokens: (self.input.is_some() || self.output.is_some()).then(|| Tokens {
                input: self.input.unwrap_or(0),
                output: self.output.unwrap_or(0),
            }),
            rejected: None,
        }
    }
}

/// The cost in nano-USD of `tokens` at `price` (USD per 1k input, output tokens).
pub fn cost_nano_usd(price: (f64, f64), tokens: Tokens) -> i64 {
    let nano = (tokens.input as f64) * price.0 * 1e6 + (tokens.output as f64) * price.1 * 1e6;
    nano.round().clamp(0.0, i64::MAX as f64) as i64
}

/// Called once when the body ends: what was reported and whether the body completed.
pub type Done = Box<dyn FnOnce(Reported, bool) + Send + Sync>;

/// A response body that reports its usage when it ends (see the module docs).
pub struct UsageTap {
    inner: RespBody,
    parser: UsageParser,
    done: Option<Done>,
}

impl UsageTap {
    pub fn new(inner: RespBody, parser: UsageParser, done: Done) -> Self {
        Self {
            inner,
            parser,
            done: Some(done),
        }
    }

    fn end(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.parser.finish(), complete);
        }
    }
}

impl Body for UsageTap {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let d = d.clone();
                    self.parser.feed(&d);
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {}
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

impl Drop for UsageTap {
    fn drop(&mut self) {
        // The client went away mid-body: count what was seen (those tokens were spent).
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(chunks: &[&str]) -> Option<Tokens> {
        sse_reported(chunks).tokens
    }

    fn sse_reported(chunks: &[&str]) -> Reported {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "text/event-stream".parse().unwrap());
        let mut p = UsageParser::for_response(&h);
        for c in chunks {
            p.feed(c.as_bytes());
        }
        p.finish()
    }

    /// A hostile or broken upstream: negative, absurd or non-integer usage is refused as a
    /// whole (the caller charges the reservation); a later smaller report cannot lower a count.
    #[test]
    fn negative_absurd_and_shrinking_usage() {
        for bad in [
            r#"{"usage":{"prompt_tokens":10,"completion_tokens":-500000}}"#,
            r#"{"usage":{"input_tokens":-1,"output_tokens":4}}"#,
            r#"{"usage":{"prompt_tokens":10,"completion_tokens":1e30}}"#,
            r#"{"usage":{"prompt_tokens":10,"completion_tokens":"5"}}"#,
            r#"{"usage":{"prompt_tokens":10,"completion_tokens":100000001}}"#,
        ] {
            let r = sse_reported(&[&format!("data: {bad}\n\n")]);
            assert_eq!(r.tokens, None, "{bad}");
            assert!(r.rejected.is_some(), "{bad}");
        }
        let t = sse(&[
            "data: {\"usage\":{\"input_tokens\":25,\"output_tokens\":90}}\n\n",
            "data: {\"usage\":{\"output_tokens\":1}}\n\n",
        ]);
        assert_eq!(
            t,
            Some(Tokens {
                input: 25,
                output: 90
            })
        );
    }

    #[test]
    fn json_bodies_of_both_providers() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let mut p = UsageParser::for_response(&h);
        p.feed(br#"{"usage":{"prompt_tokens":12,"#);
        p.feed(br#""completion_tokens":5,"total_tokens":17}}"#);
        assert_eq!(
            p.finish().tokens,
            Some(Tokens {
                input: 12,
                output: 5
            })
        );
        let mut p = UsageParser::for_response(&h);
        p.feed(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#);
        assert_eq!(
            p.finish().tokens,
            Some(Tokens {
                input: 3,
                output: 4
            })
        );
        let mut p = UsageParser::for_response(&h);
        p.feed(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        assert_eq!(
            p.finish().tokens,
            Some(Tokens {
                input: 8,
                output: 0
            })
        );
        h.insert("content-encoding", "gzip".parse().unwrap());
        let mut p = UsageParser::for_response(&h);
        p.feed(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#);
        assert_eq!(p.finish().tokens, None, "compressed bodies are not read");
    }

    #[test]
    fn sse_events_split_anywhere() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":42,\"total_tokens\":142}}\n\ndata: [DONE]\n\n";
        for split in 0..openai.len() {
            let (a, b) = openai.split_at(split);
            assert_eq!(
                sse(&[a, b]),
                Some(Tokens {
                    input: 100,
                    output: 42
                }),
                "split at {split}"
            );
        }
        let anthropic = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\nevent: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        assert_eq!(
            sse(&[anthropic]),
            Some(Tokens {
                input: 25,
                output: 15
            })
        );
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2}}}\n\n";
        assert_eq!(
            sse(&[responses]),
            Some(Tokens {
                input: 9,
                output: 2
            })
        );
        assert_eq!(sse(&["data: {\"choices\":[]}\n\n"]), None);
    }

    /// Only events naming a `usage` object are parsed: content that merely mentions the word
    /// (even quoted, escaped inside a string) changes nothing, and a usage event split into
    /// one-byte frames is still read once complete.
    #[test]
    fn only_usage_events_are_parsed() {
        let t = sse(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\" key\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n",
        ]);
        assert_eq!(t, None);
        let event =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n";
        let bytes: Vec<String> = event.chars().map(String::from).collect();
        let frames: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(
            sse(&frames),
            Some(Tokens {
                input: 7,
                output: 3
            })
        );
        assert!(contains(b"ab\"usage\"", USAGE_KEY));
        assert!(!contains(b"\"usag", USAGE_KEY));
        assert!(!contains(b"", USAGE_KEY));
    }

    #[test]
    fn hostile_streams_stay_bounded() {
        // A line longer than the limit is skipped without being kept; later lines still count.
        let long = format!("data: {}", "x".repeat(MAX_LINE + 10));
        let t = sse(&[
            &long,
            "\ndata: {\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}\n",
        ]);
        assert_eq!(
            t,
            Some(Tokens {
                input: 1,
                output: 2
            })
        );
    }
}
