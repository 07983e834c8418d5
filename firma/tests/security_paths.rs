//! Path normalisation end to end: a real `firma sidecar` in http_proxy mode with MITM, curl with
//! `--path-as-is` (so curl sends the dot segments instead of resolving them), a local HTTPS
//! upstream and the signed audit file. What is decided, what is audited and what the upstream
//! receives must be the same normalised path; ambiguous paths are refused before any decision.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-paths-31d7";

/// A test-only rule so that `GET /v1/files` has an action class (the shipped rules leave it
/// unmapped): the scope check, not the mapping, must be what stops the escape from
/// `/v1/models`.
const FILES_RULE: &str = "[[rule]]\nmethod = \"GET\"\nhost = \"api.openai.com\"\npath = \"/v1/files\"\naction_class = \"model.inference.chat\"\n";

fn setup() -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com", "api.acme-vendor.com"]);
    let settings = Settings {
        extra: "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n".into(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &settings);
    std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
    std::mem::forget(tmp);
    let rules = d.root().join("extra-rules.toml");
    std::fs::write(&rules, FILES_RULE).unwrap();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cfg = cfg.replacen(
        "default_protected =",
        &format!(
            "rules_paths = [{:?}]\ndefault_protected =",
            rules.display().to_string()
        ),
        1,
    );
    std::fs::write(&d.config, cfg).unwrap();
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    (up, d, sc)
}

fn get(sc: &Sidecar, d: &Deployment, url: &str, headers: &[&str]) -> CurlOut {
    let mut args = vec!["--path-as-is"];
    for h in headers {
        args.extend(["-H", h]);
    }
    curl(&sc.proxy_url(), &d.ca_cert(), url, &args)
}

/// Issues a capability with `firma authority issue` and returns its raw token.
fn issue(d: &Deployment, session: &str, scope: &str) -> String {
    d.issue_token("tenant-acme", session, "model.inference.chat", scope)
}

fn audited(d: &Deployment, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    assert_eventually(Duration::from_secs(5), what, || {
        d.audit_for("api.openai.com").iter().any(&f)
    });
}

#[test]
fn dot_segments_are_classified_audited_and_forwarded_normalised() {
    let (up, d, sc) = setup();

    // The reported attack: `/v1/models/*` is chat (allowed, credential injected), but the
    // upstream resolves the dots to the API-keys endpoint. Normalised, it is an unmapped
    // GET and denied; the upstream sees nothing.
    for url in [
        "https://api.openai.com/v1/models/../../v1/organization/api_keys",
        "https://api.openai.com/v1/models/%2e%2e/%2E%2e/v1/organization/api_keys",
        "https://api.openai.com/v1/models/./.%2E/..//v1/organization/api_keys",
    ] {
        let out = get(&sc, &d, url, &[]);
        assert_eq!(out.status, 403, "{url}: {out:?}");
        assert_eq!(out.json()["reason"], "UnclassifiedIntent", "{url}: {out:?}");
        assert!(
            out.json()["detail"]
                .as_str()
                .unwrap_or("")
                .contains("/v1/organization/api_keys"),
            "{url}: {out:?}"
        );
    }
    assert_eq!(up.count(), 0, "a denied call must not reach the upstream");
    audited(&d, "deny audited with the normalised path", |e| {
        e["decision"]["reason"] == "UnclassifiedIntent"
            && e["envelope"]["intent"]["resource"]["path"] == "/v1/organization/api_keys"
            && e["connector"]["credential_injected"] == false
    });
    assert!(
        !d.audit_text().contains("/v1/models/.."),
        "the raw dotted path must not be what was decided on"
    );

    // Dots that land on a permitted endpoint: classified by the real target, and the
    // upstream receives the normalised path (with the query untouched).
    let out = get(
        &sc,
        &d,
        "https://api.openai.com/v1/files/%2E%2E/./models/gpt-4o?x=../y",
        &[],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/v1/models/gpt-4o");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {CANARY}"));
    assert!(
        up.raw_contains("GET /v1/models/gpt-4o?x=../y\r\n"),
        "upstream request line"
    );
    audited(&d, "allow audited with the normalised path", |e| {
        e["decision"]["outcome"] == "ALLOW"
            && e["envelope"]["intent"]["action_class"] == "model.inference.chat"
            && e["envelope"]["intent"]["resource"]["path"] == "/v1/models/gpt-4o"
    });
}

#[test]
fn a_scoped_token_cannot_step_out_of_its_scope() {
    let (up, d, sc) = setup();
    let tok = issue(&d, "scoped-1", "api.openai.com/v1/models");
    let cap = format!("x-firma-capability: {tok}");
    let out = get(
        &sc,
        &d,
        "https://api.openai.com/v1/models/gpt-4o",
        &[cap.as_str()],
    );
    assert_eq!(out.status, 200, "in scope: {out:?}\n{}", sc.log_text());
    assert_eq!(up.count(), 1);

    for url in [
        "https://api.openai.com/v1/models/../../v1/files",
        "https://api.openai.com/v1/models/%2E%2E/%2e%2e/v1/files",
    ] {
        let out = get(&sc, &d, url, &[cap.as_str()]);
        assert_eq!(out.status, 403, "{url}: {out:?}");
        assert_eq!(
            out.json()["reason"],
            "CapabilityScopeMismatch",
            "{url}: {out:?}"
        );
    }
    assert_eq!(up.count(), 1, "nothing out of scope reached the upstream");
    audited(&d, "scope mismatch audited on the normalised path", |e| {
        e["decision"]["reason"] == "CapabilityScopeMismatch"
            && e["envelope"]["intent"]["resource"]["path"] == "/v1/files"
            && e["capability"].is_null()
    });
}

#[test]
fn ambiguous_paths_are_malformed_and_audited() {
    let (up, d, sc) = setup();
    for (url, needle) in [
        (
            "https://api.openai.com/v1/models%2F..%2F..%2Fv1%2Ffiles",
            "%2F",
        ),
        ("https://api.openai.com/v1/models/..%5C..%5Cv1", "backslash"),
        ("https://api.openai.com/v1/models/a%00b", "control"),
        ("https://api.openai.com/v1/models/..;/..;/v1/files", "';'"),
        ("https://api.openai.com/../v1/models", "above the root"),
        ("https://api.openai.com/v1/models/%zz", "percent escape"),
    ] {
        let out = get(&sc, &d, url, &[]);
        assert_eq!(out.status, 400, "{url}: {out:?}");
        assert_eq!(out.json()["reason"], "MalformedRequest", "{url}: {out:?}");
        let detail = out.json()["detail"].as_str().unwrap_or("").to_owned();
        assert!(detail.contains(needle), "{url}: {detail}");
    }
    // Plain-HTTP absolute-form through the proxy takes the same check.
    let out = get(&sc, &d, "http://api.acme-vendor.com/send%2f..%2fadmin", &[]);
    assert_eq!(out.status, 400, "{out:?}");
    assert_eq!(out.json()["reason"], "MalformedRequest");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    audited(&d, "encoded slash audited", |e| {
        e["decision"]["reason"] == "MalformedRequest"
            && e["decision"]["detail"]
                .as_str()
                .is_some_and(|s| s.contains("%2F"))
            && e["connector"]["credential_injected"] == false
    });
    assert_eventually(
        Duration::from_secs(5),
        "plain-HTTP malformed audited",
        || {
            d.audit().iter().any(|e| {
                e["decision"]["reason"] == "MalformedRequest"
                    && e["envelope"]["intent"]["method"] == "GET"
                    && e["decision"]["detail"]
                        .as_str()
                        .is_some_and(|s| s.contains("/send%2f"))
            })
        },
    );
}
