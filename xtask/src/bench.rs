//! `cargo xtask bench`: the criterion benches of the decision pipeline, then the end-to-end
//! load harness (`firma-bench run`, `profiling` build: release code with line tables) comparing two clients (`firma-bench client`
//! and Go `hey`) direct, through the sidecar, and through Envoy and mitmproxy (installed by the
//! harness into a venv under `target/bench/peers`; `hey` and `nginx-light` with apt-get as
//! root) in one run, repeated and interleaved. Results: `target/bench/e2e.json` (every run and
//! the medians), and the table of medians on stdout. Then the many-tenants scenario
//! (`firma-bench tenants`, `target/bench/tenants.json`) and the LLM streams scenario
//! (`firma-bench streams`, `target/bench/streams.json`) and the big-bodies scenario
//! (`firma-bench bodies`, `target/bench/bodies.json`) and the many-idle-connections scenario
//! (`firma-bench idle`, `target/bench/idle.json`), Envoy alone vs Envoy + Firma ext_authz vs
//! the sidecar (`firma-bench ext-authz`, `target/bench/ext_authz.json`) and the Authority's
//! issuance and revocation catch-up (`firma-bench authority`, `target/bench/authority.json`)
//! and the `firma run` overhead (`firma-bench run-overhead`, `target/bench/run_overhead.json`);
//! `--scenario NAME` runs one alone.

use crate::exec;
use std::path::Path;
use std::process::Command;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Do not run `cargo bench -p firma-sidecar --bench decision`.
    #[arg(long)]
    pub skip_criterion: bool,
    /// A smoke run that checks the harness works end to end, not a measurement: debug
    /// binaries, no criterion, no peers, no `hey`, one short repetition of the side-by-side
    /// run and of the many-tenants scenario (1,000 tenants), 20 SSE streams of 5 events, a 1 MB
    /// upload and download, 50 idle connections, 1 s of the ext_authz comparison (Envoy from
    /// `target/bench/peers` if there), 20 issuances + 200 revocations and one repetition of the
    /// `firma run` overhead, results in
    /// `target/bench/smoke*.json`. CI runs it (scripts/check-documented.sh).
    #[arg(long)]
    pub smoke: bool,
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
    /// 1,000 concurrent SSE responses direct vs through the sidecar with a token budget policy
    /// on (`firma-bench streams`): added per-event latency, sidecar CPU and RSS.
    Streams,
    /// Multi-MB uploads (on the rule that extracts) and downloads, direct vs through the
    /// sidecar (`firma-bench bodies`): MB/s and sidecar CPU-s per GB.
    Bodies,
    /// 10,000 idle keep-alive connections through the sidecar (`firma-bench idle`): RSS per
    /// connection, and a probe connection's p99 before and during.
    Idle,
    /// Envoy alone vs Envoy + Firma ext_authz vs the Firma sidecar, same client and upstream
    /// (`firma-bench ext-authz`), with the criterion bench of the embedded layer.
    #[value(name = "ext_authz")]
    ExtAuthz,
    /// Issuance over gRPC and a client catching up on 10,000 revocations at connect
    /// (`firma-bench authority`), with the criterion bench of in-process issuance.
    Authority,
    /// The same curl direct and under `firma run`, and `firma run -- true`
    /// (`firma-bench run-overhead`): start to the first enforced request, client end to exit.
    #[value(name = "run_overhead")]
    RunOverhead,
}

/// What every smoke run of a scenario passes: one repetition.
const SMOKE_COMMON: &[&str] = &["--repetitions", "1"];

/// What the smoke runs of the timed scenarios (`run`, `tenants`, `ext-authz`) add: the builtin
/// upstream, 1 s measured after 20 warmup requests.
const SMOKE_TIMED: &[&str] = &[
    "--upstream",
    "builtin",
    "--duration-secs",
    "1",
    "--warmup",
    "20",
];

/// The smoke runs: `(subcommand, report file under target/bench, timed, its own arguments)`,
/// in the order they run.
const SMOKE: &[(&str, &str, bool, &[&str])] = &[
    (
        "run",
        "smoke.json",
        true,
        &[
            "--skip-peers",
            "--skip-hey",
            "--requests",
            "200",
            "--new-connection-requests",
            "50",
            "--issuance-requests",
            "10",
        ],
    ),
    (
        "tenants",
        "smoke-tenants.json",
        true,
        // The reload must land within the run minus 3 s (poll interval + a debug compile).
        &["--tenants", "1000", "--reload-run-secs", "10"],
    ),
    (
        "streams",
        "smoke-streams.json",
        false,
        &["--streams", "20", "--events", "5", "--interval-ms", "10"],
    ),
    ("bodies", "smoke-bodies.json", false, &["--sizes-mb", "1"]),
    (
        "idle",
        "smoke-idle.json",
        false,
        &["--connections", "50", "--probe-requests", "50"],
    ),
    // Envoy from `target/bench/peers` when `.ci/run` or `install-peers` put it there; else
    // only the sidecar row, with SKIP.
    ("ext-authz", "smoke-ext_authz.json", true, &[]),
    (
        "authority",
        "smoke-authority.json",
        false,
        &["--issuance-requests", "20", "--revocations", "200"],
    ),
    ("run-overhead", "smoke-run_overhead.json", false, &[]),
];

/// The arguments of one smoke run: the common ones, the timed ones if `timed`, then `own`.
fn smoke_args(timed: bool, own: &[&str]) -> Vec<String> {
    let timed = if timed { SMOKE_TIMED } else { &[] };
    [SMOKE_COMMON, timed, own]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
}

/// The cargo profile the harness builds and runs (`[profile.profiling]`: release + debug = 1).
const PROFILE: &str = "profiling";

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let root = &root.canonicalize()?;
    // The streams scenario has no criterion bench of its own (its hot path is the relay).
    // The ext_authz and Authority scenarios have criterion benches of their own crates.
    if !args.skip_criterion && !args.smoke {
        let own = match args.scenario {
            Some(Scenario::ExtAuthz) => Some(["firma-embed", "embedded"]),
            Some(Scenario::Authority) => Some(["firma-authority", "issuance"]),
            _ => None,
        };
        if let Some([krate, bench]) = own {
            let mut cmd = Command::new("cargo");
            cmd.args(["bench", "--profile", PROFILE, "-p", krate, "--bench", bench]);
            exec(cmd.current_dir(root))?;
        }
    }
    if !args.skip_criterion
        && !args.smoke
        && !matches!(
            args.scenario,
            Some(
                Scenario::Streams
                    | Scenario::Bodies
                    | Scenario::Idle
                    | Scenario::ExtAuthz
                    | Scenario::Authority
                    | Scenario::RunOverhead
            )
        )
    {
        let mut cmd = Command::new("cargo");
        cmd.args(["bench", "-p", "firma-sidecar", "--bench", "decision"]);
        if args.scenario == Some(Scenario::Tenants) {
            cmd.args(["--", "10k_tenants"]);
        }
        exec(cmd.current_dir(root))?;
    }
    // One optimised build of both binaries: the figures are meaningless for a debug `firma`,
    // and a debug load client would measure itself. The `profiling` profile is release plus
    // line tables, so `perf` on the measured binary resolves symbols and lines. A smoke run
    // only checks the harness works (debug).
    let profile = if args.smoke { "debug" } else { PROFILE };
    let mut build = Command::new("cargo");
    build.args(["build", "-p", "firma", "-p", "firma-bench"]);
    if !args.smoke {
        build.args(["--profile", PROFILE]);
    }
    exec(build.current_dir(root))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join(profile);
    if args.smoke {
        for (name, file, timed, own) in SMOKE {
            let mut extra = smoke_args(*timed, own);
            let out = target.join("bench").join(file);
            match *name {
                // Extra arguments of `cargo xtask bench --smoke` go to the side-by-side run.
                "run" => extra.extend_from_slice(&args.args),
                "ext-authz" => {
                    ext_authz(root, &bin, &target, &out, &extra)?;
                    continue;
                }
                _ => {}
            }
            scenario(root, &bin, name, &out, &extra)?;
        }
        return Ok(());
    }
    let tenants_out = target.join("bench/tenants.json");
    let streams_out = target.join("bench/streams.json");
    let bodies_out = target.join("bench/bodies.json");
    let idle_out = target.join("bench/idle.json");
    let authority_out = target.join("bench/authority.json");
    let run_overhead_out = target.join("bench/run_overhead.json");
    match args.scenario {
        Some(Scenario::Tenants) => return tenants(root, &bin, &tenants_out, &args.args),
        Some(Scenario::Streams) => {
            return scenario(root, &bin, "streams", &streams_out, &args.args);
        }
        Some(Scenario::Bodies) => {
            return scenario(root, &bin, "bodies", &bodies_out, &args.args);
        }
        Some(Scenario::Idle) => return scenario(root, &bin, "idle", &idle_out, &args.args),
        Some(Scenario::ExtAuthz) => {
            install_peers(&bin, &target)?;
            let out = target.join("bench/ext_authz.json");
            return ext_authz(root, &bin, &target, &out, &args.args);
        }
        Some(Scenario::Authority) => {
            return scenario(root, &bin, "authority", &authority_out, &args.args);
        }
        Some(Scenario::RunOverhead) => {
            return scenario(root, &bin, "run-overhead", &run_overhead_out, &args.args);
        }
        None => {}
    }
    // The peers, hey and nginx are installed first, with the host's network (the run itself
    // has none).
    install_peers(&bin, &target)?;
    // Envoy and mitmproxy are installed here once (a venv), then reused.
    let mut extra = vec![
        "--peers-dir".to_string(),
        target.join("bench/peers").display().to_string(),
    ];
    extra.extend_from_slice(&args.args);
    scenario(root, &bin, "run", &target.join("bench/e2e.json"), &extra)?;
    tenants(root, &bin, &tenants_out, &[])?;
    scenario(root, &bin, "streams", &streams_out, &[])?;
    scenario(root, &bin, "bodies", &bodies_out, &[])?;
    scenario(root, &bin, "idle", &idle_out, &[])?;
    ext_authz(
        root,
        &bin,
        &target,
        &target.join("bench/ext_authz.json"),
        &[],
    )?;
    scenario(root, &bin, "authority", &authority_out, &[])?;
    scenario(root, &bin, "run-overhead", &run_overhead_out, &[])
}

/// `firma-bench install-peers` (Envoy, mitmproxy, hey, nginx), with the host's network.
fn install_peers(bin: &Path, target: &Path) -> anyhow::Result<()> {
    exec(
        Command::new(bin.join("firma-bench"))
            .arg("install-peers")
            .arg("--dir")
            .arg(target.join("bench/peers")),
    )
}

/// `firma-bench ext-authz` with Envoy from `target/bench/peers`, then `extra`.
fn ext_authz(
    root: &Path,
    bin: &Path,
    target: &Path,
    out: &Path,
    extra: &[String],
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    if !extra.iter().any(|a| a.starts_with("--peers-dir")) {
        all.push("--peers-dir".to_string());
        all.push(target.join("bench/peers").display().to_string());
    }
    all.extend_from_slice(extra);
    scenario(root, bin, "ext-authz", out, &all)
}

/// `firma-bench tenants` (the many-tenants scenario) with `extra` arguments.
fn tenants(root: &Path, bin: &Path, out: &Path, extra: &[String]) -> anyhow::Result<()> {
    scenario(root, bin, "tenants", out, extra)
}

/// `firma-bench NAME --firma … --out OUT EXTRA…`: one scenario subcommand.
fn scenario(
    root: &Path,
    bin: &Path,
    name: &str,
    out: &Path,
    extra: &[String],
) -> anyhow::Result<()> {
    exec(
        harness(bin)
            .arg(name)
            .arg("--firma")
            .arg(bin.join("firma"))
            .arg("--out")
            .arg(out)
            .args(extra)
            // The Authority launcher of firma-testing finds the measured binary here.
            .env("FIRMA_BIN", bin.join("firma"))
            .current_dir(root),
    )
}

/// `firma-bench` from `bin`, in a private network namespace of its own (loopback only) when
/// root can make one, so no other traffic on the host shares the figures' sockets; otherwise on
/// the host's loopback.
fn harness(bin: &Path) -> Command {
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
        .arg(bin.join("firma-bench"));
        c
    } else {
        eprintln!("bench: not root or no unshare: running on the host's loopback");
        Command::new(bin.join("firma-bench"))
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
