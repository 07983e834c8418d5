use std::fmt;
use std::path::PathBuf;

/// One problem in a policy or schema file, located as precisely as Cedar allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDiagnostic {
    /// File name inside the bundle (e.g. `genai-app.cedar`, `firma.cedarschema`).
    pub file: String,
    /// 1-based line, when Cedar reported a source location.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Why a bundle could not be loaded or compiled.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: policy directory does not exist or is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{dir}: more than one schema file ({first} and {second}); keep one `*.cedarschema`")]
    MultipleSchemas {
        dir: PathBuf,
        first: String,
        second: String,
    },
    #[error("{path}: file name is not valid UTF-8")]
    FileName { path: PathBuf },
    #[error("{}", join(.0))]
    Invalid(Vec<PolicyDiagnostic>),
    #[error("bundle version {claimed} does not match its content (computed {computed})")]
    VersionMismatch { claimed: String, computed: String },
}

fn join(d: &[PolicyDiagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl PolicyError {
    /// The located problems, when this is a content error.
    pub fn diagnostics(&self) -> &[PolicyDiagnostic] {
        match self {
            PolicyError::Invalid(d) => d,
            _ => &[],
        }
    }
}

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Turns a Cedar diagnostic into ours: the message (with Cedar's help text, which usually says
/// what was expected) and the line of its first labelled span in `text`.
pub(super) fn diagnose(file: &str, text: &str, d: &dyn miette::Diagnostic) -> PolicyDiagnostic {
    let line = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|span| line_of(text, span.offset()));
    let mut message = d.to_string();
    if let Some(help) = d.help() {
        message.push_str(&format!(" ({help})"));
    }
    PolicyDiagnostic {
        file: file.to_string(),
        line,
        message,
    }
}
