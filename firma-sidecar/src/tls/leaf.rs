//! Per-host leaf certificates for MITM, minted from the sidecar CA.
//!
//! Decisions:
//! - One leaf key pair per process (ECDSA P-256), never the CA key: a leaked leaf key cannot
//!   mint certificates, and one key keeps minting to a single signature (~tens of µs).
//! - A bounded LRU of ready `rustls::ServerConfig`s keyed by host. Each slot holds a
//!   `tokio::sync::OnceCell`, so concurrent first connections to a host wait for one minting
//!   instead of racing to mint several.
//! - Leaves live 30 days and are re-minted after 7, so a long-running sidecar never serves an
//!   expired certificate.

use super::ca::CertificateAuthority;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

const LEAF_VALIDITY: time::Duration = time::Duration::days(30);
const REMINT_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// ALPN offered to MITM'd clients: HTTP/2 first, HTTP/1.1 as fallback.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("minting a certificate for {host}: {detail}")]
    Mint { host: String, detail: String },
}

#[derive(Debug)]
struct Minted {
    config: Arc<ServerConfig>,
    at: Instant,
}

type Slot = Arc<OnceCell<Minted>>;

/// Mints and caches per-host TLS server configurations.
pub struct LeafCache {
    ca: CertificateAuthority,
    leaf_key: KeyPair,
    slots: Mutex<lru::LruCache<String, Slot>>,
    minted: AtomicU64,
}

impl LeafCache {
    pub fn new(ca: CertificateAuthority, capacity: usize) -> Result<Self, LeafError> {
        let leaf_key = KeyPair::generate().map_err(|e| LeafError::Mint {
            host: "(leaf key)".into(),
            detail: e.to_string(),
        })?;
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            ca,
            leaf_key,
            slots: Mutex::new(lru::LruCache::new(cap)),
            minted: AtomicU64::new(0),
        })
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// How many certificates this process minted (for tests and metrics).
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// The server config for `host` (lowercase), minting it on first use.
    pub async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, LeafError> {
        loop {
            let slot = {
                let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                match slots.get(host) {
                    Some(s) => s.clone(),
                    None => {
                        let s: Slot = Arc::new(OnceCell::new());
                        slots.put(host.to_string(), s.clone());
                        s
                    }
                }
            };
            let minted = slot.get_or_try_init(|| async { self.mint(host) }).await?;
            if minted.at.elapsed() < REMINT_AFTER {
                return Ok(minted.config.clone());
            }
            // Stale: drop the slot (if nobody replaced it yet) and mint again.
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.peek(host).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.pop(host);
            }
        }
    }

    fn mint(&self, host: &str) -> Result<Minted, LeafError> {
        let err = |e: &dyn std::fmt::Display| LeafError::Mint {
            host: host.to_string(),
            detail: e.to_string(),
        };
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(|e| err(&e))?;
        params.distinguished_name.push(DnType::CommonName, host);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&self.leaf_key, self.ca.issuer())
            .map_err(|e| err(&e))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .map_err(|e| err(&e))?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        self.minted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(host, "minted MITM leaf certificate");
        Ok(Minted {
            config: Arc::new(config),
            at: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_first_requests_mint_once() {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), false).unwrap();
        let cache = Arc::new(LeafCache::new(ca, 16).unwrap());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let c = cache.clone();
            tasks.push(tokio::spawn(async move {
                c.server_config("api.example.com").await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(cache.minted(), 1);
        cache.server_config("other.example.com").await.unwrap();
        assert_eq!(cache.minted(), 2);
    }
}
