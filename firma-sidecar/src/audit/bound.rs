//! Bounds on the fields a client controls, so one request cannot make one huge audit line.
//!
//! A field longer than its limit is cut at a character boundary and ends with
//! `…[truncated: N bytes]`, N being the original length in bytes. The limit counts the bytes
//! the text takes *once written as JSON* (a `"` costs 2, a control character up to 6), so a
//! path of quotes or control bytes is bounded the same as a path of letters. Limits
//! (docs/architecture.md, "Bounded fields"):
//!
//! | field | limit (JSON bytes) |
//! |---|---|
//! | `envelope.intent.resource.path` (query included) | [`PATH`] 1024 |
//! | `envelope.intent.resource.host` | [`HOST`] 256 |
//! | `envelope.intent.method` | [`METHOD`] 32 |
//! | `decision.detail` | [`DETAIL`] 1024 |
//! | every string inside `envelope.intent.request` / `dns` | [`VALUE`] 256, [`TOTAL`] 2048 in all |
//!
//! The workload (kernel- and attach-time facts) and the capability (a verified token) are not
//! client-controlled text and are written as they are. With these bounds a decision line stays
//! under about 8 KB whatever the request carried (typically well under 2 KB).

use serde_json::{Map, Value};
use std::borrow::Cow;

pub const PATH: usize = 1024;
pub const HOST: usize = 256;
pub const METHOD: usize = 32;
pub const DETAIL: usize = 1024;
pub const VALUE: usize = 256;
/// Members of `request`/`dns` objects and elements of their arrays kept; the rest are
/// replaced by one `"…[truncated: N more]"` entry.
pub const MEMBERS: usize = 32;
/// Bytes of JSON text one `request` or `dns` value keeps in all.
pub const TOTAL: usize = 2048;

/// Bytes `c` takes in serde_json's output.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `s`, or its head within `max` JSON bytes followed by the truncation marker.
pub fn text(s: &str, max: usize) -> Cow<'_, str> {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += json_len(c);
        if used > max {
            return Cow::Owned(format!("{}…[truncated: {} bytes]", &s[..i], s.len()));
        }
    }
    Cow::Borrowed(s)
}

/// `s` bounded to `max`, for optional fields.
pub fn opt(s: Option<&str>, max: usize) -> Option<Cow<'_, str>> {
    s.map(|s| text(s, max))
}

/// `v` as written if its JSON text fits [`TOTAL`], else a copy with every string bounded to
/// [`VALUE`], at most [`MEMBERS`] members or elements per object or array, nesting cut at
/// depth 4, and members dropped (with a marker) once [`TOTAL`] bytes are used.
pub fn value(v: &Value) -> Cow<'_, Value> {
    if serde_json::to_string(v).map_or(0, |t| t.len()) <= TOTAL {
        return Cow::Borrowed(v);
    }
    let mut budget = TOTAL;
    Cow::Owned(copy(v, 0, &mut budget))
}

/// `m` bounded like [`value`].
pub fn map(m: &Map<String, Value>) -> Cow<'_, Map<String, Value>> {
    if serde_json::to_string(m).map_or(0, |t| t.len()) <= TOTAL {
        return Cow::Borrowed(m);
    }
    let mut budget = TOTAL;
    match copy(&Value::Object(m.clone()), 0, &mut budget) {
        Value::Object(m) => Cow::Owned(m),
        _ => Cow::Owned(Map::new()),
    }
}

fn copy(v: &Value, depth: usize, budget: &mut usize) -> Value {
    let more = |n: usize| Value::String(format!("…[truncated: {n} more]"));
    let out = match v {
        Value::String(s) => Value::String(text(s, VALUE.min(*budget)).into_owned()),
        Value::Array(_) | Value::Object(_) if depth >= 4 => {
            Value::String("…[truncated: nested too deep]".into())
        }
        Value::Array(a) => {
            let mut out = Vec::new();
            for x in a.iter().take(MEMBERS) {
                if *budget < 32 {
                    break;
                }
                out.push(copy(x, depth + 1, budget));
            }
            if a.len() > out.len() {
                out.push(more(a.len() - out.len()));
            }
            Value::Array(out)
        }
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m.iter().take(MEMBERS) {
                if *budget < 32 {
                    break;
                }
                let k = text(k, VALUE).into_owned();
                *budget = budget.saturating_sub(k.len() + 4);
                out.insert(k, copy(x, depth + 1, budget));
            }
            if m.len() > out.len() {
                out.insert("…".into(), more(m.len() - out.len()));
            }
            Value::Object(out)
        }
        other => other.clone(),
    };
    if let Value::String(s) = &out {
        *budget = budget.saturating_sub(s.len() + 2);
    } else if !out.is_array() && !out.is_object() {
        *budget = budget.saturating_sub(8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_with_a_marker_and_its_length() {
        assert!(matches!(text("/v1/x", PATH), Cow::Borrowed("/v1/x")));
        let long = "/".to_string() + &"a".repeat(14 * 1024);
        let cut = text(&long, PATH);
        assert!(cut.starts_with("/aaa"));
        assert!(cut.ends_with(&format!("…[truncated: {} bytes]", long.len())));
        assert!(cut.len() < PATH + 40, "{}", cut.len());
    }

    #[test]
    fn the_limit_counts_json_bytes() {
        // Quotes and control bytes cost 2 and 6 once escaped: the written field stays bounded.
        for s in ["\"".repeat(5000), "\u{1}".repeat(5000), "é".repeat(5000)] {
            let cut = text(&s, PATH);
            let json = serde_json::to_string(&*cut).unwrap();
            assert!(json.len() < PATH + 60, "{} JSON bytes", json.len());
        }
        // Never splits a character.
        let s = "é".repeat(1000);
        let cut = text(&s, 11);
        assert!(cut.starts_with("ééééé…"), "{cut}");
    }

    #[test]
    fn values_are_bounded_recursively() {
        let small = serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 100});
        assert!(matches!(value(&small), Cow::Borrowed(_)));
        let big = serde_json::json!({
            "model": "m".repeat(10_000),
            "list": (0..100).collect::<Vec<_>>(),
            "deep": {"a": {"b": {"c": {"d": {"e": 1}}}}},
        });
        let b = value(&big);
        let text = serde_json::to_string(&*b).unwrap();
        assert!(text.len() < TOTAL + 200, "{} bytes: {text}", text.len());
        assert!(text.contains("truncated: 10000 bytes"), "{text}");
        assert!(text.contains("more]"), "{text}");
        // However wide and deep, the copy stays within the total.
        let wide: Value = (0..100)
            .map(|i| {
                (
                    format!("k{i}"),
                    serde_json::json!({"a": vec!["x".repeat(300); 40]}),
                )
            })
            .collect::<Map<String, Value>>()
            .into();
        let text = serde_json::to_string(&*value(&wide)).unwrap();
        assert!(text.len() < TOTAL + 400, "{} bytes", text.len());
        let deep = serde_json::json!({"a": {"b": {"c": {"d": {"e": "x".repeat(3000)}}}}});
        let text = serde_json::to_string(&*value(&deep)).unwrap();
        assert!(text.contains("nested too deep"), "{text}");
    }
}
