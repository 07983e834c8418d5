//! What every config section shares: the error type and the strict TOML reader.
//!
//! Each section's schema lives in the crate that uses it (`firma_sidecar::config`,
//! `firma_authority::config`); the `firma` binary assembles them into the one sectioned
//! `firma.toml`. Parsing is strict everywhere: unknown keys are errors, and every error names the
//! file, the dotted key and what was expected, so an operator can fix it without reading code.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A configuration problem, always naming the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {expected}")]
    Invalid {
        file: PathBuf,
        key: String,
        expected: String,
    },
    #[error("{file}: section `[{key}]` is required for this command but absent")]
    Missing { file: PathBuf, key: String },
}

impl ConfigError {
    /// Shorthand for a cross-field rule failure on `key`.
    pub fn invalid(file: &Path, key: &str, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            expected: expected.into(),
        }
    }
}

/// Reads `path` as text, naming the file on failure.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        file: path.to_path_buf(),
        cause: e,
    })
}

/// Deserializes `text` into `T`, reporting the dotted key of the first mismatch.
///
/// `T` decides strictness (`deny_unknown_fields`); `path` only names the file in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
        file: path.to_path_buf(),
        key: e.path().to_string(),
        expected: e.inner().message().trim().to_string(),
    })
}

/// The log levels both components accept (`RUST_LOG` still overrides them).
pub fn check_log_level(file: &Path, key: &str, level: &str) -> Result<(), ConfigError> {
    match level {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(()),
        other => Err(ConfigError::invalid(
            file,
            key,
            format!("expected one of error, warn, info, debug, trace; got {other:?}"),
        )),
    }
}

/// Log line format: `text` (human, colours only on a terminal) or `json` (one object a line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Checks an optional admin listen address.
pub fn check_admin_addr(file: &Path, key: &str, addr: Option<&str>) -> Result<(), ConfigError> {
    match addr {
        Some(a) if a.parse::<std::net::SocketAddr>().is_err() => Err(ConfigError::invalid(
            file,
            key,
            format!("expected a socket address like \"127.0.0.1:9464\", got {a:?}"),
        )),
        _ => Ok(()),
    }
}

/// One section of a sectioned file (`[sidecar]`, `[authority]`), other sections ignored.
///
/// For a component started on its own (tests, embedders); the `firma` binary parses the whole
/// file strictly instead. Key paths in errors stay absolute (`sidecar.audit.sink`).
pub fn parse_section<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    key: &str,
) -> Result<T, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let value = table.remove(key).ok_or_else(|| ConfigError::Missing {
        file: path.to_path_buf(),
        key: key.to_string(),
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        ConfigError::Invalid {
            file: path.to_path_buf(),
            key: if inner == "." {
                key.to_string()
            } else {
                format!("{key}.{inner}")
            },
            expected: e.inner().message().trim().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        port: u16,
    }

    #[test]
    fn a_section_ignores_the_others_and_keeps_absolute_key_paths() {
        let path = Path::new("/etc/firma.toml");
        let text = "[other]\nanything = 1\n[mine]\nport = 80\n";
        let s: Section = parse_section(text, path, "mine").unwrap();
        assert_eq!(s.port, 80);

        let bad = parse_section::<Section>("[mine]\nport = \"x\"\n", path, "mine")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("/etc/firma.toml") && bad.contains("`mine.port`"),
            "{bad}"
        );
        let unknown = parse_section::<Section>("[mine]\nport = 1\nprot = 2\n", path, "mine")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("prot"), "{unknown}");
        let missing = parse_section::<Section>("[other]\n", path, "mine").unwrap_err();
        assert!(matches!(missing, ConfigError::Missing { .. }), "{missing}");
    }
}
