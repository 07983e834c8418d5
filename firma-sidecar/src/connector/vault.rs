//! Reading credentials from HashiCorp Vault (or a Vault-API server such as RustyVault).
//!
//! Decisions:
//! - Lazy: nothing is fetched at startup; the first allowed request for a host fetches its
//!   secret. Vault being down at boot therefore only affects hosts that need it, and only
//!   while it is down.
//! - In-memory cache per `(secret_path, secret_key)` for `cache_ttl_seconds`; a rotation is
//!   visible after at most that long. An expired entry is never served when the refresh
//!   fails: fail closed (`CredentialUnavailable`), the upstream is not contacted.
//! - One refresh at a time per secret (a per-entry async mutex), so a burst after expiry makes
//!   one Vault call.
//! - Raw `GET /v1/<secret_path>` and accept both shapes: KV v2 `data.data.<key>` and KV v1
//!   `data.<key>`. This works with Vault, OpenBao and RustyVault (KV v1 only) alike, and with
//!   whatever mount path the operator chose, without guessing the engine version. It uses the
//!   same hyper/rustls stack as the upstream connector, so there is one TLS policy.
//! - Token: `token` from config, else `VAULT_TOKEN`, else an AppRole login with the role and
//!   secret ids read (once, at startup) from the environment variables named in config. An
//!   AppRole token rejected with 403 triggers one re-login. Tokens are never renewed (see the
//!   seed's advice to run Vault Agent for that).

use super::dial::{DialError, Dialer};
use super::secret::Secret;
use bytes::Bytes;
use firma_common::config::VaultConfig;
use http_body_util::{BodyExt, Full, Limited};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("[sidecar.credentials.vault] addr {addr:?}: expected http(s)://host:port")]
    BadAddr { addr: String },
    #[error(
        "no Vault token: set `token` in [sidecar.credentials.vault], or VAULT_TOKEN, or the AppRole variables {role_env} and {secret_env}"
    )]
    NoAuth {
        role_env: String,
        secret_env: String,
    },
    #[error("Vault at {addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: DialError,
    },
    #[error("Vault at {addr}: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("Vault refused {what} (HTTP {status})")]
    Status { what: String, status: u16 },
    #[error("Vault secret {path} has no string field {key:?}")]
    MissingKey { path: String, key: String },
    #[error("Vault request timed out after {0:?}")]
    Timeout(Duration),
}

#[derive(Debug)]
enum Auth {
    Token(Secret),
    AppRole {
        mount: String,
        role_id: Secret,
        secret_id: Secret,
    },
}

type Entry = Mutex<Option<(Secret, Instant)>>;

/// A Vault connection shared by every vault-mode credential.
pub struct VaultClient {
    addr: String,
    host: String,
    port: u16,
    tls: bool,
    namespace: Option<String>,
    dialer: Dialer,
    auth: Auth,
    token: Mutex<Option<Secret>>,
    ttl: Duration,
    timeout: Duration,
    entries: HashMap<(String, String), Entry>,
}

impl VaultClient {
    /// Reads token or AppRole ids from config/env now; contacts Vault only on first use.
    /// `secrets` are the `(secret_path, secret_key)` pairs the credentials need.
    pub fn new(
        cfg: &VaultConfig,
        dialer: Dialer,
        secrets: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, VaultError> {
        let uri: http::Uri = cfg.addr.parse().map_err(|_| VaultError::BadAddr {
            addr: cfg.addr.clone(),
        })?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(VaultError::BadAddr {
                    addr: cfg.addr.clone(),
                });
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| VaultError::BadAddr {
                addr: cfg.addr.clone(),
            })?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let auth = if let Some(t) = &cfg.token {
            Auth::Token(Secret::new(t.clone()))
        } else if let Some(t) = env("VAULT_TOKEN") {
            Auth::Token(Secret::new(t))
        } else if let (Some(r), Some(s)) = (
            env(&cfg.approle_role_id_env),
            env(&cfg.approle_secret_id_env),
        ) {
            Auth::AppRole {
                mount: cfg.approle_mount.trim_matches('/').to_string(),
                role_id: Secret::new(r),
                secret_id: Secret::new(s),
            }
        } else {
            return Err(VaultError::NoAuth {
                role_env: cfg.approle_role_id_env.clone(),
                secret_env: cfg.approle_secret_id_env.clone(),
            });
        };
        let token = match &auth {
            Auth::Token(t) => Some(t.clone()),
            Auth::AppRole { .. } => None,
        };
        Ok(Self {
            addr: cfg.addr.clone(),
            host,
            port,
            tls,
            namespace: cfg.namespace.clone(),
            dialer,
            auth,
            token: Mutex::new(token),
            ttl: Duration::from_secs(cfg.cache_ttl_seconds),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            entries: secrets.into_iter().map(|k| (k, Mutex::new(None))).collect(),
        })
    }

    /// The secret, from cache while fresh, else from Vault.
    pub async fn get(&self, path: &str, key: &str) -> Result<Secret, VaultError> {
        let Some(entry) = self.entries.get(&(path.to_string(), key.to_string())) else {
            return Err(VaultError::MissingKey {
                path: path.into(),
                key: key.into(),
            });
        };
        let mut slot = entry.lock().await;
        if let Some((s, at)) = slot.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(s.clone());
        }
        *slot = None;
        let fresh = tokio::time::timeout(self.timeout, self.fetch(path, key))
            .await
            .map_err(|_| VaultError::Timeout(self.timeout))??;
        *slot = Some((fresh.clone(), Instant::now()));
        Ok(fresh)
    }

    async fn fetch(&self, path: &str, key: &str) -> Result<Secret, VaultError> {
        let url_path = format!("/v1/{}", path.trim_start_matches('/'));
        for attempt in 0..2 {
            let token = self.token().await?;
            let (status, body) = self
                .request(http::Method::GET, &url_path, Some(&token), None)
                .await?;
            if status == 403 && attempt == 0 && matches!(self.auth, Auth::AppRole { .. }) {
                *self.token.lock().await = None;
                continue;
            }
            if status != 200 {
                return Err(VaultError::Status {
                    what: format!("read of {path}"),
                    status,
                });
            }
            return extract(&body, key).ok_or_else(|| VaultError::MissingKey {
                path: path.into(),
                key: key.into(),
            });
        }
        Err(VaultError::Status {
            what: format!("read of {path}"),
            status: 403,
        })
    }

    async fn token(&self) -> Result<Secret, VaultError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let Auth::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.auth
        else {
            return Err(VaultError::Protocol {
                addr: self.addr.clone(),
                detail: "no token".into(),
            });
        };
        let body =
            serde_json::json!({"role_id": role_id.expose(), "secret_id": secret_id.expose()});
        let (status, resp) = self
            .request(
                http::Method::POST,
                &format!("/v1/auth/{mount}/login"),
                None,
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        if status != 200 {
            return Err(VaultError::Status {
                what: "AppRole login".into(),
                status,
            });
        }
        let token = serde_json::from_slice::<serde_json::Value>(&resp)
            .ok()
            .and_then(|v| v["auth"]["client_token"].as_str().map(Secret::new))
            .ok_or_else(|| VaultError::Protocol {
                addr: self.addr.clone(),
                detail: "AppRole login response has no auth.client_token".into(),
            })?;
        *slot = Some(token.clone());
        Ok(token)
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), VaultError> {
        let unreachable = |source| VaultError::Unreachable {
            addr: self.addr.clone(),
            source,
        };
        let proto = |detail: String| VaultError::Protocol {
            addr: self.addr.clone(),
            detail,
        };
        let addr = resolve(&self.host, self.port)
            .await
            .ok_or_else(|| proto(format!("cannot resolve {}", self.host)))?;
        let tls_name = self.tls.then_some(self.host.as_str());
        let mut sender = self
            .dialer
            .http1(addr, tls_name, None)
            .await
            .map_err(unreachable)?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            let mut v = http::HeaderValue::from_str(t.expose())
                .map_err(|_| proto("token is not a valid header value".into()))?;
            v.set_sensitive(true);
            req = req.header("x-vault-token", v);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("x-vault-namespace", ns.as_str());
        }
        let req = req
            .body(
                Full::new(body.unwrap_or_default())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| proto(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(format!("request failed: {e}")))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| proto(format!("reading response: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
}

async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port)).await.ok()?.next()
}

/// KV v2 (`data.data.<key>`) first, then KV v1 (`data.<key>`).
fn extract(body: &[u8], key: &str) -> Option<Secret> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let data = &v["data"];
    if let Some(s) = data["data"].get(key).and_then(|x| x.as_str()) {
        return Some(Secret::new(s));
    }
    data.get(key).and_then(|x| x.as_str()).map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::extract;

    #[test]
    fn both_kv_shapes() {
        let v2 = br#"{"data":{"data":{"value":"a"},"metadata":{}}}"#;
        let v1 = br#"{"data":{"value":"b"}}"#;
        assert_eq!(extract(v2, "value").unwrap().expose(), "a");
        assert_eq!(extract(v1, "value").unwrap().expose(), "b");
        assert!(extract(v1, "other").is_none());
        assert!(extract(b"not json", "value").is_none());
    }
}
