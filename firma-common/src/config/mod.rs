//! The one sectioned `firma.toml` read by every `firma` subcommand.
//!
//! Parsing is strict: unknown keys are errors, and every error names the file, the dotted key
//! and what was expected, so an operator can fix it without reading code. Structural checks
//! happen in serde; rules that span fields live in [`FirmaConfig::validate`].

mod authority;
mod error;
mod sidecar;

pub use authority::AuthorityConfig;
pub use error::ConfigError;
pub use sidecar::*;

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole file. Each component reads only its own section and complains if it is absent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmaConfig {
    /// `[authority]`: the gRPC Authority and the offline `firma authority …` commands.
    pub authority: Option<AuthorityConfig>,
    /// `[sidecar.*]`: the enforcement sidecar.
    pub sidecar: Option<SidecarConfig>,
    /// Path the config was read from (not a key; filled in by [`FirmaConfig::load`]).
    #[serde(skip)]
    pub source: PathBuf,
}

impl FirmaConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_path_buf(),
            cause: e,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in error messages and to resolve
    /// nothing else (relative paths in the file are taken as given).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut cfg: FirmaConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                file: path.to_path_buf(),
                key,
                expected: error::describe_toml_error(e.inner()),
            }
        })?;
        cfg.source = path.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.authority {
            a.validate(&self.source)?;
        }
        if let Some(s) = &self.sidecar {
            s.validate(&self.source)?;
        }
        Ok(())
    }

    /// The `[authority]` section, or an error naming the file that lacks it.
    pub fn authority(&self) -> Result<&AuthorityConfig, ConfigError> {
        self.authority.as_ref().ok_or_else(|| ConfigError::Missing {
            file: self.source.clone(),
            key: "authority".into(),
        })
    }

    /// The `[sidecar]` tables, or an error naming the file that lacks them.
    pub fn sidecar(&self) -> Result<&SidecarConfig, ConfigError> {
        self.sidecar.as_ref().ok_or_else(|| ConfigError::Missing {
            file: self.source.clone(),
            key: "sidecar".into(),
        })
    }
}

#[cfg(test)]
mod tests;
