//! `firma doctor`: the JSON report lists every check, a key readable by others fails the run
//! (exit 1) naming the file, and fixing the mode makes that check pass.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn doctor(config: &std::path::Path) -> (i32, serde_json::Value) {
    let out = Command::new(firma_testing::firma_bin())
        .args(["doctor", "--json", "-c"])
        .arg(config)
        .output()
        .expect("run firma doctor");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no `{name}` check in {report}"))
}

#[test]
fn key_mode_is_checked_and_reported_in_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("authority.key");
    firma_common::keys::generate(&key, false).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.path().join("firma.toml");
    std::fs::write(
        &config,
        format!(
            "[authority]\nlisten_addr = \"127.0.0.1:50051\"\npolicy_dir = \"p\"\n\
             issuance_policy_dir = \"i\"\nrevocation_file = \"r\"\nkey_file = \"{}\"\n",
            key.display()
        ),
    )
    .expect("config");

    let (code, report) = doctor(&config);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["ok"], false);
    for name in ["kernel", "cgroup2", "bpffs", "eBPF object"] {
        check(&report, name);
    }
    let keys = check(&report, "key mode");
    assert_eq!(keys["status"], "fail", "{keys}");
    assert!(
        keys["detail"]
            .as_str()
            .unwrap_or("")
            .contains("authority.key"),
        "{keys}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (_, report) = doctor(&config);
    assert_eq!(check(&report, "key mode")["status"], "ok", "{report}");
}

/// As root with BPF: the doctor loads and attaches each program of the embedded object in a
/// scratch cgroup and reports every hook and `BPF_LINK_DETACH` as ok, leaving no scratch cgroup
/// or pins behind. Run in a private mount namespace with its own bpffs (`unshare --mount`), as
/// a host without a mounted bpffs would get "not probed".
#[test]
fn hooks_are_probed_on_this_kernel_and_cleaned_up() {
    if let Some(why) = firma_testing::kernel::skip_reason() {
        firma_testing::skip("hooks_are_probed_on_this_kernel_and_cleaned_up", &why);
        return;
    }
    // The doctor's pid names its scratch cgroup and pins; other tests may run a doctor too.
    let script = "mount --make-rprivate / && mount -t bpf bpf /sys/fs/bpf && { \"$0\" doctor --json & echo \"pid=$!\" >&2; wait $!; ls /sys/fs/bpf >&2; }";
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .arg(firma_testing::firma_bin())
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {stderr}"));
    let hooks = [
        "sock_ops",
        "cgroup_skb/egress",
        "cgroup/recvmsg4",
        "cgroup/recvmsg6",
        "cgroup/getpeername4",
        "cgroup/getpeername6",
        "cgroup/sendmsg4",
        "cgroup/sendmsg6",
        "cgroup/connect4",
        "cgroup/connect6",
    ];
    for hook in hooks {
        let c = check(&report, hook);
        assert_eq!(c["status"], "ok", "{c}");
        assert!(
            c["detail"]
                .as_str()
                .unwrap()
                .contains("loaded and attached"),
            "{c}"
        );
    }
    let detach = check(&report, "BPF_LINK_DETACH");
    assert_eq!(detach["status"], "ok", "{detach}");
    assert!(
        detach["detail"]
            .as_str()
            .unwrap()
            .starts_with("10 probe links"),
        "{detach}"
    );
    // Nothing left: the probe's pins (the listing after the doctor ran) and its cgroup.
    let pid = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("no pid: {stderr}"));
    let scratch = format!("firma-probe-{pid}");
    assert!(!stderr.contains(&scratch), "{stderr}");
    let cg = firma_sidecar::ebpf::Cgroup2::discover().expect("cgroup2");
    assert!(!cg.mount().join(&scratch).exists(), "{scratch} cgroup left");
}
