//! The agent's own credentials on credential hosts, placeholders elsewhere, and the provider
//! error shapes, with the real `firma sidecar` (http_proxy mode, MITM), curl and the local
//! HTTPS upstream. No root needed (the SDK runs under `firma run` are `real_agents.rs`).
//!
//! - api.openai.com (defaults): the agent's `Authorization`, `x-api-key`, `api-key`,
//!   `x-goog-api-key` and `?key=` never reach the upstream, Firma's credential does; a
//!   placeholder in a header Firma does not replace there is `CredentialLeak`.
//! - api.acme-vendor.com with `strip_headers = []`, `strip_query_params = []`: the agent's
//!   `Authorization` and `?key=` pass, the credential's own header is still replaced; a
//!   placeholder in the kept `Authorization`, or percent-encoded in the path, is
//!   `CredentialLeak`.
//! - Denials on api.anthropic.com and on a host given `error_format = "openai"` carry the
//!   provider's shape and `x-should-retry: false`; elsewhere the plain Firma body.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;

const OPENAI_SECRET: &str = "sk-real-openai-c0ffee";
const VENDOR_SECRET: &str = "vendor-real-5ec7e7";
const PH: &str = "sk-firma-placeholder-0123456789abcdef0123456789abcdef";
const HOSTS: [&str; 4] = [
    "api.openai.com",
    "api.anthropic.com",
    "api.acme-vendor.com",
    "llm.internal",
];

fn setup() -> (Upstream, Deployment, Sidecar, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &HOSTS);
    let hosts: Vec<String> = HOSTS.map(String::from).to_vec();
    let s = Settings {
        intercept_hosts: hosts.clone(),
        strict_hosts: Vec::new(),
        upstream_hosts: hosts,
        runtime_policy: firma_testing::authority::PERMIT_ALL.into(),
        host_extra: vec![("llm.internal".into(), "error_format = \"openai\"".into())],
        extra: "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_T_OPENAI\"\n\n\
                [[sidecar.credentials]]\nhost = \"api.acme-vendor.com\"\nmode = \"basic\"\nheader = \"x-api-key\"\nvalue_from_env = \"FIRMA_T_VENDOR\"\nstrip_headers = []\nstrip_query_params = []\n"
            .into(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    let sc = d.start(&[
        ("FIRMA_T_OPENAI", OPENAI_SECRET),
        ("FIRMA_T_VENDOR", VENDOR_SECRET),
    ]);
    (up, d, sc, tmp)
}

fn get(sc: &Sidecar, d: &Deployment, url: &str, headers: &[&str]) -> CurlOut {
    let args: Vec<&str> = headers.iter().flat_map(|h| ["-H", *h]).collect();
    curl(&sc.proxy_url(), &d.ca_cert(), url, &args)
}

/// The one decision event for `host` whose path is `path`.
fn decision(d: &Deployment, host: &str, path: &str) -> serde_json::Value {
    assert_eventually(
        std::time::Duration::from_secs(5),
        "decision audited",
        || {
            d.audit_for(host)
                .into_iter()
                .find(|e| e["envelope"]["intent"]["resource"]["path"] == path)
        },
    )
}

#[test]
fn agent_credentials_are_stripped_and_placeholders_never_leave() {
    let (up, d, sc, _tmp) = setup();
    let bearer_ph = format!("Authorization: Bearer {PH}");
    let api_key_ph = format!("api-key: {PH}");

    // Defaults on api.openai.com: every credential header and ?key= of the agent's removed.
    let out = get(
        &sc,
        &d,
        &format!("https://api.openai.com/v1/models?key={PH}&alt=json"),
        &[
            &bearer_ph,
            "x-api-key: agent-own-key",
            &api_key_ph,
            "x-goog-api-key: agent-own-key",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["authorization"], format!("Bearer {OPENAI_SECRET}"));
    for gone in ["x-api-key", "api-key", "x-goog-api-key"] {
        assert!(!h.contains_key(gone), "{gone} left: {h:?}");
    }
    assert!(up.raw_contains("GET /v1/models?alt=json\r\n"));
    assert!(!up.raw_contains("firma-placeholder") && !up.raw_contains("agent-own-key"));
    assert_eq!(
        decision(&d, "api.openai.com", "/v1/models")["decision"]["outcome"],
        "ALLOW"
    );

    // A placeholder in a header Firma does not replace there: it would leave.
    let out = get(
        &sc,
        &d,
        "https://api.openai.com/v1/models/gpt-4o",
        &[&format!("x-custom-auth: {PH}")],
    );
    assert_eq!(out.status, 403, "{out:?}");
    let body = out.json();
    assert_eq!(body["reason"], "CredentialLeak");
    assert_eq!(
        body["error"]["code"], "CredentialLeak",
        "openai shape: {body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|t| t.contains("header `x-custom-auth`") && t.contains("strip_headers")),
        "{body}"
    );
    let e = decision(&d, "api.openai.com", "/v1/models/gpt-4o");
    assert_eq!(e["decision"]["reason"], "CredentialLeak");
    // The policy allowed it (PERMIT_ALL): the leak overrides, keeping the class.
    assert_eq!(
        e["envelope"]["intent"]["action_class"],
        "model.inference.chat"
    );

    // strip_headers = [] on the vendor: the agent's Authorization and ?key= pass; the
    // credential's own header is still Firma's.
    let out = get(
        &sc,
        &d,
        "https://api.acme-vendor.com/v2/items?key=user-page-key",
        &[
            "Authorization: Bearer user-session-token",
            "x-api-key: agent-own-key",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}");
    let seen = up.seen();
    let h = &seen[1].headers;
    assert_eq!(h["authorization"], "Bearer user-session-token");
    assert_eq!(h["x-api-key"], VENDOR_SECRET);
    assert!(up.raw_contains("GET /v2/items?key=user-page-key\r\n"));

    // ... so a placeholder there is a leak, and so is one escaped into the path.
    let out = get(
        &sc,
        &d,
        "https://api.acme-vendor.com/v2/items",
        &[&bearer_ph],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CredentialLeak");
    assert!(
        out.json().get("error").is_none(),
        "plain Firma body elsewhere"
    );
    let escaped = PH.replace('-', "%2D");
    let out = get(
        &sc,
        &d,
        &format!("https://api.acme-vendor.com/upload/{escaped}"),
        &[],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert!(out.json()["detail"].as_str().unwrap().contains("URL path"));
    // A host with no credential at all.
    let out = get(
        &sc,
        &d,
        &format!("https://llm.internal/v1/chat?token={PH}"),
        &[],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CredentialLeak");
    assert!(
        out.json()["detail"]
            .as_str()
            .unwrap()
            .contains("which has no credential")
    );

    assert_eq!(up.count(), 2, "a leaking request reached the upstream");
    // Each leak is one audited denial (denials are written as the answer goes out: wait).
    assert_eventually(
        std::time::Duration::from_secs(5),
        "four CredentialLeak decisions audited",
        || {
            d.audit()
                .into_iter()
                .filter(|e| e["event"] == "decision" && e["decision"]["reason"] == "CredentialLeak")
                .count()
                == 4
        },
    );
}

#[test]
fn denials_carry_the_provider_shape_on_llm_hosts() {
    let (up, d, sc, tmp) = setup();
    let headers = tmp.path().join("headers");
    let with_headers = |url: &str| {
        curl(
            &sc.proxy_url(),
            &d.ca_cert(),
            url,
            &["-D", headers.to_str().unwrap()],
        )
    };
    // No rule for this path: UnclassifiedIntent, in Anthropic's shape.
    let out = with_headers("https://api.anthropic.com/v1/complete");
    assert_eq!(out.status, 403, "{out:?}");
    let b = out.json();
    assert_eq!(b["type"], "error", "{b}");
    assert_eq!(b["error"]["type"], "permission_error", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Firma denied this request (UnclassifiedIntent): "),
        "{b}"
    );
    assert_eq!(
        (&b["denied"], &b["reason"]),
        (&true.into(), &"UnclassifiedIntent".into())
    );
    let h = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(h.contains("x-should-retry: false"), "{h}");
    // A self-hosted OpenAI-compatible endpoint, by configuration.
    let out = with_headers("https://llm.internal/v1/chat/completions");
    assert_eq!(out.status, 403, "{out:?}");
    let b = out.json();
    assert_eq!(b["error"]["code"], "UnclassifiedIntent", "{b}");
    assert_eq!(b["error"]["type"], "permission_error", "{b}");
    assert!(b["error"]["param"].is_null());
    // Malformed on an OpenAI host: 400 invalid_request_error.
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/chat/completions",
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            "not json",
        ],
    );
    assert_eq!(out.status, 400, "{out:?}");
    assert_eq!(out.json()["error"]["type"], "invalid_request_error");
    assert_eq!(out.json()["reason"], "MalformedRequest");
    assert_eq!(up.count(), 0);
}
