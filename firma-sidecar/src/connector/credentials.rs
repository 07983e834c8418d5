//! Host-scoped credentials injected after an allow (`[[sidecar.credentials]]`).
//!
//! Exact host match only: a credential for `api.openai.com` is never sent anywhere else. The
//! injected header replaces any value the agent set for the same header name ("injection
//! clobbers"), so an agent cannot choose what the upstream sees under that name.

use super::secret::Secret;
use super::vault::{VaultClient, VaultError};
use crate::config::{CredentialMode, SidecarConfig};
use http::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "environment variable {var} is not set (credential for host {host}, value_from_env); set it or remove the credential"
    )]
    MissingEnv { host: String, var: String },
    #[error("credential for host {host}: header {header:?} is not a valid HTTP header name")]
    BadHeader { host: String, header: String },
    #[error("credential for host {host}: the value is not a valid HTTP header value")]
    BadValue { host: String },
    #[error("two [[sidecar.credentials]] entries for host {host}")]
    Duplicate { host: String },
    #[error(transparent)]
    Vault(#[from] VaultError),
}

enum Source {
    Basic(Secret),
    Vault { path: String, key: String },
}

struct Entry {
    header: HeaderName,
    prefix: String,
    source: Source,
}

/// A credential ready to put on a request.
pub struct Injection {
    pub header: HeaderName,
    pub value: HeaderValue,
    /// `"basic"` or `"vault"` (for the audit event).
    pub source: &'static str,
}

impl std::fmt::Debug for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("header", &self.header)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

pub struct CredentialStore {
    by_host: HashMap<String, Entry>,
    vault: Option<Arc<VaultClient>>,
}

impl CredentialStore {
    /// Reads every basic-mode environment variable now (a missing one stops startup) and
    /// prepares the Vault client (which connects lazily).
    pub fn from_config(cfg: &SidecarConfig) -> Result<Self, CredentialError> {
        let mut by_host = HashMap::new();
        let mut vault_secrets = Vec::new();
        for c in &cfg.credentials {
            let host = c.host.trim().to_ascii_lowercase();
            let header = HeaderName::from_bytes(c.header.as_bytes()).map_err(|_| {
                CredentialError::BadHeader {
                    host: host.clone(),
                    header: c.header.clone(),
                }
            })?;
            let source = match c.mode {
                CredentialMode::Basic => {
                    let var = c.value_from_env.clone().unwrap_or_default();
                    let value = std::env::var(&var)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| CredentialError::MissingEnv {
                            host: host.clone(),
                            var: var.clone(),
                        })?;
                    let s = Secret::new(value);
                    header_value(&c.prefix, &s)
                        .ok_or_else(|| CredentialError::BadValue { host: host.clone() })?;
                    Source::Basic(s)
                }
                CredentialMode::Vault => {
                    let path = c.secret_path.clone().unwrap_or_default();
                    let key = c.secret_key.clone().unwrap_or_default();
                    vault_secrets.push((path.clone(), key.clone()));
                    Source::Vault { path, key }
                }
            };
            let entry = Entry {
                header,
                prefix: c.prefix.clone(),
                source,
            };
            if by_host.insert(host.clone(), entry).is_some() {
                return Err(CredentialError::Duplicate { host });
            }
        }
        let vault = match cfg.vault() {
            Some(v) if !vault_secrets.is_empty() => Some(Arc::new(VaultClient::new(
                v,
                &cfg.connector.extra_root_certs,
                vault_secrets,
            )?)),
            _ => None,
        };
        Ok(Self { by_host, vault })
    }

    pub fn has(&self, host: &str) -> bool {
        self.by_host.contains_key(host)
    }

    /// The credential for `host` (exact match), fetching from Vault if needed.
    /// `Ok(None)`: no credential configured for this host.
    pub async fn resolve(&self, host: &str) -> Result<Option<Injection>, CredentialError> {
        let Some(e) = self.by_host.get(host) else {
            return Ok(None);
        };
        let (secret, source) = match &e.source {
            Source::Basic(s) => {
                crate::metrics::credential_fetch("basic", true);
                (s.clone(), "basic")
            }
            Source::Vault { path, key } => {
                let vault = self.vault.as_ref().ok_or(VaultError::NoAuth {
                    role_env: String::new(),
                    secret_env: String::new(),
                })?;
                let fetched = vault.get(path, key).await;
                crate::metrics::credential_fetch("vault", fetched.is_ok());
                (fetched?, "vault")
            }
        };
        let value = header_value(&e.prefix, &secret).ok_or_else(|| CredentialError::BadValue {
            host: host.to_string(),
        })?;
        Ok(Some(Injection {
            header: e.header.clone(),
            value,
            source,
        }))
    }
}

/// `prefix + secret` as a header value marked sensitive (hyper/h2 never index or print it).
fn header_value(prefix: &str, secret: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("{prefix}{}", secret.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}
