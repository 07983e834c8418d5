use std::path::PathBuf;

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
    pub fn invalid(file: &std::path::Path, key: &str, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            expected: expected.into(),
        }
    }
}

/// The toml error message without its source excerpt (the key path is reported separately).
pub(super) fn describe_toml_error(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(_) => msg,
        None => msg,
    }
}
