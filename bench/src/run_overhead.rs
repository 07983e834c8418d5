//! `firma-bench run-overhead`: what `firma run -- CMD` adds to a short agent command
//! (docs/benchmarks.md, "firma run overhead").
//!
//! In a fresh network and private mount namespace (re-executed under `unshare`, as the
//! transparent targets are), the builtin upstream poses as [`deploy::HOST`] at 10.77.0.2:443
//! (a hosts file over /etc/hosts; `firma run` refuses loopback to CMD). Each repetition runs,
//! interleaved and in rotating order:
//! - `direct`: the client command alone;
//! - `firma_run`: `firma run --credential … -- <the same client command>`;
//! - `firma_run_true`: `firma run -- true` (setup and teardown alone).
//!
//! The client command is `sh -c 'curl … https://api.openai.com/v1/models; date +%s%N > MARK'`:
//! the mark is when the client finished, the upstream records when the request arrived and
//! whether it carried the injected credential. So a `firma run` splits into start → first
//! enforced request (cgroup, sidecar, eBPF attach, CMD's spawn, curl's TLS through the MITM)
//! and client exit → `firma run` exit (kill what is left, sidecar drain, cgroup, pins and run
//! directory removed, the audit summary). A `firma run` whose request reached the upstream
//! without the credential, that exits non-zero, or that leaves its cgroup, pin directory or
//! run directory behind fails the scenario: no figure is printed for it.

use crate::deploy;
use crate::upstream::{Kind, Upstream};
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, clap::Args)]
pub struct RunOverheadArgs {
    /// The `firma` binary to benchmark (a release build).
    #[arg(long)]
    pub firma: PathBuf,
    /// Measured repetitions of each command, interleaved, after one unmeasured run of each
    /// (the first `firma run` creates the state directory: keys and CA).
    #[arg(long, default_value_t = 10)]
    pub repetitions: usize,
    /// `--enforcement-timeout-ms` of every `firma run`: a decision deadline, not a cost (a
    /// debug build on a loaded machine needs more than the default 50).
    #[arg(long, default_value_t = 2000)]
    pub enforcement_timeout_ms: u64,
    #[arg(long, default_value = "target/bench/run_overhead.json")]
    pub out: PathBuf,
    /// Internal: already inside the fresh network and mount namespaces.
    #[arg(long, hide = true)]
    pub inner: bool,
}

/// The measured commands, in the report's order.
const DIRECT: &str = "direct";
const FIRMA_RUN: &str = "firma_run";
const FIRMA_RUN_TRUE: &str = "firma_run_true";

/// One run of one command, in ms from its spawn.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub command: &'static str,
    pub rep: usize,
    /// Spawn to exit.
    pub wall_ms: f64,
    /// Spawn to the request's arrival at the upstream (with the injected credential for
    /// `firma_run`); none for `firma_run_true`.
    pub to_request_ms: Option<f64>,
    /// The client's end (its mark) to the exit of what was spawned: for `firma_run` the
    /// cleanup and summary; none for `firma_run_true`.
    pub client_end_to_exit_ms: Option<f64>,
}

/// p50 / p90 / max (nearest rank) of one metric of one command.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub command: &'static str,
    pub metric: &'static str,
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
}

/// `firma_run` over `direct` for one metric (p50s).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub metric: &'static str,
    pub direct_p50_ms: f64,
    pub firma_run_p50_ms: f64,
    pub ratio: f64,
    pub added_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunOverheadReport {
    pub date_unix: u64,
    pub cpus: usize,
    pub load_avg_1m: Option<f64>,
    pub repetitions: usize,
    /// Why nothing was measured (no root, cgroup2, bpffs or eBPF object).
    pub skipped: Option<String>,
    /// The client command (MARK and BUNDLE are per run / per deployment).
    pub client: String,
    /// The unmeasured first `firma run -- true`, which created the state directory.
    pub first_run_ms: Option<f64>,
    pub stats: Vec<Stat>,
    pub ratios: Vec<Ratio>,
    /// Every run, in the order it ran.
    pub samples: Vec<Sample>,
}

impl RunOverheadReport {
    fn new(args: &RunOverheadArgs, skipped: Option<String>) -> Self {
        Self {
            date_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_avg_1m: crate::ext_authz::load_avg(),
            repetitions: args.repetitions,
            skipped,
            client: client_script("BUNDLE", Path::new("MARK")),
            first_run_ms: None,
            stats: Vec::new(),
            ratios: Vec::new(),
            samples: Vec::new(),
        }
    }
}

pub fn run(args: &RunOverheadArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if args.inner {
        return inner(args);
    }
    if let Some(why) = crate::transparent::skip_reason() {
        return skip(args, why);
    }
    let firma = crate::scenario::firma_binary(&args.firma)?;
    eprintln!("starting: firma run overhead in a fresh network namespace");
    let status = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe()?)
        .arg("run-overhead")
        .arg("--inner")
        .arg("--firma")
        .arg(&firma)
        .args(["--repetitions", &args.repetitions.to_string()])
        .args([
            "--enforcement-timeout-ms",
            &args.enforcement_timeout_ms.to_string(),
        ])
        .arg("--out")
        .arg(&args.out)
        .status()
        .context("run unshare")?;
    ensure!(status.success(), "the firma run overhead scenario failed");
    Ok(())
}

/// Prints SKIP and records why in the report.
fn skip(args: &RunOverheadArgs, why: String) -> anyhow::Result<()> {
    println!("SKIP firma run overhead: {why}");
    write(args, &RunOverheadReport::new(args, Some(why)))
}

fn write(args: &RunOverheadArgs, report: &RunOverheadReport) -> anyhow::Result<()> {
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("write {}", args.out.display()))
}

/// The client: one GET that the shipped policy allows (`model.inference.chat`), the status on
/// stdout, then the time it ended (ns since the epoch) into `mark`.
fn client_script(bundle: &str, mark: &Path) -> String {
    format!(
        "curl -sS --max-time 30 -o /dev/null -w '%{{http_code}}' --cacert '{bundle}' https://{}/v1/models; s=$?; date +%s%N > '{}'; exit $s",
        deploy::HOST,
        mark.display()
    )
}

/// Inside the namespaces: the upstream, the runs, the checks, the report.
fn inner(args: &RunOverheadArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dst = crate::transparent::netns_with_hosts(tmp.path())?;
    // The builtin server: it records each request's arrival time in this process.
    let up = Upstream::start(
        Kind::Builtin,
        tmp.path(),
        &[deploy::HOST],
        dst,
        &deploy::injected_auth(),
    )?;
    let w = World {
        firma: args.firma.clone(),
        state: tmp.path().join("state"),
        up,
        dir: tmp.path().to_path_buf(),
        timeout_ms: args.enforcement_timeout_ms,
        cgroup2: crate::transparent::cgroup2_mount().context("cgroup2 mount")?,
        pids: Default::default(),
    };
    let mut report = RunOverheadReport::new(args, None);
    // Unmeasured: the first run creates the state directory (keys, the MITM CA).
    let first = match w.firma_run_true(0) {
        Ok(s) => s,
        Err(Refusal::Prerequisite(why)) => return skip(args, why),
        Err(Refusal::Failed(e)) => return Err(e),
    };
    report.first_run_ms = Some(first.wall_ms);
    // The same client trusts both CAs, so the exact same command runs on both paths.
    let bundle = tmp.path().join("ca-bundle.pem");
    crate::run::write_bundle(&bundle, &[w.up.ca_path.clone(), w.firma_ca()])?;
    let bundle = deploy::path_str(&bundle)?.to_string();
    w.direct(&bundle, 0)?;
    w.firma_run(&bundle, 0)?;
    for rep in 1..=args.repetitions {
        for i in 0..3 {
            let s = match (rep + i) % 3 {
                0 => w.direct(&bundle, rep)?,
                1 => w.firma_run(&bundle, rep)?,
                _ => w.firma_run_true(rep).map_err(Refusal::into_error)?,
            };
            report.samples.push(s);
        }
    }
    report.stats = stats(&report.samples);
    report.ratios = ratios(&report.stats);
    write(args, &report)?;
    print_table(&report);
    Ok(())
}

/// Why a `firma run` did not give a figure.
enum Refusal {
    /// Exit 78 naming a missing prerequisite (`firma doctor`): the scenario is skipped.
    Prerequisite(String),
    Failed(anyhow::Error),
}

impl Refusal {
    fn into_error(self) -> anyhow::Error {
        match self {
            Refusal::Prerequisite(why) => anyhow::anyhow!("firma run refused: {why}"),
            Refusal::Failed(e) => e,
        }
    }
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Refusal::Failed(e)
    }
}

struct World {
    firma: PathBuf,
    state: PathBuf,
    up: Upstream,
    dir: PathBuf,
    timeout_ms: u64,
    cgroup2: PathBuf,
    /// Every `firma run` spawned, so the leftover check looks at this scenario's runs only.
    pids: std::cell::RefCell<Vec<u32>>,
}

/// One spawned command: when it started and ended, and its output.
struct Timed {
    start: SystemTime,
    end: SystemTime,
    out: std::process::Output,
}

fn ms(from: SystemTime, to: SystemTime) -> anyhow::Result<f64> {
    Ok(to
        .duration_since(from)
        .with_context(|| format!("{to:?} is before {from:?}"))?
        .as_secs_f64()
        * 1000.0)
}

fn spawn_timed(mut cmd: Command) -> anyhow::Result<Timed> {
    cmd.stdin(std::process::Stdio::null());
    let start = SystemTime::now();
    let out = cmd.output().context("spawn")?;
    let end = SystemTime::now();
    Ok(Timed { start, end, out })
}

impl World {
    fn firma_ca(&self) -> PathBuf {
        self.state.join("firma-ca/firma-ca.crt")
    }

    /// `firma run --state-dir … --upstream-ca … --credential HOST=VAR -- CMD…`.
    fn firma_command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new(&self.firma);
        c.arg("run")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--upstream-ca")
            .arg(&self.up.ca_path)
            .args(["--enforcement-timeout-ms", &self.timeout_ms.to_string()])
            .arg("--credential")
            .arg(format!("{}={}", deploy::HOST, deploy::CREDENTIAL_ENV))
            .arg("--")
            .args(cmd)
            .env(deploy::CREDENTIAL_ENV, deploy::CREDENTIAL)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("SUDO_UID");
        c
    }

    /// Exit 0 and nothing of the run left (its cgroup, pin directory, run directory).
    fn check_firma_run(&self, t: &Timed) -> Result<(), Refusal> {
        let stderr = String::from_utf8_lossy(&t.out.stderr);
        if t.out.status.code() == Some(78) && stderr.contains("firma doctor") {
            return Err(Refusal::Prerequisite(stderr.trim().to_string()));
        }
        if !t.out.status.success() {
            return Err(Refusal::Failed(anyhow::anyhow!(
                "firma run exited {:?}:\n{}{stderr}",
                t.out.status.code(),
                String::from_utf8_lossy(&t.out.stdout)
            )));
        }
        let left = self.leftovers();
        if !left.is_empty() {
            return Err(Refusal::Failed(anyhow::anyhow!(
                "firma run left behind: {left:?}"
            )));
        }
        Ok(())
    }

    /// Whatever any `firma run` of this scenario left: `firma-run-*` cgroups, pin directories
    /// and run directories (runs are sequential, so any is a leftover).
    fn leftovers(&self) -> Vec<String> {
        let dirs = [
            self.cgroup2.clone(),
            PathBuf::from("/sys/fs/bpf"),
            self.state.join("runs"),
        ];
        let ours = |n: &str| n.starts_with("firma-run-");
        dirs.iter()
            .flat_map(|d| {
                std::fs::read_dir(d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(ours))
                    .filter(|p| self.started_here(p))
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Whether `firma-run-<pid>-<hex>` names a `firma run` this scenario started (another
    /// process on the host may run its own at the same time).
    fn started_here(&self, p: &Path) -> bool {
        let pid = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("firma-run-"))
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<u32>().ok());
        pid.is_some_and(|pid| self.pids.borrow().contains(&pid))
    }

    fn firma_run_true(&self, rep: usize) -> Result<Sample, Refusal> {
        let t = self.spawn_firma(&["true"])?;
        self.check_firma_run(&t)?;
        Ok(Sample {
            command: FIRMA_RUN_TRUE,
            rep,
            wall_ms: ms(t.start, t.end)?,
            to_request_ms: None,
            client_end_to_exit_ms: None,
        })
    }

    fn spawn_firma(&self, cmd: &[&str]) -> anyhow::Result<Timed> {
        let mut c = self.firma_command(cmd);
        c.stdin(std::process::Stdio::null());
        let start = SystemTime::now();
        let child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("spawn firma run")?;
        self.pids.borrow_mut().push(child.id());
        let out = child.wait_with_output()?;
        let end = SystemTime::now();
        Ok(Timed { start, end, out })
    }

    fn direct(&self, bundle: &str, rep: usize) -> anyhow::Result<Sample> {
        let mark = self.dir.join("mark");
        let script = client_script(bundle, &mark);
        let before = (self.up.requests(), self.up.injected());
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        let t = spawn_timed(c)?;
        self.client_result(&t, "direct")?;
        ensure!(
            (self.up.requests(), self.up.injected()) == (before.0 + 1, before.1),
            "direct: the upstream counted {:?} (requests, injected), expected one more request without the credential",
            (self.up.requests() - before.0, self.up.injected() - before.1)
        );
        self.sample(DIRECT, rep, &t, &mark, false)
    }

    fn firma_run(&self, bundle: &str, rep: usize) -> anyhow::Result<Sample> {
        let mark = self.dir.join("mark");
        let script = client_script(bundle, &mark);
        let before = (self.up.requests(), self.up.injected());
        let t = self.spawn_firma(&["sh", "-c", &script])?;
        self.check_firma_run(&t).map_err(Refusal::into_error)?;
        self.client_result(&t, "firma run")?;
        // Enforced: exactly one request reached the upstream, and it carried the credential
        // only the sidecar holds.
        ensure!(
            (self.up.requests(), self.up.injected()) == (before.0 + 1, before.1 + 1),
            "firma run: the upstream counted {:?} (requests, injected), expected one request with the injected credential",
            (self.up.requests() - before.0, self.up.injected() - before.1)
        );
        self.sample(FIRMA_RUN, rep, &t, &mark, true)
    }

    /// The client printed 200 and wrote its mark.
    fn client_result(&self, t: &Timed, what: &str) -> anyhow::Result<()> {
        let stdout = String::from_utf8_lossy(&t.out.stdout);
        ensure!(
            t.out.status.success() && stdout.starts_with("200"),
            "{what}: the client did not get a 200 (exit {:?}):\n{stdout}{}",
            t.out.status.code(),
            String::from_utf8_lossy(&t.out.stderr)
        );
        Ok(())
    }

    fn sample(
        &self,
        command: &'static str,
        rep: usize,
        t: &Timed,
        mark: &Path,
        injected: bool,
    ) -> anyhow::Result<Sample> {
        let (arrived, with_credential) = self
            .up
            .last_arrival()
            .context("the upstream recorded no arrival")?;
        ensure!(
            with_credential == injected,
            "{command}: the request arrived with_credential={with_credential}, expected {injected}"
        );
        let ns: u64 = std::fs::read_to_string(mark)
            .with_context(|| format!("read {}", mark.display()))?
            .trim()
            .parse()
            .context("the client's mark")?;
        std::fs::remove_file(mark)?;
        let client_end = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
        Ok(Sample {
            command,
            rep,
            wall_ms: ms(t.start, t.end)?,
            to_request_ms: Some(ms(t.start, arrived)?),
            client_end_to_exit_ms: Some(ms(client_end, t.end)?),
        })
    }
}

/// p-th percentile (nearest rank) of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// A metric's name and how to read it from a sample.
type Metric = (&'static str, fn(&Sample) -> Option<f64>);

const METRICS: [Metric; 3] = [
    ("wall", |s| Some(s.wall_ms)),
    ("to_request", |s| s.to_request_ms),
    ("client_end_to_exit", |s| s.client_end_to_exit_ms),
];

fn stats(samples: &[Sample]) -> Vec<Stat> {
    let mut out = Vec::new();
    for command in [DIRECT, FIRMA_RUN, FIRMA_RUN_TRUE] {
        for (metric, f) in METRICS {
            let mut v: Vec<f64> = samples
                .iter()
                .filter(|s| s.command == command)
                .filter_map(f)
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            out.push(Stat {
                command,
                metric,
                runs: v.len(),
                p50_ms: pct(&v, 50.0),
                p90_ms: pct(&v, 90.0),
                max_ms: v[v.len() - 1],
                min_ms: v[0],
            });
        }
    }
    out
}

fn ratios(stats: &[Stat]) -> Vec<Ratio> {
    let find = |c: &str, m: &str| stats.iter().find(|s| s.command == c && s.metric == m);
    METRICS
        .iter()
        .filter_map(|(metric, _)| {
            let (d, f) = (find(DIRECT, metric)?, find(FIRMA_RUN, metric)?);
            Some(Ratio {
                metric,
                direct_p50_ms: d.p50_ms,
                firma_run_p50_ms: f.p50_ms,
                ratio: f.p50_ms / d.p50_ms,
                added_ms: f.p50_ms - d.p50_ms,
            })
        })
        .collect()
}

fn print_table(r: &RunOverheadReport) {
    println!(
        "\nfirma run overhead: {} repetitions, interleaved (load {}); first run (creates the state directory) {:.0} ms",
        r.repetitions,
        r.load_avg_1m.map_or("?".into(), |l| format!("{l:.1}")),
        r.first_run_ms.unwrap_or(f64::NAN)
    );
    println!(
        "  {:<16} {:<20} {:>9} {:>9} {:>9}",
        "command", "metric", "p50 ms", "p90 ms", "max ms"
    );
    for s in &r.stats {
        println!(
            "  {:<16} {:<20} {:>9.1} {:>9.1} {:>9.1}",
            s.command, s.metric, s.p50_ms, s.p90_ms, s.max_ms
        );
    }
    for x in &r.ratios {
        println!(
            "  firma_run / direct, {:<20} x{:.2} (+{:.1} ms at p50)",
            x.metric, x.ratio, x.added_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(command: &'static str, wall_ms: f64) -> Sample {
        let split = (command != FIRMA_RUN_TRUE).then_some(wall_ms / 2.0);
        Sample {
            command,
            rep: 0,
            wall_ms,
            to_request_ms: split,
            client_end_to_exit_ms: split,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(
            (pct(&v, 50.0), pct(&v, 90.0), pct(&v, 100.0)),
            (5.0, 9.0, 10.0)
        );
        assert_eq!(pct(&[7.0], 90.0), 7.0);
    }

    #[test]
    fn ratios_are_firma_run_over_direct_and_true_has_wall_only() {
        let samples = [
            sample(DIRECT, 20.0),
            sample(FIRMA_RUN, 200.0),
            sample(FIRMA_RUN_TRUE, 150.0),
        ];
        let s = stats(&samples);
        let of = |c: &str| s.iter().filter(|x| x.command == c).count();
        assert_eq!((of(DIRECT), of(FIRMA_RUN), of(FIRMA_RUN_TRUE)), (3, 3, 1));
        let r = ratios(&s);
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].metric, r[0].ratio, r[0].added_ms),
            ("wall", 10.0, 180.0)
        );
    }
}
