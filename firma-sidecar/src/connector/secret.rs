//! A credential value that cannot leak through formatting.

use std::fmt;

/// Holds a secret string. `Debug` and `Display` print `[redacted]`, so a secret passed to a
/// log macro, an error message or an audit field by mistake shows nothing. The only way out is
/// [`Secret::expose`], used exactly where the header value is built.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_formats_the_value() {
        let s = super::Secret::new("sk-canary");
        assert!(!format!("{s} {s:?} {:?}", Some(&s)).contains("canary"));
        assert_eq!(s.expose(), "sk-canary");
    }
}
