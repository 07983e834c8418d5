//! Client-side TLS towards upstreams and Vault.
//!
//! Upstream certificates are verified against the Mozilla roots (`webpki-roots`) plus any
//! `[sidecar.connector] extra_root_certs`, always for the host name the decision was made on,
//! so a redirected or spoofed destination cannot receive a request meant for another host.

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("{path}: cannot read PEM certificates: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{path}: contains no certificate")]
    Empty { path: PathBuf },
    #[error("{path}: certificate rejected as a trust root: {detail}")]
    Rejected { path: PathBuf, detail: String },
}

/// Webpki roots plus the PEM certificates in `extra` (each file may hold several).
pub fn root_store(extra: &[PathBuf]) -> Result<RootCertStore, RootsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra {
        add_pem_roots(&mut roots, path)?;
    }
    Ok(roots)
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), RootsError> {
    let read_err = |detail: String| RootsError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let mut n = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| read_err(e.to_string()))? {
        let cert = cert.map_err(|e| read_err(e.to_string()))?;
        roots.add(cert).map_err(|e| RootsError::Rejected {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(RootsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Upstream client config offering ALPN `h2` then `http/1.1`: the connector speaks HTTP/2 to
/// upstreams that offer it (one shared, multiplexed connection; gRPC needs it) and HTTP/1.1 to
/// the rest, whatever the client spoke to us.
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}
