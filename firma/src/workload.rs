//! `firma sidecar attach|detach|status`: talks to a running sidecar over its control socket.
//!
//! PLACEHOLDER: the transparent-interception work implements `run`.

use clap::Subcommand;
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
    /// Show attached workloads and redirect state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(_cmd: WorkloadCommand, _config: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("workload management is not available in this build")
}
