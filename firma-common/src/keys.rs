//! Ed25519 key files: PKCS#8 PEM private keys (mode 0600, enforced) and SPKI PEM public keys.
//!
//! The same format serves the Authority's capability-signing key and the sidecar's
//! audit-signing key, so one `generate-key` command makes both.

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error(
        "{path}: private key file has mode {mode:04o}; expected 0600 (owner-only). Fix with: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not an Ed25519 {what} in PEM form: {detail}")]
    Format {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

/// The public key path that belongs to a private key path (`x.key` -> `x.pub`).
pub fn public_key_path(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

/// Generates a key pair, writing `path` (0600) and its `.pub`. Refuses to replace either
/// file unless `force`.
pub fn generate(path: &Path, force: bool) -> Result<(PathBuf, PathBuf), KeyError> {
    let pub_path = public_key_path(path);
    if !force {
        for p in [path, pub_path.as_path()] {
            if p.exists() {
                return Err(KeyError::Exists {
                    path: p.to_path_buf(),
                });
            }
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::Format {
            path: path.to_path_buf(),
            what: "private key",
            detail: e.to_string(),
        })?;
    write_file(path, pem.as_bytes(), 0o600)?;
    let pub_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| KeyError::Format {
            path: pub_path.clone(),
            what: "public key",
            detail: e.to_string(),
        })?;
    write_file(&pub_path, pub_pem.as_bytes(), 0o644)?;
    Ok((path.to_path_buf(), pub_path))
}

/// Writes `data` to `path` with `mode` via a temporary file, fsync and rename, so a reader
/// never sees a half-written key and the mode is right from the first byte.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-firma");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    write_atomic(path, data, mode).map_err(io(path))
}

/// Fails unless `path` is readable by its owner only (group/other bits clear).
pub fn check_owner_only(path: &Path) -> Result<(), KeyError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Loads a private key, refusing files that group or others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    check_owner_only(path)?;
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        what: "private key (PKCS#8)",
        detail: e.to_string(),
    })
}

/// Loads a public key written by [`generate`].
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        what: "public key (SPKI)",
        detail: e.to_string(),
    })
}
