//! Vault-mode credentials against a real Vault-API server (RustyVault, KV v1): lazy fetch and
//! injection, rotation visible after the cache TTL, fail-closed `CredentialUnavailable` when
//! Vault is down or refuses, and the secret never in audit or logs.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::vault::*;
use firma_testing::*;
use std::time::Duration;

fn vault_settings(vault: &Vault, token: &str, ttl: u64) -> Settings {
    Settings {
        extra: format!(
            "[[sidecar.credentials]]\nhost = \"api.acme-vendor.com\"\nmode = \"vault\"\nheader = \"x-api-key\"\nsecret_path = \"secret/acme-vendor/api-key\"\nsecret_key = \"value\"\n\n[sidecar.credentials.vault]\naddr = \"{}\"\ntoken = \"{token}\"\ncache_ttl_seconds = {ttl}\ntimeout_ms = 1000\n",
            vault.addr
        ),
        ..Settings::default()
    }
}

fn start() -> Option<(tempfile::TempDir, Upstream, Vault)> {
    let tmp = tempfile::tempdir().unwrap();
    let Some(vault) = Vault::start(tmp.path()) else {
        firma_testing::skip(
            "sidecar_vault",
            "rvault (RustyVault) not installed; `cargo install rusty_vault`",
        );
        return None;
    };
    let up = Upstream::start(
        tmp.path(),
        &[
            "api.acme-vendor.com",
            "api.openai.com",
            "paste.rs",
            "unmapped.example",
        ],
    );
    Some((tmp, up, vault))
}

#[test]
fn vault_secret_injected_rotated_and_fail_closed_when_down() {
    let Some((_tmp, up, mut vault)) = start() else {
        return;
    };
    vault.put("acme-vendor/api-key", "value", "vault-secret-one");
    let d = Deployment::new(Some(&up), &vault_settings(&vault, &vault.token, 1));
    let sc = d.start(&[]);
    let (p, ca) = (sc.proxy_url(), d.ca_cert());

    // Fetched on first use and injected, clobbering the agent's own header.
    let out = curl(
        &p,
        &ca,
        "https://api.acme-vendor.com/v1/send",
        &["-H", "x-api-key: agent-made-up"],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    assert_eq!(up.seen()[0].headers["x-api-key"], "vault-secret-one");

    // Rotation is picked up after the 1 s cache TTL.
    vault.put("acme-vendor/api-key", "value", "vault-secret-two");
    // A real timer: the credential cache's TTL (`cache_ttl_seconds = 1`) must run out; a
    // request before then would (rightly) still get the cached value.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        curl(&p, &ca, "https://api.acme-vendor.com/v1/send", &[]).status,
        200
    );
    assert_eq!(
        up.seen().last().unwrap().headers["x-api-key"],
        "vault-secret-two"
    );

    // Vault down: once the cache expires, deny without contacting the upstream.
    vault.stop();
    // A real timer again: the cached value must expire (`cache_ttl_seconds = 1`).
    std::thread::sleep(Duration::from_millis(1200));
    let before = up.count();
    let out = curl(&p, &ca, "https://api.acme-vendor.com/v1/send", &[]);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CredentialUnavailable");
    assert_eq!(
        up.count(),
        before,
        "upstream must not be contacted without the credential"
    );
    assert_eventually(Duration::from_secs(5), "audited", || {
        d.audit_for("api.acme-vendor.com").iter().any(|e| {
            e["decision"]["reason"] == "CredentialUnavailable"
                && e["connector"]["credential_injected"] == false
        }) && d
            .audit_for("api.acme-vendor.com")
            .iter()
            .any(|e| e["connector"]["credential_source"] == "vault")
    });
    let audit = d.audit_text();
    let logs = sc.log_text();
    for secret in ["vault-secret-one", "vault-secret-two", vault.token.as_str()] {
        assert!(!audit.contains(secret), "secret in audit");
        assert!(!logs.contains(secret), "secret in logs");
    }
    // Only the vendor host ever received it.
    assert!(
        up.seen()
            .iter()
            .all(|r| r.headers["host"] == "api.acme-vendor.com")
    );
}

#[test]
fn vault_refusal_and_missing_key_deny_credential_unavailable() {
    let Some((_tmp, up, vault)) = start() else {
        return;
    };
    vault.put("acme-vendor/api-key", "other_field", "x");
    // Wrong token: Vault answers 403.
    let d = Deployment::new(Some(&up), &vault_settings(&vault, "not-a-valid-token", 60));
    let sc = d.start(&[]);
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.acme-vendor.com/v1/send",
        &[],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CredentialUnavailable");
    assert!(
        out.json()["detail"].as_str().unwrap().contains("403"),
        "{out:?}"
    );
    drop(sc);
    // Valid token, but the secret has no `value` field.
    d.write(Some(&up), &vault_settings(&vault, &vault.token, 60));
    let sc = d.start(&[]);
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.acme-vendor.com/v1/send",
        &[],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CredentialUnavailable");
    assert!(
        out.json()["detail"].as_str().unwrap().contains("value"),
        "{out:?}"
    );
    assert_eq!(up.count(), 0);
}

#[test]
fn approle_login_from_env_vars_named_in_config() {
    let Some((_tmp, up, vault)) = start() else {
        return;
    };
    vault.put("acme-vendor/api-key", "value", "approle-fetched-secret");
    let (role_id, secret_id) = vault.approle();
    let s = Settings {
        extra: format!(
            "[[sidecar.credentials]]\nhost = \"api.acme-vendor.com\"\nmode = \"vault\"\nheader = \"x-api-key\"\nsecret_path = \"secret/acme-vendor/api-key\"\nsecret_key = \"value\"\n\n[sidecar.credentials.vault]\naddr = \"{}\"\napprole_role_id_env = \"FIRMA_T_ROLE\"\napprole_secret_id_env = \"FIRMA_T_SECRET\"\n",
            vault.addr
        ),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    // Without the AppRole variables there is no way to authenticate: startup refuses.
    let out = firma(&["sidecar", "-c", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("FIRMA_T_ROLE"),
        "{}",
        text(&out.stderr)
    );

    let sc = d.start(&[("FIRMA_T_ROLE", &role_id), ("FIRMA_T_SECRET", &secret_id)]);
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.acme-vendor.com/v1/send",
        &[],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    assert_eq!(up.seen()[0].headers["x-api-key"], "approle-fetched-secret");
    assert!(!sc.log_text().contains(&secret_id));
    assert!(!d.audit_text().contains(&secret_id));
}
