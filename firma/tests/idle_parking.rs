//! Idle HTTP/1 keep-alive connections are parked (hyper's connection taken apart, its buffers
//! freed; `interceptor/park.rs`) and served again on their next request, losing no byte.
//!
//! The real `firma sidecar` (http_proxy, MITM for api.openai.com) and Python clients
//! (`tests/python/park_client.py`): the standard library's `http.client` through a CONNECT
//! tunnel, and raw TLS clients that cut the next head across the park, pipeline two requests
//! after it, send a smuggling head after it, or half-close while parked. Each waits on the
//! sidecar's `firma_sidecar_connections_parked` gauge, not on time. For each: what the client
//! got, what the upstream saw (and that the credential was injected), and what the audit says.

use firma_testing::audit;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-park-4e1d";

#[test]
fn parked_connections_serve_their_next_request_and_lose_no_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let d = Deployment::new(
        Some(&up),
        &Settings {
            extra: "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\n\
                    header = \"Authorization\"\nprefix = \"Bearer \"\n\
                    value_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n\n\
                    [sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n"
                .into(),
            ..Settings::default()
        },
    );
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    let admin: std::net::SocketAddr = sc
        .process
        .logged("admin listening on ")
        .expect("admin listener");
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/python/park_client.py"))
        .arg(sc.proxy_url())
        .arg(d.ca_cert())
        .arg(format!("http://{admin}/metrics"))
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sc.log_text()
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("{v}");

    // The client's side.
    assert_eq!(v["stdlib"], serde_json::json!([200, 200, 200]), "{v}");
    assert_eq!(
        v["stdlib_same_socket"], true,
        "http.client reconnected: {v}"
    );
    assert_eq!(v["split"], serde_json::json!([200, 200]), "{v}");
    assert_eq!(v["pipelined"], serde_json::json!([200, 200, 200]), "{v}");
    assert_eq!(v["smuggle"], serde_json::json!([200, 400]), "{v}");
    assert_eq!(v["smuggle_reason"], "MalformedRequest", "{v}");
    assert_eq!(v["smuggle_closed"], true, "{v}");
    assert_eq!(v["eof_first"], 200, "{v}");
    assert_eq!(v["eof_closed"], true, "{v}");

    // The upstream's side: every allowed request exactly once, in order per connection,
    // with the injected credential; the smuggling head never.
    let seen = up.seen();
    let steps: Vec<&str> = seen
        .iter()
        .map(|r| r.headers.get("x-step").map_or("?", String::as_str))
        .collect();
    let expect = [
        "n1", "n2", "n3", "split1", "split2", "pipe1", "pipe2", "pipe3", "smuggle1", "eof1",
    ];
    assert_eq!(steps, expect, "upstream saw {steps:?}");
    assert!(
        seen.iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {CANARY}")),
        "a request without the injected credential"
    );

    // One client connection per scenario (no reconnects), none parked at the end.
    assert_eq!(
        sc.metric("firma_sidecar_connections_total{mode=\"http_proxy\"}"),
        Some(5.0),
        "{}",
        sc.admin_get("/metrics").1
    );
    assert_eventually(Duration::from_secs(10), "nothing parked", || {
        sc.metric("firma_sidecar_connections_parked") == Some(0.0)
    });

    // The audit: ten allowed decisions, one MalformedRequest for the smuggling head, and a
    // chain that verifies.
    assert_eventually(Duration::from_secs(10), "decisions audited", || {
        let events = d.audit_for("api.openai.com");
        let allowed = events
            .iter()
            .filter(|e| e["event"] == "decision" && e["decision"]["outcome"] == "ALLOW")
            .count();
        let malformed = events
            .iter()
            .filter(|e| e["event"] == "decision" && e["decision"]["reason"] == "MalformedRequest")
            .count();
        allowed == expect.len() && malformed == 1
    });
    let (ok, report) = audit::verify(&d.audit_path, &[&d.root().join("audit.pub")]);
    assert!(ok, "{report}");
}
