//! Host-scoped credentials injected after an allow (`[[sidecar.credentials]]`).
//!
//! Exact host match only: a credential for `api.openai.com` is never sent anywhere else. On a
//! credential host every header and query parameter that carries an API credential
//! (`strip_headers`, `strip_query_params`, and the injected header itself) is removed before
//! Firma's header is set, so the agent's own key (or its placeholder) never leaves next to
//! Firma's and the agent cannot choose what the upstream sees under those names. A placeholder
//! anywhere else is a leak ([`CredentialStore::placeholder_leak`], see [`super::placeholder`]).

use super::placeholder;
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
    /// Headers removed from every request to the host (always includes `header`).
    strip_headers: Vec<HeaderName>,
    /// Query parameters removed from every request to the host (lowercase).
    strip_query: Vec<String>,
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
            let mut strip_headers = Vec::new();
            let configured = c.strip_headers.clone().unwrap_or_else(|| {
                placeholder::DEFAULT_STRIP_HEADERS
                    .map(String::from)
                    .to_vec()
            });
            for h in configured {
                let name = HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    CredentialError::BadHeader {
                        host: host.clone(),
                        header: h.clone(),
                    }
                })?;
                if !strip_headers.contains(&name) {
                    strip_headers.push(name);
                }
            }
            if !strip_headers.contains(&header) {
                strip_headers.push(header.clone());
            }
            let strip_query = c
                .strip_query_params
                .clone()
                .unwrap_or_else(|| placeholder::DEFAULT_STRIP_QUERY.map(String::from).to_vec())
                .into_iter()
                .map(|q| q.to_ascii_lowercase())
                .collect();
            let entry = Entry {
                header,
                prefix: c.prefix.clone(),
                source,
                strip_headers,
                strip_query,
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

    /// Why this request to `host` must not leave: it carries a placeholder credential
    /// ([`placeholder::MARKER`]) that Firma would not remove there. On a credential host the
    /// headers and query parameters it strips are exempt (they never leave); anywhere else,
    /// nothing is.
    pub fn placeholder_leak(
        &self,
        host: &str,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Option<String> {
        let entry = self.by_host.get(host);
        let found = placeholder::find(
            uri,
            headers,
            entry.map_or(&[][..], |e| &e.strip_headers),
            entry.map_or(&[][..], |e| &e.strip_query),
        )?;
        Some(match entry {
            None => format!(
                "a Firma placeholder credential ({marker}) is in the {found} of a request to {host}, which has no credential: the agent is sending an API key to another host than the key's own",
                marker = placeholder::MARKER
            ),
            Some(e) => format!(
                "a Firma placeholder credential ({marker}) is in the {found} of a request to {host}; Firma removes and replaces only the headers {} and the query parameters {} there ([[sidecar.credentials]] strip_headers, strip_query_params), so it would leave",
                e.strip_headers
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if e.strip_query.is_empty() {
                    "(none)".to_string()
                } else {
                    e.strip_query.join(", ")
                },
                marker = placeholder::MARKER
            ),
        })
    }

    /// The headers [`Self::strip_agent_credentials`] removes for `host` (empty: no entry).
    pub fn agent_headers(&self, host: &str) -> &[HeaderName] {
        self.by_host.get(host).map_or(&[], |e| &e.strip_headers)
    }

    /// Removes the credential headers and query parameters of `host`'s entry from a request
    /// (the agent's own key or its placeholder). No entry: nothing changes.
    pub fn strip_agent_credentials<B>(&self, host: &str, req: &mut http::Request<B>) {
        let Some(e) = self.by_host.get(host) else {
            return;
        };
        for h in &e.strip_headers {
            req.headers_mut().remove(h);
        }
        if let Some(pq) = req.uri().path_and_query().map(|p| p.as_str().to_string())
            && let Some(stripped) = placeholder::strip_query(&pq, &e.strip_query)
        {
            let mut parts = req.uri().clone().into_parts();
            if let Ok(p) = stripped.parse() {
                parts.path_and_query = Some(p);
                if let Ok(u) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
    }

    /// The credential for `host` (exact match), fetching from Vault if needed.
    /// `Ok(None)`: no credential configured for this host.
    pub async fn resolve(&self, host: &str) -> Result<Option<Injection>, CredentialError> {
        let Some(e) = self.by_host.get(host) else {
            return Ok(None);
        };
        let (secret, source) = match &e.source {
            Source::Basic(s) => {
                super::metrics::credential_fetch("basic", true);
                (s.clone(), "basic")
            }
            Source::Vault { path, key } => {
                let vault = self.vault.as_ref().ok_or(VaultError::NoAuth {
                    role_env: String::new(),
                    secret_env: String::new(),
                })?;
                let fetched = vault.get(path, key).await;
                super::metrics::credential_fetch("vault", fetched.is_ok());
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
