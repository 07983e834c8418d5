//! Offline `firma authority` commands through the built binary: key generation, issuance
//! (allow, deny, clamp, bad input), seed verification and revocation file management.

use firma_common::capability::{CapabilityError, now_unix};
use firma_testing::authority::*;
use firma_testing::*;
use std::os::unix::fs::PermissionsExt;

const PRODUCTION: &str = "issuance/production/issuance.cedar";

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn generate_key_writes_0600_and_pub_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("firma-authority.key");
    let k = key.to_str().unwrap();
    let out = firma(&["authority", "generate-key", "-o", k]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode(&key), 0o600);
    let public = dir.path().join("firma-authority.pub");
    assert!(public.exists(), ".pub written beside the key");
    firma_common::keys::load_signing_key(&key).expect("loadable private key");
    let vk = firma_common::keys::load_verifying_key(&public).expect("loadable public key");
    let before = std::fs::read(&key).unwrap();

    let out = firma(&["authority", "generate-key", "-o", k]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "key untouched");

    // Only the .pub existing also blocks.
    std::fs::remove_file(&key).unwrap();
    let out = firma(&["authority", "generate-key", "-o", k]);
    assert!(!out.status.success());

    let out = firma(&["authority", "generate-key", "-o", k, "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode(&key), 0o600);
    let vk2 = firma_common::keys::load_verifying_key(&public).unwrap();
    assert_ne!(vk, vk2, "--force made a new key pair");
}

#[test]
fn generate_key_defaults_to_config_key_file() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    std::fs::remove_file(&d.key).unwrap();
    std::fs::remove_file(&d.public_key).unwrap();
    let out = d.authority(&["generate-key"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode(&d.key), 0o600);
}

#[test]
fn issue_writes_a_verifiable_seed_and_hand_edits_are_detected() {
    let d = Deployment::new(&shipped_policy(PRODUCTION), PERMIT_ALL);
    let seed_path = d.path("capability-support.toml");
    let before = now_unix();
    let out = d.authority(&[
        "issue",
        "--agent-id",
        "support-agent",
        "--session-id",
        "session-001",
        "--action",
        "communication.external.send",
        "--action",
        "model.inference.chat",
        "--resource-scope",
        "*",
        "--ttl-seconds",
        "600",
        "--output",
        seed_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode(&seed_path), 0o600, "seed holds a bearer token");
    let seed = read_seed(&seed_path);
    let claims = seed.verify(&d.verifying_key()).expect("seed verifies");
    assert_eq!(claims.agent_id, "support-agent");
    assert_eq!(claims.session_id, "session-001");
    assert_eq!(
        claims.action_set,
        ["communication.external.send", "model.inference.chat"]
    );
    assert_eq!(claims.resource_scope, "*");
    assert!(claims.iat >= before && claims.iat <= now_unix());
    assert_eq!(claims.exp - claims.iat, 600);
    assert_eq!(claims.context_hash.len(), 64);
    let id = uuid_v4(&claims.token_id);
    assert!(id, "token_id {} is a UUIDv4", claims.token_id);
    assert!(text(&out.stderr).contains(&claims.token_id));

    // A hand edit of the mirror (scope widened) must be caught by the verifier.
    let edited = std::fs::read_to_string(&seed_path).unwrap().replace(
        "resource_scope = \"*\"",
        "resource_scope = \"api.openai.com*\"",
    );
    std::fs::write(&seed_path, edited).unwrap();
    let err = read_seed(&seed_path)
        .verify(&d.verifying_key())
        .unwrap_err();
    assert!(
        matches!(
            err,
            CapabilityError::MirrorMismatch {
                field: "resource_scope"
            }
        ),
        "{err}"
    );

    // A seed checked against another authority's key fails signature verification.
    let other = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let err = seed.verify(&other.verifying_key()).unwrap_err();
    assert!(matches!(err, CapabilityError::Invalid(_)), "{err}");
}

fn uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 36
        && [8, 13, 18, 23].iter().all(|i| b[*i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

#[test]
fn denied_issuance_exits_nonzero_and_names_the_policy() {
    let d = Deployment::new(&shipped_policy(PRODUCTION), PERMIT_ALL);
    let seed_path = d.path("payment.toml");
    let out = d.authority(&[
        "issue",
        "--agent-id",
        "support-agent",
        "--session-id",
        "s",
        "--action",
        "model.inference.chat",
        "--action",
        "payment.transfer",
        "--ttl-seconds",
        "60",
        "--output",
        seed_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("payment.transfer"), "{err}");
    assert!(err.contains("issuance:1"), "names the forbid policy: {err}");
    assert!(!seed_path.exists(), "no seed written on denial");

    // An agent the policy does not know: default deny, said so.
    let out = d.authority(&[
        "issue",
        "--agent-id",
        "stranger",
        "--session-id",
        "s",
        "--action",
        "model.inference.chat",
        "--ttl-seconds",
        "60",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no issuance policy permits"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ttl_is_clamped_to_max_and_reported() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let seed_path = d.path("long.toml");
    let out = d.authority(&[
        "issue",
        "--agent-id",
        "a",
        "--session-id",
        "s",
        "--action",
        "data.read",
        "--ttl-seconds",
        "31536000",
        "--output",
        seed_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("clamped to 3600s"),
        "{}",
        text(&out.stderr)
    );
    let c = read_seed(&seed_path).verify(&d.verifying_key()).unwrap();
    assert_eq!(c.exp - c.iat, 3600);
}

#[test]
fn bad_issue_requests_are_refused() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let base = ["issue", "--agent-id", "a", "--session-id", "s"];
    let cases: [(&[&str], &str); 5] = [
        (
            &["--action", "payment.steal", "--ttl-seconds", "60"],
            "unknown action class `payment.steal`",
        ),
        (
            &["--ttl-seconds", "60"],
            "requested_actions: the action set is empty",
        ),
        (
            &["--action", "data.read", "--ttl-seconds", "0"],
            "must be positive",
        ),
        (
            &["--action", "data.read", "--ttl-seconds", "-5"],
            "must be positive",
        ),
        (
            &[
                "--action",
                "data.read",
                "--ttl-seconds",
                "5",
                "--resource-scope",
                "",
            ],
            "InvalidRequest: resource_scope: must not be empty",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = d.authority(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.contains("InvalidRequest"), "{err}");
    }
}

#[test]
fn revocations_add_list_compact() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let old = now_unix() - 7200;
    // An operator-written bare line and an entry revoked two hours ago (max TTL is 1 h).
    std::fs::write(&d.revocations, format!("bare-id\nold-id {old}\n")).unwrap();
    let id = "79dd9ffb-ebc8-4883-8f1e-72eb74a26e33";
    let out = d.authority(&["revocations", "add", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = d.authority(&["revocations", "add", id]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("already revoked"));
    let content = std::fs::read_to_string(&d.revocations).unwrap();
    assert_eq!(content.matches(id).count(), 1, "idempotent: {content}");
    // Recorded in Unix milliseconds (what the stream sends as revoked_at_unix_ms).
    let at: i64 = content
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{id} ")))
        .and_then(|t| t.parse().ok())
        .expect("a timestamp on the added line");
    assert!(
        (now_unix() * 1000 - at).abs() < 60_000,
        "{at} is not now in ms"
    );

    let out = d.authority(&["revocations", "list"]);
    let listed = text(&out.stdout);
    let ids: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(ids, ["bare-id", "old-id", id]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(id) && l.ends_with('Z') && l.contains('.')),
        "RFC 3339 with milliseconds: {listed}"
    );

    let out = d.authority(&["revocations", "compact"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("kept 2, dropped 1"),
        "{}",
        text(&out.stdout)
    );
    let out = d.authority(&["revocations", "list"]);
    let listed = text(&out.stdout);
    assert!(listed.contains("bare-id") && listed.contains(id) && !listed.contains("old-id"));

    let out = d.authority(&["revocations", "add", "two words"]);
    assert!(!out.status.success());
}

#[test]
fn policy_validate_accepts_shipped_examples_and_locates_errors() {
    let root = repo_root().join("policies");
    let dirs: Vec<String> = [
        "issuance/dev",
        "issuance/production",
        "issuance/genai-app",
        "runtime/genai-app",
        "runtime/first-policy",
    ]
    .iter()
    .map(|d| root.join(d).display().to_string())
    .collect();
    let mut args = vec!["policy", "validate"];
    args.extend(dirs.iter().map(String::as_str));
    let out = firma(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches(": ok:").count(), 5);
    assert!(text(&out.stdout).contains("genai-app:2"));

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("a.cedar"),
        "permit (principal, action, resource);\nforbid (principal, action == Firma::Action::\"payment.steal\", resource);\n",
    )
    .unwrap();
    let out = firma(&["policy", "validate", bad.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("a.cedar:2") && err.contains("payment.steal"),
        "{err}"
    );
}
