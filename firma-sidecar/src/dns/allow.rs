//! The names the DNS guard answers: every host the configuration can send traffic to (intercept
//! and strict hosts, mapping-rule hosts, connector and credential hosts) plus `[sidecar.dns]
//! allow`. Exact names, or `*.suffix` for any name strictly below `suffix`. A catch-all `*`
//! (mapping rules may have one) opens nothing: it would make every name, and so every
//! exfiltration label, resolvable.

use std::collections::BTreeSet;

#[derive(Debug, Clone, Default)]
pub struct AllowList {
    exact: BTreeSet<String>,
    /// Stored with their leading dot (`.example.com`).
    suffixes: BTreeSet<String>,
}

/// Lower-case, without one trailing dot.
pub fn normalise(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    n.strip_suffix('.').map(str::to_owned).unwrap_or(n)
}

impl AllowList {
    pub fn new<I, S>(patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Self::default();
        for p in patterns {
            let p = normalise(p.as_ref());
            if let Some(rest) = p.strip_prefix("*.") {
                if !rest.is_empty() && !rest.contains('*') {
                    list.suffixes.insert(format!(".{rest}"));
                }
            } else if !p.is_empty() && !p.contains('*') {
                list.exact.insert(p);
            }
        }
        list
    }

    /// The pattern that allows `qname` (normalised), if any.
    pub fn matches(&self, qname: &str) -> Option<String> {
        if self.exact.contains(qname) {
            return Some(qname.to_owned());
        }
        self.suffixes
            .iter()
            .filter(|s| qname.len() > s.len() && qname.ends_with(s.as_str()))
            .max_by_key(|s| s.len())
            .map(|s| format!("*{s}"))
    }

    /// Every pattern, for the startup log.
    pub fn patterns(&self) -> Vec<String> {
        self.exact
            .iter()
            .cloned()
            .chain(self.suffixes.iter().map(|s| format!("*{s}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_suffix() {
        let a = AllowList::new(["API.openai.com.", "*.example.org", "*", "*.", ""]);
        assert_eq!(
            a.matches("api.openai.com").as_deref(),
            Some("api.openai.com")
        );
        assert_eq!(a.matches("x.api.openai.com"), None);
        assert_eq!(
            a.matches("a.b.example.org").as_deref(),
            Some("*.example.org")
        );
        assert_eq!(a.matches("example.org"), None);
        assert_eq!(a.matches("badexample.org"), None);
        assert_eq!(a.matches("secret-data.paste.rs"), None);
        assert_eq!(a.patterns(), vec!["api.openai.com", "*.example.org"]);
    }
}
