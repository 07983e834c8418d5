//! Capability tokens: PASETO v4.public (Ed25519) over a JSON claim set.
//!
//! One module signs (Authority) and verifies (sidecar, seed checks), so the two sides can
//! never disagree on the wire format. `iat`/`exp` travel as RFC 3339 strings, as PASETO
//! registers them; [`CapabilityClaims`] holds them as Unix seconds.

use crate::keys::{SigningKey, VerifyingKey};
use pasetors::Public;
use pasetors::keys::AsymmetricPublicKey;
use pasetors::token::UntrustedToken;
use pasetors::version4::{PublicToken, V4};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What a capability grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityClaims {
    pub token_id: String,
    pub agent_id: String,
    pub session_id: String,
    pub action_set: Vec<String>,
    pub resource_scope: String,
    /// Unix seconds.
    pub iat: i64,
    /// Unix seconds.
    pub exp: i64,
    /// Hex SHA-256 binding the token to the issuance request and issuance bundle.
    pub context_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("raw_token failed PASETO verification: {0}")]
    Invalid(String),
    #[error("raw_token claims do not match seed claims (field `{field}`)")]
    MirrorMismatch { field: &'static str },
    #[error("capability {token_id} expired at {expiry}")]
    Expired { token_id: String, expiry: String },
    #[error("capability {token_id} is not valid before {issued_at}")]
    NotYetValid { token_id: String, issued_at: String },
    #[error("cannot sign capability: {0}")]
    Sign(String),
}

/// The JSON payload inside the token (RFC 3339 times, as PASETO registers them).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireClaims {
    token_id: String,
    agent_id: String,
    session_id: String,
    action_set: Vec<String>,
    resource_scope: String,
    iat: String,
    exp: String,
    context_hash: String,
}

/// Formats Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// Formats Unix seconds as RFC 3339 for the signed claims: unlike [`rfc3339`], refuses a time
/// outside what RFC 3339 can express (years 0000-9999), which no verifier would accept.
fn rfc3339_strict(unix: i64, what: &str) -> Result<String, CapabilityError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| {
            CapabilityError::Sign(format!(
                "`{what}` ({unix}) is outside the RFC 3339 range (years 0000-9999)"
            ))
        })
}

/// Parses RFC 3339 into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Current Unix time in seconds.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// PASETO v4.public without a footer or implicit assertion, signed here rather than by
/// pasetors: pasetors re-derives the public key from the secret key on every signature (a
/// second Ed25519 scalar multiplication: about a third of an issuance's CPU in the profile,
/// docs/benchmarks.md). The bytes are the same (Ed25519 is deterministic; a test compares
/// with pasetors' own output), and verification stays with pasetors.
fn sign_v4_public(key: &SigningKey, payload: &[u8]) -> String {
    use base64::Engine;
    use ed25519_dalek::Signer;
    const HEADER: &[u8] = b"v4.public.";
    let signed = key.sign(&pae(&[HEADER, payload, b"", b""]));
    let mut body = Vec::with_capacity(payload.len() + 64);
    body.extend_from_slice(payload);
    body.extend_from_slice(&signed.to_bytes());
    format!(
        "v4.public.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
    )
}

/// PASETO's pre-authentication encoding: LE64(count), then LE64(len) || piece for each piece
/// (LE64 with the top bit cleared).
fn pae(pieces: &[&[u8]]) -> Vec<u8> {
    let le64 = |n: usize| ((n as u64) & (u64::MAX >> 1)).to_le_bytes();
    let mut out = Vec::with_capacity(8 + pieces.iter().map(|p| 8 + p.len()).sum::<usize>());
    out.extend_from_slice(&le64(pieces.len()));
    for p in pieces {
        out.extend_from_slice(&le64(p.len()));
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
fn secret_key(
    key: &SigningKey,
) -> Result<pasetors::keys::AsymmetricSecretKey<V4>, CapabilityError> {
    // pasetors wants the 64-byte keypair encoding (seed || public key).
    pasetors::keys::AsymmetricSecretKey::<V4>::from(&key.to_keypair_bytes())
        .map_err(|e| CapabilityError::Sign(e.to_string()))
}

fn public_key(key: &VerifyingKey) -> Result<AsymmetricPublicKey<V4>, CapabilityError> {
    AsymmetricPublicKey::<V4>::from(key.as_bytes())
        .map_err(|e| CapabilityError::Invalid(e.to_string()))
}

impl CapabilityClaims {
    /// Signs the claims into a `v4.public.…` token. Fails rather than sign times that
    /// [`CapabilityClaims::verify`] could not read back.
    pub fn sign(&self, key: &SigningKey) -> Result<String, CapabilityError> {
        let wire = WireClaims {
            token_id: self.token_id.clone(),
            agent_id: self.agent_id.clone(),
            session_id: self.session_id.clone(),
            action_set: self.action_set.clone(),
            resource_scope: self.resource_scope.clone(),
            iat: rfc3339_strict(self.iat, "iat")?,
            exp: rfc3339_strict(self.exp, "exp")?,
            context_hash: self.context_hash.clone(),
        };
        let payload =
            serde_json::to_vec(&wire).map_err(|e| CapabilityError::Sign(e.to_string()))?;
        Ok(sign_v4_public(key, &payload))
    }

    /// Verifies the signature and parses the claims. Does not check time; see
    /// [`CapabilityClaims::check_time`].
    pub fn verify(token: &str, key: &VerifyingKey) -> Result<Self, CapabilityError> {
        let untrusted = UntrustedToken::<Public, V4>::try_from(token.trim())
            .map_err(|e| CapabilityError::Invalid(format!("malformed token: {e}")))?;
        let trusted = PublicToken::verify(&public_key(key)?, &untrusted, None, None)
            .map_err(|_| CapabilityError::Invalid("signature does not verify".into()))?;
        let wire: WireClaims = serde_json::from_str(trusted.payload())
            .map_err(|e| CapabilityError::Invalid(format!("claims: {e}")))?;
        let time = |s: &str, what: &str| {
            parse_rfc3339(s).ok_or_else(|| {
                CapabilityError::Invalid(format!("claims: `{what}` is not RFC 3339"))
            })
        };
        Ok(Self {
            iat: time(&wire.iat, "iat")?,
            exp: time(&wire.exp, "exp")?,
            token_id: wire.token_id,
            agent_id: wire.agent_id,
            session_id: wire.session_id,
            action_set: wire.action_set,
            resource_scope: wire.resource_scope,
            context_hash: wire.context_hash,
        })
    }

    /// Fails if `now` is past `exp + skew` or before `iat - skew`.
    pub fn check_time(&self, now: i64, skew_seconds: u64) -> Result<(), CapabilityError> {
        let skew = i64::try_from(skew_seconds).unwrap_or(i64::MAX);
        if now > self.exp.saturating_add(skew) {
            return Err(CapabilityError::Expired {
                token_id: self.token_id.clone(),
                expiry: rfc3339(self.exp),
            });
        }
        if now < self.iat.saturating_sub(skew) {
            return Err(CapabilityError::NotYetValid {
                token_id: self.token_id.clone(),
                issued_at: rfc3339(self.iat),
            });
        }
        Ok(())
    }

    /// Whether the capability's scope covers `resource` (`host` + `path`).
    pub fn covers(&self, resource: &str) -> bool {
        scope_matches(&self.resource_scope, resource)
    }
}

/// Resource scope rule: `*` matches everything; `S*` is a prefix; `S` matches `S` and `S/…`.
pub fn scope_matches(scope: &str, resource: &str) -> bool {
    if scope == "*" {
        return true;
    }
    if let Some(prefix) = scope.strip_suffix('*') {
        return resource.starts_with(prefix);
    }
    resource == scope
        || (resource.starts_with(scope) && resource.as_bytes().get(scope.len()) == Some(&b'/'))
}

/// A seed file written by `firma authority issue`: the token plus a readable mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitySeed {
    pub raw_token: String,
    pub token_id: String,
    pub agent_id: String,
    pub session_id: String,
    pub action_set: Vec<String>,
    pub resource_scope: String,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339.
    pub expiry: String,
    pub context_hash: String,
}

impl CapabilitySeed {
    pub fn new(raw_token: String, c: &CapabilityClaims) -> Self {
        Self {
            raw_token,
            token_id: c.token_id.clone(),
            agent_id: c.agent_id.clone(),
            session_id: c.session_id.clone(),
            action_set: c.action_set.clone(),
            resource_scope: c.resource_scope.clone(),
            issued_at: rfc3339(c.iat),
            expiry: rfc3339(c.exp),
            context_hash: c.context_hash.clone(),
        }
    }

    /// Verifies `raw_token` and that every mirrored field equals the signed claim.
    pub fn verify(&self, key: &VerifyingKey) -> Result<CapabilityClaims, CapabilityError> {
        let c = CapabilityClaims::verify(&self.raw_token, key)?;
        let checks: [(&'static str, bool); 8] = [
            ("token_id", c.token_id == self.token_id),
            ("agent_id", c.agent_id == self.agent_id),
            ("session_id", c.session_id == self.session_id),
            ("action_set", c.action_set == self.action_set),
            ("resource_scope", c.resource_scope == self.resource_scope),
            ("issued_at", parse_rfc3339(&self.issued_at) == Some(c.iat)),
            ("expiry", parse_rfc3339(&self.expiry) == Some(c.exp)),
            ("context_hash", c.context_hash == self.context_hash),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((field, _)) => Err(CapabilityError::MirrorMismatch { field }),
            None => Ok(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> CapabilityClaims {
        let now = now_unix();
        CapabilityClaims {
            token_id: "t-1".into(),
            agent_id: "support-agent".into(),
            session_id: "session-001".into(),
            action_set: vec!["model.inference.chat".into()],
            resource_scope: "*".into(),
            iat: now,
            exp: now + 60,
            context_hash: "00".into(),
        }
    }

    #[test]
    fn tokens_are_byte_identical_to_pasetors() {
        for i in 0..20 {
            let k = SigningKey::generate(&mut rand::rngs::OsRng);
            let mut c = claims();
            c.token_id = format!("t-{i}-{}", "x".repeat(i));
            let ours = c.sign(&k).unwrap();
            let wire = WireClaims {
                token_id: c.token_id.clone(),
                agent_id: c.agent_id.clone(),
                session_id: c.session_id.clone(),
                action_set: c.action_set.clone(),
                resource_scope: c.resource_scope.clone(),
                iat: rfc3339_strict(c.iat, "iat").unwrap(),
                exp: rfc3339_strict(c.exp, "exp").unwrap(),
                context_hash: c.context_hash.clone(),
            };
            let payload = serde_json::to_vec(&wire).unwrap();
            let theirs = PublicToken::sign(&secret_key(&k).unwrap(), &payload, None, None).unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(
                CapabilityClaims::verify(&ours, &k.verifying_key()).unwrap(),
                c
            );
        }
    }

    #[test]
    fn sign_verify_roundtrip_and_other_key_fails() {
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let c = claims();
        let t = c.sign(&k).unwrap();
        assert!(t.starts_with("v4.public."));
        assert_eq!(CapabilityClaims::verify(&t, &k.verifying_key()).unwrap(), c);
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        assert!(CapabilityClaims::verify(&t, &other.verifying_key()).is_err());
        assert!(CapabilityClaims::verify("v4.public.garbage", &k.verifying_key()).is_err());
    }

    /// Found by the `capability` fuzz target: `sign` wrote times outside RFC 3339 as bare
    /// numbers, producing tokens that `verify` always rejects.
    #[test]
    fn times_outside_rfc3339_are_not_signed() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        for (iat, exp) in [
            (0, i64::MAX),
            (i64::MIN, 0),
            (0, 253_402_300_800), // 10000-01-01T00:00:00Z
        ] {
            let c = CapabilityClaims {
                iat,
                exp,
                ..claims()
            };
            assert!(
                matches!(c.sign(&key), Err(CapabilityError::Sign(_))),
                "{iat} {exp}"
            );
        }
        let last = CapabilityClaims {
            iat: -62_167_219_200, // 0000-01-01T00:00:00Z
            exp: 253_402_300_799, // 9999-12-31T23:59:59Z
            ..claims()
        };
        let token = last.sign(&key).unwrap();
        assert_eq!(
            CapabilityClaims::verify(&token, &key.verifying_key()).unwrap(),
            last
        );
    }

    #[test]
    fn seed_mirror_mismatch_detected() {
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let c = claims();
        let mut seed = CapabilitySeed::new(c.sign(&k).unwrap(), &c);
        assert!(seed.verify(&k.verifying_key()).is_ok());
        seed.resource_scope = "api.openai.com*".into();
        let e = seed.verify(&k.verifying_key()).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
    }

    #[test]
    fn expiry_with_skew() {
        let mut c = claims();
        c.exp = 100;
        c.iat = 50;
        assert!(c.check_time(104, 5).is_ok());
        assert!(matches!(
            c.check_time(106, 5),
            Err(CapabilityError::Expired { .. })
        ));
        assert!(matches!(
            c.check_time(40, 5),
            Err(CapabilityError::NotYetValid { .. })
        ));
    }

    #[test]
    fn scope_rules() {
        assert!(scope_matches("*", "anything/at/all"));
        assert!(scope_matches("api.openai.com*", "api.openai.com/v1/models"));
        assert!(!scope_matches("api.openai.com*", "evil.com/api.openai.com"));
        assert!(scope_matches("api.openai.com", "api.openai.com"));
        assert!(scope_matches("api.openai.com", "api.openai.com/v1"));
        assert!(!scope_matches(
            "api.openai.com",
            "api.openai.com.evil.com/v1"
        ));
    }
}
