//! Request attributes from JSON bodies (and query strings), for Cedar (`context.request.*`).
//!
//! A mapping rule may name values to take from the request's JSON body with JSON Pointers
//! (RFC 6901), or from its query string with `?name`; one source, or a list of them (for APIs
//! that renamed a field):
//!
//! ```toml
//! [[rule]]
//! method = "POST"
//! host = "api.openai.com"
//! path = "/v1/chat/completions"
//! action_class = "model.inference.chat"
//! extract = { model = "/model", max_tokens = ["/max_completion_tokens", "/max_tokens"], stream = "/stream" }
//! ```
//!
//! The attribute names and their Cedar types are fixed ([`ATTRIBUTES`], declared in the shipped
//! schema as `RequestAttributes`); an unknown name stops the sidecar at load time naming file and
//! rule. Only requests whose rule extracts from the body have their body read before the
//! decision, up to `[sidecar.mapping] extract_max_body_bytes` (default 32 MiB; larger is
//! `BodyTooLarge`, 413, see `interceptor::body`); the body is then forwarded as read. A pointer
//! that finds nothing leaves the attribute absent: policies test `context.request has max_tokens`.
//!
//! **One reading** (`docs/llm-policies.md`): attributes are read the way the strictest upstream
//! would read them, so the policy never decides on another value than the one served. Refused
//! (`MalformedRequest`): a body that is not JSON, a value of the wrong type, any duplicated object
//! key, an object key on an extracted pointer's path that matches it only when case is ignored
//! (`Model` next to, or instead of, `model`), a query parameter named twice (in any case). When
//! several sources of one attribute are present, all are read: a number takes the largest
//! (`max_tokens` vs `max_completion_tokens`: the decision assumes the larger limit), a string or
//! boolean must be the same in all of them.

use serde::Deserialize;
use std::collections::BTreeMap;

mod fold;
mod inline;
mod pruned;

use fold::same_ignoring_case;
pub use inline::InlineData;

/// A Cedar type an attribute is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    String,
    Long,
    Bool,
}

/// The attributes a rule may extract, with their types (keep in step with
/// `policies/firma.cedarschema`, `RequestAttributes`).
pub const ATTRIBUTES: &[(&str, AttrType)] = &[
    ("model", AttrType::String),
    ("max_tokens", AttrType::Long),
    ("stream", AttrType::Bool),
    ("n", AttrType::Long),
    ("user", AttrType::String),
    ("service_tier", AttrType::String),
];

pub use firma_common::policy::AttrValue;

/// Values extracted from one request, by attribute name.
pub type Attributes = BTreeMap<String, AttrValue>;

/// `{name: value}` for the audit event (`envelope.intent.request`).
pub fn to_json(attrs: &Attributes) -> serde_json::Value {
    attrs
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AttrValue::String(s) => s.clone().into(),
                AttrValue::Long(n) => (*n).into(),
                AttrValue::Bool(b) => (*b).into(),
            };
            (k.clone(), v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `extract = { name = "/ptr" | ["/a", "/b"] }` as written in a rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawPointers {
    One(String),
    Many(Vec<String>),
}

/// Where an attribute is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// JSON Pointers into the body (`/model`).
    Body,
    /// Query-string parameters (`?model`), e.g. the Realtime API's WebSocket upgrade.
    Query,
}

/// One attribute to extract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extract {
    pub name: String,
    pub ty: AttrType,
    pub source: Source,
    /// JSON Pointers (body) or parameter names without the `?` (query).
    pub pointers: Vec<String>,
}

/// Whether `spec` reads anything from the body (then the body is read before the decision).
pub fn reads_body(spec: &[Extract]) -> bool {
    spec.iter().any(|x| x.source == Source::Body)
}

/// Validates a rule's `extract` table.
pub fn parse_spec(raw: BTreeMap<String, RawPointers>) -> Result<Vec<Extract>, String> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, ptrs) in raw {
        let Some((_, ty)) = ATTRIBUTES.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = ATTRIBUTES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "extract.{name}: unknown request attribute (known: {})",
                known.join(", ")
            ));
        };
        let pointers = match ptrs {
            RawPointers::One(p) => vec![p],
            RawPointers::Many(v) => v,
        };
        if pointers.is_empty() {
            return Err(format!(
                "extract.{name}: expected at least one JSON Pointer"
            ));
        }
        let source_of = |p: &str| match p.as_bytes().first() {
            Some(b'/') => Some(Source::Body),
            Some(b'?') if p.len() > 1 => Some(Source::Query),
            _ => None,
        };
        let mut source = None;
        for p in &pointers {
            let Some(s) = source_of(p) else {
                return Err(format!(
                    "extract.{name}: {p:?} is neither a JSON Pointer into the body (\"/field\", \"/a/b\") nor a query parameter (\"?name\")"
                ));
            };
            if source.is_some_and(|have| have != s) {
                return Err(format!(
                    "extract.{name}: expected all sources in the body or all in the query string, not both"
                ));
            }
            source = Some(s);
        }
        let source = source.unwrap_or(Source::Body);
        let pointers = match source {
            Source::Body => pointers,
            Source::Query => pointers.into_iter().map(|p| p[1..].to_string()).collect(),
        };
        out.push(Extract {
            name,
            ty: *ty,
            source,
            pointers,
        });
    }
    Ok(out)
}

/// Parses `body` as JSON and extracts the body attributes of `spec` from it; `Err` is the
/// `MalformedRequest` detail.
pub fn extract(spec: &[Extract], body: &[u8]) -> Result<Attributes, String> {
    extract_measured(spec, body).map(|(attrs, _)| attrs)
}

/// [`extract`], and the body's [`InlineData`]. The body is parsed in one strict pass that
/// keeps only the nodes the pointers read (see [`pruned`]): no copy of its strings.
pub fn extract_measured(spec: &[Extract], body: &[u8]) -> Result<(Attributes, InlineData), String> {
    let pointers: Vec<_> = spec
        .iter()
        .filter(|x| x.source == Source::Body)
        .flat_map(|x| x.pointers.iter().map(|p| pruned::tokens(p)))
        .collect();
    let (doc, inline) = pruned::parse(&pointers, body)
        .map_err(|e| format!("request body is not valid JSON ({e}); this endpoint's mapping rule reads attributes from it"))?;
    let mut out = Attributes::new();
    for x in spec.iter().filter(|x| x.source == Source::Body) {
        let mut found = Vec::with_capacity(x.pointers.len());
        for ptr in &x.pointers {
            let Some(v) = lookup(&doc, ptr)?.filter(|v| !v.is_null()) else {
                continue;
            };
            found.push((ptr.as_str(), typed(x, ptr, v)?));
        }
        if let Some(v) = merge(x, found)? {
            out.insert(x.name.clone(), v);
        }
    }
    Ok((out, inline))
}

/// Extracts the query attributes of `spec` from `query` (the raw query string, no `?`).
pub fn extract_query(spec: &[Extract], query: Option<&str>) -> Result<Attributes, String> {
    let mut out = Attributes::new();
    let specs: Vec<&Extract> = spec.iter().filter(|x| x.source == Source::Query).collect();
    if specs.is_empty() {
        return Ok(out);
    }
    let mut params: Vec<(String, &str)> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.push((percent_decode(k)?, v));
    }
    for x in specs {
        let mut found = Vec::with_capacity(x.pointers.len());
        for name in &x.pointers {
            let mut hits = params.iter().filter(|(k, _)| same_ignoring_case(k, name));
            let Some((key, raw)) = hits.next() else {
                continue;
            };
            if hits.next().is_some() {
                return Err(format!(
                    "query parameter {name:?} is given more than once; upstreams disagree on which one counts"
                ));
            }
            if key != name {
                return Err(case_variant(&format!("query parameter {key:?}"), name));
            }
            if raw.contains('+') {
                return Err(format!(
                    "query parameter {name:?} contains '+', which upstreams read as a space or as '+'; use %20 or %2B"
                ));
            }
            let text = percent_decode(raw)?;
            let v = match x.ty {
                AttrType::String => Some(AttrValue::String(text)),
                AttrType::Long => text
                    .parse::<i64>()
                    .ok()
                    .filter(|_| text.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
                    .map(AttrValue::Long),
                AttrType::Bool => match text.as_str() {
                    "true" => Some(AttrValue::Bool(true)),
                    "false" => Some(AttrValue::Bool(false)),
                    _ => None,
                },
            };
            let Some(v) = v else {
                return Err(format!(
                    "query parameter {name} ({}) must be {}",
                    x.name,
                    want(x.ty)
                ));
            };
            found.push((name.as_str(), v));
        }
        if let Some(v) = merge(x, found)? {
            out.insert(x.name.clone(), v);
        }
    }
    Ok(out)
}

fn want(ty: AttrType) -> &'static str {
    match ty {
        AttrType::String => "a string",
        AttrType::Long => "an integer",
        AttrType::Bool => "true or false",
    }
}

fn typed(x: &Extract, ptr: &str, v: &serde_json::Value) -> Result<AttrValue, String> {
    match (x.ty, v) {
        (AttrType::String, serde_json::Value::String(s)) => Ok(AttrValue::String(s.clone())),
        (AttrType::Long, serde_json::Value::Number(n)) if n.as_i64().is_some() => {
            Ok(AttrValue::Long(n.as_i64().unwrap_or_default()))
        }
        (AttrType::Bool, serde_json::Value::Bool(b)) => Ok(AttrValue::Bool(*b)),
        (ty, _) => Err(format!(
            "request body field {ptr} ({}) must be {}",
            x.name,
            want(ty)
        )),
    }
}

/// One value from every source that was present: the largest number; strings and booleans
/// must agree.
fn merge(x: &Extract, found: Vec<(&str, AttrValue)>) -> Result<Option<AttrValue>, String> {
    let mut it = found.into_iter();
    let Some((first_at, mut value)) = it.next() else {
        return Ok(None);
    };
    for (at, v) in it {
        match (&value, &v) {
            (AttrValue::Long(a), AttrValue::Long(b)) => {
                if b > a {
                    value = v;
                }
            }
            _ if v == value => {}
            _ => {
                return Err(format!(
                    "{first_at} and {at} ({}) disagree; upstreams differ on which one counts",
                    x.name
                ));
            }
        }
    }
    Ok(Some(value))
}

fn case_variant(found: &str, wanted: &str) -> String {
    format!("{found} differs from {wanted:?} only in case; upstreams disagree on whether it counts")
}

/// RFC 6901 lookup that refuses what a case-insensitive reader would see differently: at every
/// object on the way, exactly one key may match the token ignoring case, and it must match
/// exactly.
fn lookup<'a>(
    doc: &'a serde_json::Value,
    ptr: &str,
) -> Result<Option<&'a serde_json::Value>, String> {
    let mut cur = doc;
    for raw in ptr.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            serde_json::Value::Object(map) => {
                let mut hits = map.iter().filter(|(k, _)| same_ignoring_case(k, &token));
                let Some((key, v)) = hits.next() else {
                    return Ok(None);
                };
                if let Some((other, _)) = hits.next() {
                    return Err(format!(
                        "request body has both {key:?} and {other:?} for {ptr}; upstreams disagree on which one counts"
                    ));
                }
                if *key != token {
                    return Err(case_variant(&format!("request body key {key:?}"), &token));
                }
                v
            }
            serde_json::Value::Array(items) => {
                let ok = !token.is_empty()
                    && token.bytes().all(|b| b.is_ascii_digit())
                    && (token == "0" || !token.starts_with('0'));
                match token.parse::<usize>().ok().filter(|_| ok) {
                    Some(i) => match items.get(i) {
                        Some(v) => v,
                        None => return Ok(None),
                    },
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
    }
    Ok(Some(cur))
}

/// `%XX` decoding (UTF-8); a malformed escape or invalid UTF-8 is refused.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => out.push(v),
                None => return Err(format!("query string has a malformed %-escape in {s:?}")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("query string {s:?} is not UTF-8 once decoded"))
}

/// `body` (a JSON object already read by [`extract`]) with `stream_options.include_usage` set
/// to `true`: the object's members are re-emitted in order with their values byte for byte,
/// except `stream_options`, whose members are kept the same way and whose `include_usage` is
/// replaced (or added). A key that differs from those two only in case is refused (a
/// case-insensitive upstream could read it instead).
pub fn with_include_usage(body: &[u8]) -> Result<Vec<u8>, String> {
    let members = object_members(body)?;
    let mut out = Vec::with_capacity(body.len() + 40);
    out.push(b'{');
    let mut seen = false;
    for (key, value) in &members {
        if !out.ends_with(b"{") {
            out.push(b',');
        }
        out.extend_from_slice(&serde_json::to_vec(key).unwrap_or_default());
        out.push(b':');
        if key == "stream_options" {
            seen = true;
            // `null` or anything not an object: replaced.
            let inner = object_members(value).unwrap_or_default();
            out.push(b'{');
            for (k, v) in inner.iter().filter(|(k, _)| k != "include_usage") {
                if same_ignoring_case(k, "include_usage") {
                    return Err(case_variant(
                        &format!("request body key stream_options.{k:?}"),
                        "include_usage",
                    ));
                }
                out.extend_from_slice(&serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                out.extend_from_slice(v);
                out.push(b',');
            }
            out.extend_from_slice(b"\"include_usage\":true}");
        } else if same_ignoring_case(key, "stream_options") {
            return Err(case_variant(
                &format!("request body key {key:?}"),
                "stream_options",
            ));
        } else {
            out.extend_from_slice(value);
        }
    }
    if !seen {
        if !out.ends_with(b"{") {
            out.push(b',');
        }
        out.extend_from_slice(b"\"stream_options\":{\"include_usage\":true}");
    }
    out.push(b'}');
    // What leaves must still be one JSON object with the same members.
    pruned::validate(&out)
        .map_err(|e| format!("request body could not be rewritten with include_usage ({e})"))?;
    Ok(out)
}

/// The members of the JSON object `text` as (decoded key, raw value bytes), in order.
fn object_members(text: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    let bad = || "request body is not a JSON object".to_string();
    let ws = |i: &mut usize| {
        while text.get(*i).is_some_and(|b| b" \t\r\n".contains(b)) {
            *i += 1;
        }
    };
    let mut i = 0;
    ws(&mut i);
    if text.get(i) != Some(&b'{') {
        return Err(bad());
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        match text.get(i) {
            Some(b'}') if out.is_empty() => break,
            Some(b'"') => {}
            _ => return Err(bad()),
        }
        let k0 = i;
        i = skip_string(text, i).ok_or_else(bad)?;
        let key: String = serde_json::from_slice(&text[k0..i]).map_err(|_| bad())?;
        ws(&mut i);
        if text.get(i) != Some(&b':') {
            return Err(bad());
        }
        i += 1;
        ws(&mut i);
        let v0 = i;
        i = skip_value(text, i).ok_or_else(bad)?;
        out.push((key, &text[v0..i]));
        ws(&mut i);
        match text.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => break,
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Parses `body` as one JSON value refusing duplicate keys at any depth (also used for MCP).
pub(crate) fn parse_strict(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(body).map(|s| s.0)
}

/// End of the string starting at `i` (a `"`).
fn skip_string(t: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match t.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// End of the (valid) JSON value starting at `i`.
fn skip_value(t: &[u8], mut i: usize) -> Option<usize> {
    match t.get(i)? {
        b'"' => skip_string(t, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match t.get(i)? {
                    b'"' => {
                        i = skip_string(t, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            while t.get(i).is_some_and(|b| !b",}] \t\r\n".contains(b)) {
                i += 1;
            }
            Some(i)
        }
    }
}

/// A JSON value that refuses duplicate object keys (see [`extract`]).
struct Strict(serde_json::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {k:?}"
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<Vec<Extract>, String> {
        #[derive(Deserialize)]
        struct T {
            extract: BTreeMap<String, RawPointers>,
        }
        parse_spec(toml::from_str::<T>(toml_text).unwrap().extract)
    }

    #[test]
    fn extracts_typed_values_with_fallback_pointers() {
        let s = spec(r#"extract = { model = "/model", max_tokens = ["/max_completion_tokens", "/max_tokens"], stream = "/stream" }"#).unwrap();
        let a = extract(&s, br#"{"model":"gpt-4o","max_tokens":512,"stream":true}"#).unwrap();
        assert_eq!(a["model"], AttrValue::String("gpt-4o".into()));
        assert_eq!(a["max_tokens"], AttrValue::Long(512));
        assert_eq!(a["stream"], AttrValue::Bool(true));
        let a = extract(
            &s,
            br#"{"model":"m","max_completion_tokens":9,"max_tokens":1}"#,
        )
        .unwrap();
        assert_eq!(a["max_tokens"], AttrValue::Long(9));
        assert!(!a.contains_key("stream"), "absent stays absent");
    }

    #[test]
    fn inline_data_urls_are_measured() {
        let s = spec(r#"extract = { model = "/model" }"#).unwrap();
        let body = br#"{"model":"m","messages":[{"content":[{"type":"text","text":"data: no"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],
            "x":["data:audio/wav;base64,BB", "data:image/png;base64,not base64!",
            "data:image/jpeg;base64,/9j/4A=="]}"#;
        let (_, inline) = extract_measured(&s, body).unwrap();
        // Text that starts with `data:`, audio and a payload that is not base64 do not count.
        assert_eq!(inline.count, 2);
        assert_eq!(
            inline.bytes,
            ("data:image/png;base64,AAAA".len() + "data:image/jpeg;base64,/9j/4A==".len()) as u64
        );
    }

    #[test]
    fn hostile_bodies_are_malformed() {
        let s = spec(r#"extract = { model = "/model", max_tokens = "/max_tokens" }"#).unwrap();
        assert!(
            extract(&s, b"not json")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            extract(&s, br#"{"max_tokens":"lots"}"#)
                .unwrap_err()
                .contains("/max_tokens (max_tokens) must be an integer")
        );
        assert!(extract(&s, br#"{"max_tokens":1.5}"#).is_err());
        assert!(extract(&s, br#"{"model":["a"]}"#).is_err());
        // Duplicate keys: parsers disagree on which one counts, so the policy could see
        // another model than the upstream serves. Refused, at any depth.
        assert!(
            extract(&s, br#"{"model":"a","model":"b"}"#)
                .unwrap_err()
                .contains("duplicate key \"model\"")
        );
        assert!(extract(&s, br#"{"model":"a","x":[{"k":1,"k":2}]}"#).is_err());
        // Nesting bombs stop at serde_json's recursion limit instead of the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(extract(&s, deep.as_bytes()).is_err());
    }

    /// Parser differentials a case-insensitive or last-wins upstream would read differently.
    #[test]
    fn one_reading_case_variants_and_largest_limit() {
        let s = spec(r#"extract = { model = "/model", max_tokens = ["/max_completion_tokens", "/max_tokens"], n = "/opts/n" }"#).unwrap();
        for body in [
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
            r#"{"MODEL":"gpt-4o"}"#,
            r#"{"model":"a","Max_Tokens":100000}"#,
            r#"{"model":"a","opts":{"N":9}}"#,
            // Kelvin sign: Unicode case folding reads it as `k`.
            "{\"model\":\"a\",\"max_to\u{212A}ens\":100000}",
        ] {
            let e = extract(&s, body.as_bytes()).unwrap_err();
            assert!(e.contains("upstreams disagree"), "{body}: {e}");
        }
        // Case variants of keys nobody extracts are not this rule's business.
        assert!(extract(&s, br#"{"model":"a","Messages":[],"messages":[]}"#).is_ok());
        // Both limits present: the larger decides, whichever field carries it.
        for body in [
            r#"{"model":"a","max_completion_tokens":100,"max_tokens":100000}"#,
            r#"{"model":"a","max_completion_tokens":100000,"max_tokens":100}"#,
        ] {
            let a = extract(&s, body.as_bytes()).unwrap();
            assert_eq!(a["max_tokens"], AttrValue::Long(100000), "{body}");
        }
        // Every present source is type-checked, not only the first.
        assert!(extract(&s, br#"{"max_completion_tokens":1,"max_tokens":"lots"}"#).is_err());
        let two = spec(r#"extract = { model = ["/model", "/engine"] }"#).unwrap();
        assert!(
            extract(&two, br#"{"model":"a","engine":"b"}"#)
                .unwrap_err()
                .contains("disagree")
        );
        assert!(extract(&two, br#"{"model":"a","engine":"a"}"#).is_ok());
    }

    #[test]
    fn query_parameters() {
        let s = spec(r#"extract = { model = "?model" }"#).unwrap();
        assert!(!reads_body(&s));
        let q = |q: &str| extract_query(&s, Some(q));
        assert_eq!(
            q("model=gpt-4o-mini&x=1").unwrap()["model"],
            AttrValue::String("gpt-4o-mini".into())
        );
        assert_eq!(
            q("mod%65l=gpt%2D4o").unwrap()["model"],
            AttrValue::String("gpt-4o".into())
        );
        assert!(q("x=1").unwrap().is_empty());
        assert!(extract_query(&s, None).unwrap().is_empty());
        for hostile in [
            "model=a&model=b",
            "model=a&Model=b",
            "MODEL=gpt-4o",
            "model=a&mod%45l=b",
            "model=gpt+4o",
            "model=%zz",
            "model=%+f",
            "model=%ff",
        ] {
            assert!(q(hostile).is_err(), "{hostile}");
        }
        assert!(
            spec(r#"extract = { model = ["?model", "/model"] }"#)
                .unwrap_err()
                .contains("not both")
        );
        assert!(spec(r#"extract = { model = "?" }"#).is_err());
    }

    #[test]
    fn include_usage_is_set_keeping_everything_else() {
        let cases = [
            (
                r#"{"model":"m", "stream":true,"messages":[{"a":"}{,\""}]}"#,
                r#"{"model":"m","stream":true,"messages":[{"a":"}{,\""}],"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#" { "stream_options" : {"x": [1, 2], "include_usage": false} , "seed":123456789012345678901234567890 } "#,
                r#"{"stream_options":{"x":[1, 2],"include_usage":true},"seed":123456789012345678901234567890}"#,
            ),
            (
                r#"{"stream_options":null,"n":1}"#,
                r#"{"stream_options":{"include_usage":true},"n":1}"#,
            ),
            ("{}", r#"{"stream_options":{"include_usage":true}}"#),
        ];
        for (body, want) in cases {
            let got = with_include_usage(body.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), want, "{body}");
        }
        for hostile in [
            r#"{"Stream_Options":{"include_usage":false}}"#,
            r#"{"stream_options":{"Include_Usage":false}}"#,
            "[1]",
        ] {
            assert!(with_include_usage(hostile.as_bytes()).is_err(), "{hostile}");
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(
            spec(r#"extract = { temperature = "/t" }"#)
                .unwrap_err()
                .contains("unknown request attribute")
        );
        assert!(
            spec(r#"extract = { model = "model" }"#)
                .unwrap_err()
                .contains("neither a JSON Pointer")
        );
        assert!(spec(r#"extract = { model = [] }"#).is_err());
    }
}
