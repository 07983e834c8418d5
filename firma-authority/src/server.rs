//! `firma authority -c F`: load keys and bundles, bind, serve gRPC (TLS when configured) until
//! the shutdown future resolves, then drain.

use crate::bundles::{self, describe_count};
use crate::config::AuthorityConfig;
use crate::error::AuthorityError;
use crate::etcd::EtcdStore;
use crate::revocation_hub::{self, RevocationHub};
use crate::revocations::RevocationFile;
use crate::revoke::Revoker;
use crate::service::AuthorityService;
use firma_common::keys::{check_owner_only, load_signing_key};
use firma_common::proto::authority::authority_server::AuthorityServer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// How long in-flight RPCs get to finish after shutdown is requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest gRPC message the `Authority` service decodes. A valid `IssuanceRequest` is at most
/// about 3.5 KiB (see [`crate::validate`]) and the stream requests are smaller, so anything
/// bigger is refused from its length prefix (`OUT_OF_RANGE`) before it is buffered or parsed
/// (tonic's default would read up to 4 MiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const STARTUP: &str = "firma_authority::startup";

/// Reads the TLS identity, refusing a private key others can read.
fn tls_identity(cert: &Path, key: &Path) -> Result<Identity, AuthorityError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| AuthorityError::Tls {
            path: p.to_path_buf(),
            message: e.to_string(),
        })
    };
    check_owner_only(key)?;
    Ok(Identity::from_pem(read(cert)?, read(key)?))
}

/// Refuses plaintext anywhere but loopback: capabilities and bundles must not cross a network
/// in the clear.
pub fn check_listen(addr: SocketAddr, tls: bool) -> Result<(), AuthorityError> {
    if !tls && !addr.ip().is_loopback() {
        return Err(AuthorityError::PlaintextNonLoopback { addr });
    }
    Ok(())
}

/// Runs the Authority until `shutdown` resolves. Startup fails (before binding) on a bad key,
/// an invalid bundle, a missing revocation file or a plaintext non-loopback address.
pub async fn run(
    cfg: &AuthorityConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuthorityError> {
    tracing::debug!(target: STARTUP, config = ?cfg, "effective configuration");
    let addr = cfg.socket_addr();
    let tls = match (&cfg.tls_cert_path, &cfg.tls_key_path) {
        (Some(cert), Some(key)) => Some(tls_identity(cert, key)?),
        _ => None,
    };
    check_listen(addr, tls.is_some())?;
    let key = Arc::new(load_signing_key(&cfg.key_file)?);

    let issuance = bundles::load("issuance", &cfg.issuance_policy_dir)?;
    tracing::info!(target: STARTUP, version = %issuance.bundle.version,
        "loaded issuance bundle ({})", describe_count(issuance.bundle.file_count()));
    let runtime = bundles::load("runtime", &cfg.policy_dir)?;
    tracing::info!(target: STARTUP, version = %runtime.bundle.version,
        "loaded runtime bundle ({})", describe_count(runtime.bundle.file_count()));

    let cancel = CancellationToken::new();
    let (hub, in_sync, revoker) = revocation_source(cfg, &cancel).await?;
    let admin_token = match &cfg.admin_token_env {
        Some(env) => {
            let t = crate::revoke::AdminToken::from_env(env)?;
            tracing::info!(target: STARTUP, "admin Revoke RPC enabled (bearer token from ${env})");
            Some(Arc::new(t))
        }
        None => None,
    };
    tracing::debug!(target: STARTUP, count = hub.len(), "loaded revocations");

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AuthorityError::Bind {
            addr,
            cause: source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AuthorityError::Bind {
            addr,
            cause: source,
        })?;
    tracing::info!(target: STARTUP, tls = tls.is_some(), "gRPC listening on {bound}");

    let metrics = cfg.admin_addr.as_ref().map(|_| crate::metrics::enable());
    let service = AuthorityService {
        key,
        issuance: bundles::watch_dir(
            "issuance",
            cfg.issuance_policy_dir.clone(),
            issuance,
            cancel.clone(),
        ),
        runtime: bundles::watch_dir("runtime", cfg.policy_dir.clone(), runtime, cancel.clone()),
        revocations: hub.clone(),
        max_ttl_seconds: cfg.max_ttl_seconds,
        bundle_ttl: Duration::from_secs(cfg.bundle_ttl_seconds),
        shutdown: cancel.clone(),
        in_sync,
        revoker,
        admin_token,
    };
    if let (Some(addr), Some(metrics)) = (&cfg.admin_addr, metrics) {
        let admin = crate::admin::AuthorityAdmin {
            metrics,
            runtime: service.runtime.clone(),
            issuance: service.issuance.clone(),
            revocations: hub.clone(),
            key_file: cfg.key_file.clone(),
        };
        let local = firma_common::admin::serve(addr, Arc::new(admin)).await?;
        tracing::info!(target: STARTUP, "admin listening on {local} (/metrics, /healthz, /readyz)");
    }

    let mut builder = Server::builder();
    if let Some(identity) = tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| AuthorityError::Tls {
                path: cfg.tls_cert_path.clone().unwrap_or_default(),
                message: e.to_string(),
            })?;
    }
    // The collector behind sidecars' `grpc` audit sink rides on the same listener when asked for.
    let collector = match &cfg.audit_collector_path {
        Some(path) => {
            let c = crate::collector::Collector::open(path, Vec::new())?;
            tracing::info!(target: STARTUP, "audit collector writing to {}", path.display());
            Some(c.into_service())
        }
        None => None,
    };
    let router = builder
        .add_service(AuthorityServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_optional_service(collector);
    tracing::info!(target: "firma_authority", "authority ready");

    let stop = cancel.clone();
    let serve =
        router.serve_with_incoming_shutdown(crate::listen::incoming(listener), async move {
            shutdown.await;
            tracing::info!(target: "firma_authority", "shutting down: draining connections");
            stop.cancel();
        });
    let deadline = async {
        cancel.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        r = serve => r.map_err(|e| AuthorityError::Serve(e.to_string()))?,
        _ = deadline => tracing::warn!(target: "firma_authority",
            "drain timeout ({DRAIN_TIMEOUT:?}) reached; closing remaining connections"),
    }
    cancel.cancel();
    tracing::info!(target: "firma_authority", "authority stopped");
    Ok(())
}

/// The revocation set: the file (watched) or etcd (followed), and whether it is in sync (always
/// for the file; for etcd, while a quorum answers: see [`crate::etcd`]).
async fn revocation_source(
    cfg: &AuthorityConfig,
    cancel: &CancellationToken,
) -> Result<(Arc<RevocationHub>, watch::Receiver<bool>, Revoker), AuthorityError> {
    if let Some(etcd) = &cfg.etcd {
        let store = EtcdStore::connect(&etcd.endpoints, &etcd.prefix).await?;
        let hub = RevocationHub::new(Vec::new());
        let (tx, rx) = watch::channel(false);
        tracing::info!(target: STARTUP, endpoints = ?etcd.endpoints, prefix = %etcd.prefix,
            "revocations shared through etcd");
        tokio::spawn(crate::etcd::follow(
            store.clone(),
            hub.clone(),
            tx,
            Duration::from_millis(etcd.stale_after_ms),
            cancel.clone(),
        ));
        return Ok((hub, rx, Revoker::Etcd(store)));
    }
    // Config validation requires one of the two; a library caller may skip validation.
    let path = cfg
        .revocation_file
        .as_ref()
        .ok_or(AuthorityError::NoRevocationStore)?;
    let file = RevocationFile::new(path);
    let list = file.read()?;
    for (line, text) in &list.malformed {
        tracing::warn!(target: STARTUP, file = %path.display(), line,
            "ignoring malformed revocation line {text:?}");
    }
    let hub = RevocationHub::new(list.entries);
    tokio::spawn(revocation_hub::watch_file(
        hub.clone(),
        file.clone(),
        cancel.clone(),
    ));
    // The sender is dropped: the file is always in sync (`borrow` keeps `true`).
    Ok((hub, watch::channel(true).1, Revoker::File(file)))
}
