//! Transparent mode (eBPF cgroup redirection): the same client in a tagged cgroup vs untagged,
//! inside a fresh network namespace so no traffic can leave the machine.
//!
//! `outer` checks the prerequisites (root, cgroup2, bpffs, `unshare`, `ip`) and otherwise
//! returns `Skipped` with the reason; then it re-runs this binary as `transparent-inner` under
//! `unshare --net`. The inner run puts the upstream on 10.77.0.2:443 (an address only that
//! namespace has), starts `firma sidecar` in `transparent` mode, tags a fresh cgroup with
//! `firma sidecar attach`, and runs the client untagged and then inside the cgroup.

use crate::client::ClientResult;
use crate::deploy::{self, Deployment, Mode};
use crate::report::{Ratio, Scenario, Transparent};
use crate::run::{RunArgs, spawn_client};
use crate::upstream::Upstream;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The destination address, present only on `lo` of the namespace the inner run creates.
const DST: &str = "10.77.0.2";

#[derive(Debug, Clone, clap::Args)]
pub struct InnerArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Where the inner run writes its JSON result.
    #[arg(long)]
    result: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
enum InnerOut {
    Measured {
        untagged: Box<ClientResult>,
        tagged: Box<ClientResult>,
        untagged_new_conn: Box<ClientResult>,
        tagged_new_conn: Box<ClientResult>,
    },
    Skipped(String),
}

/// Why this host cannot run the transparent comparison, if it cannot.
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("needs root (eBPF programs, cgroups, network namespace)".into());
    }
    if cgroup2_mount().is_none() {
        return Some("no cgroup2 mount".into());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        return Some("no bpffs at /sys/fs/bpf".into());
    }
    for tool in ["unshare", "ip"] {
        if Command::new(tool).arg("--help").output().is_err() {
            return Some(format!("`{tool}` not installed"));
        }
    }
    None
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

pub fn outer(args: &RunArgs, firma: &Path) -> Transparent {
    if let Some(why) = skip_reason() {
        eprintln!("transparent mode: SKIP ({why})");
        return Transparent::Skipped(why);
    }
    match outer_run(args, firma) {
        Ok(InnerOut::Measured {
            untagged,
            tagged,
            untagged_new_conn,
            tagged_new_conn,
        }) => Transparent::Measured {
            ratios: vec![
                Ratio::new("tagged / untagged, transparent", &untagged, &tagged),
                Ratio::new(
                    "tagged / untagged, transparent new conn",
                    &untagged_new_conn,
                    &tagged_new_conn,
                ),
            ],
            scenarios: vec![
                Scenario {
                    name: "netns, untagged (direct)".into(),
                    result: *untagged,
                    sidecar_cpu_us_per_request: None,
                },
                Scenario {
                    name: "netns, tagged cgroup (transparent)".into(),
                    result: *tagged,
                    sidecar_cpu_us_per_request: None,
                },
                Scenario {
                    name: "netns, untagged, new conn each".into(),
                    result: *untagged_new_conn,
                    sidecar_cpu_us_per_request: None,
                },
                Scenario {
                    name: "netns, transparent, new conn each".into(),
                    result: *tagged_new_conn,
                    sidecar_cpu_us_per_request: None,
                },
            ],
        },
        Ok(InnerOut::Skipped(why)) => {
            eprintln!("transparent mode: SKIP ({why})");
            Transparent::Skipped(why)
        }
        Err(e) => Transparent::Failed(format!("{e:#}")),
    }
}

fn outer_run(args: &RunArgs, firma: &Path) -> anyhow::Result<InnerOut> {
    let tmp = tempfile::tempdir()?;
    let result = tmp.path().join("transparent.json");
    let exe = std::env::current_exe()?;
    eprintln!("running: transparent mode in a fresh network namespace");
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .arg("transparent-inner")
        .arg("--firma")
        .arg(firma)
        .args(["--requests", &args.requests.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args([
            "--new-connection-requests",
            &args.new_connection_requests.to_string(),
        ])
        .args(["--time-limit-secs", &args.time_limit_secs.to_string()])
        .args(["--duration-secs", &args.duration_secs.to_string()])
        .args(["--client-threads", &args.client_threads.to_string()])
        .arg("--result")
        .arg(&result)
        .spawn()
        .context("run unshare")?;
    // Four client runs plus setup, bounded.
    let deadline = Instant::now() + Duration::from_secs(4 * args.time_limit_secs + 120);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("transparent run exceeded its time limit");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("transparent run failed ({status}); see its output above");
    }
    let text = std::fs::read_to_string(&result).context("transparent result")?;
    Ok(serde_json::from_str(&text)?)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Removed on drop: the workload cgroup (empty once the client exited) and the pin directory.
struct Cleanup {
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// Runs inside the fresh network namespace.
pub fn inner(args: &InnerArgs) -> anyhow::Result<()> {
    let out = inner_run(&args.run)?;
    std::fs::write(&args.result, serde_json::to_string(&out)?)?;
    Ok(())
}

fn inner_run(args: &RunArgs) -> anyhow::Result<InnerOut> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{DST}/32"), "dev", "lo"])?;
    let firma = &args.firma;
    let tmp = tempfile::tempdir()?;
    let dst: std::net::SocketAddr = format!("{DST}:443").parse()?;
    let up = Upstream::start(tmp.path(), &[deploy::HOST], dst, &deploy::injected_auth())?;
    let name = format!("firma-bench-{}", std::process::id());
    let cleanup = Cleanup {
        cgroup: cgroup2_mount().context("cgroup2")?.join(&name),
        pins: PathBuf::from("/sys/fs/bpf").join(&name),
    };
    std::fs::create_dir_all(&cleanup.cgroup).context("create workload cgroup")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mode = Mode::Transparent {
        port,
        pin_dir: cleanup.pins.clone(),
        control_socket: tmp.path().join("run/sidecar.sock"),
        allow_ephemeral_pins: None,
    };
    let d = Deployment::new(firma, tmp.path(), up.addr, &up.ca_path, &mode, false)?;
    let mut sc = match d.start_sidecar() {
        Ok(sc) => sc,
        Err(e) if format!("{e:#}").contains("no eBPF object") => {
            return Ok(InnerOut::Skipped(
                "the firma build has no eBPF object (run scripts/install-bpf-linker.sh)".into(),
            ));
        }
        Err(e) => return Err(e),
    };
    d.sidecar_command(&[
        "attach",
        "--cgroup",
        &format!("/{name}"),
        "--agent-id",
        "tenant-acme",
        "--session-id",
        "bench",
    ])?;
    // The client trusts both CAs, so the exact same client config works on both paths.
    let client = args.client(dst, vec![up.ca_path.clone(), d.firma_ca()]);
    eprintln!("running: netns, untagged");
    let untagged = spawn_client(&client, None, tmp.path())?;
    if up.injected() != 0 {
        bail!("the untagged client went through the sidecar");
    }
    eprintln!("running: netns, tagged cgroup");
    let tagged = spawn_client(&client, Some(&cleanup.cgroup), tmp.path())?;
    // New connection each: the handshake path, where a listener socket without TCP_NODELAY
    // once added a delayed-ACK stall (~40 ms) to every connection.
    let nc = args.new_conn(client);
    eprintln!("running: netns, untagged, new conn each");
    let injected_before = up.injected();
    let untagged_new_conn = spawn_client(&nc, None, tmp.path())?;
    if up.injected() != injected_before {
        bail!("the untagged new-connection client went through the sidecar");
    }
    eprintln!("running: netns, transparent, new conn each");
    let tagged_new_conn = spawn_client(&nc, Some(&cleanup.cgroup), tmp.path())?;
    if !sc.alive() {
        bail!("the transparent sidecar exited:\n{}", sc.log_text());
    }
    let tagged_ok = (tagged.ok + tagged_new_conn.ok) as u64;
    if up.injected() < tagged_ok {
        bail!(
            "only {} of {tagged_ok} tagged requests reached the upstream with the injected credential",
            up.injected(),
        );
    }
    drop(sc);
    drop(cleanup);
    Ok(InnerOut::Measured {
        untagged: Box::new(untagged),
        tagged: Box::new(tagged),
        untagged_new_conn: Box::new(untagged_new_conn),
        tagged_new_conn: Box::new(tagged_new_conn),
    })
}
