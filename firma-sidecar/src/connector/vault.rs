//! Reading credentials from HashiCorp Vault (or a Vault-API server such as RustyVault).
//!
//! Decisions:
//! - The Vault protocol is `vaultrs` (KV read, AppRole login, token and namespace headers,
//!   TLS via reqwest + rustls with the process's ring provider): a maintained client rather
//!   than hand-written HTTP. Vault is the operator's own service, not a destination the agent
//!   chose, so it does not need the upstream connector's per-decision dialing.
//! - Lazy: nothing is fetched at startup; the first allowed request for a host fetches its
//!   secret. Vault being down at boot therefore only affects hosts that need it, and only
//!   while it is down.
//! - In-memory cache per `(secret_path, secret_key)` for `cache_ttl_seconds`; a rotation is
//!   visible after at most that long. An expired entry is never served when the refresh
//!   fails: fail closed (`CredentialUnavailable`), the upstream is not contacted.
//! - One refresh at a time per secret (a per-entry async mutex), so a burst after expiry makes
//!   one Vault call.
//! - One read of `secret_path` and both shapes accepted: KV v2 `data.data.<key>` (path
//!   `secret/data/...`) and KV v1 `data.<key>`. This works with Vault, OpenBao and RustyVault
//!   (KV v1 only) alike, and with whatever mount path the operator chose, without guessing the
//!   engine version.
//! - The read and the AppRole login are two small endpoints executed by vaultrs (its client,
//!   middleware and error parsing) with lenient response types, instead of `kv1::get_raw` and
//!   `auth::approle::login`: those deserialize into structs whose fields are all required
//!   (`request_id`; `accessor`, `entity_id`, `token_type`, `orphan`, ...), and RustyVault
//!   omits them, so every read and login would fail as unparsable. Only `data` and
//!   `auth.client_token` are needed.
//! - TLS: `ca_cert_path` when set, otherwise `[sidecar.connector] extra_root_certs`, on top of
//!   the webpki roots; always verified.
//! - Token: `token` from config, else `VAULT_TOKEN`, else an AppRole login with the role and
//!   secret ids read (once, at startup) from the environment variables named in config. An
//!   AppRole token rejected with 403 triggers one re-login. Tokens are never renewed (see the
//!   seed's advice to run Vault Agent for that).
//! - Errors carry status codes and transport causes only, never a response body: a Vault
//!   response can hold the secret, and error text ends up in logs and audit events.

use super::secret::Secret;
use crate::config::VaultConfig;
use http::HeaderValue;
use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};
use vaultrs::client::{Client as _, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("[sidecar.credentials.vault] addr {addr:?}: expected http(s)://host:port")]
    BadAddr { addr: String },
    #[error("[sidecar.credentials.vault]: {detail}")]
    BadSetting { detail: String },
    #[error(
        "no Vault token: set `token` in [sidecar.credentials.vault], or VAULT_TOKEN, or the AppRole variables {role_env} and {secret_env}"
    )]
    NoAuth {
        role_env: String,
        secret_env: String,
    },
    #[error("Vault at {addr} unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
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
    Token,
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
    auth: Auth,
    /// vaultrs keeps the token inside the client (`set_token` needs `&mut`): reads share it,
    /// an AppRole login replaces it.
    client: RwLock<vaultrs::client::VaultClient>,
    /// `Some(generation)` while the client holds a token believed valid. The generation lets
    /// concurrent reads that all saw a 403 cause one re-login, not one each.
    session: Mutex<Option<u64>>,
    ttl: Duration,
    timeout: Duration,
    entries: HashMap<(String, String), Entry>,
}

impl VaultClient {
    /// Reads token or AppRole ids from config/env now and builds the HTTP client (reading the
    /// CA files); contacts Vault only on first use. `extra_roots` are trusted when
    /// `ca_cert_path` is not set. `secrets` are the `(secret_path, secret_key)` pairs the
    /// credentials need.
    pub fn new(
        cfg: &VaultConfig,
        extra_roots: &[PathBuf],
        secrets: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, VaultError> {
        let bad_addr = || VaultError::BadAddr {
            addr: cfg.addr.clone(),
        };
        // Checked here: vaultrs's `address` setter panics on a malformed URL.
        let url = reqwest::Url::parse(&cfg.addr).map_err(|_| bad_addr())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad_addr());
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (auth, token) = if let Some(t) = &cfg.token {
            (Auth::Token, Secret::new(t.clone()))
        } else if let Some(t) = env("VAULT_TOKEN") {
            (Auth::Token, Secret::new(t))
        } else if let (Some(r), Some(s)) = (
            env(&cfg.approle_role_id_env),
            env(&cfg.approle_secret_id_env),
        ) {
            let auth = Auth::AppRole {
                mount: cfg.approle_mount.trim_matches('/').to_string(),
                role_id: Secret::new(r),
                secret_id: Secret::new(s),
            };
            (auth, Secret::new(""))
        } else {
            return Err(VaultError::NoAuth {
                role_env: cfg.approle_role_id_env.clone(),
                secret_env: cfg.approle_secret_id_env.clone(),
            });
        };
        // vaultrs turns these into headers with `unwrap`: reject what would panic there.
        if !is_header_value(token.expose()) {
            return Err(VaultError::BadSetting {
                detail: "the Vault token is not a valid HTTP header value".into(),
            });
        }
        if let Some(ns) = &cfg.namespace
            && !is_header_value(ns)
        {
            return Err(VaultError::BadSetting {
                detail: format!("namespace {ns:?} is not a valid HTTP header value"),
            });
        }
        let roots = match &cfg.ca_cert_path {
            Some(ca) => std::slice::from_ref(ca),
            None => extra_roots,
        };
        let ca_certs = roots
            .iter()
            .map(|p| {
                p.to_str()
                    .map(str::to_string)
                    .ok_or_else(|| VaultError::BadSetting {
                        detail: format!("CA path {} is not UTF-8", p.display()),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        // Every field set explicitly: the builder's defaults read VAULT_ADDR, VAULT_CACERT,
        // VAULT_CAPATH, VAULT_SKIP_VERIFY and client-certificate variables, which must not
        // silently change where the sidecar sends its token or whether it verifies TLS.
        let settings = VaultClientSettingsBuilder::default()
            .address(url.as_str())
            .token(token.expose())
            .namespace(cfg.namespace.clone())
            .timeout(Some(timeout))
            .ca_certs(ca_certs)
            .identity(None)
            .verify(true)
            .build()
            .map_err(|e| VaultError::BadSetting {
                detail: e.to_string(),
            })?;
        let client = vaultrs::client::VaultClient::new(settings).map_err(|e| {
            VaultError::BadSetting {
                // Safe to show: file paths and reqwest builder errors, no server data.
                detail: error_chain(&e),
            }
        })?;
        let session = match auth {
            Auth::Token => Some(0),
            Auth::AppRole { .. } => None,
        };
        Ok(Self {
            addr: cfg.addr.clone(),
            auth,
            client: RwLock::new(client),
            session: Mutex::new(session),
            ttl: Duration::from_secs(cfg.cache_ttl_seconds),
            timeout,
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
        let endpoint_path = path.trim_matches('/').to_string();
        let what = || format!("read of {path}");
        for attempt in 0..2 {
            let generation = self.login().await?;
            let read = {
                let client = self.client.read().await;
                let read = ReadSecret {
                    path: endpoint_path.clone(),
                };
                vaultrs::api::exec_with_no_result(&*client, read).await
            };
            match read {
                Ok(resp) => {
                    return extract(&resp["data"], key).ok_or_else(|| VaultError::MissingKey {
                        path: path.into(),
                        key: key.into(),
                    });
                }
                Err(e)
                    if attempt == 0
                        && status_of(&e) == Some(403)
                        && matches!(self.auth, Auth::AppRole { .. }) =>
                {
                    let mut session = self.session.lock().await;
                    if *session == Some(generation) {
                        *session = None;
                    }
                }
                Err(e) => return Err(self.map_err(e, what())),
            }
        }
        Err(VaultError::Status {
            what: what(),
            status: 403,
        })
    }

    /// The current session generation, logging in with AppRole first if there is none.
    async fn login(&self) -> Result<u64, VaultError> {
        let mut session = self.session.lock().await;
        if let Some(g) = *session {
            return Ok(g);
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
        let mut client = self.client.write().await;
        // A stale token must not ride along on the login request.
        client.set_token("");
        let login = AppRoleLogin {
            mount,
            role_id,
            secret_id,
        };
        let resp = vaultrs::api::exec_with_no_result(&*client, login)
            .await
            .map_err(|e| self.map_err(e, "AppRole login".into()))?;
        let token = resp
            .auth
            .map(|a| Secret::new(a.client_token))
            .ok_or_else(|| VaultError::Protocol {
                addr: self.addr.clone(),
                detail: "AppRole login response has no auth.client_token".into(),
            })?;
        if !is_header_value(token.expose()) {
            return Err(VaultError::Protocol {
                addr: self.addr.clone(),
                detail: "AppRole login returned a token that is not a valid header value".into(),
            });
        }
        client.set_token(token.expose());
        let next = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *session = Some(next);
        Ok(next)
    }

    /// vaultrs error -> [`VaultError`], keeping status codes and transport causes and dropping
    /// anything that could quote a response body.
    fn map_err(&self, e: ClientError, what: String) -> VaultError {
        if let Some(status) = status_of(&e) {
            return VaultError::Status { what, status };
        }
        let protocol = |detail: &str| VaultError::Protocol {
            addr: self.addr.clone(),
            detail: format!("{what}: {detail}"),
        };
        use rustify::errors::ClientError as Rest;
        match e {
            ClientError::RestClientError { source } => match source {
                Rest::RequestError { source, .. } | Rest::ResponseError { source } => {
                    match source.downcast_ref::<reqwest::Error>() {
                        Some(r) if r.is_timeout() => VaultError::Timeout(self.timeout),
                        Some(r) => VaultError::Unreachable {
                            addr: self.addr.clone(),
                            detail: error_chain(r),
                        },
                        None => protocol("request failed"),
                    }
                }
                Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => {
                    protocol("the response is not the JSON Vault sends")
                }
                _ => protocol("could not build the request"),
            },
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
                protocol("the response has no data")
            }
            ClientError::JsonParseError { .. } => {
                protocol("the response is not the JSON Vault sends")
            }
            // Remaining variants describe local failures in words of their own (no server
            // data in their messages).
            other => protocol(&other.to_string()),
        }
    }
}

/// `GET /v1/<path>`, the whole JSON body as the response.
struct ReadSecret {
    path: String,
}

impl Endpoint for ReadSecret {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// `POST /v1/auth/<mount>/login` with the AppRole ids.
struct AppRoleLogin<'a> {
    mount: &'a str,
    role_id: &'a Secret,
    secret_id: &'a Secret,
}

#[derive(serde::Deserialize)]
struct LoginResponse {
    auth: Option<LoginAuth>,
}

#[derive(serde::Deserialize)]
struct LoginAuth {
    client_token: String,
}

impl Endpoint for AppRoleLogin<'_> {
    type Response = LoginResponse;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("auth/{}/login", self.mount)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        let body = serde_json::json!({
            "role_id": self.role_id.expose(),
            "secret_id": self.secret_id.expose(),
        });
        Ok(Some(body.to_string().into_bytes()))
    }
}

/// Session generations are unique across clients so a stale one can never match.
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The HTTP status of a refusal by Vault, if that is what `e` is.
fn status_of(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

fn is_header_value(s: &str) -> bool {
    HeaderValue::from_str(s).is_ok()
}

/// `e` and its causes, joined. Only used on transport and setup errors, whose messages are
/// about sockets, TLS and files.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// KV v2 (`data.<key>` under `data`) first, then KV v1 (`<key>`); `data` is the response's
/// `data` field.
fn extract(data: &serde_json::Value, key: &str) -> Option<Secret> {
    if let Some(s) = data["data"].get(key).and_then(|x| x.as_str()) {
        return Some(Secret::new(s));
    }
    data.get(key).and_then(|x| x.as_str()).map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::{VaultClient, VaultError, extract};
    use crate::config::VaultConfig;
    use serde_json::json;
    use std::time::Duration;

    fn cfg(addr: &str, token: &str, timeout_ms: u64) -> VaultConfig {
        let text = format!("addr = {addr:?}\ntoken = {token:?}\ntimeout_ms = {timeout_ms}\n");
        toml::from_str(&text).unwrap()
    }

    fn client(c: &VaultConfig) -> Result<VaultClient, VaultError> {
        VaultClient::new(c, &[], [("secret/x".to_string(), "value".to_string())])
    }

    #[test]
    fn settings_vaultrs_would_panic_on_are_errors() {
        for addr in ["not a url", "ftp://127.0.0.1:1", "http://"] {
            let e = client(&cfg(addr, "t", 100)).err();
            assert!(
                matches!(e, Some(VaultError::BadAddr { .. })),
                "{addr}: {e:?}"
            );
        }
        let e = client(&cfg("http://127.0.0.1:1", "bad\ntoken", 100)).err();
        assert!(matches!(e, Some(VaultError::BadSetting { .. })), "{e:?}");
        let mut c = cfg("http://127.0.0.1:1", "t", 100);
        c.namespace = Some("ns\r\n".into());
        assert!(matches!(client(&c), Err(VaultError::BadSetting { .. })));
        c.namespace = None;
        c.ca_cert_path = Some("/nonexistent/vault-ca.pem".into());
        assert!(matches!(client(&c), Err(VaultError::BadSetting { .. })));
    }

    /// The transport failures vaultrs reports map to the variants the connector and the
    /// operator read: nothing listening -> `Unreachable`, a server that never answers ->
    /// `Timeout`. Both on loopback.
    #[tokio::test]
    async fn transport_failures_are_classified() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let v = client(&cfg(&format!("http://127.0.0.1:{port}"), "t", 2_000)).unwrap();
        let e = v.get("secret/x", "value").await.unwrap_err();
        assert!(matches!(e, VaultError::Unreachable { .. }), "{e:?}");
        // The operator sees the cause, not just "unreachable".
        assert!(e.to_string().contains("Connection refused"), "{e}");

        // Accepted by the kernel backlog, never answered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", silent.local_addr().unwrap());
        let v = client(&cfg(&addr, "t", 300)).unwrap();
        let started = std::time::Instant::now();
        let e = v.get("secret/x", "value").await.unwrap_err();
        assert!(matches!(e, VaultError::Timeout(_)), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A secret that was never configured is not fetched at all.
        let e = v.get("secret/other", "value").await.unwrap_err();
        assert!(matches!(e, VaultError::MissingKey { .. }), "{e:?}");
    }

    #[test]
    fn both_kv_shapes() {
        let v2 = json!({"data":{"value":"a"},"metadata":{}});
        let v1 = json!({"value":"b"});
        assert_eq!(extract(&v2, "value").unwrap().expose(), "a");
        assert_eq!(extract(&v1, "value").unwrap().expose(), "b");
        assert!(extract(&v1, "other").is_none());
        assert!(extract(&json!("not an object"), "value").is_none());
        assert!(extract(&json!({"value": 3}), "value").is_none());
    }
}
