//! What an MCP mapping rule declares (`mcp = { arguments = { … } }`), validated.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The Cedar type a declared tool argument is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    String,
    Long,
    Bool,
}

impl ArgType {
    pub(super) fn describe(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Long => "an integer",
            Self::Bool => "true or false",
        }
    }
}

/// What an MCP mapping rule declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpSpec {
    /// Tool arguments visible to Cedar as `context.mcp.arguments.<name>`, with their type.
    pub arguments: BTreeMap<String, ArgType>,
}

/// `mcp = { arguments = { name = "String" | "Long" | "Bool" } }` as written in a rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    #[serde(default)]
    arguments: BTreeMap<String, String>,
}

/// Validates a rule's `mcp` table.
pub fn parse_spec(raw: RawSpec) -> Result<McpSpec, String> {
    let mut arguments = BTreeMap::new();
    for (name, ty) in raw.arguments {
        let ok_name = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !ok_name {
            return Err(format!(
                "mcp.arguments.{name}: expected a Cedar identifier ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        let ty = match ty.as_str() {
            "String" => ArgType::String,
            "Long" => ArgType::Long,
            "Bool" => ArgType::Bool,
            other => {
                return Err(format!(
                    "mcp.arguments.{name}: type {other:?}, expected \"String\", \"Long\" or \"Bool\""
                ));
            }
        };
        arguments.insert(name, ty);
    }
    Ok(McpSpec { arguments })
}
