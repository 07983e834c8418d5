//! Transparent mode (eBPF cgroup redirection) inside a fresh network namespace, so no traffic
//! can leave the machine: the same clients in a tagged cgroup (through the sidecar) and
//! untagged (straight to the upstream).
//!
//! `Inner::start` checks the prerequisites (root, cgroup2, bpffs, `unshare`, `ip`) and otherwise
//! says why it skips; then it re-runs this binary as `transparent-inner` under `unshare --net`.
//! The inner process puts the upstream on 10.77.0.2:443 (an address only that namespace has),
//! starts `firma sidecar` in `transparent` mode, tags a fresh cgroup with `firma sidecar
//! attach`, and then serves measurement requests, one JSON line each on stdin, answering one
//! JSON line on stdout, so the outer run interleaves these targets with its own repetition by
//! repetition. On `Finish` (or end of input) it checks the audit log and cleans up.

use crate::deploy::{self, Deployment, Mode};
use crate::hey::HeyTarget;
use crate::measure::{Client, Env, Load, Run, Target};
use crate::report::names;
use crate::run::RunArgs;
use crate::upstream::Upstream;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The destination address, present only on `lo` of the namespace the inner run creates.
const DST: &str = "10.77.0.2";

#[derive(Debug, Clone, clap::Args)]
pub struct InnerArgs {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Measure {
        target: String,
        load: Load,
        client: Client,
        rep: usize,
    },
    Finish,
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// Set up; these targets (name, with hey) can be measured.
    Ready(Vec<(String, bool)>),
    Skipped(String),
    Run(Box<Run>),
    Error(String),
    Finished {
        audit_events: usize,
        requests: u64,
    },
}

/// Why this host cannot run the transparent comparison, if it cannot.
pub(crate) fn skip_reason() -> Option<String> {
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

pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// The outer side: the inner process and its reply lines.
pub struct Inner {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: mpsc::Receiver<String>,
    /// The inner targets: (name, measured with hey too).
    pub targets: Vec<(String, bool)>,
    per_run: Duration,
}

/// The inner run, set up, or why this host skips transparent mode.
pub enum Started {
    Ready(Inner),
    Skipped(String),
}

impl Inner {
    pub fn start(
        args: &RunArgs,
        firma: &Path,
        upstream: crate::upstream::Kind,
    ) -> anyhow::Result<Started> {
        if let Some(why) = skip_reason() {
            return Ok(Started::Skipped(why));
        }
        let exe = std::env::current_exe()?;
        eprintln!("starting: transparent mode in a fresh network namespace");
        let mut cmd = Command::new("unshare");
        // A private mount namespace too: the sidecar resolves the upstream's name itself (the
        // destination binding), from a hosts file mounted over /etc/hosts in there.
        cmd.args(["--net", "--mount", "--propagation", "private", "--"])
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
            .args([
                "--upstream",
                match upstream {
                    crate::upstream::Kind::Nginx => "nginx",
                    crate::upstream::Kind::Builtin => "builtin",
                },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if args.skip_hey {
            cmd.arg("--skip-hey");
        }
        if args.mitm_fallback {
            cmd.arg("--mitm-fallback");
        }
        let mut child = cmd.spawn().context("run unshare")?;
        let stdin = child.stdin.take().context("inner stdin")?;
        let stdout = child.stdout.take().context("inner stdout")?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut inner = Inner {
            child,
            stdin,
            replies,
            targets: Vec::new(),
            per_run: Duration::from_secs(args.time_limit_secs.max(args.duration_secs) * 2 + 120),
        };
        match inner.recv(Duration::from_secs(120))? {
            Reply::Ready(targets) => {
                inner.targets = targets;
                Ok(Started::Ready(inner))
            }
            Reply::Skipped(why) => Ok(Started::Skipped(why)),
            Reply::Error(e) => bail!("{e}"),
            other => bail!("unexpected first reply {other:?}"),
        }
    }

    fn recv(&mut self, within: Duration) -> anyhow::Result<Reply> {
        let line = self.replies.recv_timeout(within).map_err(|_| {
            let _ = self.child.kill();
            anyhow::anyhow!(
                "the transparent run did not answer within {within:?} (see its output above)"
            )
        })?;
        serde_json::from_str(&line).with_context(|| format!("transparent reply {line}"))
    }

    fn send(&mut self, r: &Request) -> anyhow::Result<()> {
        writeln!(self.stdin, "{}", serde_json::to_string(r)?)?;
        self.stdin.flush()?;
        Ok(())
    }

    pub fn measure(
        &mut self,
        target: &str,
        load: Load,
        client: Client,
        rep: usize,
    ) -> anyhow::Result<Run> {
        self.send(&Request::Measure {
            target: target.to_string(),
            load,
            client,
            rep,
        })?;
        match self.recv(self.per_run)? {
            Reply::Run(r) => Ok(*r),
            Reply::Error(e) => bail!("{e}"),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Ends the inner run: (audit events, requests served) of the transparent sidecar, after
    /// `firma audit verify`.
    pub fn finish(mut self) -> anyhow::Result<(usize, u64)> {
        self.send(&Request::Finish)?;
        let r = match self.recv(Duration::from_secs(60))? {
            Reply::Finished {
                audit_events,
                requests,
            } => Ok((audit_events, requests)),
            Reply::Error(e) => Err(anyhow::anyhow!("{e}")),
            other => Err(anyhow::anyhow!("unexpected reply {other:?}")),
        };
        let _ = self.child.wait();
        r
    }
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

fn reply(r: &Reply) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(r)?)?;
    out.flush()?;
    Ok(())
}

/// Runs inside the fresh network namespace.
pub fn inner(args: &InnerArgs) -> anyhow::Result<()> {
    if let Err(e) = inner_run(&args.run) {
        reply(&Reply::Error(format!("{e:#}")))?;
    }
    Ok(())
}

/// Inside a fresh network and private mount namespace: `lo` up with [`DST`] on it, and a hosts
/// file under `dir` mounted over /etc/hosts naming [`deploy::HOST`] at [`DST`]. Returns
/// `DST:443`, where the upstream listens.
pub(crate) fn netns_with_hosts(dir: &Path) -> anyhow::Result<std::net::SocketAddr> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{DST}/32"), "dev", "lo"])?;
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n::1 localhost\n{DST} {}\n",
            deploy::HOST
        ),
    )?;
    let mounted = Command::new("mount")
        .arg("--bind")
        .arg(&hosts)
        .arg("/etc/hosts")
        .status()
        .context("run mount")?;
    anyhow::ensure!(
        mounted.success(),
        "mount --bind {} /etc/hosts failed",
        hosts.display()
    );
    Ok(format!("{DST}:443").parse()?)
}

fn inner_run(args: &RunArgs) -> anyhow::Result<()> {
    let firma = &args.firma;
    let tmp = tempfile::tempdir()?;
    let dst = netns_with_hosts(tmp.path())?;
    let (kind, _) = crate::upstream::Kind::choose(args.upstream);
    let up = Upstream::start(
        kind,
        tmp.path(),
        &[deploy::HOST],
        dst,
        &deploy::injected_auth(),
    )?;
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
    let d = Deployment::new(
        firma,
        tmp.path(),
        up.addr,
        &up.ca_path,
        &mode,
        false,
        !args.mitm_fallback,
    )?;
    let mut sc = match d.start_sidecar() {
        Ok(sc) => sc,
        Err(e) if format!("{e:#}").contains("no eBPF object") => {
            return reply(&Reply::Skipped(
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
    // The clients trust both CAs, so the exact same client config works on both paths.
    let cas = vec![up.ca_path.clone(), d.firma_ca()];
    let bundle = tmp.path().join("ca-bundle.pem");
    crate::run::write_bundle(&bundle, &cas)?;
    let hey_bin = if args.skip_hey {
        None
    } else {
        crate::hey::binary()
    };
    let hey = hey_bin.as_ref().map(|_| HeyTarget {
        url: format!("https://{DST}{}", crate::client::PATH),
        host: deploy::HOST.into(),
        proxy: None,
        ca_bundle: bundle.clone(),
    });
    let untagged = Target {
        name: names::NETNS_DIRECT.into(),
        fb: args.client(dst, cas.clone()),
        hey: hey.clone(),
        loads: vec![Load::KeepAlive, Load::NewConn],
        cgroup: None,
        pid: None,
        via: false,
        aborters: None,
    };
    let tagged = Target {
        name: names::TRANSPARENT.into(),
        cgroup: Some(cleanup.cgroup.clone()),
        pid: Some(sc.child.id()),
        via: true,
        ..untagged.clone()
    };
    let targets = [untagged, tagged];
    reply(&Reply::Ready(
        targets
            .iter()
            .map(|t| (t.name.clone(), t.hey.is_some()))
            .collect(),
    ))?;
    let env = Env {
        args,
        up: &up,
        scratch: tmp.path(),
        hey: hey_bin.as_deref(),
    };
    let mut served = 0u64;
    let mut tagged_ok = 0u64;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        match serde_json::from_str::<Request>(&line).context("request line")? {
            Request::Measure {
                target,
                load,
                client,
                rep,
            } => {
                let t = targets
                    .iter()
                    .find(|t| t.name == target)
                    .with_context(|| format!("no inner target {target}"))?;
                let r = crate::measure::measure(&env, t, load, client, rep);
                if !sc.alive() {
                    bail!("the transparent sidecar exited:\n{}", sc.log_text());
                }
                match r {
                    Ok(run) => {
                        if run.result.errors > 0 && t.via {
                            eprintln!(
                                "transparent sidecar log (WARN/ERROR, last 20):\n{}",
                                crate::measure::log_tail(&sc.log_text(), 20)
                            );
                        }
                        if t.via {
                            served += run.served as u64;
                            tagged_ok += run.result.ok as u64;
                        }
                        reply(&Reply::Run(Box::new(run)))?;
                    }
                    Err(e) => reply(&Reply::Error(format!("{e:#}")))?,
                }
            }
            Request::Finish => break,
        }
    }
    // Every completed tagged request has its signed audit event once the sink flushes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (d.audit_events() as u64) < tagged_ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let audit_events = d.audit_events();
    if (audit_events as u64) < tagged_ok {
        bail!("only {audit_events} audit events for {tagged_ok} tagged requests");
    }
    drop(sc);
    d.verify_audit()?;
    drop(cleanup);
    reply(&Reply::Finished {
        audit_events,
        requests: served,
    })
}
