//! The seed guide's Python client (grpcio, stubs generated from `proto/` at test time) against
//! the real Authority: a capability is issued and verifies with the Authority's public key, a
//! forbidden action class is denied naming the policy, and the bundle stream delivers.
//! Fails (never skips) when grpcio/grpcio-tools are missing: CI installs them.

use firma_common::capability::CapabilityClaims;
use firma_testing::authority::*;
use firma_testing::*;
use std::path::Path;
use std::process::Command;

/// Generates `firma_proto/authority_pb2{,_grpc}.py` under `out`.
fn generate_stubs(out: &Path) {
    let pkg = out.join("firma_proto");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("__init__.py"), "").unwrap();
    let proto = repo_root().join("proto");
    let result = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", pkg.display()))
        .arg(format!("--grpc_python_out={}", pkg.display()))
        .arg(proto.join("authority.proto"))
        .output();
    let out = match result {
        Ok(o) => o,
        Err(e) => panic!(
            "python3 is required for this test ({e}); install python3 and `pip install grpcio grpcio-tools`"
        ),
    };
    assert!(
        out.status.success(),
        "cannot generate Python stubs ({}); run `pip install grpcio grpcio-tools`",
        text(&out.stderr).trim()
    );
}

fn run_client(stubs: &Path, addr: &str, ca: Option<&Path>) -> serde_json::Value {
    let script = repo_root().join("tests/python/issue_capability.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(stubs).arg(addr);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = cmd
        .env("NO_PROXY", "*")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("grpc_proxy")
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python client failed (pip install grpcio grpcio-tools if missing):\n{}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

fn check(d: &Deployment, v: &serde_json::Value) {
    let raw = v["raw_token"].as_str().unwrap();
    assert!(raw.starts_with("v4.public."));
    let claims = CapabilityClaims::verify(raw, &d.verifying_key()).expect("token verifies");
    assert_eq!(claims.agent_id, "tenant-acme");
    assert_eq!(claims.session_id, "user-session-42");
    assert_eq!(v["token_id"], claims.token_id.as_str());
    assert_eq!(claims.exp - claims.iat, 900);
    assert_eq!(v["denied_code"], "IssuanceDenied");
    assert_eq!(v["denied_policies"], serde_json::json!(["issuance:1"]));
    assert!(
        v["denied_reason"]
            .as_str()
            .unwrap()
            .contains("payment.transfer")
    );
    let version = firma_common::policy::PolicyBundle::load_dir(&d.policy_dir)
        .unwrap()
        .version;
    assert_eq!(v["bundle_version"], version.as_str());
}

#[test]
fn python_grpc_client_issues_and_gets_denied() {
    let d = Deployment::new(
        &shipped_policy("issuance/genai-app/issuance.cedar"),
        &shipped_policy("runtime/genai-app/genai-app.cedar"),
    );
    let stubs = d.path("stubs");
    generate_stubs(&stubs);
    let server = d.start();
    let v = run_client(&stubs, &server.addr.to_string(), None);
    check(&d, &v);
}

#[test]
fn python_grpc_client_over_tls() {
    let d = Deployment::new(
        &shipped_policy("issuance/genai-app/issuance.cedar"),
        &shipped_policy("runtime/genai-app/genai-app.cedar"),
    );
    let (ca, cert, key) = write_tls_files(d.dir.path());
    d.write_config(
        "127.0.0.1:0",
        &format!(
            "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let stubs = d.path("stubs");
    generate_stubs(&stubs);
    let server = d.start();
    let v = run_client(&stubs, &server.addr.to_string(), Some(&ca));
    check(&d, &v);
}
