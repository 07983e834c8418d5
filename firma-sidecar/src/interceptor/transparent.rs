//! Transparent interception: connections the eBPF cgroup programs redirected to us.
//!
//! Startup ([`serve`]): load (or re-adopt) the pinned programs and maps, attach the workloads
//! from `[sidecar.interceptor.transparent] workloads`, bind 127.0.0.1:port and [::1]:port and
//! the owner-only control socket, then run under the drain: one accept loop per listener, the
//! control socket (`firma sidecar attach|detach|status`) and the eBPF log pump. Any failure here
//! stops startup: a sidecar that half-started would leave tagged workloads refused without
//! saying why.
//!
//! With `redirect_dns` (the default) the DNS guard ([`crate::dns`]) listens too, on
//! `[sidecar.dns] port`, and the kernel sends every port-53 exchange of tagged workloads there.
//!
//! Per connection: the kernel's record (original destination, cgroup, pid) is looked up by
//! peer address; the connection then goes through the same [`serve_stream`] as `CONNECT` in
//! `http_proxy` mode; the upstream is an address of the decided name, which the original
//! destination must be (`connector::binding`; the connector marks those sockets with `SO_MARK`,
//! so they are never redirected back here). A connection without a
//! record, or whose cgroup lost its binding, is closed and audited: never served with a guessed
//! destination or identity.
//!
//! Shutdown leaves the programs pinned on purpose: while no sidecar listens, tagged workloads'
//! connects are refused (fail closed); the next start re-adopts them.

use super::redirect_listener::{self as listener, Redirected, Unredirected};
use crate::audit::RequestAudit;
use crate::config::{SidecarConfig, WorkloadConfig};
use crate::conn::{Decision, DenyReason, InterceptKind};
use crate::control;
use crate::drain::Drain;
use crate::ebpf::pins::{self, PinsError};
use crate::ebpf::{EbpfError, RedirectSettings, Redirector, Target};
use crate::interceptor::limits::Limits;
use crate::interceptor::serve::serve_stream;
use crate::state::SidecarState;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("[sidecar.interceptor.transparent] {0}")]
    Kernel(EbpfError),
    #[error("[sidecar.interceptor.transparent] workloads[{index}] ({what}): {cause}")]
    Workload {
        index: usize,
        what: String,
        cause: EbpfError,
    },
    #[error(
        "[sidecar.interceptor.transparent] workloads[{0}]: give exactly one of `cgroup` and `pod`"
    )]
    WorkloadTarget(usize),
    #[error(
        "[sidecar.interceptor.transparent] port {port}: cannot listen on 127.0.0.1 and [::1]: {cause}"
    )]
    Bind { port: u16, cause: std::io::Error },
    #[error("[sidecar.interceptor.transparent] {0}")]
    Pins(PinsError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Embedding conversions: the message carries the cause, so it is not chained too.
impl From<EbpfError> for TransparentError {
    fn from(e: EbpfError) -> Self {
        Self::Kernel(e)
    }
}

impl From<PinsError> for TransparentError {
    fn from(e: PinsError) -> Self {
        Self::Pins(e)
    }
}

/// Runs a blocking kernel operation (bpf syscalls, cgroupfs walks) off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, TransparentError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransparentError::Internal(e.to_string()))
}

fn target_of(w: &WorkloadConfig) -> Option<Target> {
    match (&w.cgroup, &w.pod) {
        (Some(c), None) => Some(Target::Cgroup(c.clone())),
        (None, Some(p)) => Some(Target::Pod(p.clone())),
        _ => None,
    }
}

/// Starts transparent mode; returns once listening (the work continues under `shutdown`).
pub async fn serve(
    state: Arc<SidecarState>,
    cfg: &SidecarConfig,
    shutdown: Drain,
    limits: Arc<Limits>,
) -> Result<Arc<Redirector>, TransparentError> {
    let t = &cfg.interceptor.transparent;
    let mut settings = RedirectSettings::from_config(t)?;
    settings.dns_port = cfg.dns.port;
    let port = settings.port;
    // Fail closed on a crash only if the pins outlive us: check before loading anything.
    let (pin_dir, allow) = (settings.pin_dir.clone(), t.allow_ephemeral_pins);
    blocking(move || pins::ensure_durable(&pin_dir, allow)).await??;
    let (redirector, pump) = blocking(move || Redirector::start(settings)).await??;
    let redirector = Arc::new(redirector);
    tracing::info!(
        pin_dir = %redirector.pin_dir().display(),
        cgroup2 = %redirector.cgroup2().mount().display(),
        adopted_programs = redirector.adopted_programs(),
        "eBPF redirector loaded"
    );

    for (index, w) in t.workloads.iter().enumerate() {
        // The config loader checks exactly one of cgroup/pod; keep this total anyway.
        let Some(target) = target_of(w) else {
            return Err(TransparentError::WorkloadTarget(index));
        };
        let (r, agent, session, tgt) = (
            redirector.clone(),
            w.agent_id.clone(),
            w.session_id.clone(),
            target.clone(),
        );
        blocking(move || r.attach(&tgt, &agent, session.as_deref()))
            .await?
            .map_err(|source| TransparentError::Workload {
                index,
                what: format!("{target:?}"),
                cause: source,
            })?;
    }

    let listeners = listener::bind(port)
        .await
        .map_err(|source| TransparentError::Bind {
            port,
            cause: source,
        })?;
    if t.redirect_dns {
        let guard = Arc::new(crate::dns::DnsGuard::new(
            state.clone(),
            cfg,
            redirector.clone(),
        ));
        crate::dns::serve(guard, cfg.dns.port, shutdown.clone(), limits.clone()).await?;
    }
    let control_path = t.control_socket.clone();
    let control_listener = control::bind(&control_path)?;

    // The control socket and log pump take a token; cancel it when the drain begins.
    let stop = CancellationToken::new();
    {
        let (stop, drain) = (stop.clone(), shutdown.clone());
        tokio::spawn(async move {
            drain.cancelled().await;
            stop.cancel();
        });
    }
    {
        let (r, stop) = (redirector.clone(), stop.clone());
        shutdown.spawn(async move {
            control::serve_bound(control_listener, &control_path, r, stop).await
        });
    }
    if let Some(pump) = pump {
        shutdown.spawn(pump.run(stop.clone()));
    }
    for l in listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(target: "firma_sidecar", "transparent listening on {addr}");
        }
        let serve_state = state.clone();
        let reject_state = state.clone();
        shutdown.spawn(listener::accept_loop(
            l,
            redirector.clone(),
            shutdown.clone(),
            limits.clone(),
            move |c| handle(serve_state.clone(), c),
            move |u| reject(&reject_state, u, port),
        ));
    }
    Ok(redirector)
}

/// Serves one redirected connection through the shared pipeline.
async fn handle(state: Arc<SidecarState>, c: Redirected) {
    let Redirected {
        stream,
        peer,
        original_dst,
        workload,
    } = c;
    let port = original_dst.port();
    let has_workload = workload.is_some();
    let conn = state.new_conn(
        InterceptKind::Transparent,
        peer,
        Some(original_dst),
        workload,
    );
    let _counted = crate::interceptor::metrics::connection(conn.kind);
    if !has_workload {
        // The cgroup was detached between connect() and accept(): no identity, fail closed.
        let d = Decision::deny(
            DenyReason::WorkloadMismatch,
            format!(
                "connection from {peer} to {original_dst} was redirected but its cgroup has no workload binding any more; closed"
            ),
        );
        tracing::warn!(conn = conn.conn_id, %peer, %original_dst, "redirected connection without a workload binding; closing");
        RequestAudit::new(&state.audit, &conn)
            .target(None, port, None)
            .deny(&d);
        return;
    }
    tracing::debug!(conn = conn.conn_id, %peer, %original_dst, "transparent connection");
    serve_stream(state, stream, conn, None, port).await;
}

/// Audits a connection that reached a transparent listener with no kernel record (something
/// connected to the listener directly, or its entry expired). It has already been closed.
fn reject(state: &SidecarState, u: Unredirected, port: u16) {
    let conn = state.new_conn(InterceptKind::Transparent, u.peer, None, None);
    let d = Decision::deny(
        DenyReason::MalformedRequest,
        format!(
            "connection from {} reached the transparent listener without a redirect record (not redirected by the kernel, or its entry expired); closed",
            u.peer
        ),
    );
    RequestAudit::new(&state.audit, &conn)
        .target(None, port, None)
        .deny(&d);
}
