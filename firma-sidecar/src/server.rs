//! Starting, running and stopping the sidecar.
//!
//! Startup order: connector (credentials: a missing env var stops here) -> MITM CA ->
//! audit -> pipeline -> listeners -> `sidecar ready`. Every bound address is logged. On
//! SIGTERM/SIGINT (or the embedder's stop, [`run_until`]): drain (see [`crate::drain`]) then flush audit.

use crate::audit::{AuditError, AuditLog};
use crate::config::{InterceptMode, SidecarConfig};
use crate::connector::{Connector, ConnectorError};
use crate::drain::Drain;
use crate::interceptor::limits::{self, Limits};
use crate::interceptor::{http_proxy, transparent};
use crate::pipeline::{Pipeline, PipelineError};
use crate::state::{Mitm, SidecarState};
use crate::tls::ca::{CaError, CertificateAuthority};
use crate::tls::leaf::{LeafCache, LeafError};
use std::sync::Arc;
use std::time::Duration;

/// Leaf certificates kept in memory (one per intercepted host name seen).
const LEAF_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Bad or incomplete configuration (exit code 78): `key` names the config key.
    #[error("{message}")]
    Config { key: &'static str, message: String },
    #[error("pipeline: {0}")]
    Pipeline(PipelineError),
    #[error("audit: {0}")]
    Audit(AuditError),
    #[error("binding {addr}: {cause}")]
    Bind { addr: String, cause: std::io::Error },
    #[error(transparent)]
    Transparent(#[from] transparent::TransparentError),
    #[error(transparent)]
    Leaf(#[from] LeafError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("starting the connection workers: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Admin(#[from] firma_common::admin::AdminError),
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<PipelineError> for SidecarError {
    fn from(e: PipelineError) -> Self {
        Self::Pipeline(e)
    }
}

impl From<AuditError> for SidecarError {
    fn from(e: AuditError) -> Self {
        Self::Audit(e)
    }
}

impl SidecarError {
    /// The config key to blame when this is a configuration problem.
    pub fn config_key(&self) -> Option<&'static str> {
        match self {
            Self::Config { key, .. } => Some(key),
            Self::Pipeline(e) => Some(match e {
                PipelineError::Mapping(_) => "sidecar.mapping",
                PipelineError::Seed(_) => "sidecar.capability_seed",
                PipelineError::PublicKey(_) => "sidecar.authority.public_key_path",
                PipelineError::PolicyDir(_)
                | PipelineError::Bundle(_)
                | PipelineError::Authority(_) => "sidecar.policy",
                PipelineError::Startup(_) => "sidecar",
            }),
            Self::Audit(e) => Some(match e {
                AuditError::Key(_) => "sidecar.audit.signing_key_path",
                AuditError::File { .. } => "sidecar.audit.path",
                AuditError::Grpc(_) => "sidecar.audit.grpc_url",
                AuditError::Startup(_) => "sidecar.audit",
            }),
            Self::Admin(_) => Some("sidecar.admin.listen_addr"),
            Self::Transparent(transparent::TransparentError::Pins(_)) => {
                Some("sidecar.interceptor.transparent.pin_dir")
            }
            _ => None,
        }
    }
}

impl From<ConnectorError> for SidecarError {
    fn from(e: ConnectorError) -> Self {
        let key = match e {
            ConnectorError::Credentials(_) => "sidecar.credentials",
            ConnectorError::Roots(_) => "sidecar.connector.extra_root_certs",
        };
        Self::Config {
            key,
            message: e.to_string(),
        }
    }
}

impl From<CaError> for SidecarError {
    fn from(e: CaError) -> Self {
        Self::Config {
            key: "sidecar.ca.dir",
            message: e.to_string(),
        }
    }
}

fn log_effective_config(cfg: &SidecarConfig) {
    let mitm = &cfg.interceptor.https_mitm;
    // Each mode logs the address it listens on: `listen_addr` is the http_proxy listener only.
    let listen = match cfg.interceptor.mode {
        InterceptMode::HttpProxy => cfg.interceptor.listen_addr.clone(),
        InterceptMode::Transparent => {
            let t = &cfg.interceptor.transparent;
            match t.redirect_address {
                Some(a) => format!("127.0.0.1:{0}, [::1]:{0} and {a}:{0}", t.port),
                None => format!("127.0.0.1:{0} and [::1]:{0}", t.port),
            }
        }
    };
    tracing::info!(
        mode = ?cfg.interceptor.mode,
        listen = %listen,
        drain_timeout_secs = cfg.interceptor.drain_timeout_secs,
        mitm_enabled = mitm.enabled,
        intercept_hosts = ?mitm.intercept_hosts,
        strict_hosts = ?mitm.strict_hosts,
        "effective interceptor config"
    );
    for h in &cfg.connector.hosts {
        tracing::info!(host = %h.host, rps = ?h.rps, burst = ?h.burst, timeout_ms = ?h.timeout_ms, address = ?h.address, "connector host");
    }
    for c in &cfg.credentials {
        // Names only: the value is never logged.
        tracing::info!(host = %c.host, mode = ?c.mode, header = %c.header, env = ?c.value_from_env, secret_path = ?c.secret_path, "credential configured");
    }
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains and returns.
pub async fn run(cfg: &SidecarConfig) -> Result<(), SidecarError> {
    run_until(cfg, || {}, shutdown_signals).await
}

/// SIGTERM or SIGINT, whichever comes first (named for the log).
fn shutdown_signals() -> Result<impl Future<Output = &'static str>, SidecarError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(SidecarError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SidecarError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM received",
            _ = int.recv() => "SIGINT received",
        }
    })
}

/// As [`run`], for an embedding process (`firma run`) that owns the signals: `stop` is called
/// just before the listeners open and returns the future that ends the sidecar (its output
/// names why, for the log); `ready` is called once every listener is up (transparent mode:
/// the startup workloads are attached), which is when a workload may start.
pub async fn run_until<S, F>(
    cfg: &SidecarConfig,
    ready: impl FnOnce(),
    stop: S,
) -> Result<(), SidecarError>
where
    S: FnOnce() -> Result<F, SidecarError>,
    F: Future<Output = &'static str>,
{
    crate::tls::install_crypto_provider();
    log_effective_config(cfg);
    let connector = Connector::new(cfg)?;
    let mitm = if cfg.interceptor.https_mitm.enabled {
        let (ca, created) = CertificateAuthority::load_or_init(&cfg.ca.dir)?;
        if created {
            tracing::info!(cert = %ca.cert_path().display(), "generated MITM CA; clients must trust this certificate");
        } else {
            tracing::info!(cert = %ca.cert_path().display(), "loaded MITM CA");
        }
        Some(Mitm::new(cfg, LeafCache::new(ca, LEAF_CACHE)?))
    } else {
        None
    };
    // Before anything opens descriptors that count against the reserve.
    let nofile = limits::raise_nofile();
    // Before anything records: recording is off without an admin listener.
    let metrics = cfg
        .admin
        .listen_addr
        .as_ref()
        .map(|_| crate::metrics::enable());
    let workers = crate::workers::start(crate::workers::count(cfg.interceptor.workers))
        .map_err(SidecarError::Workers)?;
    tracing::info!(target: "firma_sidecar", workers, "connection workers started");
    let audit = AuditLog::start(&cfg.audit).await?;
    let first_conn_id = crate::audit::next_conn_id(&cfg.audit);
    let pipeline = Pipeline::start(cfg).await?;
    let connector = connector.with_rules(pipeline.mapping_rules());
    let drain = Drain::new();
    let limits = Limits::from_config(&cfg.limits, nofile, limits::open_fds());
    let state = Arc::new(SidecarState::new(
        pipeline,
        audit.clone(),
        connector,
        crate::error_shape::ErrorShapes::from_config(cfg),
        mitm,
        drain.clone(),
    ));
    state.resume_conn_ids(first_conn_id);

    // Register signals before announcing readiness so an early SIGTERM still drains.
    let stop = stop()?;

    // Transparent mode: the redirector, whose kernel refusals are audited every second and
    // once more before the final flush.
    let mut refusals = None;
    let kernel: Option<Arc<dyn crate::ebpf::metrics::KernelState>> = match cfg.interceptor.mode {
        InterceptMode::HttpProxy => {
            let addr = &cfg.interceptor.listen_addr;
            let listener = addr
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                .and_then(crate::sockopt::listen)
                .map_err(|source| SidecarError::Bind {
                    addr: addr.clone(),
                    cause: source,
                })?;
            let local = listener.local_addr().map_err(|source| SidecarError::Bind {
                addr: addr.clone(),
                cause: source,
            })?;
            tracing::info!(target: "firma_sidecar", "http_proxy listening on {local}");
            drain.spawn(http_proxy::serve(state.clone(), listener, limits));
            None
        }
        InterceptMode::Transparent => {
            let r = transparent::serve(state.clone(), cfg, drain.clone(), limits).await?;
            let task = crate::ebpf::refusals::spawn(r.clone(), audit.clone());
            refusals = Some((r.clone(), task));
            Some(r)
        }
    };
    if let Some(x) = &cfg.ext_authz {
        let gate = crate::gate::Gate::new(state.clone());
        let local = crate::ext_authz::serve(gate, x, drain.clone())
            .await
            .map_err(|cause| SidecarError::Bind {
                addr: x.listen_addr.clone(),
                cause,
            })?;
        tracing::info!(target: "firma_sidecar", "ext_authz listening on {local}");
    }
    if let (Some(addr), Some(metrics)) = (&cfg.admin.listen_addr, metrics) {
        let admin = crate::admin::SidecarAdmin {
            metrics,
            state: state.clone(),
            kernel,
        };
        let local = firma_common::admin::serve(addr, Arc::new(admin)).await?;
        tracing::info!(target: "firma_sidecar", "admin listening on {local} (/metrics, /healthz, /readyz)");
    }
    tracing::info!(target: "firma_sidecar", "sidecar ready");
    ready();

    let sig = stop.await;
    let deadline = Duration::from_secs(cfg.interceptor.drain_timeout_secs);
    tracing::info!(target: "firma_sidecar", "{sig}: draining (up to {}s)", deadline.as_secs());
    let left = drain.drain(deadline).await;
    if left > 0 {
        tracing::warn!(target: "firma_sidecar", "drain deadline reached; cutting {left} connection(s)");
    } else {
        tracing::info!(target: "firma_sidecar", "drained: all connections finished");
    }
    state.pipeline.flush_usage();
    if let Some((r, task)) = refusals {
        task.abort();
        crate::ebpf::refusals::audit_pending(&r, &audit).await;
    }
    audit.flush().await;
    tracing::info!(target: "firma_sidecar", "sidecar stopped");
    Ok(())
}
