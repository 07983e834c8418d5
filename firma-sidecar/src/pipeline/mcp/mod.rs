//! MCP-aware enforcement (see `docs/mcp.md`): on endpoints a mapping rule marks as MCP, each
//! JSON-RPC message of a POST body is its own decision through the shared pipeline.
//!
//! - [`jsonrpc`]: strict parsing of the body (one message or a batch);
//! - [`classify`]: method -> action class, tool/resource/prompt name, typed Cedar arguments.
//!
//! A mapping rule opts in with `mcp = { arguments = { path = "String", … } }`; the rule's own
//! `action_class` then applies to the endpoint's other requests (the GET event stream, DELETE
//! of a session), and its POST bodies are read (at most `[sidecar.mcp] max_body_bytes`) and
//! decided message by message.

pub mod classify;
pub mod follow;
pub mod jsonrpc;
mod spec;

pub use classify::{ACTION_CLASSES, Message};
use sha2::Digest;
pub use spec::{ArgType, McpSpec, RawSpec, parse_spec};

/// Parses and classifies a POST body; `Err` is the `MalformedRequest` detail.
pub fn classify_body(body: &[u8], spec: &McpSpec) -> Result<(Vec<Message>, bool), String> {
    let parsed = jsonrpc::parse(body)?;
    let batch = parsed.batch;
    let n = parsed.messages.len();
    let messages = parsed
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            classify::classify(m, spec).map_err(|e| {
                if batch {
                    format!("batch member {i} of {n}: {e}")
                } else {
                    e
                }
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((messages, batch))
}

impl Message {
    /// A `tools/call` of `tool` with unknown arguments, for list-time decisions; `None` when
    /// the name is outside the set a call could use (such a tool cannot be called).
    pub fn listed_tool(tool: &str) -> Option<Self> {
        if !classify::name_ok(tool) {
            return None;
        }
        Some(Self {
            action_class: "mcp.tools.call",
            method: "tools/call".into(),
            id: None,
            name: Some(tool.to_owned()),
            kind: Some("/tools"),
            arguments: serde_json::Map::new(),
            context: firma_common::policy::McpContext {
                method: "tools/call".into(),
                name: Some(tool.to_owned()),
                arguments: std::collections::BTreeMap::new(),
            },
        })
    }

    /// The Cedar resource id: `<host><path>/tools/<name>` for a named call, else `<host><path>`.
    pub fn resource(&self, host: &str, path: &str) -> String {
        match (&self.kind, &self.name) {
            (Some(k), Some(n)) => format!("{host}{path}{k}/{n}"),
            _ => format!("{host}{path}"),
        }
    }

    /// The key of `context.action_count`'s counter: per tool (resource, prompt) for named
    /// calls, per action class otherwise.
    pub fn counter_key(&self) -> String {
        match (&self.kind, &self.name) {
            (Some(k), Some(n)) => format!("{}{k}/{n}", self.action_class),
            _ => self.action_class.to_string(),
        }
    }

    /// The audit record: method, name, id, and the arguments' keys with a SHA-256 of their
    /// JSON (values only when `values`; they can be secrets).
    pub fn audit(&self, values: bool) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("method".into(), self.method.clone().into());
        if let Some(n) = &self.name {
            o.insert("name".into(), n.clone().into());
        }
        o.insert(
            "id".into(),
            self.id.clone().unwrap_or(serde_json::Value::Null),
        );
        if self.kind.is_some() {
            let keys: Vec<&String> = self.arguments.keys().collect();
            o.insert("argument_keys".into(), serde_json::json!(keys));
            let text = serde_json::Value::Object(self.arguments.clone()).to_string();
            o.insert(
                "arguments_sha256".into(),
                hex::encode(sha2::Sha256::digest(text.as_bytes())).into(),
            );
            if values {
                o.insert(
                    "arguments".into(),
                    serde_json::Value::Object(self.arguments.clone()),
                );
            }
        }
        o.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_validate_names_and_types() {
        let raw: RawSpec =
            toml::from_str("arguments = { path = \"String\", limit = \"Long\" }").unwrap();
        let s = parse_spec(raw).unwrap();
        assert_eq!(s.arguments["limit"], ArgType::Long);
        let raw: RawSpec = toml::from_str("arguments = { path = \"Str\" }").unwrap();
        assert!(parse_spec(raw).unwrap_err().contains("expected \"String\""));
        let raw: RawSpec = toml::from_str("arguments = { \"a-b\" = \"String\" }").unwrap();
        assert!(parse_spec(raw).unwrap_err().contains("Cedar identifier"));
        assert!(toml::from_str::<RawSpec>("argument = {}").is_err());
    }

    #[test]
    fn resource_counter_and_audit() {
        let (m, batch) = classify_body(
            br#"{"jsonrpc":"2.0","id":"q","method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/shadow"}}}"#,
            &McpSpec::default(),
        )
        .unwrap();
        assert!(!batch);
        assert_eq!(
            m[0].resource("mcp.test", "/mcp"),
            "mcp.test/mcp/tools/read_file"
        );
        assert_eq!(m[0].counter_key(), "mcp.tools.call/tools/read_file");
        let a = m[0].audit(false);
        assert_eq!(a["argument_keys"], serde_json::json!(["path"]));
        assert!(a.get("arguments").is_none());
        assert!(!a.to_string().contains("shadow"), "no values by default");
        assert_eq!(m[0].audit(true)["arguments"]["path"], "/etc/shadow");
        let e = classify_body(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}]"#,
            &McpSpec::default(),
        )
        .unwrap_err();
        assert!(e.starts_with("batch member 1 of 2"), "{e}");
    }
}
