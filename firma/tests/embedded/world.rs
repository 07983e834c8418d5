//! The world of the embedded-layer tests: a real `firma authority` (bundle and revocation
//! streams), capabilities issued by its CLI, mapping rules and a runtime policy of their own,
//! and the `[sidecar]` config the in-process pipeline starts from (file audit, signed).

use firma_testing::authority::{Deployment, PERMIT_ALL, Server, read_seed};
use firma_testing::text;
use std::path::{Path, PathBuf};

/// The credential Firma injects for the test hosts (from this environment variable).
pub const KEY_ENV: &str = "FIRMA_EMBED_TEST_KEY";
pub const SECRET: &str = "sk-embed-secret";

pub const RULES: &str = r#"
[[rule]]
method = "GET"
host = "api.embed.test"
path = "/v1/*"
action_class = "communication.external.send"

[[rule]]
method = "POST"
host = "grpc.embed.test"
path = "/envoy.service.auth.v3.Authorization/*"
action_class = "data.write"
"#;

pub const RUNTIME: &str = r#"
@id("embed-allow")
permit (principal, action, resource);

@id("no-admin")
forbid (principal, action, resource) when { resource has "path" && resource.path like "/v1/admin*" };
"#;

#[allow(dead_code)] // Not every test file reads every field.
pub struct World {
    pub authority: Deployment,
    /// Kept running for the test (killed on drop).
    pub server: Server,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub audit_pub: PathBuf,
}

/// A capability issued by `firma authority issue`: (raw token, token id).
pub fn issue(d: &Deployment, agent: &str, session: &str, actions: &[&str]) -> (String, String) {
    let out = d.path(&format!("{session}.toml"));
    let mut args = vec![
        "issue",
        "--agent-id",
        agent,
        "--session-id",
        session,
        "--resource-scope",
        "*",
        "--ttl-seconds",
        "600",
        "--output",
        out.to_str().expect("utf8"),
    ];
    for a in actions {
        args.push("--action");
        args.push(a);
    }
    let o = d.authority(&args);
    assert!(o.status.success(), "issue: {}", text(&o.stderr));
    let seed = read_seed(&out);
    (seed.raw_token.clone(), seed.token_id.clone())
}

#[allow(dead_code)] // Not every test file uses every helper.
impl World {
    /// Sets the credential variable: call before any thread is started.
    pub fn set_credential_env() {
        // SAFETY: called first thing in a `#[test]` fn of its own file, before its runtime
        // or any other thread of the test exists.
        unsafe { std::env::set_var(KEY_ENV, SECRET) };
    }

    pub fn new() -> Self {
        Self::with_extra("")
    }

    /// As [`World::new`], with `extra` TOML appended to the `[sidecar]` config.
    pub fn with_extra(extra: &str) -> Self {
        let authority = Deployment::new(PERMIT_ALL, RUNTIME);
        let server = authority.start();
        let dir = authority.dir.path();
        let rules = dir.join("rules.toml");
        std::fs::write(&rules, RULES).expect("rules");
        let audit_key = dir.join("audit.key");
        let (_, audit_pub) = firma_common::keys::generate(&audit_key, false).expect("audit key");
        let audit = dir.join("audit.jsonl");
        let config = dir.join("app-firma.toml");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        std::fs::write(
            &config,
            format!(
                r#"
[sidecar.interceptor]
mode = "http_proxy"
listen_addr = "127.0.0.1:0"

[sidecar.mapping]
rules_path = {rules}
default_protected = true

[sidecar.policy]
authority_url = "{url}"

[sidecar.authority]
public_key_path = {pubkey}

[sidecar.constraint_enforcement]
bundle_ttl_seconds = 30
enforcement_timeout_ms = 2000

[[sidecar.credentials]]
host = "api.embed.test"
mode = "basic"
header = "authorization"
prefix = "Bearer "
value_from_env = "{KEY_ENV}"

[[sidecar.credentials]]
host = "grpc.embed.test"
mode = "basic"
header = "authorization"
prefix = "Bearer "
value_from_env = "{KEY_ENV}"

[sidecar.audit]
sink = "file"
path = {audit}
signing_key_path = {audit_key}
{extra}
"#,
                rules = q(&rules),
                url = server.url(),
                pubkey = q(&authority.public_key),
                audit = q(&audit),
                audit_key = q(&audit_key),
            ),
        )
        .expect("config");
        Self {
            authority,
            server,
            config,
            audit,
            audit_pub,
        }
    }

    /// `firma authority revocations add TOKEN_ID` through the real CLI.
    pub fn revoke(&self, token_id: &str) {
        let o = self.authority.authority(&["revocations", "add", token_id]);
        assert!(o.status.success(), "revoke: {}", text(&o.stderr));
    }

    /// The audit lines as JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        firma_testing::audit::lines(&self.audit)
            .iter()
            .map(|l| firma_testing::audit::json(l))
            .collect()
    }

    /// `firma audit verify` on the audit file with the audit public key.
    pub fn verify(&self) {
        let (ok, out) = firma_testing::audit::verify(&self.audit, &[&self.audit_pub]);
        assert!(ok, "firma audit verify failed:\n{out}");
    }
}

/// The `decision` events' (outcome, reason) in order, for `host`.
pub fn decisions(events: &[serde_json::Value], host: &str) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .filter(|e| e["event"] == "decision")
        .filter(|e| e["envelope"]["intent"]["resource"]["host"] == host)
        .map(|e| {
            (
                e["decision"]["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["decision"]["reason"].as_str().map(str::to_string),
            )
        })
        .collect()
}
