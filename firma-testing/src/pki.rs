//! Test certificate authorities: a self-signed CA and leaf certificates it signs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA made for one test run.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl TestCa {
    /// A CA named `common_name`, allowed to sign certificates.
    pub fn new(common_name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf { cert, key }
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_pem(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).expect("write CA certificate");
        path.to_path_buf()
    }
}

impl Leaf {
    /// A rustls server configuration presenting this certificate with `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key.serialize_der().into()),
            )
            .expect("server config");
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(tls)
    }
}

/// An HTTPS server certificate for `names`, signed by a fresh CA whose PEM is written to
/// `dir/upstream-ca.crt`: (server config with `alpn`, CA path).
pub fn upstream_tls(
    dir: &Path,
    ca_name: &str,
    names: &[&str],
    alpn: &[&[u8]],
) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let ca = TestCa::new(ca_name);
    let tls = ca.leaf(names).server_config(alpn);
    (tls, ca.write_pem(&dir.join("upstream-ca.crt")))
}
