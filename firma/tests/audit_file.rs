//! The file audit sink with real decisions, and `firma audit verify`: event shape as the seeds
//! show it, chain resumed across a restart, tampering (edit, removal, reordering, other key,
//! a stripped or missing batch signature) reported at the first bad line with a non-zero exit,
//! and one signature per group-committed batch.

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
    assert!(allow["event_id"].is_string());
    // One signature per writer batch: the last line always carries one.
    assert!(firma_common::audit::is_signed(&l[2]), "{}", l[2]);
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
    // A signed line fails its own signature; an unsigned one breaks the link after it.
    let expected = if firma_common::audit::is_signed(&lines(&file)[1]) {
        "edited.jsonl:2: signature does not verify"
    } else {
        "edited.jsonl:3: chain"
    };
    assert!(!ok && out.contains(expected), "{out}");
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
    // Another key: refused at the first signed line (the lines before it are only proven by it).
    let (_, other) = audit_key(&env, "other.key");
    let (ok, out) = verify(&file, &[&other]);
    let first_signed = lines(&file)
        .iter()
        .position(|l| firma_common::audit::is_signed(l))
        .expect("a signed line")
        + 1;
    assert!(
        !ok && out.contains(&format!("first bad line is {first_signed}")),
        "{out}"
    );
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

/// Many events queued at once are group-committed with one signature per batch: fewer
/// signatures than events, every line still proven; cutting the signed line of the last batch
/// (or appending a line without the key) fails verification; a restart cuts unsigned lines a
/// never-completed batch left and records a recovery event.
#[tokio::test]
async fn one_signature_per_batch_covers_every_line() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let (key, public) = audit_key(&env, "audit.key");
    let file = env.path("audit.jsonl");
    let log = AuditLog::start(&file_config(&file, &key))
        .await
        .expect("audit starts");
    let r = req("POST", "api.openai.com", "/v1/chat/completions", &[]);
    let d = p.decide(&r).await;
    // Queued without waiting: the writer finds them together and commits them in batches.
    for _ in 0..400 {
        log.record(firma_sidecar::audit::AuditInput {
            conn: &r.conn,
            method: Some("POST"),
            host: Some(&r.host),
            port: r.port,
            path: Some(&r.path),
            decision: &d,
            connector: None,
        });
    }
    log.flush().await;
    drop(log);
    let l = lines(&file);
    assert_eq!(l.len(), 400);
    let signed = l
        .iter()
        .filter(|x| firma_common::audit::is_signed(x))
        .count();
    assert!(
        signed < 400,
        "one signature per batch, not per line: {signed}"
    );
    assert!(firma_common::audit::is_signed(&l[399]));
    let (ok, out) = verify(&file, &[&public]);
    assert!(
        ok && out.contains(&format!(
            "OK: 400 event(s) in 1 chain(s), {signed} signature(s)"
        )),
        "{out}"
    );

    // Without the last signed line, the lines of its batch before it are proven by nothing.
    let last_unsigned = l.iter().rposition(|x| !firma_common::audit::is_signed(x));
    if let Some(i) = last_unsigned.filter(|i| *i + 1 < l.len()) {
        let cut = env.path("cut.jsonl");
        std::fs::write(&cut, l[..=i].join("\n") + "\n").expect("write");
        let (ok, out) = verify(&cut, &[&public]);
        assert!(!ok && out.contains("not covered by a signature"), "{out}");
    }
    // A line appended without the key, chained correctly, is not covered either.
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&l[399].replace(",\"signature\":", ",\"was\":")).expect("json");
    body.remove("was");
    body.insert("seq".into(), 400.into());
    body.insert(
        "prev_hash".into(),
        firma_common::audit::line_hash(&l[399]).into(),
    );
    body.insert("event_id".into(), "forged".into());
    let forged = firma_common::audit::unsigned_line(&body).expect("line");
    let appended = env.path("appended.jsonl");
    std::fs::write(&appended, l.join("\n") + "\n" + &forged + "\n").expect("write");
    let (ok, out) = verify(&appended, &[&public]);
    assert!(!ok && out.contains("not covered by a signature"), "{out}");

    // A batch that never got its signed line (write failed, cut failed, then a crash): the
    // restart cuts its lines and records the cut in a signed recovery event.
    std::fs::write(&file, l.join("\n") + "\n" + &forged + "\n").expect("write");
    let log = AuditLog::start(&file_config(&file, &key))
        .await
        .expect("audit restarts");
    log.flush().await;
    drop(log);
    let after = lines(&file);
    assert_eq!(after.len(), 401, "forged line cut, recovery added");
    let rec: serde_json::Value = serde_json::from_str(&after[400]).expect("json");
    assert_eq!(rec["event"], "recovery");
    assert_eq!(rec["cut_unsigned_lines"], 1);
    assert_eq!(rec["seq"], 400);
    let (ok, out) = verify(&file, &[&public]);
    assert!(ok && out.contains("OK: 401 event(s)"), "{out}");
}

/// The file sink rotated by size: the chain continues across files and across a restart, and a
/// crash between rotation's two renames (rotated file there, no active file) is continued
/// behind a `rotation` event; `firma audit verify DIR` passes each time.
#[tokio::test]
async fn rotation_continues_the_chain_across_restarts_and_a_crash_mid_rotation() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let (key, public) = audit_key(&env, "audit.key");
    let dir = env.path("audit");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("audit.jsonl");
    let mut cfg = file_config(&file, &key);
    cfg.max_file_bytes = Some(4096);
    let r = req("POST", "api.openai.com", "/v1/chat/completions", &[]);
    let d = p.decide(&r).await;
    let run = |cfg: firma_sidecar::config::AuditConfig| {
        let (r, d) = (r.clone(), d.clone());
        async move {
            let log = AuditLog::start(&cfg).await.expect("audit starts");
            for _ in 0..5 {
                for _ in 0..6 {
                    log.record(firma_sidecar::audit::AuditInput {
                        conn: &r.conn,
                        method: Some("POST"),
                        host: Some(&r.host),
                        port: r.port,
                        path: Some(&r.path),
                        decision: &d,
                        connector: None,
                    });
                }
                log.flush().await;
            }
        }
    };
    let rotated = || firma_common::audit_files::rotated_files(&file).expect("list");
    run(cfg.clone()).await;
    let n = rotated().len();
    assert!(n >= 2, "rotated: {:?}", rotated());
    let (ok, out) = verify(&dir, &[&public]);
    assert!(ok && out.contains("1 chain(s)"), "{out}");

    // Restart: numbering and the chain go on.
    run(cfg.clone()).await;
    assert!(rotated().len() > n);
    let (ok, out) = verify(&dir, &[&public]);
    assert!(ok && out.contains("1 chain(s)"), "{out}");

    // A crash after the active file was renamed and before the new one was put in place.
    let next = rotated().last().and_then(|f| f.index).unwrap() + 1;
    std::fs::rename(&file, firma_common::audit_files::rotated_path(&file, next)).expect("rename");
    run(cfg.clone()).await;
    let files = firma_common::audit_files::set_of(&file).expect("set");
    let after = files
        .iter()
        .find(|f| f.index == Some(next + 1))
        .map_or(&file, |f| &f.path);
    let text = std::fs::read_to_string(after).expect("read");
    let head: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    assert_eq!(head["event"], "rotation", "{head}");
    assert_eq!(head["file_index"], next + 1);
    let (ok, out) = verify(&dir, &[&public]);
    assert!(ok && out.contains("1 chain(s)"), "{out}");
}
