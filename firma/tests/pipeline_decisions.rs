//! The decision pipeline with real parts: an Ed25519 Authority key, PASETO seeds and header
//! tokens, seed 000's `genai-app.cedar`, the shipped `mapping-rules.toml`. One test per
//! outcome the seeds and docs/architecture.md (Decisions) name.

use firma_common::capability::now_unix;
use firma_sidecar::pipeline::path::NormalPath;
use firma_sidecar::pipeline::{DenyReason, Outcome, Pipeline};
use firma_testing::pipeline::*;
use std::time::Duration;

#[tokio::test]
async fn seeded_capability_allows_openai_chat_and_names_the_policy() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let d = p
        .decide(&req("POST", "api.openai.com", "/v1/chat/completions", &[]))
        .await;
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    assert_eq!(d.action_class.as_deref(), Some(CHAT));
    assert_eq!(d.matched_policies, vec!["genai-app:0".to_string()]);
    let cap = d.capability.expect("capability summary");
    assert_eq!(
        (
            cap.token_id.as_str(),
            cap.agent_id.as_str(),
            cap.session_id.as_str()
        ),
        ("t-1", "tenant-acme", "s-1")
    );
    let stages: Vec<&str> = d.timings_us.iter().map(|(k, _)| *k).collect();
    assert!(
        stages.contains(&"stage1_us") && stages.contains(&"stage2_us"),
        "{stages:?}"
    );
}

#[tokio::test]
async fn exfiltration_hosts_hit_the_forbid_and_unpermitted_hosts_default_deny() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    for host in ["paste.rs", "transfer.sh", "0x0.st"] {
        let d = p.decide(&req("POST", host, "/", &[])).await;
        assert_eq!(d.reason, Some(DenyReason::PolicyDenied), "{host}: {d:?}");
        assert_eq!(
            d.matched_policies,
            vec!["genai-app:2".to_string()],
            "{host}"
        );
        assert_eq!(d.action_class.as_deref(), Some(SEND));
    }
    // Anthropic is mapped to chat, but genai-app.cedar only permits chat to OpenAI.
    let d = p
        .decide(&req("POST", "api.anthropic.com", "/v1/messages", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::PolicyDenied), "{d:?}");
    assert!(d.matched_policies.is_empty());
    let d = p
        .decide(&req("POST", "api.acme-vendor.com", "/v2/tickets", &[]))
        .await;
    assert!(d.is_allow(), "{d:?}");
}

#[tokio::test]
async fn unmapped_requests_deny_when_protected_and_pass_through_otherwise() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let p = env
        .pipeline(std::slice::from_ref(&seed), &Opts::default())
        .await;
    let d = p.decide(&req("GET", "evil.example", "/x", &[])).await;
    assert_eq!(d.reason, Some(DenyReason::UnclassifiedIntent), "{d:?}");
    assert!(d.action_class.is_none());
    // Mapped host, unmapped path+method.
    let d = p
        .decide(&req("DELETE", "api.openai.com", "/v1/files", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::UnclassifiedIntent), "{d:?}");

    let open = Opts {
        default_protected: false,
        ..Opts::default()
    };
    let p = env.pipeline(&[seed], &open).await;
    let d = p.decide(&req("GET", "evil.example", "/x", &[])).await;
    assert!(d.is_allow() && d.passthrough, "{d:?}");
    assert!(d.capability.is_none());
}

#[tokio::test]
async fn capability_not_found_and_scope_mismatch() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "api.openai.com"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let d = p
        .decide(&req("POST", "api.acme-vendor.com", "/send", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityNotFound), "{d:?}");
    let d = p
        .decide(&req("POST", "api.openai.com", "/v1/chat/completions", &[]))
        .await;
    assert!(d.is_allow(), "{d:?}");

    let seed = env.seed(&env.claims(
        "t-2",
        "tenant-acme",
        "s-2",
        &[CHAT, SEND],
        "api.openai.com*",
    ));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let d = p
        .decide(&req("POST", "api.acme-vendor.com", "/send", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityScopeMismatch), "{d:?}");
    assert!(
        d.detail.contains("api.acme-vendor.com/send"),
        "{}",
        d.detail
    );
}

#[tokio::test]
async fn header_tokens_invalid_expired_and_session_reuse() {
    let env = Env::new();
    let p = env.pipeline(&[], &Opts::default()).await;
    let chat = req("POST", "api.openai.com", "/v1/chat/completions", &[]);
    assert_eq!(
        p.decide(&chat).await.reason,
        Some(DenyReason::CapabilityNotFound)
    );

    let tok = env.token(&env.claims("h-1", "tenant-globex", "web-42", &[CHAT], "*"));
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-capability", &tok)],
        ))
        .await;
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(d.capability.map(|c| c.session_id), Some("web-42".into()));
    // The session is now known by name.
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-session", "web-42")],
        ))
        .await;
    assert!(d.is_allow(), "{d:?}");
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-session", "web-43")],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityNotFound));
    // ...but only by the connection that presented the token: a session id is not a bearer.
    let mut elsewhere = conn(None);
    elsewhere.conn_id = 8;
    let d = p
        .decide(&req_from(
            elsewhere,
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-session", "web-42")],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityNotFound), "{d:?}");

    let other = firma_common::keys::SigningKey::from_bytes(&[7u8; 32]);
    let forged = env
        .claims("h-2", "tenant-globex", "web-42", &[CHAT], "*")
        .sign(&other)
        .expect("sign");
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-capability", &forged)],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityInvalid), "{d:?}");

    let mut old = env.claims("h-3", "tenant-globex", "web-44", &[CHAT], "*");
    old.exp = now_unix() - 60;
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-capability", &env.token(&old))],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityExpired), "{d:?}");
}

#[tokio::test]
async fn workload_binding_selects_the_agent_and_rejects_foreign_tokens() {
    let env = Env::new();
    let a = env.seed(&env.claims("t-a", "agent-a", "s-a", &[CHAT], "*"));
    let b = env.seed(&env.claims("t-b", "agent-b", "s-b", &[CHAT], "*"));
    let p = env.pipeline(&[a, b], &Opts::default()).await;
    let bound = || conn(Some(workload("agent-a", None)));
    let d = p
        .decide(&req_from(
            bound(),
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[],
        ))
        .await;
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(d.capability.map(|c| c.token_id), Some("t-a".into()));
    let tok = env.token(&env.claims("t-c", "agent-b", "s-c", &[CHAT], "*"));
    let d = p
        .decide(&req_from(
            bound(),
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-capability", &tok)],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::WorkloadMismatch), "{d:?}");
    let d = p
        .decide(&req_from(
            bound(),
            "POST",
            "api.openai.com",
            "/v1/chat/completions",
            &[("x-firma-session", "s-b")],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::WorkloadMismatch), "{d:?}");
    // Two seeded sessions and no identity: nothing to pick.
    let d = p
        .decide(&req("POST", "api.openai.com", "/v1/chat/completions", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityNotFound), "{d:?}");
}

#[tokio::test]
async fn the_101st_vendor_call_in_a_session_is_denied() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let call = req("POST", "api.acme-vendor.com", "/v1/send", &[]);
    for i in 1..=100 {
        let d = p.decide(&call).await;
        assert!(d.is_allow(), "call {i}: {d:?}");
    }
    assert_eq!(p.action_count("s-1", SEND), 100);
    let d = p.decide(&call).await;
    assert_eq!(d.reason, Some(DenyReason::PolicyDenied), "{d:?}");
    assert!(d.detail.contains("action_count = 101"), "{}", d.detail);
    // Denied calls do not consume budget, and another session has its own.
    assert_eq!(p.action_count("s-1", SEND), 100);
    let tok = env.token(&env.claims("t-2", "tenant-acme", "s-2", &[SEND], "*"));
    let d = p
        .decide(&req(
            "POST",
            "api.acme-vendor.com",
            "/v1/send",
            &[("x-firma-capability", &tok)],
        ))
        .await;
    assert!(d.is_allow(), "{d:?}");
}

#[tokio::test]
async fn enforcement_budget_exceeded_denies() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let opts = Opts {
        timeout_ms: 0,
        ..Opts::default()
    };
    let p = env.pipeline(&[seed], &opts).await;
    let d = p
        .decide(&req("POST", "api.openai.com", "/v1/chat/completions", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::EnforcementTimeout), "{d:?}");
}

#[tokio::test]
async fn local_bundle_that_stops_loading_goes_stale_then_recovers() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let opts = Opts {
        bundle_ttl: 2,
        ..Opts::default()
    };
    let p = env.pipeline(&[seed], &opts).await;
    let chat = req("POST", "api.openai.com", "/v1/chat/completions", &[]);
    assert!(p.decide(&chat).await.is_allow());
    let broken = env.policy_dir.join("broken.cedar");
    std::fs::write(
        &broken,
        "permit (principal, action, resource) when { nope };",
    )
    .expect("write");
    let stale = eventually_async(Duration::from_secs(10), async || {
        let d = p.decide(&chat).await;
        (d.reason == Some(DenyReason::PolicyBundleStale)).then_some(d)
    })
    .await
    .expect("stale within 10 s");
    assert!(
        stale.detail.contains("bundle_ttl_seconds = 2"),
        "{}",
        stale.detail
    );
    std::fs::remove_file(&broken).expect("rm");
    eventually_async(Duration::from_secs(10), async || {
        p.decide(&chat).await.is_allow().then_some(())
    })
    .await
    .expect("recovers once the directory loads again");
}

#[tokio::test]
async fn no_authority_means_not_ready() {
    let env = Env::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let opts = Opts {
        authority_url: Some(format!("http://127.0.0.1:{port}")),
        ..Opts::default()
    };
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*"));
    let p = env.pipeline(&[seed], &opts).await;
    let d = p
        .decide(&req("POST", "api.openai.com", "/v1/chat/completions", &[]))
        .await;
    assert_eq!(d.reason, Some(DenyReason::PolicyBundleNotReady), "{d:?}");
}

#[tokio::test]
async fn destinations_need_a_whole_host_rule() {
    let env = Env::new();
    let seed = env.seed(&env.claims("t-1", "tenant-acme", "s-1", &[CHAT, SEND], "*"));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    // acme-vendor has a path = "*" rule and the vendor permit.
    let d = p
        .decide_destination(&dest(Some("api.acme-vendor.com"), None))
        .await;
    assert!(d.is_allow(), "{d:?}");
    // paste.rs is classified but forbidden.
    let d = p.decide_destination(&dest(Some("paste.rs"), None)).await;
    assert_eq!(d.reason, Some(DenyReason::PolicyDenied), "{d:?}");
    // OpenAI is only mapped per path: a blind tunnel cannot be classified.
    let d = p
        .decide_destination(&dest(Some("api.openai.com"), None))
        .await;
    assert_eq!(d.reason, Some(DenyReason::UnclassifiedIntent), "{d:?}");
    let d = p
        .decide_destination(&dest(None, Some("127.0.0.9:5432")))
        .await;
    assert_eq!(d.reason, Some(DenyReason::UnclassifiedIntent), "{d:?}");
    assert!(d.detail.contains("127.0.0.9:5432"), "{}", d.detail);
}

#[tokio::test]
async fn bad_rules_and_seeds_stop_startup_with_actionable_errors() {
    let env = Env::new();
    let rules = env.path("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nhost = \"a.com\"\naction_class = \"model.inference.chat\"\n\
         [[rule]]\nhost = \"b.com\"\naction_class = \"model.inference.teleport\"\n",
    )
    .expect("write");
    let opts = Opts {
        rules: Some(rules.clone()),
        ..Opts::default()
    };
    let e = Pipeline::start(&env.config(&[], &opts))
        .await
        .err()
        .expect("fails")
        .to_string();
    assert!(
        e.contains("rules.toml: rule[1]") && e.contains("model.inference.teleport"),
        "{e}"
    );

    std::fs::write(
        &rules,
        "[[rule]]\nhost = \"a.com\"\naction_class = \"data.read\"\n\
         [[rule]]\nhost = \"a.com\"\npath = \"*\"\naction_class = \"data.write\"\n",
    )
    .expect("write");
    let e = Pipeline::start(&env.config(&[], &opts))
        .await
        .err()
        .expect("fails")
        .to_string();
    assert!(e.contains("rules.toml: rule[1]: duplicates"), "{e}");

    let c = env.claims("t-1", "tenant-acme", "s-1", &[CHAT], "*");
    let seed = env.seed(&c);
    let text = std::fs::read_to_string(&seed).expect("read");
    std::fs::write(
        &seed,
        text.replace(
            "resource_scope = \"*\"",
            "resource_scope = \"api.openai.com*\"",
        ),
    )
    .expect("write");
    let e = Pipeline::start(&env.config(&[seed], &Opts::default()))
        .await
        .err()
        .expect("fails")
        .to_string();
    assert!(
        e.contains("raw_token claims do not match seed claims"),
        "{e}"
    );

    let other = firma_common::keys::SigningKey::from_bytes(&[9u8; 32]);
    let seed = env.path("other.toml");
    let s = firma_common::capability::CapabilitySeed::new(c.sign(&other).expect("sign"), &c);
    std::fs::write(&seed, toml::to_string(&s).expect("toml")).expect("write");
    let e = Pipeline::start(&env.config(&[seed], &Opts::default()))
        .await
        .err()
        .expect("fails")
        .to_string();
    assert!(e.contains("raw_token failed PASETO verification"), "{e}");
}

#[tokio::test]
async fn paths_are_normalised_before_classification_and_scope() {
    let env = Env::new();
    let seed = env.seed(&env.claims(
        "t-1",
        "tenant-acme",
        "s-1",
        &[CHAT],
        "api.openai.com/v1/models",
    ));
    let p = env.pipeline(&[seed], &Opts::default()).await;
    let d = p
        .decide(&req(
            "GET",
            "api.openai.com",
            "/v1/models/x/%2E%2E/./gpt-4o",
            &[],
        ))
        .await;
    assert!(d.is_allow(), "{d:?}");
    // `/v1/models/*` would match the raw path; the normalised one has no rule.
    let d = p
        .decide(&req(
            "GET",
            "api.openai.com",
            "/v1/models/../../v1/organization/api_keys",
            &[],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::UnclassifiedIntent), "{d:?}");
    // Mapped, but outside the capability's scope once the dots are resolved.
    let d = p
        .decide(&req(
            "POST",
            "api.openai.com",
            "/v1/models/./../chat/completions",
            &[],
        ))
        .await;
    assert_eq!(d.reason, Some(DenyReason::CapabilityScopeMismatch), "{d:?}");
    // Ambiguous paths never reach the pipeline: no `NormalPath` can hold them (the callers
    // deny them `MalformedRequest`, see security_paths.rs).
    for bad in [
        "/v1/models%2F..%2Fx",
        "/v1/models/..%5Cx",
        "/v1/%00",
        "/../v1/models",
    ] {
        assert!(NormalPath::new(bad).is_err(), "{bad}");
    }
}
