//! Server side: runs inside the sidecar next to the transparent listeners.

use super::protocol::{Request, Response, StatusReport, WorkloadStatus};
use crate::ebpf::{Redirector, Target};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {0} is in use by a running sidecar")]
    InUse(PathBuf),
}

/// Binds `path` (0600) and serves requests until `shutdown`; removes the socket file on exit.
pub async fn serve(
    path: &Path,
    redirector: Arc<Redirector>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let listener = bind_owner_only(path)?;
    serve_bound(listener, path, redirector, shutdown).await;
    Ok(())
}

/// Binds the control socket at `path` (0600) without serving it yet, so a caller can fail
/// startup on a bind error before spawning [`serve_bound`].
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    bind_owner_only(path)
}

/// Serves an already bound control socket until `shutdown`; removes `path` on exit.
pub async fn serve_bound(
    listener: UnixListener,
    path: &Path,
    redirector: Arc<Redirector>,
    shutdown: CancellationToken,
) {
    tracing::info!(path = %path.display(), "control socket listening");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let r = redirector.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, r).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

fn bind_owner_only(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.into(),
        cause: source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    if path.exists() {
        // A live sidecar answers; a stale file from a crash does not and is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(listener)
}

async fn handle(stream: UnixStream, redirector: Arc<Redirector>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        tracing::warn!(
            uid = cred.uid(),
            "control socket: refused a peer of another user"
        );
        return Ok(());
    }
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(MAX_LINE as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let r = redirector.clone();
                tokio::task::spawn_blocking(move || execute(&r, req))
                    .await
                    .unwrap_or_else(|e| Response::err(format!("internal error: {e}")))
            }
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        wr.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

fn target(cgroup: Option<String>, pod: Option<String>) -> Result<Target, Response> {
    match (cgroup, pod) {
        (Some(c), None) => Ok(Target::Cgroup(c)),
        (None, Some(p)) => Ok(Target::Pod(p)),
        _ => Err(Response::err("give exactly one of `cgroup` and `pod`")),
    }
}

/// Runs one request against the redirector (blocking: bpf syscalls and cgroupfs walks).
pub fn execute(r: &Redirector, req: Request) -> Response {
    match req {
        Request::Attach {
            cgroup,
            pod,
            agent_id,
            session_id,
        } => {
            if agent_id.trim().is_empty() {
                return Response::err("agent_id must not be empty");
            }
            match target(cgroup, pod) {
                Ok(t) => r
                    .attach(&t, &agent_id, session_id.as_deref())
                    .map_or_else(Response::err, Response::ok),
                Err(resp) => resp,
            }
        }
        Request::Detach { cgroup, pod } => match target(cgroup, pod) {
            Ok(t) => r.detach(&t).map_or_else(Response::err, Response::ok),
            Err(resp) => resp,
        },
        Request::Status => Response::ok(status(r)),
    }
}

pub fn status(r: &Redirector) -> StatusReport {
    let s = r.settings();
    let (tracked_by_cookie, tracked_by_peer) = r.tracked();
    StatusReport {
        port: s.port,
        pin_dir: r.pin_dir().display().to_string(),
        cgroup2_mount: r.cgroup2().mount().display().to_string(),
        block_quic: s.block_quic,
        redirect_dns: s.redirect_dns,
        excluded_cidrs: s
            .excluded_cidrs
            .iter()
            .map(|c| format!("{}/{}", c.addr, c.prefix))
            .collect(),
        excluded_ports: s.excluded_ports.clone(),
        allow_udp: s.allow_udp.iter().map(ToString::to_string).collect(),
        allow_loopback: s
            .allow_loopback
            .iter()
            .map(|a| match a {
                crate::ebpf::allow::LoopbackAllowance::Port(p) => p.to_string(),
                crate::ebpf::allow::LoopbackAllowance::Addr(a) => a.to_string(),
            })
            .collect(),
        tracked_by_cookie,
        tracked_by_peer,
        workloads: r
            .status()
            .into_iter()
            .map(|(b, links)| WorkloadStatus {
                cgroup_path: b.cgroup_path,
                cgroup_id: b.cgroup_id,
                agent_id: b.agent_id,
                session_id: b.session_id,
                links,
            })
            .collect(),
    }
}
