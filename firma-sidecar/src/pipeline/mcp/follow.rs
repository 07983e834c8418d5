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
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
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

/// Cuts an SSE byte stream into events as it arrives (lines end in `\n` or `\r\n`; an event
/// ends at an empty line). Holds only the bytes of the event in progress.
#[derive(Default)]
pub struct SseSplitter {
    pending: Vec<u8>,
    /// Where to resume looking for the end of the event.
    scanned: usize,
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
        loop {
            let from = self.scanned;
            match find_event_end(&self.pending, from) {
                Some(end) => {
                    let rest = self.pending.split_off(end);
                    out.push(std::mem::replace(&mut self.pending, rest));
                    self.scanned = 0;
                }
                None => {
                    // Resume a little before the end: a boundary may straddle chunks.
                    self.scanned = self.pending.len().saturating_sub(3);
                    break;
                }
            }
        }
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

/// End (exclusive) of the first event in `b`, searching from `from`: after `\n\n` or
/// `\n\r\n` (lines ending in `\n` or `\r\n`).
fn find_event_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        if b[i] == b'\n' {
            match b.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if b.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
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

    #[test]
    fn sse_is_split_incrementally_and_filtered_per_event() {
        let stream = format!(
            "event: endpoint\r\ndata: /messages/?session_id=1\r\n\r\n: keep-alive\n\nevent: message\ndata: {LIST}\n\nevent: message\r\ndata: {{\"jsonrpc\":\"2.0\",\"id\":5,\"error\":{{\"code\":1,\"message\":\"x\"}}}}\r\n\r\n"
        );
        // Every split point gives the same events.
        let whole = {
            let mut s = SseSplitter::default();
            let mut out = Vec::new();
            s.feed(stream.as_bytes(), 1 << 20, &mut out).unwrap();
            out
        };
        assert_eq!(whole.len(), 4);
        for cut in 1..stream.len() {
            let mut s = SseSplitter::default();
            let mut out = Vec::new();
            s.feed(&stream.as_bytes()[..cut], 1 << 20, &mut out)
                .unwrap();
            s.feed(&stream.as_bytes()[cut..], 1 << 20, &mut out)
                .unwrap();
            assert_eq!(out, whole, "cut at {cut}");
            assert_eq!(s.pending(), 0);
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
