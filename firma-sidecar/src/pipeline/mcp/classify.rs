//! JSON-RPC message -> MCP action class, name and Cedar arguments.
//!
//! | method                     | action class          | name (in the resource)      |
//! |----------------------------|-----------------------|-----------------------------|
//! | `tools/call`               | `mcp.tools.call`      | `params.name` (`/tools/…`)  |
//! | `tools/list`               | `mcp.tools.list`      |                             |
//! | `resources/read`           | `mcp.resources.read`  | `params.uri` (`/resources/…`)|
//! | `prompts/get`              | `mcp.prompts.get`     | `params.name` (`/prompts/…`)|
//! | `initialize`               | `mcp.initialize`      |                             |
//! | `notifications/…` (no id)  | `mcp.notification`    |                             |
//! | anything else, responses   | `mcp.other`           |                             |
//!
//! Refused (`MalformedRequest`): a method or name outside the strict character sets, a case
//! variant of a known method (`Tools/Call`: a server may fold case, the policy would not), a
//! request without an id whose method is not a notification (a `tools/call` disguised as a
//! notification), a notification with an id, a `tools/call` without a name, declared
//! arguments of the wrong type.

use super::jsonrpc::RawMessage;
use super::spec::{ArgType, McpSpec};
use firma_common::policy::{AttrValue, McpContext};
use serde_json::{Map, Value};

/// The action classes MCP messages are given (declared in the shipped schema).
pub const ACTION_CLASSES: &[&str] = &[
    "mcp.tools.call",
    "mcp.tools.list",
    "mcp.resources.read",
    "mcp.prompts.get",
    "mcp.initialize",
    "mcp.notification",
    "mcp.other",
];

/// Methods of the MCP specification a client sends (for the case-variant check).
const KNOWN: &[&str] = &[
    "initialize",
    "ping",
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "logging/setLevel",
    "completion/complete",
];

const NOTIFICATION_PREFIX: &str = "notifications/";
const MAX_NAME: usize = 128;
const MAX_URI: usize = 2048;

/// One classified message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub action_class: &'static str,
    /// The JSON-RPC method (`"response"` for a client's answer to a server request).
    pub method: String,
    pub id: Option<Value>,
    /// Tool or prompt name, or resource URI.
    pub name: Option<String>,
    /// `/tools`, `/resources` or `/prompts`: where `name` goes in the resource id.
    pub kind: Option<&'static str>,
    /// All arguments as sent (for the audit: keys and a hash).
    pub arguments: Map<String, Value>,
    /// What Cedar sees as `context.mcp`.
    pub context: McpContext,
}

pub(super) fn method_ok(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= MAX_NAME
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'))
}

/// Tool and prompt names: the MCP specification's set, `[A-Za-z0-9_.-]{1,128}`.
pub(super) fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Resource URIs: printable ASCII without spaces (percent-encode the rest).
fn uri_ok(u: &str) -> bool {
    !u.is_empty() && u.len() <= MAX_URI && u.bytes().all(|b| b.is_ascii_graphic())
}

/// Classifies one message; `Err` is the `MalformedRequest` detail.
pub fn classify(raw: RawMessage, spec: &McpSpec) -> Result<Message, String> {
    let Some(method) = raw.method else {
        return Ok(Message {
            action_class: "mcp.other",
            method: "response".into(),
            id: raw.id,
            name: None,
            kind: None,
            arguments: Map::new(),
            context: McpContext {
                method: "response".into(),
                name: None,
                arguments: Default::default(),
            },
        });
    };
    if !method_ok(&method) {
        return Err(format!(
            "MCP method {method:?} is outside [A-Za-z0-9/_.-]{{1,{MAX_NAME}}}"
        ));
    }
    let lower = method.to_ascii_lowercase();
    if !KNOWN.contains(&method.as_str())
        && (KNOWN.iter().any(|k| k.eq_ignore_ascii_case(&method))
            || (lower.starts_with(NOTIFICATION_PREFIX) && !method.starts_with(NOTIFICATION_PREFIX)))
    {
        return Err(format!(
            "MCP method {method:?} is a case variant of a known method"
        ));
    }
    let notification = method.starts_with(NOTIFICATION_PREFIX);
    match (&raw.id, notification) {
        (None, false) => {
            return Err(format!(
                "{method:?} without an id: only notifications/* may omit it"
            ));
        }
        (Some(_), true) => return Err(format!("notification {method:?} with an id")),
        _ => {}
    }
    let mut params = raw.params.unwrap_or_default();
    let (action_class, kind, name_key) = match method.as_str() {
        "tools/call" => ("mcp.tools.call", Some("/tools"), Some("name")),
        "tools/list" => ("mcp.tools.list", None, None),
        "resources/read" => ("mcp.resources.read", Some("/resources"), Some("uri")),
        "prompts/get" => ("mcp.prompts.get", Some("/prompts"), Some("name")),
        "initialize" => ("mcp.initialize", None, None),
        _ if notification => ("mcp.notification", None, None),
        _ => ("mcp.other", None, None),
    };
    let name = match name_key {
        None => None,
        Some(key) => match params.remove(key) {
            Some(Value::String(n)) => {
                let ok = if key == "uri" {
                    uri_ok(&n)
                } else {
                    name_ok(&n)
                };
                if !ok {
                    return Err(format!(
                        "{method} params.{key} {n:?} is outside the allowed character set"
                    ));
                }
                Some(n)
            }
            _ => return Err(format!("{method} needs a string params.{key}")),
        },
    };
    let arguments = match params.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) if kind.is_some() => a,
        Some(Value::Object(_)) => Map::new(),
        Some(_) => return Err(format!("{method} params.arguments must be an object")),
    };
    let mut cedar = std::collections::BTreeMap::new();
    if method == "tools/call" {
        for (key, ty) in &spec.arguments {
            let v = match arguments.get(key) {
                None | Some(Value::Null) => continue,
                Some(v) => v,
            };
            let typed = match (ty, v) {
                (ArgType::String, Value::String(s)) => AttrValue::String(s.clone()),
                (ArgType::Long, Value::Number(n)) if n.is_i64() => {
                    AttrValue::Long(n.as_i64().unwrap_or_default())
                }
                (ArgType::Bool, Value::Bool(b)) => AttrValue::Bool(*b),
                (ty, _) => {
                    return Err(format!(
                        "tools/call argument {key:?} must be {} (declared in the MCP mapping rule)",
                        ty.describe()
                    ));
                }
            };
            cedar.insert(key.clone(), typed);
        }
    }
    Ok(Message {
        action_class,
        context: McpContext {
            method: method.clone(),
            name: name.clone(),
            arguments: cedar,
        },
        method,
        id: raw.id,
        name,
        kind,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::super::jsonrpc::parse;
    use super::*;

    fn spec() -> McpSpec {
        McpSpec {
            arguments: [
                ("path".to_string(), ArgType::String),
                ("limit".to_string(), ArgType::Long),
            ]
            .into(),
        }
    }

    fn one(body: &str) -> Result<Message, String> {
        let mut b = parse(body.as_bytes())?;
        classify(b.messages.remove(0), &spec())
    }

    #[test]
    fn methods_map_to_classes_names_and_arguments() {
        let m = one(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/workspace/a","limit":3,"other":[1]}}}"#).unwrap();
        assert_eq!(m.action_class, "mcp.tools.call");
        assert_eq!(m.name.as_deref(), Some("read_file"));
        assert_eq!(m.kind, Some("/tools"));
        assert_eq!(m.id, Some(Value::from(7)));
        assert_eq!(
            m.context.arguments["path"],
            AttrValue::String("/workspace/a".into())
        );
        assert_eq!(m.context.arguments["limit"], AttrValue::Long(3));
        assert!(!m.context.arguments.contains_key("other"), "undeclared");
        assert_eq!(m.arguments.len(), 3, "all kept for the audit");
        for (body, class) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
                "mcp.tools.list",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
                "mcp.initialize",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                "mcp.notification",
            ),
            (r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, "mcp.other"),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x/custom"}"#,
                "mcp.other",
            ),
            (r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, "mcp.other"),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a/b"}}"#,
                "mcp.resources.read",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#,
                "mcp.prompts.get",
            ),
        ] {
            assert_eq!(one(body).unwrap().action_class, class, "{body}");
        }
    }

    #[test]
    fn hostile_messages_are_refused() {
        for (body, why) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"x"}}"#,
                "case variant",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"TOOLS/LIST"}"#,
                "case variant",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"Notifications/initialized"}"#,
                "case variant",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call "}"#,
                "outside",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools\u2215call"}"#,
                "outside",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call\u0000"}"#,
                "outside",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_repo"}}"#,
                "without an id",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"notifications/initialized"}"#,
                "with an id",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
                "needs a string params.name",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a b"}}"#,
                "character set",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Read\u00e9"}}"#,
                "character set",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r","arguments":{"path":["/etc/shadow"]}}}"#,
                "must be a string",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r","arguments":{"limit":1.5}}}"#,
                "must be an integer",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r","arguments":"x"}}"#,
                "must be an object",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a b"}}"#,
                "character set",
            ),
        ] {
            let e = one(body).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn unicode_escaped_method_is_the_decoded_method() {
        let m = one(
            r#"{"jsonrpc":"2.0","id":1,"method":"\u0074ools/call","params":{"name":"read_file"}}"#,
        )
        .unwrap();
        assert_eq!(m.action_class, "mcp.tools.call");
    }
}
