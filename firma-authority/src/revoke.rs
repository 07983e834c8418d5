//! The admin `Revoke` RPC: where a revocation is written and who may ask for one.
//!
//! The Authority's gRPC listener authenticates itself (TLS) but not its callers: capability
//! issuance is decided by the issuance policy, and the streams only read. Revoking is a write
//! that anyone able to reach the port could otherwise use to cut agents off, so it needs a
//! credential of its own: a bearer token held in the environment variable named by
//! `[authority] admin_token_env` (never in the config file). Without that key the RPC is refused
//! outright; with it, a request without the right `authorization: Bearer` metadata is refused
//! before anything is written. The comparison is over SHA-256 digests, in constant time.

use crate::error::AuthorityError;
use crate::etcd::EtcdStore;
use crate::revocations::{RevocationFile, check_token_id};
use sha2::{Digest, Sha256};
use tonic::Status;

/// Shortest admin token accepted at startup (bytes).
pub const MIN_TOKEN_LEN: usize = 32;

/// Where `Revoke` records a revocation: the same store, and the same code, as the CLI.
#[derive(Clone)]
pub enum Revoker {
    File(RevocationFile),
    Etcd(EtcdStore),
}

impl Revoker {
    /// Records `token_id` at `now_ms`; `true` when it was not revoked before.
    pub async fn add(&self, token_id: &str, now_ms: i64) -> Result<bool, AuthorityError> {
        match self {
            Self::Etcd(store) => store.add(token_id, now_ms).await,
            Self::File(file) => {
                let (file, id) = (file.clone(), token_id.to_owned());
                tokio::task::spawn_blocking(move || file.add(&id, now_ms))
                    .await
                    .map_err(|e| AuthorityError::Serve(format!("revocation writer: {e}")))?
            }
        }
    }
}

/// The admin token's digest (the token itself is not kept).
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// Reads the token from the variable `env`; a missing, non-UTF-8 or short value is an error
    /// naming the variable and the config key.
    pub fn from_env(env: &str) -> Result<Self, AuthorityError> {
        let bad = |why: &str| {
            AuthorityError::AdminToken(format!(
                "authority.admin_token_env names {env}, but {env} {why}"
            ))
        };
        let value = std::env::var(env).map_err(|_| bad("is not set (or not UTF-8)"))?;
        if value.trim().len() < MIN_TOKEN_LEN {
            return Err(bad(&format!("holds fewer than {MIN_TOKEN_LEN} characters")));
        }
        Ok(Self::of(value.trim()))
    }

    fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `metadata` carries `authorization: Bearer <this token>`.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("Revoke needs `authorization: Bearer <admin token>`")
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let diff = digest
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(Status::unauthenticated("Revoke: wrong admin token"))
        }
    }
}

/// Checks the request's token id as every store does, as a gRPC status.
pub fn check_request_id(token_id: &str) -> Result<(), Status> {
    check_token_id(token_id).map_err(|e| Status::invalid_argument(format!("token_id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn md(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let t = AdminToken::of("0123456789abcdef0123456789abcdef");
        assert!(
            t.check(&md(Some("Bearer 0123456789abcdef0123456789abcdef")))
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer 0123456789abcdef0123456789abcdeF"),
            Some("Bearer "),
            Some("Basic 0123456789abcdef0123456789abcdef"),
            Some("0123456789abcdef0123456789abcdef"),
        ] {
            let e = t.check(&md(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn token_ids_are_checked() {
        assert!(check_request_id("abc").is_ok());
        for bad in ["", "# x", "a b", "a\nb"] {
            assert_eq!(
                check_request_id(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
