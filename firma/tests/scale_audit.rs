//! Audit anchoring on a real 3-member etcd cluster, real `firma` binaries: a sidecar anchors its
//! chain head; `firma audit verify --anchors` passes on the file as written and fails once the
//! file is cut back to before the anchored line, although the cut file still verifies on its
//! own (docs/scale-out.md, "Audit anchoring").

use firma_testing::client::curl;
use firma_testing::etcd::{self, EtcdCluster};
use firma_testing::sidecar::{Deployment, Settings};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma, text};
use std::time::Duration;

fn seq_of(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).expect("json line");
    v["seq"].as_u64().expect("seq")
}

#[test]
fn a_file_truncated_after_anchoring_fails_verify_anchors() {
    if let Err(why) = etcd::available() {
        firma_testing::skip(
            "a_file_truncated_after_anchoring_fails_verify_anchors",
            &why,
        );
        return;
    }
    let cluster = EtcdCluster::start(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let settings = Settings {
        upstream_hosts: vec!["api.openai.com".into()],
        intercept_hosts: vec!["api.openai.com".into()],
        strict_hosts: Vec::new(),
        extra: format!(
            "\n[sidecar.audit.anchor]\nendpoints = {}\ninterval_ms = 200\n",
            cluster.endpoints_toml()
        ),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &settings);
    let mut sc = d.start(&[]);
    assert!(
        sc.log_text()
            .contains("anchoring the audit chain head to etcd"),
        "{}",
        sc.log_text()
    );
    for _ in 0..6 {
        let out = curl(
            &sc.proxy_url(),
            &d.ca_cert(),
            "https://api.openai.com/v1/chat/completions",
            &[
                "-H",
                "x-firma-session: s1",
                "-d",
                "{\"model\":\"m\",\"messages\":[]}",
            ],
        );
        assert_eq!(out.status, 200, "{out:?}");
    }
    assert!(up.count() >= 6);
    // Wait until the anchor covers the file's last line.
    let anchors_url = format!(
        "etcd://{}",
        cluster
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_owned())
            .collect::<Vec<_>>()
            .join(",")
    );
    let audit = d.audit_path.to_str().expect("utf8").to_owned();
    let public = d.root().join("audit.pub");
    let verify = |args: &[&str]| {
        let mut all = vec![
            "audit",
            "verify",
            &audit,
            "--public-key",
            public.to_str().expect("utf8"),
        ];
        all.extend_from_slice(args);
        firma(&all)
    };
    let last_seq = assert_eventually(Duration::from_secs(10), "anchor covers the file", || {
        let text = d.audit_text();
        let last = seq_of(text.lines().last()?);
        let out = cluster.etcdctl(&["get", "--prefix", "/firma/anchors/", "--print-value-only"]);
        let v: serde_json::Value = serde_json::from_str(text_of(&out).trim()).ok()?;
        (v["seq"].as_u64() == Some(last)).then_some(last)
    });
    sc.terminate(Duration::from_secs(10));
    let out = verify(&["--anchors", &anchors_url]);
    let stdout = text(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("ANCHOR OK: chain") && stdout.contains(&format!("seq {last_seq}")),
        "{stdout}"
    );

    // Cut the file after an earlier signed line: on its own it still verifies...
    let full = d.audit_text();
    let lines: Vec<&str> = full.lines().collect();
    let cut = lines
        .iter()
        .rposition(|l| l.contains("\"signature\"") && seq_of(l) < last_seq)
        .expect("an earlier signed line");
    std::fs::write(&d.audit_path, format!("{}\n", lines[..=cut].join("\n"))).expect("truncate");
    let out = verify(&[]);
    assert!(
        out.status.success(),
        "the cut file verifies alone: {}",
        text(&out.stdout)
    );
    // ...but not against the anchor.
    let out = verify(&["--anchors", &anchors_url]);
    let stdout = text(&out.stdout);
    eprintln!("{stdout}");
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("truncated after anchoring")
            && stdout.contains(&format!("anchored at seq {last_seq}")),
        "{stdout}"
    );

    // A rewritten anchored line fails too.
    let mut rewritten: Vec<String> = full.lines().map(str::to_owned).collect();
    let at = rewritten
        .iter()
        .position(|l| seq_of(l) == last_seq)
        .expect("anchored line");
    rewritten[at] = rewritten[at].replacen('{', "{ ", 1);
    std::fs::write(&d.audit_path, format!("{}\n", rewritten.join("\n"))).expect("rewrite");
    let out = verify(&["--anchors", &anchors_url]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    // No Firma etcd client (the sidecar's anchor publisher, `audit verify --anchors`) was cut
    // off for pinging more often than etcd allows.
    cluster.assert_no_ping_abuse();
}

/// The hostile side of `assert_no_ping_abuse`: a client that pings an idle connection every
/// second (`tests/python/etcd_ping_flood.py`, grpcio) is cut off by etcd, and the fixture's
/// logs show it, so the assertion after the Firma etcd tests can fail.
#[test]
fn etcd_fixture_sees_a_client_cut_off_for_pinging_too_often() {
    if let Err(why) = etcd::available() {
        firma_testing::skip(
            "etcd_fixture_sees_a_client_cut_off_for_pinging_too_often",
            &why,
        );
        return;
    }
    let cluster = EtcdCluster::start(1);
    let member = cluster.endpoints()[0]
        .trim_start_matches("http://")
        .to_owned();
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(firma_testing::repo_root().join("tests/python/etcd_ping_flood.py"))
        .arg(&member);
    let flood = firma_testing::process::Process::spawn(cmd).expect("python3 (grpcio)");
    assert_eventually(
        Duration::from_secs(30),
        "etcd logs a client cut off for too many pings",
        || {
            cluster
                .logs()
                .iter()
                .any(|l| l.contains(etcd::TOO_MANY_PINGS))
        },
    );
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.assert_no_ping_abuse()
    }));
    assert!(caught.is_err(), "assert_no_ping_abuse missed it");
    drop(flood);
}

fn text_of(o: &std::process::Output) -> String {
    text(&o.stdout)
}
