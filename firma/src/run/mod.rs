//! `firma run [OPTIONS] -- CMD [ARGS...]`: one unmodified program under enforcement, nothing
//! to write first (docs/run.md).
//!
//! Order: check privileges (refuse before creating anything) -> state directory (keys and CA,
//! kept) -> run directory (policies, rules, a capability issued in-process, CA bundle) ->
//! transient cgroup -> the sidecar in-process in transparent mode with this run's port, mark,
//! pins and control socket, the cgroup attached at its startup -> CMD spawned inside the
//! cgroup -> wait, forwarding SIGINT/SIGTERM/SIGHUP -> kill what CMD left in the cgroup ->
//! stop the sidecar -> remove pins, cgroup and run directory -> summary from the audit log ->
//! CMD's exit status.

mod cgroup;
mod child;
mod privileges;
mod setup;
mod stale;
mod summary;

use anyhow::Context;
use cgroup::TransientCgroup;
use setup::{CredentialArg, Prepared, RunIds, State};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit codes of `firma run` itself (CMD's own status passes through; a CMD killed by signal
/// N gives 128+N, as in a shell).
pub const EXIT_FIRMA_FAILED: u8 = 125;
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
pub const EXIT_NOT_FOUND: u8 = 127;
pub const EXIT_CONFIG: u8 = 78;

#[derive(clap::Args)]
pub struct Args {
    /// Agent identity of the capability and of the workload binding.
    #[arg(long, default_value = "local-agent")]
    agent_id: String,
    /// Action class the capability grants; repeat. Default: the classes the shipped policy
    /// permits (model.inference.chat, communication.external.send).
    #[arg(long = "action", value_name = "CLASS")]
    actions: Vec<String>,
    /// Capability lifetime.
    #[arg(long, default_value_t = 12 * 3600)]
    ttl_seconds: i64,
    /// Keeps the keys and the MITM CA between runs [default: $XDG_STATE_HOME/firma, else
    /// /var/lib/firma as root].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Use this firma.toml's [sidecar] tables (and its [authority] to issue the capability)
    /// instead of the embedded defaults.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Runtime Cedar policy directory instead of the shipped one.
    #[arg(long, value_name = "DIR")]
    policy: Option<PathBuf>,
    /// Mapping rules file instead of the shipped one.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Permit every call to HOST (exact or *.suffix) on port 443, or on PORT with HOST:PORT
    /// (plain HTTP needs HOST:80); repeat. The shipped forbids still win.
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    allow_hosts: Vec<String>,
    /// Allow the MCP server at URL (`https://HOST[:PORT]/PATH`, PATH may end in `*`); repeat
    /// (the legacy transport needs its `/sse` and `/messages/*`). Its JSON-RPC messages are
    /// decided one by one (docs/mcp.md): the session plumbing is permitted, `tools/call` of
    /// the `--mcp-tools` (every tool without it).
    #[arg(long = "allow-mcp", value_name = "URL")]
    allow_mcp: Vec<String>,
    /// With --allow-mcp: the only tools that may be called (comma-separated, repeatable);
    /// `tools/list` answers show only these. Without it every tool (and resources, prompts).
    #[arg(long = "mcp-tools", value_name = "TOOL,…", value_delimiter = ',')]
    mcp_tools: Vec<String>,
    /// Let CMD send UDP to ADDR:PORT ([V6]:PORT for IPv6); repeat. UDP is otherwise closed
    /// (DNS goes to the run's DNS guard).
    #[arg(long = "allow-udp", value_name = "ADDR:PORT")]
    allow_udp: Vec<String>,
    /// Let CMD reach loopback PORT (every loopback address) or ADDR:PORT, TCP and UDP, directly;
    /// repeat. Loopback is otherwise closed; the run's own ports can never be allowed.
    #[arg(long = "allow-loopback", value_name = "PORT|ADDR:PORT")]
    allow_loopback: Vec<String>,
    /// Audit log file [default: <state-dir>/audit/<run>.jsonl].
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Inject a credential read from firma's environment: HOST=ENVVAR sends
    /// `Authorization: Bearer <value>`, HOST=ENVVAR:HEADER sends `HEADER: <value>`. CMD gets
    /// ENVVAR set to a placeholder (`sk-firma-placeholder-…`), never the value. Repeat.
    #[arg(long = "credential", value_name = "HOST=ENVVAR[:HEADER]", value_parser = setup::parse_credential)]
    credentials: Vec<CredentialArg>,
    /// Extra CA certificate (PEM) the sidecar trusts for upstreams; repeat.
    #[arg(long = "upstream-ca", value_name = "PEM")]
    upstream_ca: Vec<PathBuf>,
    /// Run CMD as this user [default: the user who ran sudo (SUDO_UID), else root].
    #[arg(long, value_name = "NAME|UID")]
    user: Option<String>,
    /// Log level of the in-process sidecar (RUST_LOG wins).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Budget of one decision in milliseconds (`enforcement_timeout_ms`); a slower decision
    /// is denied `EnforcementTimeout`. Default: the config's, else 50.
    #[arg(long = "enforcement-timeout-ms", value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    enforcement_timeout_ms: Option<u64>,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// Why `firma run` itself failed, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn config(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

/// A run that the flags or the config make impossible (exit 78, like a config error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        let code = if e.downcast_ref::<crate::ConfigFailure>().is_some()
            || e.downcast_ref::<Refused>().is_some()
        {
            EXIT_CONFIG
        } else {
            EXIT_FIRMA_FAILED
        };
        Self {
            code,
            message: crate::describe(&e),
        }
    }
}

pub fn run(args: Args) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("firma run: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Everything the run created, removed in reverse order on every exit path.
struct Cleanup {
    run_dir: Option<PathBuf>,
    cgroup: Option<TransientCgroup>,
    pin_dir: Option<PathBuf>,
}

impl Cleanup {
    fn finish(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(cg) = self.cgroup.take()
            && let Err(e) = cg.remove()
        {
            errors.push(e);
        }
        // Unpinning programs, maps and links (the sidecar has stopped, so nothing else holds
        // them) removes the last kernel state of the run.
        if let Some(p) = self.pin_dir.take()
            && p.exists()
            && let Err(e) = std::fs::remove_dir_all(&p)
        {
            errors.push(format!("cannot remove pins {}: {e}", p.display()));
        }
        if let Some(d) = self.run_dir.take() {
            let _ = std::fs::remove_dir_all(&d);
        }
        errors
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for e in self.finish() {
            eprintln!("firma run: warning: {e}");
        }
    }
}

fn run_inner(args: Args) -> Result<ExitCode, Failure> {
    setup::check_args(&args).map_err(Failure::config)?;
    let cgroup2 = privileges::check().map_err(Failure::config)?;
    let who = child::Identity::resolve(args.user.as_deref())
        .map_err(|e| Failure::config(crate::describe(&e)))?;
    crate::logging::init(&args.log_level, firma_common::config::LogFormat::Text);

    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(setup::default_state_dir);
    let state = State::open(&state_dir)?;
    stale::collect(
        cgroup2.mount(),
        std::path::Path::new(firma_sidecar::ebpf::bpffs::DEFAULT_BPFFS),
        &state.dir.join("runs"),
    );
    let ids = RunIds::new()?;
    let mut cleanup = Cleanup {
        run_dir: Some(state.dir.join("runs").join(&ids.name)),
        cgroup: None,
        pin_dir: None,
    };
    let prepared = setup::prepare(&state, &ids, &args)?;
    cleanup.pin_dir = Some(prepared.config.interceptor.transparent.pin_dir.clone());
    let cg = TransientCgroup::create(cgroup2.mount(), &ids.name)?;
    let procs = cg.procs_file()?;
    cleanup.cgroup = Some(TransientCgroup {
        dir: cg.dir.clone(),
    });

    if who.is_root() {
        eprintln!(
            "firma: warning: CMD runs as root: a root process can move itself out of its cgroup, set the sidecar's socket mark or read firma's environment (the injected secrets), and so bypass enforcement; use --user NAME (under sudo the default is the invoking user)"
        );
    }

    let env = child::environment(
        &prepared.placeholders,
        &prepared.ca_bundle_dir.path().join("ca-bundle.pem"),
        &who,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = format!(
        "firma: enforcing as agent {} (cgroup {}, audit {})",
        args.agent_id,
        prepared.cgroup_rel,
        prepared
            .audit_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not a file sink".into())
    );
    let mut spawned = false;
    let outcome = rt.block_on(supervise(
        &prepared,
        Child {
            argv: &args.command,
            env,
            procs: &procs,
            who: &who,
            banner: &started,
            spawned: &mut spawned,
        },
        &cg,
    ));
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(procs);
    let leftovers = cleanup.finish();
    drop(cleanup);

    if let Some(audit) = prepared.audit_path.as_ref().filter(|_| spawned) {
        let lines = summary::lines(audit, &prepared.cgroup_rel);
        eprintln!(
            "firma: {} decision(s); audit {}{}",
            summary::decisions(audit, &prepared.cgroup_rel),
            audit.display(),
            prepared
                .audit_public_key
                .as_deref()
                .map(|k| format!(
                    " (verify: firma audit verify {} --public-key {})",
                    audit.display(),
                    k.display()
                ))
                .unwrap_or_default()
        );
        for l in lines {
            eprintln!("firma: {l}");
        }
    }
    for e in &leftovers {
        eprintln!("firma run: warning: {e}");
    }
    let status = outcome?;
    Ok(ExitCode::from(status))
}

/// Starts the sidecar, spawns CMD once the sidecar is ready, waits, stops the sidecar.
/// Returns CMD's exit code (128+N when killed by signal N).
/// CMD and what starting it needs.
struct Child<'a> {
    argv: &'a [OsString],
    env: Vec<(OsString, OsString)>,
    procs: &'a std::fs::File,
    who: &'a child::Identity,
    /// Printed once the sidecar is ready, just before CMD starts.
    banner: &'a str,
    /// Set once CMD has started (a summary is printed only then).
    spawned: &'a mut bool,
}

async fn supervise(prepared: &Prepared, c: Child<'_>, cg: &TransientCgroup) -> Result<u8, Failure> {
    let Child {
        argv,
        env,
        procs,
        who,
        banner,
        spawned,
    } = c;
    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k| signal(k).context("installing signal handlers");
    let (mut int, mut term, mut hup) = (
        sig(SignalKind::interrupt())?,
        sig(SignalKind::terminate())?,
        sig(SignalKind::hangup())?,
    );

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
    let cfg = prepared.config.clone();
    let mut sidecar = tokio::spawn(async move {
        firma_sidecar::server::run_until(
            &cfg,
            move || {
                let _ = ready_tx.send(());
            },
            move || Ok(async move { stop_rx.await.unwrap_or("firma run stopping") }),
        )
        .await
    });
    let sidecar_failed = |r: Result<
        Result<(), firma_sidecar::server::SidecarError>,
        tokio::task::JoinError,
    >|
     -> Failure {
        match r {
            Ok(Err(e)) => match e.config_key() {
                Some(key) => Failure::config(format!("sidecar: {key}: {e}")),
                None => Failure::from(anyhow::Error::new(e).context("sidecar failed")),
            },
            Ok(Ok(())) => Failure::from(anyhow::anyhow!("sidecar stopped unexpectedly")),
            Err(e) => Failure::from(anyhow::anyhow!("sidecar task failed: {e}")),
        }
    };
    // Nothing runs before the cgroup is attached and the listeners are up.
    tokio::select! {
        r = ready_rx => if r.is_err() {
            return Err(sidecar_failed((&mut sidecar).await));
        },
        _ = int.recv() => return Err(Failure::from(anyhow::anyhow!("interrupted during startup"))),
        _ = term.recv() => return Err(Failure::from(anyhow::anyhow!("terminated during startup"))),
    }

    eprintln!("{banner}");
    let mut child = match child::spawn(argv, env, procs, who) {
        Ok(c) => {
            *spawned = true;
            c
        }
        Err(e) => {
            let _ = stop_tx.send("CMD could not start");
            let _ = sidecar.await;
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            };
            return Err(Failure {
                code,
                message: format!("cannot run {}: {e}", argv[0].to_string_lossy()),
            });
        }
    };
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut signals = 0;
    let forward = |s: nix::sys::signal::Signal| {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, s);
        }
    };
    let status = loop {
        use nix::sys::signal::Signal;
        let got = tokio::select! {
            st = child.wait() => break st.context("waiting for CMD")?,
            r = &mut sidecar => {
                // The sidecar died under a running CMD: its connects are refused (the links
                // stay until cleanup); stop CMD and report.
                cg.kill_all(Duration::from_secs(5));
                let _ = child.wait().await;
                return Err(sidecar_failed(r));
            }
            _ = int.recv() => Signal::SIGINT,
            _ = term.recv() => Signal::SIGTERM,
            _ = hup.recv() => Signal::SIGHUP,
        };
        signals += 1;
        if signals > 1 {
            // A second signal: stop everything in the cgroup now.
            cg.kill_all(Duration::from_secs(5));
        } else {
            forward(got);
        }
    };
    // What CMD left behind (daemons, background jobs) does not outlive the run.
    cg.kill_all(Duration::from_secs(5));
    let _ = stop_tx.send("CMD exited");
    match tokio::time::timeout(Duration::from_secs(10), &mut sidecar).await {
        Ok(Ok(Ok(()))) => {}
        Ok(r) => {
            let f = sidecar_failed(r);
            eprintln!("firma run: warning: {}", f.message);
        }
        Err(_) => {
            sidecar.abort();
            eprintln!("firma run: warning: the sidecar did not stop within 10 s");
        }
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => EXIT_FIRMA_FAILED,
    })
}
