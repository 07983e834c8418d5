//! The `grpc` audit sink against a real `firma audit collect` process: events recorded while
//! the collector is down are buffered and delivered once it starts, the collector's file
//! verifies, and events signed with a key the collector does not trust are refused.

use firma_sidecar::audit::AuditLog;
use firma_testing::audit::*;
use firma_testing::pipeline::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Collector(Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_sink_buffers_until_the_collector_is_up_and_the_collected_file_verifies() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let (key, public) = audit_key(&env, "audit.key");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let log = AuditLog::start(&grpc_config(&url, &key))
        .await
        .expect("audit starts");

    // Collector not running yet: these wait in the sidecar's queue.
    decide_and_record(
        &p,
        &log,
        &req("POST", "api.openai.com", "/v1/chat/completions", &[]),
    )
    .await;
    decide_and_record(&p, &log, &req("POST", "paste.rs", "/", &[])).await;
    decide_and_record(&p, &log, &req("GET", "evil.example", "/", &[])).await;

    let out = env.path("collected.jsonl");
    let _collector = Collector(
        Command::new(firma_testing::firma_bin())
            .args(["audit", "collect", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--output")
            .arg(&out)
            .arg("--public-key")
            .arg(&public)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn firma audit collect"),
    );
    eventually_async(Duration::from_secs(20), async || {
        (lines(&out).len() == 3).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("3 buffered events delivered, got {:?}", lines(&out)));
    decide_and_record(
        &p,
        &log,
        &req("POST", "api.acme-vendor.com", "/v1/send", &[]),
    )
    .await;
    log.flush().await;
    assert_eq!(lines(&out).len(), 4, "flush waits for the collector's ack");
    assert_eq!(log.shipped(), 4);
    let (ok, report) = verify(&out, &[&public]);
    assert!(
        ok && report.contains("OK: 4 event(s) in 1 chain(s)"),
        "{report}"
    );
    assert_eq!(json(&lines(&out)[1])["decision"]["reason"], "PolicyDenied");

    // A sidecar signing with a key the collector was not given: acknowledged, not written.
    let (rogue_key, _) = audit_key(&env, "rogue.key");
    let rogue = AuditLog::start(&grpc_config(&url, &rogue_key))
        .await
        .expect("audit starts");
    decide_and_record(
        &p,
        &rogue,
        &req("POST", "api.openai.com", "/v1/chat/completions", &[]),
    )
    .await;
    rogue.flush().await;
    assert_eq!(rogue.shipped(), 1, "the collector answered");
    assert_eq!(lines(&out).len(), 4, "unverifiable event refused");
}

/// `[authority] audit_collector_path`: the Authority serves the same collector on its gRPC
/// listener, so a deployment needs no separate collector process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_serves_the_collector_when_audit_collector_path_is_set() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-2", "tenant-acme", "s-2", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let (key, public) = audit_key(&env, "audit.key");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let authority_key = env.path("collector-authority.key");
    firma_common::keys::generate(&authority_key, false).expect("authority key");
    let revocations = env.path("revocations.txt");
    std::fs::write(&revocations, "").expect("revocation file");
    let out = env.path("collected-by-authority.jsonl");
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let config = env.path("authority.toml");
    std::fs::write(
        &config,
        format!(
            "[authority]\nlisten_addr = \"127.0.0.1:{port}\"\npolicy_dir = \"{policies}/runtime/genai-app\"\n\
             issuance_policy_dir = \"{policies}/issuance/genai-app\"\nrevocation_file = \"{}\"\n\
             key_file = \"{}\"\naudit_collector_path = \"{}\"\n",
            revocations.display(),
            authority_key.display(),
            out.display()
        ),
    )
    .expect("write config");
    let _authority = Collector(
        Command::new(firma_testing::firma_bin())
            .args(["authority", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn firma authority"),
    );
    let log = AuditLog::start(&grpc_config(&format!("http://127.0.0.1:{port}"), &key))
        .await
        .expect("audit starts");
    decide_and_record(
        &p,
        &log,
        &req("POST", "api.openai.com", "/v1/chat/completions", &[]),
    )
    .await;
    decide_and_record(&p, &log, &req("POST", "paste.rs", "/", &[])).await;
    eventually_async(Duration::from_secs(20), async || {
        (lines(&out).len() == 2).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("2 events collected by the authority, got {:?}", lines(&out)));
    let (ok, report) = verify(&out, &[&public]);
    assert!(ok && report.contains("OK: 2 event(s)"), "{report}");
    assert_eq!(json(&lines(&out)[1])["decision"]["reason"], "PolicyDenied");
}
