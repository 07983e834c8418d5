//! `firma sidecar attach|detach|status`: talks to a running sidecar over its owner-only control
//! socket (`[sidecar.interceptor.transparent] control_socket`, JSON lines).

use crate::ConfigFailure;
use crate::config::FirmaConfig;
use anyhow::Context;
use clap::Subcommand;
use firma_sidecar::control::{Request, StatusReport, request};
use std::path::Path;
use std::process::ExitCode;

/// Runtime workload management of a running sidecar.
#[derive(Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Tag a cgroup (or a Kubernetes pod's cgroups) so its TCP connects go through the sidecar.
    Attach {
        /// cgroup v2 path, absolute or relative to the cgroup2 mount.
        #[arg(long, conflicts_with = "pod", required_unless_present = "pod")]
        cgroup: Option<String>,
        /// Kubernetes pod UID (systemd and cgroupfs drivers, all QoS classes).
        #[arg(long)]
        pod: Option<String>,
        /// Agent identity bound to the workload; selects its capability.
        #[arg(long)]
        agent_id: String,
        /// Session bound to the workload (optional).
        #[arg(long)]
        session_id: Option<String>,
    },
    /// Remove a workload's tag and everything attach added.
    Detach {
        #[arg(long, conflicts_with = "pod", required_unless_present = "pod")]
        cgroup: Option<String>,
        #[arg(long)]
        pod: Option<String>,
    },
    /// OCI `createRuntime` hook for the Kubernetes node agent (installed in the container
    /// runtime's base spec, see docs/kubernetes.md): reads the OCI state on stdin and, for an
    /// app container of a pod annotated `firma.dev/agent-id`, attaches its pod cgroup before
    /// the container's program runs; fails (so the container does not start) if it cannot.
    /// Does not read the config file.
    OciHook {
        /// The sidecar's control socket.
        #[arg(long, default_value = "/run/firma/sidecar.sock")]
        control_socket: std::path::PathBuf,
    },
    /// Show attached workloads and redirect state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: WorkloadCommand, config: &Path) -> anyhow::Result<ExitCode> {
    let (req, json) = match cmd {
        WorkloadCommand::Attach {
            cgroup,
            pod,
            agent_id,
            session_id,
        } => (
            Request::Attach {
                cgroup,
                pod,
                agent_id,
                session_id,
            },
            false,
        ),
        WorkloadCommand::Detach { cgroup, pod } => (Request::Detach { cgroup, pod }, false),
        WorkloadCommand::Status { json } => (Request::Status, json),
        WorkloadCommand::OciHook { control_socket } => return oci_hook(&control_socket),
    };
    let cfg = FirmaConfig::load(config).map_err(ConfigFailure)?;
    let sidecar = cfg.sidecar().map_err(ConfigFailure)?;
    let socket = &sidecar.interceptor.transparent.control_socket;
    let is_status = matches!(req, Request::Status);
    let resp = request(socket, &req)?;
    if !resp.ok {
        anyhow::bail!(
            "sidecar refused: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    let result = resp.result.unwrap_or_default();
    if json || !is_status {
        println!("{result}");
    } else {
        let report: StatusReport =
            serde_json::from_value(result).context("sidecar sent an unexpected status shape")?;
        print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the OCI hook: the runtime shows its stderr in the container's start error.
fn oci_hook(control_socket: &Path) -> anyhow::Result<ExitCode> {
    use firma_sidecar::node::hook::{self, Outcome};
    use std::io::Read;
    let mut state = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut state)
        .context("reading the OCI state from stdin")?;
    match hook::run(control_socket, &state) {
        Ok(Outcome::Attached { cgroup, agent_id }) => {
            eprintln!("firma: pod cgroup {cgroup} enforced for agent {agent_id}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Outcome::NotEnforced | Outcome::Sandbox) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("firma oci-hook: {e}; the container is not started (fail closed)");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_status(r: &StatusReport) {
    println!(
        "transparent listener port {} | pins {} | cgroup2 {}",
        r.port, r.pin_dir, r.cgroup2_mount
    );
    println!(
        "block_quic={} redirect_dns={} excluded_cidrs={:?} excluded_ports={:?}",
        r.block_quic, r.redirect_dns, r.excluded_cidrs, r.excluded_ports
    );
    println!(
        "allow_udp={:?} allow_loopback={:?} (UDP and loopback are otherwise closed)",
        r.allow_udp, r.allow_loopback
    );
    println!(
        "tracked connections: {} by cookie, {} by peer",
        r.tracked_by_cookie, r.tracked_by_peer
    );
    if r.workloads.is_empty() {
        println!("no workloads attached");
    }
    for w in &r.workloads {
        println!(
            "{} (id {}) agent={} session={} links={}",
            w.cgroup_path,
            w.cgroup_id,
            w.agent_id,
            w.session_id.as_deref().unwrap_or("-"),
            w.links
        );
    }
}
