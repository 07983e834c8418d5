//! Following MCP answers (see `docs/mcp.md`, "Following responses"): the server's JSON
//! answer or SSE stream, one message (one SSE event) at a time.
//!
//! - `tools/list` results (any JSON-RPC result with a `tools` array, on the POST answer or the
//!   GET stream: the legacy transport answers there) keep only the tools the caller could call
//!   ([`Follower::listed`]); the others are removed before the client sees them.
//! - Every result is recorded with whether it was an error (a JSON-RPC `error`, or a tool
//!   result with `"isError": true`) for the `outcome` audit event.
//! - Server-initiated messages are parsed as strictly as the client's: one that cannot be
//!   parsed as a JSON-RPC 2.0 message (not JSON, duplicate keys, too deep, no `jsonrpc`, a
//!   method outside the character set) is **dropped** from the stream, so the client never
//!   acts on something the sidecar could not read. Well-formed ones pass and are counted.
//! - The legacy transport's `endpoint` event (where the client must POST) passes and tells
//!   the follower which path the listed tools will be called on.
//!
//! An SSE stream is parsed incrementally: bytes are held only until their event ends (at most
//! `max_event` bytes), every complete event is forwarded at once.

use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// Results recorded one by one in the audit (the rest only counted).
const MAX_RECORDED: usize = 64;

/// Decides whether a listed tool is kept: `(call_path, tool) -> could be called`.
pub type Listed = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What the answer contained, for the `outcome` event (`connector.mcp`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Followed {
    /// `{id, error}` of the first results.
    pub results: Vec<(Value, bool)>,
    pub result_count: u64,
    pub error_count: u64,
    /// Tools removed from `tools/list` answers.
    pub hidden: BTreeSet<String>,
    /// Server-initiated requests (method names, first ones) and notifications passed.
    pub server_requests: Vec<String>,
    pub notifications: u64,
    /// Messages dropped because they could not be parsed (see the module doc).
    pub dropped: u64,
    /// Why following stopped early (an event too large, an answer that could not be read).
    pub stopped: Option<String>,
}

impl Followed {
    pub fn to_json(&self) -> Value {
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|(id, e)| json!({"id": id, "error": e}))
            .collect();
        let mut o = json!({
            "results": results,
            "result_count": self.result_count,
            "error_count": self.error_count,
            "tools_hidden": self.hidden,
            "server_requests": self.server_requests,
            "notifications": self.notifications,
            "dropped": self.dropped,
        });
        if let Some(s) = &self.stopped {
            o["stopped"] = s.clone().into();
        }
        o
    }
}

/// Follows one answer (a POST's) or one stream (the GET's).
pub struct Follower {
    listed: Listed,
    /// Where tools are called (the POST's path, or the legacy `endpoint` event's).
    call_path: String,
    /// The legacy transport's session id, from the `endpoint` event (`session_id=` or
    /// `sessionId=`): denials of that session's POSTs are delivered on this stream.
    pub legacy_session: Option<String>,
    pub followed: Followed,
}

impl Follower {
    pub fn new(call_path: String, listed: Listed) -> Self {
        Self {
            listed,
            call_path,
            legacy_session: None,
            followed: Followed::default(),
        }
    }

    /// A whole JSON answer: `None` to forward it unchanged, else the bytes to send instead.
    /// An answer that is not JSON-RPC is forwarded unchanged when `must_filter` is false (it
    /// cannot be a tool list the client would read), else replaced by a JSON-RPC error.
    pub fn json(&mut self, body: &[u8], must_filter: bool) -> Option<Vec<u8>> {
        match self.message_bytes(body) {
            Ok(out) => out,
            Err(why) => {
                self.followed.stopped = Some(why.clone());
                must_filter.then(|| {
                    json!({"jsonrpc": "2.0", "id": null, "error": {
                        "code": -32603,
                        "message": format!("Firma could not read the MCP server's answer: {why}"),
                        "data": {"denied": true, "reason": "MalformedResponse", "detail": why},
                    }})
                    .to_string()
                    .into_bytes()
                })
            }
        }
    }

    /// One SSE event (its raw bytes, blank line included): the bytes to forward (the same,
    /// rewritten, or none when dropped).
    pub fn event(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let ev = parse_event(raw);
        match ev.kind.as_deref() {
            None | Some("message") if ev.data.is_some() => {}
            Some("endpoint") => {
                if let Some(d) = &ev.data {
                    self.endpoint(d);
                }
                return Some(raw.to_vec());
            }
            // Comments, keep-alives, other event types: nothing a client acts on as JSON-RPC.
            _ => return Some(raw.to_vec()),
        }
        let data = ev.data.unwrap_or_default();
        match self.message_bytes(data.as_bytes()) {
            Ok(None) => Some(raw.to_vec()),
            Ok(Some(new)) => {
                let mut out = Vec::with_capacity(new.len() + 32);
                if let Some(id) = &ev.id {
                    out.extend_from_slice(format!("id: {id}\n").as_bytes());
                }
                if let Some(k) = &ev.kind {
                    out.extend_from_slice(format!("event: {k}\n").as_bytes());
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&new);
                out.extend_from_slice(b"\n\n");
                Some(out)
            }
            Err(why) => {
                tracing::warn!(target: "firma_sidecar::mcp", %why, "dropped an MCP event the sidecar cannot read");
                self.followed.dropped += 1;
                None
            }
        }
    }

    fn endpoint(&mut self, data: &str) {
        // `/messages/?session_id=…` (relative) or an absolute URL on the same server.
        let rest = match data.find("://") {
            Some(i) => {
                let after = &data[i + 3..];
                after.find('/').map_or("/", |j| &after[j..])
            }
            None => data,
        };
        let path = rest.split(['?', '#']).next().unwrap_or("/");
        if path.starts_with('/') {
            self.call_path = path.to_owned();
        }
        self.legacy_session = legacy_session(rest);
    }

    /// One JSON-RPC message or batch from the server; `Ok(Some)` when rewritten.
    fn message_bytes(&mut self, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let mut doc = crate::pipeline::extract::parse_strict(body)
            .map_err(|e| format!("not valid JSON ({e})"))?;
        if super::jsonrpc::depth(&doc) > super::jsonrpc::MAX_DEPTH * 2 {
            return Err("nested too deep".into());
        }
        let changed = match &mut doc {
            Value::Array(items) if !items.is_empty() => {
                let mut changed = false;
                for m in items {
                    changed |= self.message(m)?;
                }
                changed
            }
            Value::Object(_) => self.message(&mut doc)?,
            _ => return Err("not a JSON-RPC message".into()),
        };
        Ok(changed.then(|| doc.to_string().into_bytes()))
    }

    /// One message; true when changed.
    fn message(&mut self, m: &mut Value) -> Result<bool, String> {
        let Value::Object(o) = m else {
            return Err("a JSON-RPC message must be an object".into());
        };
        if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err("not a JSON-RPC 2.0 message".into());
        }
        let has_id = o.contains_key("id");
        match o.get("method") {
            Some(Value::String(method)) => {
                if !super::classify::method_ok(method) {
                    return Err(format!("method {method:?} outside the character set"));
                }
                if has_id {
                    if self.followed.server_requests.len() < MAX_RECORDED {
                        self.followed.server_requests.push(method.clone());
                    }
                } else {
                    self.followed.notifications += 1;
                }
                Ok(false)
            }
            Some(_) => Err("JSON-RPC method must be a string".into()),
            None if has_id && (o.contains_key("result") || o.contains_key("error")) => {
                Ok(self.result(o))
            }
            None => Err("neither a request nor a response".into()),
        }
    }

    fn result(&mut self, o: &mut Map<String, Value>) -> bool {
        let f = &mut self.followed;
        let error = o.contains_key("error")
            || o.get("result")
                .and_then(|r| r.get("isError"))
                .and_then(Value::as_bool)
                == Some(true);
        f.result_count += 1;
        f.error_count += u64::from(error);
        if f.results.len() < MAX_RECORDED {
            f.results
                .push((o.get("id").cloned().unwrap_or(Value::Null), error));
        }
        let Some(Value::Array(tools)) = o.get_mut("result").and_then(|r| r.get_mut("tools")) else {
            return false;
        };
        let before = tools.len();
        let (listed, path, hidden) = (&self.listed, &self.call_path, &mut f.hidden);
        tools.retain(|t| {
            let name = t.get("name").and_then(Value::as_str);
            let keep = name.is_some_and(|n| super::classify::name_ok(n) && listed(path, n));
            if !keep {
                hidden.insert(name.unwrap_or("<unnamed>").chars().take(128).collect());
            }
            keep
        });
        tools.len() != before
    }
}

/// The `session_id` (or `sessionId`) query parameter of a legacy transport URL.
pub fn legacy_session(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1.split('#').next()?;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (matches!(k, "session_id" | "sessionId")
            && !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then(|| v.to_owned())
    })
}

/// One parsed SSE event.
#[derive(Debug, Default, PartialEq)]
struct Event {
    kind: Option<String>,
    id: Option<String>,
    /// `data` lines joined with `\n`; `None` without any.
    data: Option<String>,
}

fn parse_event(raw: &[u8]) -> Event {
    let text = String::from_utf8_lossy(raw);
    let mut ev = Event::default();
    for line in lines(&text) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => ev.kind = Some(value.to_owned()),
            "id" => ev.id = Some(value.to_owned()),
            "data" => match &mut ev.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => ev.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    ev
}

/// The lines of `text`, which end in `\r\n`, `\n` or a bare `\r` (the SSE specification).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match rest.find(['\r', '\n']) {
            None => (rest, ""),
            Some(i) => {
                let after = &rest[i + 1..];
                let after = match (rest.as_bytes()[i], after.strip_prefix('\n')) {
                    (b'\r', Some(a)) => a,
                    _ => after,
                };
                (&rest[..i], after)
            }
        };
        rest = next;
        Some(line)
    })
}

/// Cuts an SSE byte stream into events as it arrives: lines end in `\r\n`, `\n` or a bare
/// `\r` (the SSE specification), an event ends at an empty line. Holds only the bytes of the
/// event in progress.
///
/// An event whose last byte so far is a `\r` is complete at once, as for a client: the `\n`
/// that may follow (`\r\n`) is not awaited. Such a `\n`, arriving with the next chunk, is
/// handed on as a piece of its own (forwarded unchanged: at an event boundary it is at most an
/// empty line, which dispatches nothing).
#[derive(Default)]
pub struct SseSplitter {
    pending: Vec<u8>,
    /// Where to resume looking for the end of the event.
    scanned: usize,
    /// The current line has bytes (the scan is not at the start of a line).
    in_line: bool,
    /// The last byte scanned was a `\r`: a `\n` right after it is part of that line end.
    after_cr: bool,
}

impl SseSplitter {
    /// Feeds `chunk`; complete events (raw bytes, blank line included) go to `out`.
    /// `Err` when the event in progress exceeds `max_event` bytes.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        max_event: usize,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), String> {
        self.pending.extend_from_slice(chunk);
        let mut i = self.scanned;
        while i < self.pending.len() {
            let b = self.pending[i];
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            let cut = match b {
                // The `\n` of a `\r\n` whose `\r` ended the last event: a piece of its own.
                b'\n' if after_cr && i == 0 => Some(1),
                b'\n' if after_cr => None,
                // An empty line: the event ends, with the `\n` of a `\r\n` when it is here.
                b'\r' if !self.in_line && self.pending.get(i + 1) == Some(&b'\n') => {
                    self.after_cr = false;
                    Some(i + 2)
                }
                b'\r' | b'\n' if !self.in_line => Some(i + 1),
                b'\r' | b'\n' => {
                    self.in_line = false;
                    None
                }
                _ => {
                    self.in_line = true;
                    None
                }
            };
            match cut {
                Some(end) => {
                    let rest = self.pending.split_off(end);
                    out.push(std::mem::replace(&mut self.pending, rest));
                    i = 0;
                }
                None => i += 1,
            }
        }
        self.scanned = i;
        if self.pending.len() > max_event {
            return Err(format!(
                "an SSE event larger than {max_event} bytes ([sidecar.mcp] max_body_bytes)"
            ));
        }
        Ok(())
    }

    /// Bytes of an event that never ended (the stream closed mid-event).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower() -> Follower {
        Follower::new(
            "/mcp".into(),
            Box::new(|path, tool| path == "/mcp" && tool != "delete_repo"),
        )
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"read_file","inputSchema":{}},{"name":"delete_repo","inputSchema":{}},{"name":"bad name"}]}}"#;

    #[test]
    fn json_tool_lists_are_filtered() {
        let mut f = follower();
        let out = f.json(LIST.as_bytes(), true).expect("rewritten");
        let v: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> = v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read_file"]);
        assert!(f.followed.hidden.contains("delete_repo"));
        assert!(f.followed.hidden.contains("bad name"));
        // Nothing to hide: forwarded as is.
        let mut f = follower();
        let ok = r#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":true}}"#;
        assert_eq!(f.json(ok.as_bytes(), false), None);
        assert_eq!(f.followed.results, vec![(json!(3), true)]);
        assert_eq!(f.followed.error_count, 1);
        // Unreadable: unchanged unless a list must be filtered.
        let dup =
            r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[],"tools":[{"name":"delete_repo"}]}}"#;
        assert_eq!(follower().json(dup.as_bytes(), false), None);
        let e = follower().json(dup.as_bytes(), true).unwrap();
        assert!(String::from_utf8(e).unwrap().contains("MalformedResponse"));
    }

    /// Feeds `stream` cut at `cuts`; the pieces, and the events among them (pieces that are
    /// not just line ends).
    fn split(stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&stream.len()]) {
            s.feed(&stream[from..cut], 1 << 20, &mut out).unwrap();
            from = cut;
        }
        assert_eq!(s.pending(), 0, "cuts {cuts:?}");
        assert_eq!(out.concat(), stream, "every byte is handed on, in order");
        let events = out
            .iter()
            .filter(|e| e.iter().any(|b| !matches!(b, b'\r' | b'\n')))
            .cloned()
            .collect();
        (out, events)
    }

    #[test]
    fn sse_is_split_incrementally_and_filtered_per_event() {
        let stream = format!(
            "event: endpoint\r\ndata: /messages/?session_id=1\r\n\r\n: keep-alive\n\nevent: message\ndata: {LIST}\n\nevent: message\r\ndata: {{\"jsonrpc\":\"2.0\",\"id\":5,\"error\":{{\"code\":1,\"message\":\"x\"}}}}\r\n\r\n"
        );
        let (whole, _) = split(stream.as_bytes(), &[]);
        assert_eq!(whole.len(), 4);
        // Every split point gives the same events (a cut inside an event's final `\r\n`
        // hands its `\n` on as a piece of its own).
        for cut in 1..stream.len() {
            let (_, events) = split(stream.as_bytes(), &[cut]);
            let trimmed = |e: &[u8]| e.strip_suffix(b"\n").unwrap_or(e).to_vec();
            let events: Vec<Vec<u8>> = events.iter().map(|e| trimmed(e)).collect();
            let expected: Vec<Vec<u8>> = whole.iter().map(|e| trimmed(e)).collect();
            assert_eq!(events, expected, "cut at {cut}");
        }
        let mut f = Follower::new(
            "/sse".into(),
            Box::new(|path, tool| path == "/messages/" && tool == "read_file"),
        );
        let out: Vec<Vec<u8>> = whole.iter().filter_map(|e| f.event(e)).collect();
        assert_eq!(out[0], whole[0], "endpoint passes");
        assert_eq!(f.legacy_session.as_deref(), Some("1"));
        assert_eq!(out[1], whole[1], "comment passes");
        let listed = String::from_utf8(out[2].clone()).unwrap();
        assert!(listed.starts_with("event: message\ndata: {"), "{listed}");
        assert!(listed.contains("read_file") && !listed.contains("delete_repo"));
        assert_eq!(out[3], whole[3], "an error result passes");
        assert_eq!(
            f.followed.results,
            vec![(json!(2), false), (json!(5), true)]
        );
    }

    /// A bare `\r` ends a line, and two an event, as `\n` and `\r\n` do (the SSE
    /// specification): the events are the same wherever the chunks are cut, and what the
    /// follower reads is what a client reads.
    #[test]
    fn bare_cr_line_ends_are_line_ends() {
        let stream = format!(
            "event: endpoint\rdata: /messages/?session_id=7\r\r: ping\r\revent: message\rdata: {LIST}\r\rdata: {{\"jsonrpc\":\"2.0\",\r\ndata: \"id\":9,\"result\":{{\"isError\":true}}}}\n\r"
        );
        let b = stream.as_bytes();
        let (whole, events) = split(b, &[]);
        assert_eq!(whole.len(), 4, "{whole:?}");
        assert_eq!(events, whole);
        assert!(whole[0].ends_with(b"=7\r\r"));
        // Cut anywhere into two and into three pieces, and byte by byte: the same events.
        for i in 1..b.len() {
            assert_eq!(split(b, &[i]).1, whole, "cut at {i}");
            for j in (i + 1..b.len()).step_by(7) {
                assert_eq!(split(b, &[i, j]).1, whole, "cut at {i}, {j}");
            }
        }
        let every: Vec<usize> = (1..b.len()).collect();
        assert_eq!(split(b, &every).1, whole, "byte by byte");
        let mut f = Follower::new(
            "/sse".into(),
            Box::new(|path, tool| path == "/messages/" && tool == "read_file"),
        );
        let out: Vec<Vec<u8>> = whole.iter().filter_map(|e| f.event(e)).collect();
        assert_eq!(out.len(), 4);
        assert_eq!(f.legacy_session.as_deref(), Some("7"), "endpoint read");
        assert_eq!(out[1], whole[1], "comment passes");
        let listed = String::from_utf8(out[2].clone()).unwrap();
        assert!(
            listed.contains("read_file") && !listed.contains("delete_repo"),
            "the tool list is filtered: {listed}"
        );
        assert_eq!(
            out[3], whole[3],
            "a result split over two data lines passes"
        );
        assert_eq!(
            f.followed.results,
            vec![(json!(2), false), (json!(9), true)]
        );
        // A `\r` inside a data line ends it: the follower must not read `a\rb` as one value.
        let ev = parse_event(b"data: a\rdata: b\rid: 3\revent: x\r\r");
        assert_eq!(ev.data.as_deref(), Some("a\nb"));
        assert_eq!(
            (ev.id.as_deref(), ev.kind.as_deref()),
            (Some("3"), Some("x"))
        );
    }

    /// An event whose blank line ends in a bare `\r` at the end of a chunk is handed on at
    /// once (no waiting for a `\n` that may never come); a `\n` in the next chunk is a piece of
    /// its own.
    #[test]
    fn an_event_ending_in_cr_is_not_held() {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        s.feed(
            b"data: {\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}\r\r",
            1024,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1, "delivered without the next byte");
        assert_eq!(s.pending(), 0);
        s.feed(b"\ndata: x\r", 1024, &mut out).unwrap();
        assert_eq!(out[1], b"\n");
        assert_eq!(s.pending(), 8, "the next event is in progress");
        s.feed(b"\n\r\n", 1024, &mut out).unwrap();
        assert_eq!(out[2], b"data: x\r\n\r\n");
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn unreadable_server_messages_are_dropped() {
        let mut f = follower();
        for bad in [
            "data: not json\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"roots/list\",\"method\":\"x\"}\n\n",
            "data: {\"id\":1,\"method\":\"roots/list\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"roots list\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1}\n\n",
        ] {
            assert_eq!(f.event(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(f.followed.dropped, 5);
        let ok = "data: {\"jsonrpc\":\"2.0\",\"id\":\"s1\",\"method\":\"sampling/createMessage\",\"params\":{}}\n\n";
        assert_eq!(f.event(ok.as_bytes()).as_deref(), Some(ok.as_bytes()));
        assert_eq!(f.followed.server_requests, ["sampling/createMessage"]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        assert!(s.feed(&[b'a'; 100], 64, &mut out).is_err());
    }
}
