//! `firma authority` refuses to start on bad input, and says exactly what is wrong.

use firma_testing::authority::*;
use firma_testing::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

/// Runs the server command; it must exit by itself (startup failure), not serve.
fn start_expecting_failure(d: &Deployment) -> Output {
    let out = firma(&["authority", "-c", d.config.to_str().unwrap()]);
    assert!(!out.status.success(), "server should not have started");
    out
}

#[test]
fn malformed_config_exits_78_naming_file_and_key() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    d.write_config("127.0.0.1:0", "max_ttl_seconds_typo = 5\n");
    let out = start_expecting_failure(&d);
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    assert!(err.contains(d.config.to_str().unwrap()), "{err}");
    assert!(err.contains("authority.max_ttl_seconds_typo"), "{err}");

    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("max_ttl_seconds_typo = 5\n", "")
        .replace("max_ttl_seconds = 3600", "max_ttl_seconds = \"an hour\"");
    std::fs::write(&d.config, cfg).unwrap();
    let out = start_expecting_failure(&d);
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    assert!(err.contains("authority.max_ttl_seconds"), "{err}");

    d.write_config("localhost:50051", "");
    let out = start_expecting_failure(&d);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("authority.listen_addr"));

    // Offline commands read the same config and fail the same way.
    let out = d.authority(&["revocations", "list"]);
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn missing_or_exposed_key_file_is_refused() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    std::fs::set_permissions(&d.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(err.contains("0644") && err.contains("0600"), "{err}");
    assert!(err.contains(d.key.to_str().unwrap()), "{err}");
    // Issuance refuses the exposed key too.
    let out = d.authority(&[
        "issue",
        "--agent-id",
        "a",
        "--session-id",
        "s",
        "--action",
        "data.read",
        "--ttl-seconds",
        "5",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("0600"));

    std::fs::remove_file(&d.key).unwrap();
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(err.contains(d.key.to_str().unwrap()), "{err}");
    assert!(err.to_lowercase().contains("no such file"), "{err}");
}

#[test]
fn invalid_policy_at_startup_names_file_and_line() {
    let d = Deployment::new(
        PERMIT_ALL,
        "permit (principal, action, resource);\n\npermit (principal, action, resource) when { resource.colour == \"red\" };\n",
    );
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(err.contains("runtime bundle"), "{err}");
    assert!(err.contains("runtime.cedar:3"), "{err}");

    let d = Deployment::new("permit (principal, action", PERMIT_ALL);
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(
        err.contains("issuance bundle") && err.contains("issuance.cedar:1"),
        "{err}"
    );
}

#[test]
fn missing_revocation_file_says_touch_it() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    std::fs::remove_file(&d.revocations).unwrap();
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(
        err.contains("touch") && err.contains(d.revocations.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn plaintext_on_non_loopback_is_refused() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    d.write_config("0.0.0.0:0", "");
    let out = start_expecting_failure(&d);
    let err = text(&out.stderr);
    assert!(err.contains("refusing to serve plaintext"), "{err}");
    assert!(err.contains("tls_cert_path"), "{err}");
}

#[test]
fn tls_settings_must_come_in_pairs() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    d.write_config("127.0.0.1:0", "tls_cert_path = \"/nonexistent.crt\"\n");
    let out = start_expecting_failure(&d);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("tls_key_path"));
}
