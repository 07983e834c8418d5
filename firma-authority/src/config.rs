//! `[authority]`: the Authority's section of `firma.toml`.

use firma_common::config::{ConfigError, check_admin_addr, check_log_level};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `[authority]`: keys exactly as the issuance guide shows, plus optional TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// gRPC listen address, e.g. `"[::1]:50051"`. Plaintext is only allowed on loopback.
    pub listen_addr: String,
    /// Runtime Cedar bundle streamed to sidecars (watched; changes pushed within 1 s).
    pub policy_dir: PathBuf,
    /// Cedar policies consulted before minting a capability.
    pub issuance_policy_dir: PathBuf,
    /// Append-only file, one revoked `token_id` per line (watched; new lines streamed). The
    /// single-node store; exactly one of this and `[authority.etcd]`.
    #[serde(default)]
    pub revocation_file: Option<PathBuf>,
    /// Revocations shared by several Authorities through etcd (docs/scale-out.md).
    pub etcd: Option<EtcdConfig>,
    /// Ed25519 private key (PKCS#8 PEM, mode 0600); the public key sits beside it as `.pub`.
    pub key_file: PathBuf,
    /// Upper bound for any capability's lifetime; requests asking for more are clamped.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_seconds: u64,
    /// The authority re-sends the current bundle at least this often.
    #[serde(default = "default_bundle_ttl")]
    pub bundle_ttl_seconds: u64,
    /// `error`, `warn`, `info`, `debug` or `trace` (overridden by `RUST_LOG`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// PEM certificate chain for gRPC over TLS (with `tls_key_path`).
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key for gRPC over TLS (with `tls_cert_path`).
    pub tls_key_path: Option<PathBuf>,
    /// Where the audit collector service appends events received from sidecars
    /// (JSON lines); the collector is served only when this is set.
    pub audit_collector_path: Option<PathBuf>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`), e.g. `"127.0.0.1:9465"`; off when
    /// unset.
    pub admin_addr: Option<String>,
    /// Name of the environment variable holding the bearer token the admin `Revoke` RPC
    /// requires (at least 32 characters); the RPC is refused when unset (docs/scale-out.md).
    pub admin_token_env: Option<String>,
    /// `text` or `json`; `--log-format` on the command line wins.
    #[serde(default)]
    pub log_format: firma_common::config::LogFormat,
}

fn default_max_ttl() -> u64 {
    3600
}
fn default_bundle_ttl() -> u64 {
    30
}
fn default_log_level() -> String {
    "info".into()
}

impl AuthorityConfig {
    /// The `[authority]` section of the file at `path`, validated; other sections are ignored.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&firma_common::config::read(path)?, path)
    }

    /// The `[authority]` section of `text`, validated; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = firma_common::config::parse_section(text, path, "authority")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field rules that serde cannot express.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if self.listen_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                file,
                "authority.listen_addr",
                format!(
                    "expected a socket address like \"[::1]:50051\", got {:?}",
                    self.listen_addr
                ),
            ));
        }
        if self.max_ttl_seconds == 0 {
            return Err(ConfigError::invalid(
                file,
                "authority.max_ttl_seconds",
                "expected a positive number of seconds",
            ));
        }
        if self.bundle_ttl_seconds == 0 {
            return Err(ConfigError::invalid(
                file,
                "authority.bundle_ttl_seconds",
                "expected a positive number of seconds",
            ));
        }
        match (&self.revocation_file, &self.etcd) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ConfigError::invalid(
                    file,
                    "authority.revocation_file",
                    "expected exactly one of revocation_file (single node) or [authority.etcd] (shared by several Authorities)",
                ));
            }
            (None, Some(etcd)) => etcd.validate(file, "authority.etcd")?,
            (Some(_), None) => {}
        }
        if let Some(env) = &self.admin_token_env
            && (env.is_empty() || env.contains('=') || env.contains('\0'))
        {
            return Err(ConfigError::invalid(
                file,
                "authority.admin_token_env",
                format!("expected the name of an environment variable, got {env:?}"),
            ));
        }
        check_log_level(file, "authority.log_level", &self.log_level)?;
        check_admin_addr(file, "authority.admin_addr", self.admin_addr.as_deref())?;
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return Err(ConfigError::invalid(
                file,
                "authority.tls_cert_path",
                "expected tls_cert_path and tls_key_path to be set together",
            ));
        }
        Ok(())
    }

    /// The listen address as parsed by `validate`.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        self.listen_addr
            .parse()
            .expect("validated in AuthorityConfig::validate")
    }

    /// Path of the public key written next to `key_file`.
    pub fn public_key_file(&self) -> PathBuf {
        self.key_file.with_extension("pub")
    }
}

/// `[authority.etcd]`: where the shared revocation set lives (crate::etcd).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. `["http://127.0.0.1:2379"]`. Plain `http://` only
    /// to loopback (revocations must not cross a network unauthenticated).
    pub endpoints: Vec<String>,
    /// Key prefix shared by the Authorities of one deployment.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Without a successful quorum read for this long, streams are refused (fail closed).
    #[serde(default = "default_stale_after_ms")]
    pub stale_after_ms: u64,
}

fn default_prefix() -> String {
    "/firma/".into()
}
fn default_stale_after_ms() -> u64 {
    3000
}

impl EtcdConfig {
    /// Checks the section; `section` is its dotted name in errors (`authority.etcd`).
    pub fn validate(&self, file: &Path, section: &str) -> Result<(), ConfigError> {
        firma_common::anchor::check_endpoints(
            file,
            &format!("{section}.endpoints"),
            &self.endpoints,
        )?;
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(ConfigError::invalid(
                file,
                &format!("{section}.prefix"),
                format!(
                    "expected a key prefix starting and ending with `/`, got {:?}",
                    self.prefix
                ),
            ));
        }
        if !(300..=600_000).contains(&self.stale_after_ms) {
            return Err(ConfigError::invalid(
                file,
                &format!("{section}.stale_after_ms"),
                format!(
                    "expected 300 to 600000 milliseconds, got {}",
                    self.stale_after_ms
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod etcd_tests {
    use super::*;

    fn cfg(text: &str) -> Result<EtcdConfig, String> {
        let c: EtcdConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate(Path::new("f.toml"), "authority.etcd")
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn config_rules() {
        let c = cfg("endpoints = [\"http://127.0.0.1:2379\", \"http://[::1]:2380\"]").unwrap();
        assert_eq!(c.prefix, "/firma/");
        assert_eq!(c.stale_after_ms, 3000);
        let e = cfg("endpoints = []").unwrap_err();
        assert!(
            e.contains("f.toml") && e.contains("authority.etcd.endpoints"),
            "{e}"
        );
        let e = cfg("endpoints = [\"http://10.0.0.1:2379\"]").unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let e = cfg("endpoints = [\"http://127.0.0.1\"]").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = cfg("endpoints = [\"http://127.0.0.1:1\"]\nprefix = \"firma\"").unwrap_err();
        assert!(e.contains("authority.etcd.prefix"), "{e}");
        let e = cfg("endpoints = [\"http://127.0.0.1:1\"]\nstale_after_ms = 5").unwrap_err();
        assert!(e.contains("authority.etcd.stale_after_ms"), "{e}");
        let e = cfg("endpoints = [\"http://127.0.0.1:1\"]\nbogus = 1").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }
}
