//! Bounds on what a caller may ask the Authority to sign. Every string here ends up in a signed
//! token, in seed files, in audit events and in logs, so hostile values (bidi overrides, line
//! separators, megabyte ids) are refused before anything else looks at the request. The gRPC
//! `IssueCapability` RPC and `firma authority issue` both go through [`validate_request`].
//!
//! Messages never echo the offending value: only its size or the code point at fault.

use firma_common::proto::authority as pb;

/// What a caller asks for (CLI flags or `IssuanceRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    pub agent_id: String,
    pub session_id: String,
    pub actions: Vec<String>,
    pub resource_scope: String,
    pub ttl_seconds: i64,
}

impl From<pb::IssuanceRequest> for IssueRequest {
    fn from(r: pb::IssuanceRequest) -> Self {
        Self {
            agent_id: r.agent_id,
            session_id: r.session_id,
            actions: r.requested_actions,
            resource_scope: r.resource_scope,
            ttl_seconds: r.requested_ttl_seconds,
        }
    }
}

/// Longest `agent_id` / `session_id`, in bytes (= characters: only ASCII is allowed).
pub const MAX_ID_LEN: usize = 128;
/// Longest `resource_scope`, in bytes (= characters).
pub const MAX_SCOPE_LEN: usize = 1024;
/// Most action classes in one request.
pub const MAX_ACTIONS: usize = 32;
/// Longest action class name.
pub const MAX_ACTION_LEN: usize = 64;

/// A request field that breaks one of the bounds. Displays as
/// `InvalidRequest: <field>: <rule>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("InvalidRequest: {field}: {rule}")]
pub struct InvalidRequest {
    /// The wire name of the field (`proto/authority.proto`).
    pub field: &'static str,
    /// What is wrong, without the offending value.
    pub rule: String,
}

impl InvalidRequest {
    pub fn new(field: &'static str, rule: impl Into<String>) -> Self {
        Self {
            field,
            rule: rule.into(),
        }
    }
}

/// `[A-Za-z0-9._:@-]`: enough for UUIDs, `tenant-acme`, `user@example.com`, `ns:name`.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')
}

/// Printable ASCII other than space: `*`, host prefixes and URL paths fit.
fn is_scope_char(c: char) -> bool {
    c.is_ascii_graphic()
}

/// Describes a character without printing it raw (it may be a bidi override or a newline).
fn describe(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("`{c}` (U+{:04X})", c as u32)
    } else {
        format!("U+{:04X}", c as u32)
    }
}

/// Length first (a 3 MB value is refused without being scanned), then every character.
fn check_string(
    field: &'static str,
    value: &str,
    max: usize,
    allowed: fn(char) -> bool,
    alphabet: &str,
) -> Result<(), InvalidRequest> {
    if value.is_empty() {
        return Err(InvalidRequest::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(InvalidRequest::new(
            field,
            format!(
                "is {} bytes long; at most {max} characters are allowed",
                value.len()
            ),
        ));
    }
    if let Some((i, c)) = value.chars().enumerate().find(|(_, c)| !allowed(*c)) {
        return Err(InvalidRequest::new(
            field,
            format!(
                "character {} at position {i} is not allowed; use {alphabet}",
                describe(c)
            ),
        ));
    }
    Ok(())
}

/// The action-class grammar of `policies/firma.cedarschema`: lowercase dotted names, each
/// segment `[a-z][a-z0-9_-]*` (`model.inference.chat`, `data.read`).
pub fn is_action_class_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ACTION_LEN
        && s.split('.').all(|seg| {
            let mut cs = seg.chars();
            cs.next().is_some_and(|c| c.is_ascii_lowercase())
                && cs.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        })
}

/// Checks every field of an issuance request against the bounds above and `ttl > 0`. Whether
/// each action is declared in the schema is checked afterwards, against the live bundle.
pub fn validate_request(req: &IssueRequest) -> Result<(), InvalidRequest> {
    const ID_ALPHABET: &str = "1-128 characters from A-Z a-z 0-9 . _ : @ -";
    check_string(
        "agent_id",
        &req.agent_id,
        MAX_ID_LEN,
        is_id_char,
        ID_ALPHABET,
    )?;
    check_string(
        "session_id",
        &req.session_id,
        MAX_ID_LEN,
        is_id_char,
        ID_ALPHABET,
    )?;
    check_string(
        "resource_scope",
        &req.resource_scope,
        MAX_SCOPE_LEN,
        is_scope_char,
        "1-1024 printable ASCII characters without spaces",
    )?;
    let field = "requested_actions";
    if req.actions.is_empty() {
        return Err(InvalidRequest::new(
            field,
            "the action set is empty; request at least one action class",
        ));
    }
    if req.actions.len() > MAX_ACTIONS {
        return Err(InvalidRequest::new(
            field,
            format!(
                "{} actions requested; at most {MAX_ACTIONS} are allowed",
                req.actions.len()
            ),
        ));
    }
    for (i, a) in req.actions.iter().enumerate() {
        if !is_action_class_name(a) {
            let what = if a.len() > MAX_ACTION_LEN {
                format!("is {} bytes long (at most {MAX_ACTION_LEN})", a.len())
            } else {
                "is not an action class name".to_string()
            };
            return Err(InvalidRequest::new(
                field,
                format!(
                    "action {i} {what}; expected lowercase dotted names such as `data.read` \
                     (segments of a-z 0-9 _ -, starting with a letter)"
                ),
            ));
        }
    }
    if req.ttl_seconds <= 0 {
        return Err(InvalidRequest::new(
            "requested_ttl_seconds",
            format!("must be positive, got {}", req.ttl_seconds),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> IssueRequest {
        IssueRequest {
            agent_id: "tenant-acme".into(),
            session_id: "3f2c1a9e-7b1d-4c1e-9a53-0d1f2e3a4b5c".into(),
            actions: vec!["model.inference.chat".into(), "data.read".into()],
            resource_scope: "api.openai.com/v1*".into(),
            ttl_seconds: 900,
        }
    }

    fn field_of(req: IssueRequest) -> &'static str {
        validate_request(&req).unwrap_err().field
    }

    #[test]
    fn accepts_what_the_guides_use() {
        validate_request(&ok()).unwrap();
        for scope in [
            "*",
            "api.openai.com*",
            "api.openai.com/v1/chat/completions",
            "127.0.0.1:8443/a?b=c%20d",
        ] {
            let r = IssueRequest {
                resource_scope: scope.into(),
                ..ok()
            };
            validate_request(&r).unwrap();
        }
        for id in [
            "support-agent",
            "session-001",
            "user@example.com",
            "ns:a_b.c",
        ] {
            let r = IssueRequest {
                agent_id: id.into(),
                session_id: id.into(),
                ..ok()
            };
            validate_request(&r).unwrap();
        }
        let r = IssueRequest {
            agent_id: "a".repeat(MAX_ID_LEN),
            resource_scope: "s".repeat(MAX_SCOPE_LEN),
            actions: vec!["data.read".into(); MAX_ACTIONS],
            ..ok()
        };
        validate_request(&r).unwrap();
    }

    #[test]
    fn refuses_hostile_values_naming_the_field() {
        for bad in ["a\u{2028}b", "a\u{202E}b", "a b", "a\nb", "", "é", "a/b"] {
            let r = IssueRequest {
                session_id: bad.into(),
                ..ok()
            };
            let e = validate_request(&r).unwrap_err();
            assert_eq!(e.field, "session_id", "{bad:?}");
            assert!(e.to_string().starts_with("InvalidRequest: session_id: "));
            assert!(!e.rule.contains('\u{2028}') && !e.rule.contains('\u{202E}'));
        }
        let e = validate_request(&IssueRequest {
            session_id: "a\u{202E}".into(),
            ..ok()
        })
        .unwrap_err();
        assert!(e.rule.contains("U+202E"), "{e}");
        let huge = IssueRequest {
            session_id: "x".repeat(3 << 20),
            ..ok()
        };
        assert!(
            validate_request(&huge)
                .unwrap_err()
                .rule
                .contains("3145728")
        );
        assert_eq!(
            field_of(IssueRequest {
                agent_id: "a".repeat(MAX_ID_LEN + 1),
                ..ok()
            }),
            "agent_id"
        );
        for scope in ["", "a b", "a\tb", "x\u{7f}", "é", &"s".repeat(2 << 20)] {
            let r = IssueRequest {
                resource_scope: scope.into(),
                ..ok()
            };
            assert_eq!(field_of(r), "resource_scope", "{scope:?}");
        }
        for actions in [
            vec![],
            vec!["data.read".to_string(); MAX_ACTIONS + 1],
            vec!["Data.Read".into()],
            vec!["data..read".into()],
            vec![".data".into()],
            vec!["data.read\u{2028}".into()],
            vec!["d".repeat(MAX_ACTION_LEN + 1)],
        ] {
            let r = IssueRequest {
                actions: actions.clone(),
                ..ok()
            };
            assert_eq!(field_of(r), "requested_actions", "{actions:?}");
        }
        assert_eq!(
            field_of(IssueRequest {
                ttl_seconds: 0,
                ..ok()
            }),
            "requested_ttl_seconds"
        );
    }
}
