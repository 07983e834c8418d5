//! `[sidecar.session_store]`: where Stage 2's session state lives (see docs/scale-out.md,
//! "Session state on Redis").

use firma_common::config::ConfigError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where per-session counters and token budgets are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this sidecar's memory: exact for one sidecar, N sidecars give a session N budgets.
    #[default]
    Memory,
    /// One Redis primary shared by every sidecar: budgets hold across sidecars.
    Redis,
}

/// What a decision does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Deny `SessionStoreUnavailable` (fail closed).
    #[default]
    Deny,
    /// Allow at most `local_allowance` calls per session on this sidecar per outage, counted
    /// from the last count this sidecar saw; metered (token-budgeted) calls are still denied.
    LocalAllowance,
}

/// `[sidecar.session_store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStoreConfig {
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub backend: Backend,
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS); required for `redis`.
    pub url: Option<String>,
    /// PEM CA certificate(s) that verify a `rediss://` server (default: the system roots).
    pub ca_file: Option<PathBuf>,
    /// ACL user name (Redis 6+ `AUTH user password`); default: the `default` user.
    pub username: Option<String>,
    /// Environment variable holding the Redis password (never written in this file).
    pub password_env: Option<String>,
    /// Prefix of every key Firma writes, so several deployments can share one Redis.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Longest one Redis round trip (or a connection attempt) may take before the store is
    /// treated as unavailable.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `deny` (default) or `local_allowance`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Calls per session this sidecar may allow during one outage with `local_allowance`.
    #[serde(default)]
    pub local_allowance: u32,
    /// How long a token reservation outlives a sidecar that died before settling it (live
    /// sidecars keep extending the ones they hold).
    #[serde(default = "default_reservation_ttl")]
    pub reservation_ttl_seconds: u64,
}

impl Default for SessionStoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            url: None,
            ca_file: None,
            username: None,
            password_env: None,
            key_prefix: default_prefix(),
            timeout_ms: default_timeout_ms(),
            on_unavailable: OnUnavailable::Deny,
            local_allowance: 0,
            reservation_ttl_seconds: default_reservation_ttl(),
        }
    }
}

fn default_prefix() -> String {
    "firma".into()
}

fn default_timeout_ms() -> u64 {
    200
}

fn default_reservation_ttl() -> u64 {
    30
}

/// Most calls per session a sidecar may allow during one outage.
const MAX_LOCAL_ALLOWANCE: u32 = 10_000;

impl SessionStoreConfig {
    /// Cross-field rules; `file` is named in every error.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let key = |k: &str| format!("sidecar.session_store.{k}");
        let bad = |k: &str, why: String| Err(ConfigError::invalid(file, &key(k), why));
        if self.backend == Backend::Memory {
            let set = [
                ("url", self.url.is_some()),
                ("ca_file", self.ca_file.is_some()),
                ("username", self.username.is_some()),
                ("password_env", self.password_env.is_some()),
                ("local_allowance", self.local_allowance != 0),
            ];
            if let Some((k, _)) = set.iter().find(|(_, s)| *s) {
                return bad(
                    k,
                    "expected no Redis setting with backend = \"memory\" (set backend = \"redis\")"
                        .into(),
                );
            }
            return Ok(());
        }
        let Some(url) = &self.url else {
            return bad(
                "url",
                "expected a URL like \"redis://127.0.0.1:6379\" for backend = \"redis\"".into(),
            );
        };
        let tls = match url.split_once("://").map(|(s, _)| s) {
            Some("redis") => false,
            Some("rediss") => true,
            _ => {
                return bad(
                    "url",
                    format!("expected a redis:// or rediss:// URL, got {url:?}"),
                );
            }
        };
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            return bad("url", format!("expected a valid Redis URL ({e})"));
        }
        if url.contains('@') {
            return bad(
                "url",
                "expected no credentials in the URL: use `username` and `password_env`".into(),
            );
        }
        if let Some(ca) = &self.ca_file {
            if !tls {
                return bad(
                    "ca_file",
                    "expected a rediss:// URL when a CA file is given".into(),
                );
            }
            if let Err(e) = std::fs::metadata(ca) {
                return bad(
                    "ca_file",
                    format!("expected a readable PEM file at {} ({e})", ca.display()),
                );
            }
        }
        if self.username.is_some() && self.password_env.is_none() {
            return bad(
                "password_env",
                "expected the environment variable of the password for `username`".into(),
            );
        }
        if let Some(var) = &self.password_env
            && var.is_empty()
        {
            return bad(
                "password_env",
                "expected an environment variable name".into(),
            );
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return bad(
                "key_prefix",
                format!(
                    "expected a non-empty prefix without spaces, got {:?}",
                    self.key_prefix
                ),
            );
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return bad(
                "timeout_ms",
                format!("expected 1 to 60000 ms, got {}", self.timeout_ms),
            );
        }
        if !(1..=86_400).contains(&self.reservation_ttl_seconds) {
            return bad(
                "reservation_ttl_seconds",
                format!("expected 1 to 86400, got {}", self.reservation_ttl_seconds),
            );
        }
        match (self.on_unavailable, self.local_allowance) {
            (OnUnavailable::Deny, 0) => Ok(()),
            (OnUnavailable::Deny, _) => bad(
                "local_allowance",
                "expected on_unavailable = \"local_allowance\" when an allowance is set".into(),
            ),
            (OnUnavailable::LocalAllowance, n) if !(1..=MAX_LOCAL_ALLOWANCE).contains(&n) => bad(
                "local_allowance",
                format!(
                    "expected 1 to {MAX_LOCAL_ALLOWANCE} calls per session for on_unavailable = \"local_allowance\", got {n}"
                ),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<SessionStoreConfig, String> {
        let c: SessionStoreConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.validate(Path::new("firma.toml"))
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn default_is_memory_and_redis_needs_a_url() {
        assert_eq!(parse("").unwrap().backend, Backend::Memory);
        let e = parse("backend = \"redis\"").unwrap_err();
        assert!(
            e.contains("firma.toml") && e.contains("sidecar.session_store.url"),
            "{e}"
        );
        let c = parse("backend = \"redis\"\nurl = \"redis://127.0.0.1:6390\"").unwrap();
        assert_eq!((c.key_prefix.as_str(), c.timeout_ms), ("firma", 200));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            ("url = \"redis://x:1\"", "url"),
            ("backend = \"redis\"\nurl = \"http://x:1\"", "url"),
            ("backend = \"redis\"\nurl = \"redis://u:p@x:1\"", "url"),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\nca_file = \"/etc/hosts\"",
                "ca_file",
            ),
            (
                "backend = \"redis\"\nurl = \"rediss://x:1\"\nca_file = \"/nonexistent.pem\"",
                "ca_file",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\nusername = \"u\"",
                "password_env",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\ntimeout_ms = 0",
                "timeout_ms",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\nkey_prefix = \"\"",
                "key_prefix",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\nlocal_allowance = 5",
                "local_allowance",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x:1\"\non_unavailable = \"local_allowance\"",
                "local_allowance",
            ),
        ];
        for (text, k) in cases {
            let e = parse(text).unwrap_err();
            assert!(
                e.contains(&format!("sidecar.session_store.{k}")),
                "{text}: {e}"
            );
        }
        assert!(parse("backend = \"etcd\"").is_err());
        assert!(parse("backend = \"redis\"\nurl = \"redis://x:1\"\nbogus = 1").is_err());
        let ok = "backend = \"redis\"\nurl = \"rediss://x:1\"\nca_file = \"/etc/hosts\"\non_unavailable = \"local_allowance\"\nlocal_allowance = 3";
        assert_eq!(parse(ok).unwrap().local_allowance, 3);
    }
}
