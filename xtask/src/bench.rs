//! `cargo xtask bench`: the criterion benches of the decision pipeline, then the end-to-end
//! load harness (`firma-bench run`, `profiling` build: release code with line tables) comparing two clients (`firma-bench client`
//! and Go `hey`) direct, through the sidecar, and through Envoy and mitmproxy (installed by the
//! harness into a venv under `target/bench/peers`; `hey` and `nginx-light` with apt-get as
//! root) in one run, repeated and interleaved. Results: `target/bench/e2e.json` (every run and
//! the medians), and the table of medians on stdout.

use crate::exec;
use std::path::Path;
use std::process::Command;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Do not run `cargo bench -p firma-sidecar --bench decision`.
    #[arg(long)]
    pub skip_criterion: bool,
    /// Passed to `firma-bench run` (e.g. `--duration-secs 2 --repetitions 2 --upstream builtin`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The cargo profile the harness builds and runs (`[profile.profiling]`: release + debug = 1).
const PROFILE: &str = "profiling";

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let root = &root.canonicalize()?;
    if !args.skip_criterion {
        exec(
            Command::new("cargo")
                .args(["bench", "-p", "firma-sidecar", "--bench", "decision"])
                .current_dir(root),
        )?;
    }
    // One optimised build of both binaries: the figures are meaningless for a debug `firma`,
    // and a debug load client would measure itself. The `profiling` profile is release plus
    // line tables, so `perf` on the measured binary resolves symbols and lines.
    exec(
        Command::new("cargo")
            .args([
                "build",
                "--profile",
                PROFILE,
                "-p",
                "firma",
                "-p",
                "firma-bench",
            ])
            .current_dir(root),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join(PROFILE);
    // The peers, hey and nginx are installed first, with the host's network (the run itself
    // has none).
    exec(
        Command::new(bin.join("firma-bench"))
            .arg("install-peers")
            .arg("--dir")
            .arg(target.join("bench/peers")),
    )?;
    // A private network namespace of its own (loopback only) when root can make one, so no
    // other traffic on the host shares the figures' sockets; otherwise host loopback.
    let netns = nix_is_root()
        && Command::new("unshare")
            .args(["--net", "true"])
            .status()
            .is_ok_and(|s| s.success());
    let mut cmd = if netns {
        let mut c = Command::new("unshare");
        c.args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(bin.join("firma-bench"));
        c
    } else {
        eprintln!("bench: not root or no unshare: running on the host's loopback");
        Command::new(bin.join("firma-bench"))
    };
    exec(
        cmd.arg("run")
            .arg("--firma")
            .arg(bin.join("firma"))
            // The Authority launcher of firma-testing (issuance latency) finds it here.
            .env("FIRMA_BIN", bin.join("firma"))
            .arg("--out")
            .arg(target.join("bench/e2e.json"))
            // Envoy and mitmproxy are installed here once (a venv), then reused.
            .arg("--peers-dir")
            .arg(target.join("bench/peers"))
            .args(&args.args)
            .current_dir(root),
    )
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
