//! Sidecar lifecycle through the binary: config errors exit 78, the MITM CA is created once
//! and never silently replaced, `firma ca init`, and SIGTERM drains in-flight requests.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[test]
fn missing_credential_env_var_stops_startup_with_78() {
    let d = Deployment::new(
        None,
        &Settings {
            extra: "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nvalue_from_env = \"FIRMA_TEST_NOT_SET_ANYWHERE\"\n".into(),
            ..Settings::default()
        },
    );
    let out = firma(&["sidecar", "-c", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("FIRMA_TEST_NOT_SET_ANYWHERE"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ca_created_once_and_never_silently_replaced() {
    let d = Deployment::new(None, &Settings::default());
    let mut sc = d.start(&[]);
    let key = d.ca_dir.join("firma-ca.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cert = std::fs::read(d.ca_cert()).unwrap();
    assert!(sc.log_text().contains("generated MITM CA"));
    sc.terminate(Duration::from_secs(10))
        .expect("exits on SIGTERM");

    let sc = d.start(&[]);
    assert!(sc.log_text().contains("loaded MITM CA"));
    assert_eq!(
        std::fs::read(d.ca_cert()).unwrap(),
        cert,
        "CA must be reused"
    );
    drop(sc);

    // Group-readable key: refuse.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = firma(&["sidecar", "-c", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
    // Key missing: refuse rather than mint a new CA.
    std::fs::remove_file(&key).unwrap();
    let out = firma(&["sidecar", "-c", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("firma-ca.key is missing"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(d.ca_cert()).unwrap(), cert);

    // `firma ca init` refuses without --force, replaces with it.
    let cfg = d.config.to_str().unwrap();
    let out = firma(&["ca", "init", "-c", cfg]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--force"));
    let out = firma(&["ca", "init", "-c", cfg, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(std::fs::read(d.ca_cert()).unwrap(), cert);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn sigterm_drains_in_flight_then_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.acme-vendor.com"]);
    let s = Settings {
        upstream_hosts: vec!["api.acme-vendor.com".into()],
        drain_timeout_secs: 10,
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    let mut sc = d.start(&[]);
    let (p, ca) = (sc.proxy_url(), d.ca_cert());
    let inflight =
        std::thread::spawn(move || curl(&p, &ca, "https://api.acme-vendor.com/slow?ms=1500", &[]));
    assert_eventually(Duration::from_secs(5), "request in flight", || {
        up.count() == 1
    });
    let started = Instant::now();
    let status = sc.terminate(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status}");
    let out = inflight.join().unwrap();
    assert_eq!(out.status, 200, "in-flight request must finish: {out:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(sc.log_text().contains("drained"), "{}", sc.log_text());
    // The allow was flushed to the audit file before exit.
    assert!(
        d.audit_for("api.acme-vendor.com")
            .iter()
            .any(|e| e["decision"]["outcome"] == "ALLOW")
    );
}

#[test]
fn drain_deadline_cuts_long_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.acme-vendor.com"]);
    let s = Settings {
        upstream_hosts: vec!["api.acme-vendor.com".into()],
        drain_timeout_secs: 1,
        default_timeout_ms: 30_000,
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    let mut sc = d.start(&[]);
    let (p, ca) = (sc.proxy_url(), d.ca_cert());
    let inflight =
        std::thread::spawn(move || curl(&p, &ca, "https://api.acme-vendor.com/slow?ms=20000", &[]));
    assert_eventually(Duration::from_secs(5), "request in flight", || {
        up.count() == 1
    });
    let started = Instant::now();
    sc.terminate(Duration::from_secs(10))
        .expect("exits after the deadline");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_ne!(inflight.join().unwrap().status, 200);
    assert!(
        sc.log_text().contains("drain deadline reached"),
        "{}",
        sc.log_text()
    );
}

/// `[sidecar.interceptor] workers`: out of range stops startup naming the file, key and range;
/// an explicit count is honoured and logged.
#[test]
fn connection_workers_are_validated_and_logged() {
    let d = Deployment::new(None, &Settings::default());
    let base = std::fs::read_to_string(&d.config).expect("read firma.toml");
    assert!(base.contains("[sidecar.interceptor]\n"), "{base}");
    let with = |n: &str| {
        base.replace(
            "[sidecar.interceptor]\n",
            &format!("[sidecar.interceptor]\nworkers = {n}\n"),
        )
    };

    std::fs::write(&d.config, with("9999")).expect("write");
    let out = firma(&["sidecar", "-c", d.config.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("firma.toml")
            && err.contains("sidecar.interceptor.workers")
            && err.contains("expected 0 (half the CPUs) to 256, got 9999"),
        "{err}"
    );

    std::fs::write(&d.config, with("3")).expect("write");
    let sc = d.start(&[]);
    assert!(sc.log_text().contains("workers=3"), "{}", sc.log_text());
}
