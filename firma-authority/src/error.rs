//! One error type for the Authority library; every message names the file or address at fault.

use std::path::PathBuf;

/// The audit collector's errors (its output file, its listener).
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("audit collector on {addr}: {message}")]
    Serve {
        addr: std::net::SocketAddr,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Config(#[from] firma_common::config::ConfigError),
    #[error("signing key: {0}")]
    Key(firma_common::keys::KeyError),
    #[error("audit collector: {0}")]
    Collector(CollectorError),
    #[error("{which} bundle {dir}: {cause}")]
    Policy {
        which: &'static str,
        dir: PathBuf,
        cause: firma_common::policy::PolicyError,
    },
    #[error("etcd {endpoints}: {op}: {cause}")]
    EtcdRequest {
        endpoints: String,
        op: &'static str,
        cause: etcd_client::Error,
    },
    #[error("etcd {endpoints}: {op}: no answer within {timeout:?} (no quorum?)")]
    EtcdTimeout {
        endpoints: String,
        op: &'static str,
        timeout: std::time::Duration,
    },
    #[error("admin token: {0}")]
    AdminToken(String),
    #[error("token id: {0}")]
    TokenId(String),
    #[error("revocation file {path}: {cause}")]
    Revocations {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "revocation file {path} does not exist; create it (e.g. `touch {path}`) or fix authority.revocation_file"
    )]
    RevocationFileMissing { path: PathBuf },
    #[error(
        "no revocation store: set authority.revocation_file (single node) or [authority.etcd] (shared)"
    )]
    NoRevocationStore,
    #[error(
        "refusing to serve plaintext gRPC on non-loopback address {addr}; set authority.tls_cert_path and authority.tls_key_path, or listen on 127.0.0.1/[::1]"
    )]
    PlaintextNonLoopback { addr: std::net::SocketAddr },
    #[error("TLS: {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] firma_common::admin::AdminError),
    #[error("gRPC server failed: {0}")]
    Serve(String),
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<firma_common::keys::KeyError> for AuthorityError {
    fn from(e: firma_common::keys::KeyError) -> Self {
        Self::Key(e)
    }
}

impl From<CollectorError> for AuthorityError {
    fn from(e: CollectorError) -> Self {
        Self::Collector(e)
    }
}
