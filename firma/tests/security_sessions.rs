//! `x-firma-session` is a name, not a bearer token: a real `firma sidecar` in http_proxy mode
//! with MITM, Python's standard `http.client` holding explicit connections through the proxy
//! (so which request travels on which connection is certain), a local HTTPS upstream and the
//! signed audit file.

use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs each step `[connection name, {header: value}]` in order as `GET /v1/models` on the
/// named `http.client` connection (opened through the proxy's CONNECT tunnel on first use,
/// then kept), and prints `[[status, body], …]`.
const CLIENT: &str = r#"
import http.client, json, ssl, sys
proxy_host, proxy_port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
conns, out = {}, []
for name, headers in json.load(sys.stdin):
    if name not in conns:
        c = http.client.HTTPSConnection(proxy_host, proxy_port, context=ctx, timeout=20)
        c.set_tunnel("api.openai.com", 443)
        conns[name] = c
    c = conns[name]
    c.request("GET", "/v1/models", headers=headers)
    r = c.getresponse()
    out.append([r.status, r.read().decode()])
print(json.dumps(out))
"#;

fn run_steps(sc: &Sidecar, d: &Deployment, steps: serde_json::Value) -> Vec<(u16, String)> {
    let mut child = Command::new("python3")
        .args(["-c", CLIENT])
        .arg(sc.addr.ip().to_string())
        .arg(sc.addr.port().to_string())
        .arg(d.ca_cert())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is required for this test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(steps.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        text(&out.stderr),
        sc.log_text()
    );
    let v: Vec<(u16, String)> = serde_json::from_slice(&out.stdout).expect("client output");
    v
}

#[test]
fn a_session_id_does_not_lend_another_connections_token() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let d = Deployment::new(Some(&up), &Settings::default());
    let token = d.issue_token(
        "tenant-globex",
        "globex-sess-1",
        "model.inference.chat",
        "api.openai.com",
    );
    let sc = d.start(&[]);

    let by_session = serde_json::json!({"x-firma-session": "globex-sess-1"});
    let results = run_steps(
        &sc,
        &d,
        serde_json::json!([
            // Client 1 presents the token, then names its session on the same connection.
            ["client1", {"x-firma-capability": token}],
            ["client1", by_session],
            // Client 2, a new connection, knows only the session id.
            ["client2", by_session],
            // Client 1 is unaffected.
            ["client1", by_session],
        ]),
    );
    let status: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(status, vec![200, 200, 403, 200], "{results:?}");
    let denied: serde_json::Value = serde_json::from_str(&results[2].1).unwrap();
    assert_eq!(denied["reason"], "CapabilityNotFound", "{denied}");
    assert!(
        denied["detail"]
            .as_str()
            .unwrap_or("")
            .contains("globex-sess-1"),
        "{denied}"
    );
    assert_eq!(
        up.count(),
        3,
        "client 2's request must not reach the upstream"
    );

    assert_eventually(Duration::from_secs(5), "all four audited", || {
        d.audit_for("api.openai.com").len() == 4
    });
    let events = d.audit_for("api.openai.com");
    let allowed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["decision"]["outcome"] == "ALLOW")
        .collect();
    assert_eq!(allowed.len(), 3);
    let client1 = &allowed[0]["conn"]["id"];
    for e in &allowed {
        assert_eq!(
            &e["conn"]["id"], client1,
            "allows all on client 1's connection"
        );
        assert_eq!(e["capability"]["agent_id"], "tenant-globex");
        assert_eq!(e["capability"]["session_id"], "globex-sess-1");
    }
    let deny = events
        .iter()
        .find(|e| e["decision"]["outcome"] == "DENY")
        .expect("deny event");
    assert_eq!(deny["decision"]["reason"], "CapabilityNotFound");
    assert_ne!(&deny["conn"]["id"], client1);
    assert!(deny["capability"].is_null(), "{deny}");
    assert_eq!(deny["connector"]["credential_injected"], false);

    // The seeded session stays usable by name from any connection.
    let results = run_steps(
        &sc,
        &d,
        serde_json::json!([["client3", {"x-firma-session": "s1"}]]),
    );
    assert_eq!(results[0].0, 200, "{results:?}");
}
