//! TLS on both sides of the sidecar.
//!
//! - [`ca`]: the sidecar's own MITM certificate authority (`firma-ca.crt` / `firma-ca.key`).
//! - [`leaf`]: per-host leaf certificates minted from that CA, cached with one minting per host.
//! - [`upstream`]: the client configuration used towards upstreams and Vault (webpki roots plus
//!   configured extra roots).
//! - [`sniff`]: reading a ClientHello to learn the SNI before deciding to MITM or tunnel.

pub mod ca;
pub mod leaf;
pub mod sniff;
pub mod upstream;

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Matches host names against `intercept_hosts` / `strict_hosts` patterns: exact names or
/// `*.example.com` (any name strictly below `example.com`, like a wildcard certificate but at
/// any depth).
#[derive(Debug, Clone, Default)]
pub struct HostPatterns {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

impl HostPatterns {
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a String>) -> Self {
        let mut p = Self::default();
        for raw in patterns {
            let lower = raw.trim().to_ascii_lowercase();
            match lower.strip_prefix("*.") {
                Some(rest) => p.suffixes.push(format!(".{rest}")),
                None => p.exact.push(lower),
            }
        }
        p
    }

    /// `host` must already be lowercase and without port.
    pub fn matches(&self, host: &str) -> bool {
        self.exact.iter().any(|e| e == host)
            || self
                .suffixes
                .iter()
                .any(|s| host.len() > s.len() && host.ends_with(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_and_wildcards() {
        let p = HostPatterns::new(&["API.openai.com".to_string(), "*.acme.io".to_string()]);
        assert!(p.matches("api.openai.com"));
        assert!(!p.matches("xapi.openai.com"));
        assert!(p.matches("a.acme.io"));
        assert!(p.matches("a.b.acme.io"));
        assert!(!p.matches("acme.io"));
        assert!(!p.matches("evilacme.io"));
    }
}
