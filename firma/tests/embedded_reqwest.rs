//! The embedded layer in a reqwest application (reqwest-middleware), against a local TLS
//! upstream, with a real `firma authority` streaming the bundle and revocations: an allowed call
//! reaches the upstream carrying Firma's credential (never the app's own `authorization` nor
//! the capability), a denied call fails with `firma_embed::Error::Denied` naming the reason and
//! never reaches the upstream, a revocation issued through the CLI denies the next call, and
//! `firma audit verify` passes on what the layer wrote.

#[path = "embedded/world.rs"]
mod world;

use firma_embed::{DenyReason, Firma, Identity};
use firma_testing::upstream::Upstream;
use std::time::Duration;
use world::{SECRET, World, decisions, issue};

/// The layer's typed error behind a reqwest-middleware error.
fn firma_error(e: &reqwest_middleware::Error) -> Option<&firma_embed::Error> {
    match e {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<firma_embed::Error>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

#[test]
fn reqwest_middleware_allows_injects_denies_and_follows_revocation() {
    World::set_credential_env();
    let world = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start(dir.path(), &["api.embed.test"]);
    let (token, token_id) = issue(
        &world.authority,
        "app-agent",
        "s-reqwest",
        &["communication.external.send"],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let firma = Firma::from_file(&world.config, Identity::Capability(token))
            .await
            .expect("embedded pipeline starts");
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(&upstream.ca_path).expect("upstream CA"))
                .expect("CA pem");
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve("api.embed.test", upstream.addr)
            .build()
            .expect("reqwest client");
        let client = reqwest_middleware::ClientBuilder::new(client)
            .with(firma.middleware())
            .build();
        let base = format!("https://api.embed.test:{}", upstream.addr.port());

        // Allowed: the upstream sees Firma's credential, not the app's own key or the token.
        let resp = client
            .get(format!("{base}/v1/items"))
            .header("authorization", "Bearer app-own-key")
            .send()
            .await
            .expect("allowed call");
        assert_eq!(resp.status(), 200);
        let seen = upstream.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            seen[0].headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert!(
            !seen[0].headers.keys().any(|k| k.starts_with("x-firma-")),
            "{:?}",
            seen[0].headers
        );

        // Denied by policy: a typed error naming the reason; nothing reaches the upstream.
        let e = client
            .get(format!("{base}/v1/admin/keys"))
            .send()
            .await
            .expect_err("denied call");
        let fe = firma_error(&e).unwrap_or_else(|| panic!("not a Firma error: {e:?}"));
        assert_eq!(fe.deny_reason(), Some(DenyReason::PolicyDenied), "{fe}");
        assert!(fe.to_string().contains("PolicyDenied"), "{fe}");
        // Unmapped: denied too (default_protected).
        let e = client
            .get(format!("{base}/other"))
            .send()
            .await
            .expect_err("unmapped call");
        assert_eq!(
            firma_error(&e).and_then(|f| f.deny_reason()),
            Some(DenyReason::UnclassifiedIntent)
        );
        assert_eq!(upstream.count(), 1, "a denied call reached the upstream");

        // Revocation through the real CLI: the next call after it arrives is denied.
        world.revoke(&token_id);
        let before =
            firma_testing::pipeline::eventually_async(Duration::from_secs(10), async || {
                let before = upstream.count();
                let r = client.get(format!("{base}/v1/items")).send().await;
                match r {
                    Err(e)
                        if firma_error(&e).and_then(|f| f.deny_reason())
                            == Some(DenyReason::CapabilityRevoked) =>
                    {
                        Some(before)
                    }
                    _ => None,
                }
            })
            .await
            .expect("revocation reached the embedded pipeline");
        assert_eq!(
            upstream.count(),
            before,
            "the revoked call reached the upstream"
        );
        // A replay of the revoked token stays denied.
        let e = client
            .get(format!("{base}/v1/items"))
            .send()
            .await
            .expect_err("replayed revoked token");
        assert_eq!(
            firma_error(&e).and_then(|f| f.deny_reason()),
            Some(DenyReason::CapabilityRevoked)
        );
        assert_eq!(upstream.count(), before);
        firma.flush().await;
    });

    // The audit: ALLOW with the credential and its outcome, then the denials, all verified.
    let events = world.events();
    let d = decisions(&events, "api.embed.test");
    assert_eq!(d.first().map(|x| x.0.as_str()), Some("ALLOW"), "{d:?}");
    assert!(
        d.iter().any(|x| x.1.as_deref() == Some("PolicyDenied")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.1.as_deref() == Some("CapabilityRevoked")),
        "{d:?}"
    );
    let allow = events
        .iter()
        .find(|e| e["event"] == "decision" && e["decision"]["outcome"] == "ALLOW")
        .expect("ALLOW event");
    assert_eq!(allow["conn"]["intercept"], "embedded", "{allow}");
    assert_eq!(allow["connector"]["credential_injected"], true, "{allow}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "outcome" && e["connector"]["upstream_status"] == 200),
        "no outcome event with the upstream's 200"
    );
    world.verify();
}
