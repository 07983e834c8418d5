//! The error rule shared by every crate: an error's message either embeds its cause (a field
//! named `cause`, shown in the message, not chained) or chains it (`#[from]`/`#[source]`, a
//! message that names only the context, such as a config key). Never both, so printing the
//! chain once ([`Chain`]) shows every cause exactly once.

use std::fmt;

/// Displays an error and each of its sources, joined by `": "`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("[sidecar.policy] dir")]
    struct Outer(#[from] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {cause}")]
    struct Inner {
        path: String,
        cause: std::io::Error,
    }

    #[test]
    fn each_cause_once() {
        let e = Outer::from(Inner {
            path: "/p".into(),
            cause: std::io::Error::other("denied"),
        });
        assert_eq!(Chain(&e).to_string(), "[sidecar.policy] dir: /p: denied");
    }
}
