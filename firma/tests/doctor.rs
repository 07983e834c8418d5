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
