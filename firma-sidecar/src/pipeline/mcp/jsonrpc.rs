//! Strict JSON-RPC 2.0 parsing of an MCP request body.
//!
//! The policy must see what the server will act on, so anything two parsers could read
//! differently is refused rather than guessed: duplicate keys at any depth (JSON parsers
//! disagree on which one wins), a second JSON value after the first, nesting deeper than
//! [`MAX_DEPTH`], a `jsonrpc` other than `"2.0"`, an `id` that is neither a string nor an
//! integer, `params` that are not an object, and messages that are neither a request, a
//! notification nor a response. Escapes are decoded before anything is looked at
//! (`"tools\u002fcall"` *is* `tools/call`, as for the server).

use serde_json::{Map, Value};

/// Deepest nesting accepted anywhere in the body (objects and arrays).
pub const MAX_DEPTH: usize = 32;
/// Most messages in one batch.
pub const MAX_BATCH: usize = 32;

/// One JSON-RPC message as sent by the client.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMessage {
    /// `None` for a response (the client answering a server request).
    pub method: Option<String>,
    /// `None` for a notification.
    pub id: Option<Value>,
    pub params: Option<Map<String, Value>>,
}

/// The body: one message, or a batch (`batch = true`, at least one member).
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub messages: Vec<RawMessage>,
    pub batch: bool,
}

/// Parses `body`; `Err` is the `MalformedRequest` detail.
pub fn parse(body: &[u8]) -> Result<Body, String> {
    let doc = crate::pipeline::extract::parse_strict(body)
        .map_err(|e| format!("MCP request body is not valid JSON ({e})"))?;
    let d = depth(&doc);
    if d > MAX_DEPTH {
        return Err(format!(
            "MCP request body nests {d} levels deep (at most {MAX_DEPTH})"
        ));
    }
    match doc {
        Value::Array(items) => {
            if items.is_empty() {
                return Err("empty JSON-RPC batch".into());
            }
            if items.len() > MAX_BATCH {
                return Err(format!(
                    "JSON-RPC batch of {} messages (at most {MAX_BATCH})",
                    items.len()
                ));
            }
            let messages = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| message(v).map_err(|e| format!("batch member {i}: {e}")))
                .collect::<Result<_, _>>()?;
            Ok(Body {
                messages,
                batch: true,
            })
        }
        v => Ok(Body {
            messages: vec![message(v)?],
            batch: false,
        }),
    }
}

pub(super) fn depth(v: &Value) -> usize {
    // Iterative: the parser already bounds recursion, this must not add a stack risk.
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                max = max.max(d);
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            Value::Object(o) => {
                max = max.max(d);
                stack.extend(o.values().map(|x| (x, d + 1)));
            }
            _ => {}
        }
    }
    max
}

fn message(v: Value) -> Result<RawMessage, String> {
    let Value::Object(mut o) = v else {
        return Err("a JSON-RPC message must be an object".into());
    };
    match o.remove("jsonrpc") {
        Some(Value::String(s)) if s == "2.0" => {}
        _ => return Err("not a JSON-RPC 2.0 message (\"jsonrpc\": \"2.0\" missing)".into()),
    }
    let id = match o.remove("id") {
        None => None,
        Some(Value::String(s)) => Some(Value::String(s)),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
        Some(_) => return Err("JSON-RPC id must be a string or an integer".into()),
    };
    let params = match o.remove("params") {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(_) => return Err("MCP params must be an object".into()),
    };
    let has_result = o.contains_key("result") || o.contains_key("error");
    match o.remove("method") {
        Some(Value::String(m)) => {
            if has_result {
                return Err("a JSON-RPC message cannot be both a request and a response".into());
            }
            Ok(RawMessage {
                method: Some(m),
                id,
                params,
            })
        }
        Some(_) => Err("JSON-RPC method must be a string".into()),
        None if has_result && id.is_some() && params.is_none() => Ok(RawMessage {
            method: None,
            id,
            params: None,
        }),
        None => Err("neither a JSON-RPC request nor a response (no method)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_batch() {
        let b = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert!(!b.batch);
        assert_eq!(b.messages[0].method.as_deref(), Some("tools/list"));
        let b = parse(br#"[{"jsonrpc":"2.0","id":"a","method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#).unwrap();
        assert!(b.batch);
        assert_eq!(b.messages.len(), 2);
        assert_eq!(b.messages[1].id, None);
        let b = parse(br#"{"jsonrpc":"2.0","id":3,"result":{}}"#).unwrap();
        assert_eq!(b.messages[0].method, None);
    }

    #[test]
    fn hostile_bodies_are_refused() {
        for (body, why) in [
            (&b"not json"[..], "not valid JSON"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"a","method":"tools/call"}"#, "duplicate key"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#, "duplicate key"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping"} {"jsonrpc":"2.0","id":2,"method":"ping"}"#, "not valid JSON"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping"}[]"#, "not valid JSON"),
            (br#"{"id":1,"method":"ping"}"#, "JSON-RPC 2.0"),
            (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, "JSON-RPC 2.0"),
            (br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, "id must be"),
            (br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, "id must be"),
            (br#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#, "id must be"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}"#, "params"),
            (br#"{"jsonrpc":"2.0","id":1,"method":7}"#, "method must be"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#, "both"),
            (br#"{"jsonrpc":"2.0","id":1}"#, "no method"),
            (b"[]", "empty"),
            (b"42", "must be an object"),
            (b"[1]", "batch member 0"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(body));
        }
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{"a":{}1{}}}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(parse(deep.as_bytes()).unwrap_err().contains("levels deep"));
        let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(bomb.as_bytes()).is_err());
        let many = format!(
            "[{}]",
            vec![r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#; MAX_BATCH + 1].join(",")
        );
        assert!(parse(many.as_bytes()).unwrap_err().contains("at most"));
    }

    #[test]
    fn escapes_are_decoded_like_the_server_does() {
        let b = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools\u002fcall"}"#).unwrap();
        assert_eq!(b.messages[0].method.as_deref(), Some("tools/call"));
    }
}
