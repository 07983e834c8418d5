//! One strict pass over a request body that keeps only what the extraction reads.
//!
//! Building a whole `serde_json::Value` of a body copied every string in it (a chat request's
//! 12 MB of message text or base64 images: an allocation and a copy as large as the body, on
//! top of the buffered body itself) only for [`super::lookup`] to read a few scalars. This
//! parse gives the same answer with less: it validates everything the full parse did (JSON
//! syntax, UTF-8, no duplicated key at any depth, serde_json's nesting limit), measures every
//! inline image string (`InlineData`), and keeps a `Value` that holds only the nodes on the
//! extraction pointers' paths:
//!
//! - in an object, the members whose key matches a pointer's next token *ignoring case* (so
//!   [`super::lookup`] still sees, and refuses, `Model` next to `model`);
//! - in an array, the items up to the largest index a pointer names (the others before it as
//!   `null`, so indices stay where they were; `lookup` only ever reaches the named ones);
//! - where a pointer ends, the value itself if it is a scalar, or an empty array or object of
//!   the same kind (an attribute is a scalar: `typed` refuses either kind whatever it holds).
//!
//! Everything else is checked and dropped as it is read: strings are borrowed from the body,
//! never copied. `pruned_parse_gives_the_full_parses_answer` compares this with the full parse.

use super::fold::same_ignoring_case;
use super::inline::{InlineData, is_inline_image};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// The pointer tokens still to follow below one node (RFC 6901, `~1`/`~0` decoded).
type Paths<'a, 'p> = &'a [&'p [Cow<'p, str>]];

/// Parses `body` strictly, keeping the nodes on `pointers`' paths (each pointer as its decoded
/// tokens), and measures its inline images.
pub(super) fn parse(
    pointers: &[Vec<Cow<'_, str>>],
    body: &[u8],
) -> Result<(Value, InlineData), serde_json::Error> {
    let paths: Vec<&[Cow<'_, str>]> = pointers.iter().map(Vec::as_slice).collect();
    let mut inline = InlineData::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let doc = Node {
        paths: &paths,
        inline: &mut inline,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((doc, inline))
}

/// Checks that `body` is one JSON value with no duplicated key at any depth, keeping nothing.
pub(super) fn validate(body: &[u8]) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    Skip {
        inline: &mut InlineData::default(),
    }
    .deserialize(&mut de)?;
    de.end()
}

/// The RFC 6901 tokens of `ptr` (`/a/b`), decoded.
pub(super) fn tokens(ptr: &str) -> Vec<Cow<'_, str>> {
    ptr.split('/')
        .skip(1)
        .map(|raw| {
            if raw.contains('~') {
                Cow::Owned(raw.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(raw)
            }
        })
        .collect()
}

/// The array index `token` names, as [`super::lookup`] reads it (digits, no leading zero).
fn index(token: &str) -> Option<usize> {
    let ok = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    token.parse().ok().filter(|_| ok)
}

fn measure(s: &str, inline: &mut InlineData) {
    if is_inline_image(s) {
        inline.count += 1;
        inline.bytes += s.len() as u64;
    }
}

/// A node some pointer path goes through or ends at.
struct Node<'a, 'p> {
    paths: Paths<'a, 'p>,
    inline: &'a mut InlineData,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.paths.is_empty() {
            Skip {
                inline: self.inline,
            }
            .deserialize(d)?;
            return Ok(Value::Null);
        }
        d.deserialize_any(self)
    }
}

impl Node<'_, '_> {
    /// Whether a pointer ends here (then a scalar is kept).
    fn ends_here(&self) -> bool {
        self.paths.iter().any(|p| p.is_empty())
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Into::into))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        measure(v, self.inline);
        // A pointer that goes on below a string finds nothing, as below `null`.
        Ok(if self.ends_here() {
            v.into()
        } else {
            Value::Null
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let last = self
            .paths
            .iter()
            .filter_map(|p| p.first().and_then(|t| index(t)))
            .max();
        let mut items = Vec::new();
        for i in 0usize.. {
            let more = match last {
                Some(last) if i <= last => {
                    let paths: Vec<&[Cow<'_, str>]> = self
                        .paths
                        .iter()
                        .filter(|p| p.first().and_then(|t| index(t)) == Some(i))
                        .map(|p| &p[1..])
                        .collect();
                    let item = seq.next_element_seed(Node {
                        paths: &paths,
                        inline: self.inline,
                    })?;
                    item.map(|v| items.push(v)).is_some()
                }
                _ => seq
                    .next_element_seed(Skip {
                        inline: self.inline,
                    })?
                    .is_some(),
            };
            if !more {
                break;
            }
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut seen = Seen::default();
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(Key)? {
            seen.insert(key.clone())?;
            let paths: Vec<&[Cow<'_, str>]> = self
                .paths
                .iter()
                .filter(|p| p.first().is_some_and(|t| same_ignoring_case(&key, t)))
                .map(|p| &p[1..])
                .collect();
            if paths.is_empty() {
                map.next_value_seed(Skip {
                    inline: self.inline,
                })?;
            } else {
                let v = map.next_value_seed(Node {
                    paths: &paths,
                    inline: self.inline,
                })?;
                out.insert(key.into_owned(), v);
            }
        }
        Ok(Value::Object(out))
    }
}

/// A value no pointer reads: validated, measured, dropped.
struct Skip<'a> {
    inline: &'a mut InlineData,
}

impl<'de> DeserializeSeed<'de> for Skip<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        measure(v, self.inline);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Skip {
                inline: self.inline,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = Seen::default();
        while let Some(key) = map.next_key_seed(Key)? {
            seen.insert(key)?;
            map.next_value_seed(Skip {
                inline: self.inline,
            })?;
        }
        Ok(())
    }
}

/// An object key, borrowed from the body unless it had escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// The keys of one object so far: a list while short (most objects), a hash set beyond.
#[derive(Default)]
struct Seen<'de> {
    few: Vec<Cow<'de, str>>,
    many: HashSet<Cow<'de, str>>,
}

/// Objects with more keys than this move from the list to the hash set.
const FEW: usize = 16;

impl<'de> Seen<'de> {
    /// Records `key`; a key seen before in this object is an error (see `super::extract`).
    fn insert<E: de::Error>(&mut self, key: Cow<'de, str>) -> Result<(), E> {
        let dup = if self.many.is_empty() {
            self.few.contains(&key)
        } else {
            self.many.contains(&key)
        };
        if dup {
            return Err(E::custom(format_args!("duplicate key {key:?}")));
        }
        if self.many.is_empty() {
            self.few.push(key);
            if self.few.len() > FEW {
                self.many.extend(self.few.drain(..));
            }
        } else {
            self.many.insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Extract, extract_measured, lookup, merge, parse_spec, typed};
    use super::*;
    use crate::pipeline::extract::{Attributes, RawPointers, Source, Strict};

    fn spec(toml_text: &str) -> Vec<Extract> {
        #[derive(serde::Deserialize)]
        struct T {
            extract: std::collections::BTreeMap<String, RawPointers>,
        }
        parse_spec(toml::from_str::<T>(toml_text).unwrap().extract).unwrap()
    }

    /// The extraction as it was before this module: the whole body as a `Value`.
    fn full(spec: &[Extract], body: &[u8]) -> Result<(Attributes, InlineData), String> {
        let doc = serde_json::from_slice::<Strict>(body)
            .map_err(|e| format!("request body is not valid JSON ({e}); this endpoint's mapping rule reads attributes from it"))?
            .0;
        let mut inline = InlineData::default();
        InlineData::of(&doc, &mut inline);
        let mut out = Attributes::new();
        for x in spec.iter().filter(|x| x.source == Source::Body) {
            let mut found = Vec::new();
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

    #[test]
    fn pruned_parse_gives_the_full_parses_answer() {
        let specs = [
            spec(
                r#"extract = { model = "/model", max_tokens = ["/max_completion_tokens", "/max_tokens"], stream = "/stream" }"#,
            ),
            spec(r#"extract = { model = "/messages/1/content", n = "/a~1b/0", user = "/t~0x" }"#),
            spec(r#"extract = { model = "/model", user = "/model/x", n = "/opts" }"#),
        ];
        let bodies: &[&str] = &[
            r#"{"model":"gpt-4o","max_tokens":512,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"m","max_completion_tokens":9,"max_tokens":1}"#,
            r#"{"model":"m","messages":[{"a":1,"a":2}]}"#,
            r#"{"model":"m","x":{"y":[{"k":"v"},{"k":"v","k":"w"}]}}"#,
            r#"{"Model":"a","model":"b"}"#,
            r#"{"MODEL":"a"}"#,
            "{\"model\":\"a\",\"max_to\u{212A}ens\":5}",
            r#"{"mod\u0065l":"escaped key","model":"dup after unescaping"}"#,
            r#"{"mod\u0065l":"escaped key"}"#,
            r#"{"model":"m","messages":[{"content":"zero"},{"content":"one"}]}"#,
            r#"{"messages":[{"content":"zero"},{"content":["not","a","string"]},{"content":"two","content":"dup"}]}"#,
            r#"{"messages":{"1":{"content":"object, not array"}}}"#,
            r#"{"a/b":[7,8],"t~x":"tilde"}"#,
            r#"{"a/b":{"0":7}}"#,
            r#"{"model":{"x":"nested"},"opts":{"n":1}}"#,
            r#"{"model":null,"max_tokens":null}"#,
            r#"{"model":"m","img":["data:image/png;base64,AAAA","data:image\/jpeg;base64,/9j/","data:text/plain;base64,AA"]}"#,
            r#"{"model":"data:image/png;base64,QUJD","k":{"data:image/png;base64,AA":"key, not counted"}}"#,
            r#"{"model":"m","max_tokens":1.5}"#,
            r#"{"model":"m","max_tokens":1e400}"#,
            r#"{"model":"m","s":"\ud800"}"#,
            r#"{"model":"m"} trailing"#,
            r#"{"model":"m",}"#,
            r#"[{"model":"m"}]"#,
            r#""just a string""#,
            "",
            "  { \"model\" : \"spaced\" , \"stream\" : false }  ",
        ];
        for s in &specs {
            for body in bodies {
                assert_eq!(
                    extract_measured(s, body.as_bytes()),
                    full(s, body.as_bytes()),
                    "{body}"
                );
            }
            // Invalid UTF-8 in a string nobody reads, and nesting bombs in a skipped member.
            let mut bad = br#"{"model":"m","x":""#.to_vec();
            bad.extend_from_slice(&[0xff, 0xfe]);
            bad.extend_from_slice(br#""}"#);
            assert!(extract_measured(s, &bad).is_err());
            assert_eq!(extract_measured(s, &bad), full(s, &bad));
            let deep = format!(
                r#"{{"model":"m","x":{}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert!(extract_measured(s, deep.as_bytes()).is_err());
            assert_eq!(
                extract_measured(s, deep.as_bytes()),
                full(s, deep.as_bytes())
            );
        }
    }

    #[test]
    fn validate_is_the_strict_parse_without_the_value() {
        for (body, ok) in [
            (r#"{"a":[1,{"b":"c"}]}"#, true),
            (r#"{"a":1,"a":2}"#, false),
            (r#"{"a":{"b":1,"b":1}}"#, false),
            (r#"{"a":1} x"#, false),
            ("{", false),
        ] {
            assert_eq!(validate(body.as_bytes()).is_ok(), ok, "{body}");
            assert_eq!(
                serde_json::from_slice::<Strict>(body.as_bytes()).is_ok(),
                ok,
                "{body}"
            );
        }
    }

    #[test]
    fn objects_with_many_keys_still_refuse_duplicates() {
        let mut body = String::from("{");
        for i in 0..100 {
            body.push_str(&format!("\"k{i}\":{i},"));
        }
        body.push_str("\"k3\":0}");
        assert!(
            validate(body.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("duplicate key \"k3\"")
        );
        body.truncate(body.len() - "\"k3\":0}".len() - 1);
        body.push('}');
        assert!(validate(body.as_bytes()).is_ok());
    }
}
