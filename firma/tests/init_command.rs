//! `firma init DIR`, then `firma authority -c DIR/firma.toml` and `firma sidecar -c
//! DIR/firma.toml` exactly as the README's Quick start types them, with no edit in between,
//! serving requests: the seeded capability, the runtime policy streamed by the Authority, an
//! allowed plain-HTTP call that reaches a stand-in upstream and a denied HTTPS call (403),
//! both audited and the audit verified. Runs in a fresh network namespace (the default ports
//! 50051 and 8080 are then free) with a hosts file in a private mount namespace for the
//! sidecar; needs root for that, prints SKIP otherwise.

use firma_testing::authority::Server;
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, in_fresh_netns};
use firma_testing::sidecar::Sidecar;
use firma_testing::{assert_eventually, firma, firma_bin, text};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A plain-HTTP stand-in upstream on `DST_V4:80` recording each request head.
fn http_upstream() -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind((DST_V4, 80)).expect("bind upstream");
    let sink = seen.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).unwrap_or(0);
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{\"ok\":true}\n",
            );
        }
    });
    seen
}

#[test]
fn init_then_authority_and_sidecar_serve_requests() {
    if !in_fresh_netns("init_then_authority_and_sidecar_serve_requests") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("firma");
    let d = dir.to_str().unwrap();
    let out = firma(&["init", d]);
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("firma sidecar -c {d}/firma.toml")));
    // A second init refuses to overwrite; --force is the way.
    let again = firma(&["init", d]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    let config = dir.join("firma.toml");
    let key_before = std::fs::read(dir.join("authority.key")).unwrap();
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("[sidecar.interceptor.transparent]")
    );

    let seen = http_upstream();
    let hosts = tmp.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{DST_V4} api.openai.com paste.rs\n"),
    )
    .unwrap();
    let _authority = Server::start(&config);
    // The sidecar resolves the upstream's name: give it the hosts file (unshare and sh exec).
    let mut cmd = Confine::hosts(&hosts).command(firma_bin());
    cmd.args(["sidecar", "-c", config.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    let sidecar = Sidecar::spawn(cmd).expect("sidecar starts with the init config");
    assert_eq!(sidecar.addr.to_string(), "127.0.0.1:8080");
    let ca = dir.join("firma-ca/firma-ca.crt");

    // Allowed: the seeded capability, the streamed policy, the upstream sees the request.
    let ok = assert_eventually(Duration::from_secs(10), "allowed call answered 200", || {
        let r = firma_testing::client::curl(
            "http://127.0.0.1:8080",
            &ca,
            "http://api.openai.com/v1/models",
            &[],
        );
        (r.status == 200).then_some(r)
    });
    assert!(ok.body.contains("\"ok\":true"), "{ok:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(seen.lock().unwrap()[0].starts_with("GET /v1/models"));
    // Denied: 403 with the reason; nothing reached the upstream.
    let denied = firma_testing::client::curl(
        "http://127.0.0.1:8080",
        &ca,
        "https://paste.rs/",
        &["-d", "hi"],
    );
    assert_eq!(denied.status, 403, "{denied:?}\n{}", sidecar.log_text());
    assert_eq!(denied.json()["reason"], "PolicyDenied");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Both decisions audited (the allow with the seeded capability) and the log verifies.
    let audit = dir.join("audit.jsonl");
    let events: Vec<serde_json::Value> =
        assert_eventually(Duration::from_secs(5), "two decisions audited", || {
            let e: Vec<serde_json::Value> = firma_testing::audit::lines(&audit)
                .iter()
                .map(|l| firma_testing::audit::json(l))
                .filter(|e| e["event"] == "decision")
                .collect();
            (e.len() == 2).then_some(e)
        });
    assert_eq!(events[0]["decision"]["outcome"], "ALLOW");
    assert_eq!(events[0]["capability"]["agent_id"], "local-agent");
    assert_eq!(events[1]["decision"]["reason"], "PolicyDenied");
    let (ok, report) = firma_testing::audit::verify(&audit, &[&dir.join("audit.pub")]);
    assert!(ok, "{report}");

    // --force rewrites keys (and the config still loads).
    drop(sidecar);
    let forced = firma(&["init", "--force", d]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_ne!(
        std::fs::read(dir.join("authority.key")).unwrap(),
        key_before
    );
}
