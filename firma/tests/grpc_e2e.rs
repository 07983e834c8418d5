//! gRPC end to end: a real grpcio client and a real grpcio TLS server (Python, stubs generated
//! at test time) through the real `firma sidecar`, in http_proxy mode (grpcio's own
//! `grpc_proxy` CONNECT support) and in transparent mode (eBPF redirect of a client in a tagged
//! cgroup, inside the test's own network namespace).
//!
//! Proves: requests with `content-type: application/grpc` go upstream over HTTP/2 with
//! `te: trailers` kept and trailers relayed (unary and server-streaming), the credential is
//! injected into the call's metadata (replacing the client's own), a denied method and a
//! denied host are answered in gRPC terms (`PERMISSION_DENIED` with the Firma reason in
//! `grpc-message`) and reach nobody, an unreachable upstream is `UNAVAILABLE`, and every
//! decision is in the audit with the Firma reason (see docs/architecture.md, "Life of a request").

use firma_testing::client::in_cgroup_command;
use firma_testing::config::{HostRoute, Mode};
use firma_testing::confine::Confine;
use firma_testing::grpc::{GrpcEcho, client_command, client_result};
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::{assert_eventually, firma, free_dual_port, free_port, text, unique};
use std::net::SocketAddr;
use std::time::Duration;

const HOST: &str = "grpc.firma.test";
const OTHER: &str = "grpc-other.firma.test";
const DOWN: &str = "grpc-down.firma.test";
const CANARY: &str = "sk-grpc-canary-90b1d2";

const RULES: &str = r#"
[[rule]]
method = "POST"
host = "grpc.firma.test"
path = "/firma.test.Echo/Unary"
action_class = "model.inference.chat"

[[rule]]
method = "POST"
host = "grpc.firma.test"
path = "/firma.test.Echo/Stream"
action_class = "model.inference.chat"

[[rule]]
method = "POST"
host = "grpc.firma.test"
path = "/firma.test.Echo/Admin"
action_class = "communication.external.send"

[[rule]]
host = "grpc-other.firma.test"
action_class = "model.inference.chat"

[[rule]]
host = "grpc-down.firma.test"
action_class = "model.inference.chat"
"#;

const POLICY: &str = r#"
permit (principal, action == Firma::Action::"model.inference.chat", resource)
when { resource has "host" && (resource.host == "grpc.firma.test" || resource.host == "grpc-down.firma.test") };
"#;

fn credential() -> String {
    format!(
        "[[sidecar.credentials]]\nhost = {HOST:?}\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_GRPC_KEY\"\n"
    )
}

/// A deployment for the echo server; `mode` and where each host goes (`routes`; none in
/// transparent mode, where the upstream is the original destination).
fn deploy(echo: &GrpcEcho, mode: Mode, routes: &[(&str, SocketAddr)]) -> Deployment {
    let hosts = [HOST, OTHER, DOWN].map(String::from).to_vec();
    let s = Settings {
        intercept_hosts: hosts,
        strict_hosts: Vec::new(),
        upstream_hosts: Vec::new(),
        runtime_policy: POLICY.into(),
        extra: credential(),
        ..Settings::default()
    };
    let d = Deployment::new(None, &s);
    let rules = d.root().join("grpc-rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut t = d.toml(None, &Settings { mode, ..s });
    t.rules_path = rules;
    t.extra_root_certs = vec![echo.ca_path.clone()];
    t.hosts = routes
        .iter()
        .map(|(h, a)| HostRoute {
            host: h.to_string(),
            address: *a,
            extra: String::new(),
        })
        .collect();
    t.write(&d.config).unwrap();
    d
}

fn start(d: &Deployment) -> Sidecar {
    d.start(&[("FIRMA_TEST_GRPC_KEY", CANARY)])
}

/// Runs the client against `host:443` through the proxy.
fn proxy_client(
    sc: &Sidecar,
    d: &Deployment,
    echo: &GrpcEcho,
    host: &str,
    meta: Option<&str>,
) -> serde_json::Value {
    let (prog, mut args) = client_command(&echo.stubs, &format!("{host}:443"), &d.ca_cert());
    args.extend(meta.map(str::to_string));
    let out = in_cgroup_command(None, prog, &args)
        .env("grpc_proxy", sc.proxy_url())
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_grpc_proxy")
        .output()
        .unwrap();
    client_result(&out)
}

fn assert_allowed_calls(v: &serde_json::Value, log: &str) {
    let u = &v["unary"];
    assert_eq!(u["code"], "OK", "{v}\n{log}");
    assert_eq!(u["replies"][0]["message"], "hello");
    assert_eq!(u["replies"][0]["authorization"], format!("Bearer {CANARY}"));
    assert_eq!(u["trailers"]["x-echo-trailer"], "unary-done", "{v}");
    let s = &v["stream"];
    assert_eq!(s["code"], "OK", "{v}");
    let msgs: Vec<&str> = s["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, ["tick-0", "tick-1", "tick-2"]);
    assert_eq!(s["trailers"]["x-echo-trailer"], "stream-done", "{v}");
}

fn assert_denied(call: &serde_json::Value, code: &str, reason: &str) {
    assert_eq!(call["code"], code, "{call}");
    let details = call["details"].as_str().unwrap();
    assert!(
        details.starts_with(&format!("Firma {reason}: ")),
        "grpc-message names the Firma reason: {call}"
    );
}

/// The audit decisions for `host` path `path`.
fn decisions(d: &Deployment, host: &str, path: &str) -> Vec<serde_json::Value> {
    d.audit_for(host)
        .into_iter()
        .filter(|e| e["envelope"]["intent"]["resource"]["path"] == path)
        .collect()
}

/// What every mode must show for the allowed and denied calls on HOST.
fn check_host_calls(d: &Deployment, echo: &GrpcEcho, v: &serde_json::Value, log: &str) {
    assert_allowed_calls(v, log);
    assert_denied(&v["admin"], "PERMISSION_DENIED", "PolicyDenied");
    // The server saw the allowed calls with the injected credential, never the denied one.
    let calls = echo.calls();
    let methods: Vec<&str> = calls
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["Unary", "Stream"], "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c["authorization"] == format!("Bearer {CANARY}"))
    );
    assert_eventually(Duration::from_secs(5), "gRPC decisions audited", || {
        let unary = decisions(d, HOST, "/firma.test.Echo/Unary");
        let admin = decisions(d, HOST, "/firma.test.Echo/Admin");
        unary.iter().any(|e| {
            e["decision"]["outcome"] == "ALLOW" && e["connector"]["credential_injected"] == true
        }) && admin.iter().any(|e| {
            e["decision"]["outcome"] == "DENY" && e["decision"]["reason"] == "PolicyDenied"
        })
    });
    // Outcomes: status 200 over HTTP/2 for both allowed calls.
    assert_eventually(Duration::from_secs(5), "outcomes over h2", || {
        let outs: Vec<_> = d
            .audit()
            .into_iter()
            .filter(|e| {
                e["event"] == "outcome" && e["envelope"]["intent"]["resource"]["host"] == HOST
            })
            .collect();
        outs.len() == 2
            && outs.iter().all(|e| {
                e["connector"]["upstream_status"] == 200
                    && e["connector"]["upstream_protocol"] == "h2"
            })
    });
}

#[test]
fn grpc_through_http_proxy_allowed_denied_and_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = GrpcEcho::start(
        tmp.path(),
        &[HOST, OTHER, DOWN],
        "127.0.0.1:0".parse().unwrap(),
    );
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = deploy(
        &echo,
        Mode::HttpProxy,
        &[(HOST, echo.addr), (OTHER, echo.addr), (DOWN, closed)],
    );
    let sc = start(&d);

    // Allowed unary + streaming with the credential in metadata; a denied method.
    let v = proxy_client(&sc, &d, &echo, HOST, None);
    check_host_calls(&d, &echo, &v, &sc.log_text());

    // A denied host: every call PERMISSION_DENIED, nothing reaches the server.
    let before = echo.calls().len();
    let v = proxy_client(&sc, &d, &echo, OTHER, None);
    for call in ["unary", "stream", "admin"] {
        assert_denied(&v[call], "PERMISSION_DENIED", "PolicyDenied");
    }
    assert_eq!(echo.calls().len(), before);
    assert_eventually(Duration::from_secs(5), "denied host audited", || {
        d.audit_for(OTHER).len() == 3
            && d.audit_for(OTHER)
                .iter()
                .all(|e| e["decision"]["reason"] == "PolicyDenied")
    });

    // An allowed call whose upstream is down: UNAVAILABLE naming the abort, audited.
    let v = proxy_client(&sc, &d, &echo, DOWN, None);
    assert_denied(&v["unary"], "UNAVAILABLE", "UpstreamUnavailable");
    assert_eventually(Duration::from_secs(5), "abort audited", || {
        d.audit().iter().any(|e| {
            e["envelope"]["intent"]["resource"]["host"] == DOWN
                && e["connector"]["aborted"] == "UpstreamUnavailable"
        })
    });
}

/// Hostile client: its own `authorization` metadata is replaced by the injected credential,
/// and a forged capability in metadata is refused in gRPC terms without reaching the server.
#[test]
fn grpc_client_cannot_choose_its_credential_or_forge_a_capability() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = GrpcEcho::start(tmp.path(), &[HOST], "127.0.0.1:0".parse().unwrap());
    let d = deploy(&echo, Mode::HttpProxy, &[(HOST, echo.addr)]);
    let sc = start(&d);

    let v = proxy_client(
        &sc,
        &d,
        &echo,
        HOST,
        Some("authorization=Bearer agent-own-key"),
    );
    assert_eq!(v["unary"]["code"], "OK", "{v}");
    assert_eq!(
        v["unary"]["replies"][0]["authorization"],
        format!("Bearer {CANARY}")
    );
    assert!(
        echo.calls()
            .iter()
            .all(|c| c["authorization"] != "Bearer agent-own-key")
    );

    let before = echo.calls().len();
    let v = proxy_client(
        &sc,
        &d,
        &echo,
        HOST,
        Some("x-firma-capability=v4.public.forged"),
    );
    for call in ["unary", "stream", "admin"] {
        assert_eq!(v[call]["code"], "PERMISSION_DENIED", "{v}");
        assert!(
            v[call]["details"]
                .as_str()
                .unwrap()
                .starts_with("Firma Capability"),
            "{v}"
        );
    }
    assert_eq!(
        echo.calls().len(),
        before,
        "forged calls reached the server"
    );
}

/// Transparent mode: the unmodified client in a tagged cgroup dials grpc.firma.test:443
/// (10.77.0.2 in the test's namespace); the kernel redirects it to the sidecar, which MITMs
/// it and forwards over HTTP/2 to the name's address, which the original destination is.
#[test]
fn grpc_in_tagged_cgroup_is_enforced_transparently() {
    if !in_fresh_netns("grpc_in_tagged_cgroup_is_enforced_transparently") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let echo = GrpcEcho::start(
        tmp.path(),
        &[HOST, OTHER],
        format!("{DST_V4}:443").parse().unwrap(),
    );
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-grpc")).expect("test cgroup");
    let port = free_dual_port();
    let control = tmp.path().join("sidecar.sock");
    let d = deploy(
        &echo,
        Mode::Transparent {
            port,
            pin_dir: pins.dir.clone(),
            control_socket: control,
            allow_ephemeral_pins: None,
        },
        // The sidecar binds each name to its address (the original destination must be one of
        // the decided name's addresses): configured here, as the names have no DNS.
        &[(HOST, echo.addr), (OTHER, echo.addr)],
    );
    let sc = start(&d);
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
        format!("127.0.0.1 localhost\n{DST_V4} {HOST} {OTHER}\n"),
    )
    .unwrap();

    let run = |host: &str| {
        let (prog, args) = client_command(&echo.stubs, &format!("{host}:443"), &d.ca_cert());
        let mut cmd = Confine::hosts(&hosts).cgroup(&cg.dir).command(prog);
        cmd.args(&args).env("GRPC_DNS_RESOLVER", "native");
        for v in firma_testing::client::PROXY_VARS {
            cmd.env_remove(v);
        }
        client_result(&cmd.output().unwrap())
    };

    let v = run(HOST);
    check_host_calls(&d, &echo, &v, &sc.log_text());
    let cg_decisions: Vec<_> = decisions(&d, HOST, "/firma.test.Echo/Unary")
        .into_iter()
        .filter(|e| e["workload"]["cgroup_path"] == cg_path.as_str())
        .collect();
    assert!(!cg_decisions.is_empty(), "decision names the cgroup");
    assert_eq!(cg_decisions[0]["conn"]["intercept"], "transparent");

    let before = echo.calls().len();
    let v = run(OTHER);
    for call in ["unary", "stream", "admin"] {
        assert_denied(&v[call], "PERMISSION_DENIED", "PolicyDenied");
    }
    assert_eq!(echo.calls().len(), before);
}
