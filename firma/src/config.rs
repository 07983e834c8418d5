//! The one sectioned `firma.toml` read by every `firma` subcommand, assembled from the sections
//! the components define (`firma_sidecar::config`, `firma_authority::config`).
//!
//! Parsing is strict: unknown keys are errors, and every error names the file, the dotted key
//! and what was expected, so an operator can fix it without reading code. Structural checks
//! happen in serde; rules that span fields live in each section's `validate`.

pub use firma_authority::config::AuthorityConfig;
pub use firma_common::config::ConfigError;
pub use firma_sidecar::config::SidecarConfig;

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
        Self::parse(&firma_common::config::read(path)?, path)
    }

    /// Parses and validates `text`; `path` only names the file in error messages (relative
    /// paths in the file are taken as given).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: FirmaConfig = firma_common::config::parse_toml(text, path)?;
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
