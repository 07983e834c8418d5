//! Transparent mode refuses pins that would not outlive it (docs/architecture.md, "Fail-closed rules"): a sidecar
//! whose `pin_dir` is on a bpffs mounted inside its own private mount namespace would, once
//! killed, take the pinned programs with it and leave tagged workloads connecting directly.
//! Runs `unshare --mount --propagation private sh -c 'mount -t bpf bpf DIR && exec firma …'`
//! and checks the refusal (exit 78, naming pin_dir), the `allow_ephemeral_pins` override, the
//! normal case (a directory on the host's /sys/fs/bpf) and `firma doctor`'s `pins` check.
//! Needs root + BPF; prints SKIP otherwise. Runs in its own network namespace.

use firma_testing::config::Mode;
use firma_testing::kernel::{TestPins, in_fresh_netns};
use firma_testing::process::Process;
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::{firma, firma_bin, free_dual_port, text};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// A transparent-mode deployment with `pin_dir` and no workloads (nothing is redirected).
fn deployment(pin_dir: &Path, allow_ephemeral: bool) -> Deployment {
    let d = Deployment::new(None, &Settings::default());
    let settings = Settings {
        mode: Mode::Transparent {
            port: free_dual_port(),
            pin_dir: pin_dir.to_path_buf(),
            control_socket: d.root().join("run/sidecar.sock"),
            allow_ephemeral_pins: Some(allow_ephemeral),
        },
        ..Settings::default()
    };
    d.write(None, &settings);
    d
}

/// `firma ARGS…` in a private mount namespace where `dir` is a fresh bpffs.
fn in_private_bpffs(dir: &Path, args: &[&str]) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t bpf bpf "$0" && exec "$@""#)
        .arg(dir)
        .arg(firma_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("run unshare")
}

#[test]
fn ephemeral_pins_are_refused_unless_explicitly_allowed() {
    if !in_fresh_netns("ephemeral_pins_are_refused_unless_explicitly_allowed") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pins = tmp.path().join("bpf");
    let pin_dir = pins.join("firma");
    let pin_str = pin_dir.display().to_string();

    // Refused: exit 78 (configuration), naming pin_dir and the way out.
    let d = deployment(&pin_dir, false);
    let cfg = d.config.to_str().unwrap();
    let out = run(in_private_bpffs(&pins, &["sidecar", "-c", cfg]));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains(&format!("pin_dir {pin_str}")), "{err}");
    assert!(
        err.contains("sidecar.interceptor.transparent.pin_dir"),
        "{err}"
    );
    assert!(err.contains("allow_ephemeral_pins"), "{err}");
    assert!(!err.contains("sidecar ready"), "{err}");
    eprintln!("refusal: {}", err.lines().last().unwrap_or_default());

    // `firma doctor` says the same.
    let out = run(in_private_bpffs(&pins, &["doctor", "--json", "-c", cfg]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pins")
        .cloned()
        .expect("pins check");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains(&pin_str),
        "{check}"
    );

    // Allowed explicitly: starts, with a loud warning; then stopped.
    let d = deployment(&pin_dir, true);
    let mut sc = Process::spawn(in_private_bpffs(
        &pins,
        &["sidecar", "-c", d.config.to_str().unwrap()],
    ))
    .unwrap();
    sc.wait_for("sidecar ready", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    let text_now = sc.log_text();
    assert!(text_now.contains("FAIL-OPEN CONFIGURATION"), "{text_now}");
    assert!(text_now.contains("WARN"), "{text_now}");
    let out = run(in_private_bpffs(
        &pins,
        &["doctor", "--json", "-c", d.config.to_str().unwrap()],
    ));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pins_check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pins")
        .cloned()
        .unwrap();
    assert_eq!(pins_check["status"], "warn", "{pins_check}");
    sc.terminate(Duration::from_secs(10));
    sc.kill();
    // The private bpffs (and the pins in it) went with the process: nothing was pinned here.
    assert!(!pin_dir.join("progs").exists());
}

#[test]
fn pins_on_the_hosts_bpffs_start_normally() {
    if !in_fresh_netns("pins_on_the_hosts_bpffs_start_normally") {
        return;
    }
    let pins = TestPins::new();
    let d = deployment(&pins.dir, false);
    let mut sc = Sidecar::start(&d.config, &[]);
    let log = sc.log_text();
    assert!(log.contains("pins outlive the sidecar"), "{log}");
    let out = firma(&["doctor", "--json", "-c", d.config.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pins")
        .cloned()
        .unwrap();
    assert_eq!(check["status"], "ok", "{check}");
    assert!(sc.terminate(Duration::from_secs(10)).is_some());
}
