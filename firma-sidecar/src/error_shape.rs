//! The error shapes of LLM API providers, added to Firma's own answers on their hosts so that
//! the provider's SDK puts the Firma reason into the exception it raises.
//!
//! The OpenAI SDKs (Python and Node) build the exception text from `error.message` only, and
//! expose `error.type`/`error.code`; the Anthropic SDK reads `{"type":"error","error":{"type",
//! "message"}}`. The Firma fields (`denied`/`aborted`, `reason`, `detail`) stay at the top
//! level, so tools that read Firma's shape keep working. Which shape a host gets:
//! `[[sidecar.connector.hosts]] error_format`, else the provider of the well-known hosts
//! ([`ErrorShapes::for_host`]). The table is read from the configuration, not from the
//! connector, so a request can be answered in its host's shape before anything is decided.

use crate::config::{ErrorFormat, SidecarConfig};
use http::StatusCode;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// The error shape of each host's answers.
#[derive(Debug, Clone, Default)]
pub struct ErrorShapes {
    /// `[[sidecar.connector.hosts]] error_format`, by lowercase host.
    configured: HashMap<String, ErrorFormat>,
}

impl ErrorShapes {
    pub fn from_config(cfg: &SidecarConfig) -> Self {
        Self {
            configured: cfg
                .connector
                .hosts
                .iter()
                .filter_map(|h| Some((h.host.trim().to_ascii_lowercase(), h.error_format?)))
                .collect(),
        }
    }

    /// `host`'s configured shape, else the provider's of the well-known API hosts, else Firma's.
    pub fn for_host(&self, host: &str) -> ErrorFormat {
        if let Some(f) = self.configured.get(host) {
            return *f;
        }
        match host {
            "api.openai.com" => ErrorFormat::Openai,
            "api.anthropic.com" => ErrorFormat::Anthropic,
            _ => ErrorFormat::Firma,
        }
    }
}

/// The provider's error `type` for a status (Anthropic's names; OpenAI-compatible clients
/// treat `type` as free text).
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        403 => "permission_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// Adds the provider's error fields to a Firma body (`{"denied"|"aborted", "reason",
/// "detail"}`). `message` is what the SDK shows: it starts with "Firma" and names the reason.
pub fn add(
    body: &mut Map<String, Value>,
    format: ErrorFormat,
    status: StatusCode,
    reason: &str,
    message: &str,
) {
    let kind = error_type(status);
    match format {
        ErrorFormat::Firma => {}
        ErrorFormat::Openai => {
            body.insert(
                "error".into(),
                json!({"message": message, "type": kind, "code": reason, "param": null}),
            );
        }
        ErrorFormat::Anthropic => {
            body.insert("type".into(), json!("error"));
            body.insert("error".into(), json!({"type": kind, "message": message}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaped(format: ErrorFormat, status: StatusCode) -> Value {
        let mut m = Map::new();
        m.insert("denied".into(), json!(true));
        m.insert("reason".into(), json!("PolicyDenied"));
        add(&mut m, format, status, "PolicyDenied", "Firma denied it");
        Value::Object(m)
    }

    #[test]
    fn hosts_get_their_configured_shape_else_the_providers() {
        let shapes = ErrorShapes {
            configured: [("llm.internal".to_string(), ErrorFormat::Openai)].into(),
        };
        assert_eq!(shapes.for_host("llm.internal"), ErrorFormat::Openai);
        assert_eq!(shapes.for_host("api.anthropic.com"), ErrorFormat::Anthropic);
        assert_eq!(shapes.for_host("api.openai.com"), ErrorFormat::Openai);
        assert_eq!(shapes.for_host("example.com"), ErrorFormat::Firma);
    }

    #[test]
    fn provider_shapes_keep_the_firma_fields() {
        let o = shaped(ErrorFormat::Openai, StatusCode::FORBIDDEN);
        assert_eq!(o["error"]["message"], "Firma denied it");
        assert_eq!(o["error"]["code"], "PolicyDenied");
        assert_eq!(o["error"]["type"], "permission_error");
        assert_eq!(o["reason"], "PolicyDenied");
        let a = shaped(ErrorFormat::Anthropic, StatusCode::BAD_REQUEST);
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "invalid_request_error");
        assert_eq!(a["error"]["message"], "Firma denied it");
        assert_eq!(a["denied"], true);
        let f = shaped(ErrorFormat::Firma, StatusCode::FORBIDDEN);
        assert!(f.get("error").is_none() && f.get("type").is_none());
    }
}
