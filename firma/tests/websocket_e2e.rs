//! WebSocket end to end: a real WebSocket client and echo server (Python `websockets`)
//! through the real `firma sidecar`, in http_proxy mode (the client's own proxy support:
//! `CONNECT`, then TLS to the MITM) and transparent mode (eBPF redirect of a client in a
//! tagged cgroup, in the test's own network namespace).
//!
//! Proves: the upgrade goes through mapping, Stage 1/2 and credential injection (the server
//! sees the injected `Authorization`, not the client's), frames are relayed both ways after
//! the 101, the audit has the ALLOW decision and, at close, an outcome with bytes each way and
//! the duration; a denied upgrade gets the 403 JSON and reaches nobody; and nothing can be
//! smuggled after a refused upgrade on the same connection.

use firma_testing::client::{in_cgroup_command, raw_exchange};
use firma_testing::config::{HostRoute, Mode};
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::ws::{WsEcho, client_args, client_result};
use firma_testing::{assert_eventually, firma, free_dual_port, text, unique};
use std::time::Duration;

const CANARY: &str = "sk-canary-ws-3c81";

fn credential() -> String {
    "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n".into()
}

fn deploy(echo: &WsEcho, mode: Mode, route: bool) -> (Deployment, Sidecar) {
    let s = Settings {
        upstream_hosts: Vec::new(),
        extra: credential(),
        ..Settings::default()
    };
    let d = Deployment::new(None, &s);
    let mut t = d.toml(None, &Settings { mode, ..s });
    t.extra_root_certs = vec![echo.ca_path.clone()];
    if route {
        t.hosts = ["api.openai.com", "paste.rs"]
            .iter()
            .map(|h| HostRoute {
                host: h.to_string(),
                address: echo.addr,
                extra: String::new(),
            })
            .collect();
    }
    t.write(&d.config).unwrap();
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    (d, sc)
}

/// The session audited: ALLOW decision with the credential, then at close an outcome with
/// status 101, bytes each way and a duration.
fn check_session_audited(d: &Deployment) -> serde_json::Value {
    let decision = assert_eventually(Duration::from_secs(5), "upgrade decision", || {
        d.audit_for("api.openai.com").into_iter().find(|e| {
            e["envelope"]["intent"]["resource"]["path"] == "/v1/realtime"
                && e["decision"]["outcome"] == "ALLOW"
        })
    });
    assert_eq!(decision["envelope"]["intent"]["method"], "GET");
    assert_eq!(decision["connector"]["credential_injected"], true);
    let id = decision["event_id"].as_str().unwrap().to_string();
    let outcome = assert_eventually(Duration::from_secs(10), "session outcome", || {
        d.audit()
            .into_iter()
            .find(|e| e["event"] == "outcome" && e["decision_event_id"] == id.as_str())
    });
    let c = &outcome["connector"];
    assert_eq!(c["upstream_status"], 101, "{outcome}");
    assert_eq!(c["upstream_protocol"], "websocket");
    assert!(c["aborted"].is_null(), "{outcome}");
    // Three messages (the last 5000 bytes) each way, masked frames up, plain frames down.
    assert!(c["bytes_up"].as_u64().unwrap() > 5000, "{outcome}");
    assert!(c["bytes_down"].as_u64().unwrap() > 5000, "{outcome}");
    assert!(c["duration_ms"].is_u64(), "{outcome}");
    outcome
}

fn check_echoes(v: &serde_json::Value) {
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["echoes"][0], "ping-1");
    assert_eq!(v["echoes"][1], "ping-2");
    assert_eq!(v["echoes"][2].as_str().unwrap().len(), 5000);
}

#[test]
fn websocket_echo_through_the_proxy_with_injected_credential_and_audited_close() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = WsEcho::start(
        tmp.path(),
        &["api.openai.com", "paste.rs"],
        "127.0.0.1:0".parse().unwrap(),
    );
    let (d, sc) = deploy(&echo, Mode::HttpProxy, true);
    let out = in_cgroup_command(
        None,
        "python3",
        &client_args(
            "wss://api.openai.com/v1/realtime?model=gpt-4o-realtime-preview",
            &d.ca_cert(),
            Some(&sc.proxy_url()),
        ),
    )
    .output()
    .unwrap();
    let v = client_result(&out);
    check_echoes(&v);
    let sessions = assert_eventually(Duration::from_secs(5), "server session ended", || {
        let s = echo.sessions();
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["authorization"], format!("Bearer {CANARY}"));
    assert_eq!(sessions[0]["messages"], 3);
    let outcome = check_session_audited(&d);
    assert_eq!(
        outcome["conn"]["intercept"],
        "http_proxy",
        "{}",
        sc.log_text()
    );

    // A denied upgrade: 403 JSON naming the reason; the server never sees it.
    let out = in_cgroup_command(
        None,
        "python3",
        &client_args("wss://paste.rs/ws", &d.ca_cert(), Some(&sc.proxy_url())),
    )
    .output()
    .unwrap();
    let v = client_result(&out);
    assert_eq!(v["status"], 403, "{v}");
    let body: serde_json::Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["denied"], true);
    assert_eq!(body["reason"], "PolicyDenied");
    assert_eq!(echo.sessions().len(), 1);
    assert_eventually(Duration::from_secs(5), "denied upgrade audited", || {
        d.audit_for("paste.rs").iter().any(|e| {
            e["decision"]["reason"] == "PolicyDenied" && e["envelope"]["intent"]["method"] == "GET"
        })
    });
}

/// Hostile: a refused upgrade followed by a pipelined request on the same connection. The
/// framing guard stops parsing heads after an upgrade request, so the refusal must close the
/// connection: the second request gets no answer and reaches nothing.
#[test]
fn nothing_is_smuggled_after_a_refused_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = WsEcho::start(
        tmp.path(),
        &["api.openai.com", "paste.rs"],
        "127.0.0.1:0".parse().unwrap(),
    );
    let (d, sc) = deploy(&echo, Mode::HttpProxy, true);
    let raw = raw_exchange(
        sc.addr,
        b"GET http://paste.rs/ws HTTP/1.1\r\nHost: paste.rs\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET http://paste.rs/second HTTP/1.1\r\nHost: paste.rs\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert_eq!(
        raw.matches("HTTP/1.1").count(),
        1,
        "one response only: {raw}"
    );
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw}"
    );
    // A second decision would come from reading the pipelined request after the 403; the
    // fence shows the writer is past anything the connection could have caused.
    d.audit_fence(&sc);
    let paste: Vec<_> = d.audit_for("paste.rs");
    assert_eq!(paste.len(), 1, "only the upgrade was decided: {paste:?}");
    assert!(echo.sessions().is_empty());
}

/// The sidecar hands the client's bytes on several times before hyper sees them (the
/// CONNECT head's buffer, the sniffed ClientHello, the TLS session, the first request head,
/// the framing guard's head buffer): an upgrade is answered however the client's bytes are
/// cut. The TLS Finished and the whole GET in one TCP write, the GET one byte per record, and
/// the GET with a second request behind it in one record: the refused upgrade gets its 403
/// and nothing else (the pipelined request is never answered nor decided), the allowed one
/// its 101.
#[test]
fn upgrade_is_answered_however_the_client_bytes_are_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = WsEcho::start(
        tmp.path(),
        &["api.openai.com", "paste.rs"],
        "127.0.0.1:0".parse().unwrap(),
    );
    let (d, sc) = deploy(&echo, Mode::HttpProxy, true);
    let script = firma_testing::repo_root().join("tests/python/ws_echo/segmented_client.py");
    let run = |url: &str, mode: &str| {
        let out = in_cgroup_command(
            None,
            "python3",
            &[
                script.display().to_string(),
                url.to_string(),
                d.ca_cert().display().to_string(),
                sc.proxy_url(),
                mode.to_string(),
            ],
        )
        .output()
        .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{mode}: client output is not JSON ({e}):\n{}\n{}\n{}",
                text(&out.stdout),
                text(&out.stderr),
                sc.log_text()
            )
        })
    };
    for mode in ["coalesce", "split", "pipelined"] {
        let v = run("wss://paste.rs/ws", mode);
        assert_eq!(v["status"], 403, "{mode}: {v}");
        let body: serde_json::Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["reason"], "PolicyDenied", "{mode}: {v}");
        assert!(
            v["head"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("connection: close"),
            "{mode}: {v}"
        );
        assert_eq!(v["after"], "", "{mode}: one response only: {v}");
    }
    for mode in ["coalesce", "split"] {
        let v = run("wss://api.openai.com/v1/realtime", mode);
        assert_eq!(v["status"], 101, "{mode}: {v}");
    }
    // Three refusals, each decided once: the pipelined request never reached the pipeline.
    d.audit_fence(&sc);
    let paste = d.audit_for("paste.rs");
    assert_eq!(paste.len(), 3, "{paste:?}");
    assert!(
        paste
            .iter()
            .all(|e| e["decision"]["reason"] == "PolicyDenied"
                && e["envelope"]["intent"]["resource"]["path"] == "/ws"),
        "{paste:?}"
    );
    assert_eventually(Duration::from_secs(10), "both upgrades relayed", || {
        (echo.sessions().len() == 2).then_some(())
    });
}

/// Transparent mode: an unmodified client in a tagged cgroup, no proxy, connects to
/// api.openai.com:443 (10.77.0.2 in the test namespace); the sidecar MITMs the upgrade,
/// injects the credential and relays.
#[test]
fn websocket_in_tagged_cgroup_is_relayed_and_audited() {
    if !in_fresh_netns("websocket_in_tagged_cgroup_is_relayed_and_audited") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let echo = WsEcho::start(
        tmp.path(),
        &["api.openai.com"],
        format!("{DST_V4}:443").parse().unwrap(),
    );
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-ws")).expect("test cgroup");
    let (d, _sc) = deploy(
        &echo,
        Mode::Transparent {
            port: free_dual_port(),
            pin_dir: pins.dir.clone(),
            control_socket: tmp.path().join("sidecar.sock"),
            allow_ephemeral_pins: None,
        },
        // The name's address for the destination binding (no DNS here).
        true,
    );
    let cg_path = format!("/{}", cg.dir.file_name().unwrap().to_string_lossy());
    let out = firma(&[
        "sidecar",
        "-c",
        d.config.to_str().unwrap(),
        "attach",
        "--cgroup",
        &cg_path,
        "--agent-id",
        "tenant-acme",
        "--session-id",
        "s1",
    ]);
    assert!(out.status.success(), "attach: {}", text(&out.stderr));
    let hosts = tmp.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{DST_V4} api.openai.com\n"),
    )
    .unwrap();
    let mut cmd = Confine::hosts(&hosts).cgroup(&cg.dir).command("python3");
    cmd.args(client_args(
        "wss://api.openai.com/v1/realtime",
        &d.ca_cert(),
        None,
    ));
    for v in firma_testing::client::PROXY_VARS {
        cmd.env_remove(v);
    }
    let v = client_result(&cmd.output().unwrap());
    check_echoes(&v);
    let sessions = assert_eventually(Duration::from_secs(5), "server session ended", || {
        let s = echo.sessions();
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(sessions[0]["authorization"], format!("Bearer {CANARY}"));
    let outcome = check_session_audited(&d);
    assert_eq!(outcome["conn"]["intercept"], "transparent");
}
