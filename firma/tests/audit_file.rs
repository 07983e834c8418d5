//! The file audit sink with real decisions, and `firma audit verify`: event shape as the seeds
//! show it, chain resumed across a restart, and tampering (edit, removal, reordering, other
//! key) reported at the first bad line with a non-zero exit.

use firma_sidecar::audit::AuditLog;
use firma_testing::audit::*;
use firma_testing::pipeline::*;

#[tokio::test]
async fn file_events_have_the_seed_shape_and_verify_until_tampered() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let (key, public) = audit_key(&env, "audit.key");
    let file = env.path("audit.jsonl");

    let log = AuditLog::start(&file_config(&file, &key))
        .await
        .expect("audit starts");
    decide_and_record(
        &p,
        &log,
        &req("POST", "api.openai.com", "/v1/chat/completions", &[]),
    )
    .await;
    decide_and_record(&p, &log, &req("POST", "paste.rs", "/", &[])).await;
    let bound = req_from(
        conn(Some(workload("tenant-acme", Some("s-1")))),
        "GET",
        "evil.example",
        "/x",
        &[],
    );
    decide_and_record(&p, &log, &bound).await;
    log.flush().await;

    let l = lines(&file);
    assert_eq!(l.len(), 3, "{l:#?}");
    let allow = json(&l[0]);
    assert_eq!(allow["envelope"]["intent"]["action_class"], CHAT);
    assert_eq!(
        allow["envelope"]["intent"]["resource"]["host"],
        "api.openai.com"
    );
    assert_eq!(
        allow["envelope"]["intent"]["resource"]["path"],
        "/v1/chat/completions"
    );
    assert_eq!(allow["decision"]["outcome"], "ALLOW");
    assert_eq!(allow["decision"]["matched_policies"][0], "genai-app:0");
    assert_eq!(allow["capability"]["token_id"], "t-1");
    assert_eq!(allow["capability"]["agent_id"], "tenant-acme");
    assert_eq!(allow["capability"]["session_id"], "s-1");
    assert_eq!(allow["capability"]["action_set"][1], SEND);
    assert_eq!(allow["connector"]["credential_injected"], true);
    assert_eq!(allow["connector"]["credential_source"], "basic");
    assert_eq!(allow["conn"]["intercept"], "http_proxy");
    assert_eq!(allow["seq"], 0);
    assert!(allow["timings_us"]["stage2_us"].is_u64());
    assert!(allow["signature"].is_string() && allow["event_id"].is_string());
    let deny = json(&l[1]);
    assert_eq!(deny["decision"]["outcome"], "DENY");
    assert_eq!(deny["decision"]["reason"], "PolicyDenied");
    assert_eq!(deny["connector"]["credential_injected"], false);
    assert_eq!(deny["prev_hash"], firma_common::audit::line_hash(&l[0]));
    let unclassified = json(&l[2]);
    assert_eq!(unclassified["decision"]["reason"], "UnclassifiedIntent");
    assert_eq!(unclassified["workload"]["cgroup_path"], "/firma-test/agent");
    assert_eq!(unclassified["workload"]["pid"], 1234);
    assert_eq!(unclassified["conn"]["intercept"], "transparent");

    let (ok, out) = verify(&file, &[&public]);
    assert!(ok && out.contains("OK: 3 event(s) in 1 chain(s)"), "{out}");

    // Restart: the chain resumes from the last line.
    drop(log);
    let log = AuditLog::start(&file_config(&file, &key))
        .await
        .expect("audit restarts");
    decide_and_record(&p, &log, &req("GET", "api.openai.com", "/v1/models", &[])).await;
    log.flush().await;
    let l = lines(&file);
    assert_eq!(json(&l[3])["seq"], 3);
    assert_eq!(json(&l[3])["chain_id"], json(&l[0])["chain_id"]);
    let (ok, out) = verify(&file, &[&public]);
    assert!(ok && out.contains("OK: 4 event(s) in 1 chain(s)"), "{out}");

    let tampered = |name: &str, edit: &dyn Fn(&mut Vec<String>)| {
        let mut l = lines(&file);
        edit(&mut l);
        let f = env.path(name);
        std::fs::write(&f, l.join("\n") + "\n").expect("write");
        verify(&f, &[&public])
    };
    let (ok, out) = tampered("edited.jsonl", &|l| {
        l[1] = l[1].replace("\"DENY\"", "\"ALLOW\"")
    });
    assert!(
        !ok && out.contains("edited.jsonl:2: signature does not verify"),
        "{out}"
    );
    let (ok, out) = tampered("removed.jsonl", &|l| {
        l.remove(2);
    });
    assert!(!ok && out.contains("first bad line is 3"), "{out}");
    let (ok, out) = tampered("reordered.jsonl", &|l| l.swap(1, 2));
    assert!(!ok && out.contains("first bad line is 2"), "{out}");
    let (ok, out) = tampered("head-removed.jsonl", &|l| {
        l.remove(0);
    });
    assert!(!ok && out.contains("first bad line is 1"), "{out}");
    let (_, other) = audit_key(&env, "other.key");
    let (ok, out) = verify(&file, &[&other]);
    assert!(!ok && out.contains("first bad line is 1"), "{out}");
}

#[tokio::test]
async fn file_and_grpc_sinks_require_a_signing_key_with_owner_only_mode() {
    let env = Env::new();
    let file = env.path("audit.jsonl");
    let mut cfg = file_config(&file, &env.path("missing.key"));
    cfg.signing_key_path = None;
    let e = AuditLog::start(&cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("signing_key_path") && e.contains("required"),
        "{e}"
    );

    let (key, _) = audit_key(&env, "audit.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = AuditLog::start(&file_config(&file, &key))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("0600"), "{e}");
}
