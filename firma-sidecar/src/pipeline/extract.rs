//! Request attributes from JSON bodies, for Cedar (`context.request.*`).
//!
//! A mapping rule may name values to take from the request's JSON body with JSON Pointers
//! (RFC 6901); one pointer, or a list tried in order (the first present wins, for APIs that
//! renamed a field):
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
//! rule. Only requests whose rule extracts have their body read before the decision, up to
//! `[sidecar.mapping] extract_max_body_bytes` (default 1 MiB); the body is then forwarded
//! byte for byte. A body that is not JSON, is larger than the limit, or holds a value of the
//! wrong type (`max_tokens = "lots"`) is `MalformedRequest` (400). A pointer that finds nothing
//! leaves the attribute absent: policies test `context.request has max_tokens`.

use serde::Deserialize;
use std::collections::BTreeMap;

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

/// One attribute to extract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extract {
    pub name: String,
    pub ty: AttrType,
    pub pointers: Vec<String>,
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
        for p in &pointers {
            if !p.starts_with('/') {
                return Err(format!(
                    "extract.{name}: {p:?} is not a JSON Pointer into the body (expected \"/field\" or \"/a/b\")"
                ));
            }
        }
        out.push(Extract {
            name,
            ty: *ty,
            pointers,
        });
    }
    Ok(out)
}

/// Parses `body` as JSON and extracts `spec` from it; `Err` is the `MalformedRequest` detail.
pub fn extract(spec: &[Extract], body: &[u8]) -> Result<Attributes, String> {
    let doc = serde_json::from_slice::<Strict>(body)
        .map_err(|e| format!("request body is not valid JSON ({e}); this endpoint's mapping rule reads attributes from it"))?
        .0;
    let mut out = Attributes::new();
    for x in spec {
        let Some((ptr, v)) = x
            .pointers
            .iter()
            .find_map(|p| doc.pointer(p).filter(|v| !v.is_null()).map(|v| (p, v)))
        else {
            continue;
        };
        let value = match (x.ty, v) {
            (AttrType::String, serde_json::Value::String(s)) => AttrValue::String(s.clone()),
            (AttrType::Long, serde_json::Value::Number(n)) if n.as_i64().is_some() => {
                AttrValue::Long(n.as_i64().unwrap_or_default())
            }
            (AttrType::Bool, serde_json::Value::Bool(b)) => AttrValue::Bool(*b),
            (ty, _) => {
                let want = match ty {
                    AttrType::String => "a string",
                    AttrType::Long => "an integer",
                    AttrType::Bool => "true or false",
                };
                return Err(format!(
                    "request body field {ptr} ({}) must be {want}",
                    x.name
                ));
            }
        };
        out.insert(x.name.clone(), value);
    }
    Ok(out)
}

/// Parses `body` as one JSON value refusing duplicate keys at any depth (also used for MCP).
pub(crate) fn parse_strict(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(body).map(|s| s.0)
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
                .contains("JSON Pointer")
        );
        assert!(spec(r#"extract = { model = [] }"#).is_err());
    }
}
