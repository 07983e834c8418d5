//! The sidecar's MITM certificate authority.
//!
//! `[sidecar.ca] dir` holds `firma-ca.crt` (give it to clients: `SSL_CERT_FILE`,
//! `NODE_EXTRA_CA_CERTS`, `curl --cacert`) and `firma-ca.key` (0600). Both are generated on first
//! start when *both* are absent. Any other state (one file missing, key readable by others) stops
//! startup: silently minting a new CA would break every client that trusts the old one, and a
//! group-readable CA key lets anyone on the host impersonate every intercepted site.
//!
//! The issuer is rebuilt from the key plus a fixed distinguished name, so the CA must be one
//! Firma generated (`firma ca init`); importing a foreign CA is not supported.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const CA_CERT_FILE: &str = "firma-ca.crt";
pub const CA_KEY_FILE: &str = "firma-ca.key";
const CA_COMMON_NAME: &str = "Firma Sidecar MITM CA";
const CA_ORG: &str = "Firma";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "CA directory {dir}: {present} exists but {missing} is missing; refusing to create a new CA \
         silently (clients trust the old one). Restore {missing}, or replace both with \
         `firma ca init -c <config> --force` and redistribute firma-ca.crt"
    )]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error(
        "{path}: CA private key has mode {mode:04o}; expected 0600 (owner-only). Fix with: chmod 600 {path}"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{path}: not a usable CA private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("CA directory {dir}: a CA already exists; pass --force to replace it")]
    Exists { dir: PathBuf },
    #[error("generating a certificate: {0}")]
    Generate(String),
}

/// A loaded CA: signs leaf certificates, never serves as a leaf itself.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn ca_params() -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORG);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl CertificateAuthority {
    /// Loads the CA in `dir`, generating it when both files are absent. Returns whether it
    /// was created.
    pub fn load_or_init(dir: &Path) -> Result<(Self, bool), CaError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        match (cert.exists(), key.exists()) {
            (false, false) => Ok((Self::init(dir, false)?, true)),
            (true, true) => Ok((Self::load(dir)?, false)),
            (true, false) => Err(CaError::Incomplete {
                dir: dir.to_path_buf(),
                present: CA_CERT_FILE,
                missing: CA_KEY_FILE,
            }),
            (false, true) => Err(CaError::Incomplete {
                dir: dir.to_path_buf(),
                present: CA_KEY_FILE,
                missing: CA_CERT_FILE,
            }),
        }
    }

    /// Generates a new CA in `dir` (created 0700 if absent). Refuses to replace an existing
    /// file unless `force`.
    pub fn init(dir: &Path, force: bool) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !force && (cert_path.exists() || key_path.exists()) {
            return Err(CaError::Exists {
                dir: dir.to_path_buf(),
            });
        }
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
        let mut params = ca_params()?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(Self {
            issuer: Issuer::new(ca_params()?, key),
            cert_path,
        })
    }

    /// Loads an existing CA, checking the key's mode first.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let meta = std::fs::metadata(&key_path).map_err(io(&key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode {
                path: key_path,
                mode,
            });
        }
        let pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| CaError::BadKey {
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::metadata(&cert_path).map_err(io(&cert_path))?;
        Ok(Self {
            issuer: Issuer::new(ca_params()?, key),
            cert_path,
        })
    }

    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// `firma-ca.crt`, the file clients must trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    firma_common::keys::write_atomic(path, data, mode).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_half_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ca");
        let (_, created) = CertificateAuthority::load_or_init(&d).unwrap();
        assert!(created);
        let mode = std::fs::metadata(d.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, created) = CertificateAuthority::load_or_init(&d).unwrap();
        assert!(!created);
        assert!(matches!(
            CertificateAuthority::init(&d, false),
            Err(CaError::Exists { .. })
        ));
        std::fs::set_permissions(d.join(CA_KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_init(&d),
            Err(CaError::KeyMode { .. })
        ));
        std::fs::remove_file(d.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_init(&d),
            Err(CaError::Incomplete { .. })
        ));
    }
}
