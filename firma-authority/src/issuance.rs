//! Capability issuance: validate the request, evaluate the issuance policy for every requested
//! action, clamp the lifetime, sign. Shared by the offline CLI (`firma authority issue`) and the
//! `IssueCapability` RPC so both mint identically.

use crate::error::AuthorityError;
pub use crate::validate::IssueRequest;
use crate::validate::{InvalidRequest, validate_request};
use firma_common::capability::{CapabilityClaims, CapabilitySeed, now_unix};
use firma_common::keys::SigningKey;
use firma_common::policy::{CompiledPolicies, EvalRequest};
use firma_common::proto::authority as pb;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A minted capability.
#[derive(Debug, Clone)]
pub struct Issued {
    pub claims: CapabilityClaims,
    pub raw_token: String,
    /// The requested TTL when it exceeded `max_ttl_seconds` and was clamped.
    pub clamped_from: Option<i64>,
}

impl Issued {
    /// The seed file mirror (`firma authority issue --output`).
    pub fn seed(&self) -> CapabilitySeed {
        CapabilitySeed::new(self.raw_token.clone(), &self.claims)
    }

    pub fn to_proto(&self) -> pb::Capability {
        let c = &self.claims;
        pb::Capability {
            raw_token: self.raw_token.clone(),
            token_id: c.token_id.clone(),
            agent_id: c.agent_id.clone(),
            session_id: c.session_id.clone(),
            action_set: c.action_set.clone(),
            resource_scope: c.resource_scope.clone(),
            issued_at: c.iat,
            expiry: c.exp,
            context_hash: c.context_hash.clone(),
        }
    }
}

/// Machine-readable denial code (the proto's `Denied.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialCode {
    /// The issuance policy did not permit an action.
    IssuanceDenied,
    /// The request is malformed (see [`crate::validate`], or an action class the schema does
    /// not declare). Over gRPC this is the status `INVALID_ARGUMENT`, not a `Denied` answer.
    InvalidRequest,
}

impl DenialCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenialCode::IssuanceDenied => "IssuanceDenied",
            DenialCode::InvalidRequest => "InvalidRequest",
        }
    }
}

/// Why no capability was minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    pub code: DenialCode,
    pub reason: String,
    /// Policies that decided (forbids that matched); empty on a default deny.
    pub policies: Vec<String>,
}

impl From<InvalidRequest> for Denial {
    fn from(e: InvalidRequest) -> Self {
        Self {
            code: DenialCode::InvalidRequest,
            reason: e.to_string(),
            policies: Vec::new(),
        }
    }
}

impl Denial {
    pub fn to_proto(&self) -> pb::Denied {
        pb::Denied {
            reason: self.reason.clone(),
            policies: self.policies.clone(),
            code: self.code.as_str().to_string(),
        }
    }
}

/// Mints capabilities with one key under one issuance bundle.
pub struct Issuer<'a> {
    pub key: &'a SigningKey,
    pub policies: &'a CompiledPolicies,
    pub max_ttl_seconds: u64,
}

impl Issuer<'_> {
    /// Validates, evaluates every action against the issuance policy (all must be permitted)
    /// and signs. The first denied action decides the denial.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, Denial> {
        let actions = self.validate(req)?;
        for action in &actions {
            let result = self.policies.evaluate(&EvalRequest {
                agent_id: &req.agent_id,
                action,
                resource_id: &req.resource_scope,
                host: None,
                path: None,
                action_count: 0,
                session_id: &req.session_id,
                method: "ISSUE",
                request: None,
                usage: None,
                mcp: None,
            });
            if !result.allowed {
                let why = if result.determining_policies.is_empty() {
                    "no issuance policy permits it".to_string()
                } else {
                    format!(
                        "forbidden by issuance policy {}",
                        result.determining_policies.join(", ")
                    )
                };
                let errors = if result.errors.is_empty() {
                    String::new()
                } else {
                    format!(" (evaluation errors: {})", result.errors.join("; "))
                };
                return Err(Denial {
                    code: DenialCode::IssuanceDenied,
                    reason: format!(
                        "issuance denied for agent `{}` action `{action}`: {why}{errors}",
                        req.agent_id
                    ),
                    policies: result.determining_policies,
                });
            }
        }
        let max = i64::try_from(self.max_ttl_seconds).unwrap_or(i64::MAX);
        let (ttl, clamped_from) = if req.ttl_seconds > max {
            (max, Some(req.ttl_seconds))
        } else {
            (req.ttl_seconds, None)
        };
        let iat = now_unix();
        let claims = CapabilityClaims {
            token_id: uuid::Uuid::new_v4().to_string(),
            agent_id: req.agent_id.clone(),
            session_id: req.session_id.clone(),
            context_hash: context_hash(req, &actions, ttl, self.policies.version()),
            action_set: actions,
            resource_scope: req.resource_scope.clone(),
            iat,
            exp: iat.saturating_add(ttl),
        };
        // Signing only fails on an expiry past year 9999 (a huge TTL under a huge
        // max_ttl_seconds): refuse it rather than mint a token no sidecar could verify.
        let raw_token = claims
            .sign(self.key)
            .map_err(|e| InvalidRequest::new("requested_ttl_seconds", e.to_string()))?;
        Ok(Issued {
            claims,
            raw_token,
            clamped_from,
        })
    }

    /// [`validate_request`], then every action must be a class of the live schema; returns
    /// the action set de-duplicated in request order.
    fn validate(&self, req: &IssueRequest) -> Result<Vec<String>, Denial> {
        validate_request(req)?;
        let mut actions: Vec<String> = Vec::with_capacity(req.actions.len());
        for a in &req.actions {
            if !self.policies.is_action_class(a) {
                let known: Vec<&str> = self
                    .policies
                    .action_classes()
                    .iter()
                    .map(String::as_str)
                    .collect();
                return Err(InvalidRequest::new(
                    "requested_actions",
                    format!("unknown action class `{a}` (known: {})", known.join(", ")),
                )
                .into());
            }
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
        Ok(actions)
    }
}

/// `hex(SHA-256)` over a length-framed encoding of the granted request (agent, session, action
/// set, scope, granted TTL) and the issuance bundle version: binds a token to what was asked
/// and to the policy that allowed it, so an audit can tell which issuance rules minted it.
fn context_hash(req: &IssueRequest, actions: &[String], ttl: i64, bundle_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"firma-capability-context-v1");
    let mut frame = |s: &[u8]| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s);
    };
    frame(req.agent_id.as_bytes());
    frame(req.session_id.as_bytes());
    frame(&(actions.len() as u64).to_be_bytes());
    for a in actions {
        frame(a.as_bytes());
    }
    frame(req.resource_scope.as_bytes());
    frame(&ttl.to_be_bytes());
    frame(bundle_version.as_bytes());
    hex::encode(h.finalize())
}

/// The seed as TOML text, with a header warning against hand edits.
pub fn seed_toml(seed: &CapabilitySeed) -> Result<String, toml::ser::Error> {
    let header = "# Capability seed written by `firma authority issue`. Do not edit: the sidecar\n\
                  # checks every field below against the signed raw_token.\n";
    Ok(format!("{header}{}", toml::to_string(seed)?))
}

/// Writes a seed file atomically with mode 0600 (it holds a bearer token).
pub fn write_seed(path: &Path, seed: &CapabilitySeed) -> Result<(), AuthorityError> {
    let err = |source| AuthorityError::Write {
        path: path.to_path_buf(),
        cause: source,
    };
    let text = seed_toml(seed).map_err(|e| err(std::io::Error::other(e)))?;
    let tmp = path.with_extension("toml.tmp-firma");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use firma_common::policy::{PolicyBundle, PolicyFile, SHIPPED_SCHEMA};

    fn policies(text: &str) -> CompiledPolicies {
        PolicyBundle::new(
            vec![PolicyFile {
                name: "issuance.cedar".into(),
                content: text.into(),
            }],
            SHIPPED_SCHEMA.into(),
        )
        .compile()
        .unwrap()
    }

    fn req(actions: &[&str], ttl: i64) -> IssueRequest {
        IssueRequest {
            agent_id: "support-agent".into(),
            session_id: "s".into(),
            actions: actions.iter().map(|s| s.to_string()).collect(),
            resource_scope: "*".into(),
            ttl_seconds: ttl,
        }
    }

    #[test]
    fn issues_clamps_and_binds_context() {
        let key = new_key();
        let p = policies("permit (principal, action, resource);");
        let issuer = Issuer {
            key: &key,
            policies: &p,
            max_ttl_seconds: 60,
        };
        let out = issuer
            .issue(&req(&["model.inference.chat", "model.inference.chat"], 600))
            .unwrap();
        assert_eq!(out.clamped_from, Some(600));
        assert_eq!(out.claims.exp - out.claims.iat, 60);
        assert_eq!(out.claims.action_set, ["model.inference.chat"]);
        let verified = out.seed().verify(&key.verifying_key()).unwrap();
        assert_eq!(verified, out.claims);
        let again = issuer.issue(&req(&["model.inference.chat"], 60)).unwrap();
        assert_eq!(again.clamped_from, None);
        assert_eq!(again.claims.context_hash, out.claims.context_hash);
        assert_ne!(again.claims.token_id, out.claims.token_id);
        let other = issuer.issue(&req(&["data.read"], 60)).unwrap();
        assert_ne!(other.claims.context_hash, out.claims.context_hash);
    }

    #[test]
    fn denials() {
        let key = new_key();
        let p = policies(
            "permit (principal, action, resource);\n\
             forbid (principal, action == Firma::Action::\"payment.transfer\", resource);",
        );
        let issuer = Issuer {
            key: &key,
            policies: &p,
            max_ttl_seconds: 60,
        };
        let d = issuer
            .issue(&req(&["model.inference.chat", "payment.transfer"], 60))
            .unwrap_err();
        assert_eq!(d.code, DenialCode::IssuanceDenied);
        assert_eq!(d.policies, ["issuance:1"]);
        assert!(d.reason.contains("issuance:1"), "{}", d.reason);
        for (r, needle) in [
            (req(&[], 60), "empty"),
            (req(&["nope.nope"], 60), "unknown action class"),
            (req(&["data.read"], 0), "positive"),
            (req(&["data.read"], -5), "positive"),
            (
                IssueRequest {
                    agent_id: " ".into(),
                    ..req(&["data.read"], 5)
                },
                "InvalidRequest: agent_id: ",
            ),
        ] {
            let d = issuer.issue(&r).unwrap_err();
            assert_eq!(d.code, DenialCode::InvalidRequest, "{r:?}");
            assert!(d.reason.contains(needle), "{}", d.reason);
        }
    }

    /// Found by the `capability` fuzz target: an expiry past year 9999 was signed as a bare
    /// number that no verifier accepts.
    #[test]
    fn unrepresentable_expiry_is_refused_not_minted() {
        let key = new_key();
        let p = policies("permit (principal, action, resource);");
        let issuer = Issuer {
            key: &key,
            policies: &p,
            max_ttl_seconds: u64::MAX,
        };
        let d = issuer.issue(&req(&["data.read"], i64::MAX)).unwrap_err();
        assert_eq!(d.code, DenialCode::InvalidRequest);
        assert!(
            d.reason
                .starts_with("InvalidRequest: requested_ttl_seconds: "),
            "{}",
            d.reason
        );
        // Ten years is fine.
        issuer.issue(&req(&["data.read"], 315_360_000)).unwrap();
    }

    fn new_key() -> SigningKey {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        firma_common::keys::generate(&path, false).unwrap();
        firma_common::keys::load_signing_key(&path).unwrap()
    }
}
