//! `cargo xtask bench`: the criterion benches of the decision pipeline, then the end-to-end
//! load harness (`firma-bench run`, release build) comparing two clients (`firma-bench client`
//! and Go `hey`) direct, through the sidecar, and through Envoy and mitmproxy (installed by the
//! harness into a venv under `target/bench/peers`; `hey` and `nginx-light` with apt-get as
//! root) in one run, repeated and interleaved. Results: `target/bench/e2e.json` (every run and
//! the medians), and the table of medians on stdout. Then the many-tenants scenario
//! (`firma-bench tenants`, `target/bench/tenants.json`), which `--scenario tenants` runs alone.

use crate::exec;
use std::path::Path;
use std::process::Command;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Do not run `cargo bench -p firma-sidecar --bench decision`.
    #[arg(long)]
    pub skip_criterion: bool,
    /// Run only this scenario (and only its criterion benches); the trailing arguments then go
    /// to its `firma-bench` subcommand.
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// Passed to `firma-bench run` (e.g. `--duration-secs 2 --repetitions 2 --upstream builtin`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// A scenario that can run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The shipped bundle vs the shipped bundle + 10,000 tenant policies (`firma-bench
    /// tenants`), with the criterion benches of the 10,000-tenant decision and compile.
    Tenants,
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let root = &root.canonicalize()?;
    if !args.skip_criterion {
        let mut cmd = Command::new("cargo");
        cmd.args(["bench", "-p", "firma-sidecar", "--bench", "decision"]);
        if args.scenario == Some(Scenario::Tenants) {
            cmd.args(["--", "10k_tenants"]);
        }
        exec(cmd.current_dir(root))?;
    }
    // One release build of both binaries: the figures are meaningless for a debug `firma`, and
    // a debug load client would measure itself.
    exec(
        Command::new("cargo")
            .args(["build", "--release", "-p", "firma", "-p", "firma-bench"])
            .current_dir(root),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if args.scenario == Some(Scenario::Tenants) {
        return tenants(root, &target, &args.args);
    }
    // The peers, hey and nginx are installed first, with the host's network (the run itself
    // has none).
    exec(
        Command::new(target.join("release/firma-bench"))
            .arg("install-peers")
            .arg("--dir")
            .arg(target.join("bench/peers")),
    )?;
    let mut cmd = harness(&target);
    exec(
        cmd.arg("run")
            .arg("--firma")
            .arg(target.join("release/firma"))
            // The Authority launcher of firma-testing (issuance latency) finds it here.
            .env("FIRMA_BIN", target.join("release/firma"))
            .arg("--out")
            .arg(target.join("bench/e2e.json"))
            // Envoy and mitmproxy are installed here once (a venv), then reused.
            .arg("--peers-dir")
            .arg(target.join("bench/peers"))
            .args(&args.args)
            .current_dir(root),
    )?;
    tenants(root, &target, &[])
}

/// `firma-bench tenants` (the many-tenants scenario) with `extra` arguments.
fn tenants(root: &Path, target: &Path, extra: &[String]) -> anyhow::Result<()> {
    exec(
        harness(target)
            .arg("tenants")
            .arg("--firma")
            .arg(target.join("release/firma"))
            .arg("--out")
            .arg(target.join("bench/tenants.json"))
            .args(extra)
            .current_dir(root),
    )
}

/// `firma-bench`, in a private network namespace of its own (loopback only) when root can
/// make one, so no other traffic on the host shares the figures' sockets; otherwise on the
/// host's loopback.
fn harness(target: &Path) -> Command {
    let netns = nix_is_root()
        && Command::new("unshare")
            .args(["--net", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if netns {
        let mut c = Command::new("unshare");
        c.args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(target.join("release/firma-bench"));
        c
    } else {
        eprintln!("bench: not root or no unshare: running on the host's loopback");
        Command::new(target.join("release/firma-bench"))
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}
