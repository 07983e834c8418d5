//! A real `firma authority` process streaming bundles and revocations into a `Pipeline`:
//! revocation reaches the next call within 1 s, a policy edit propagates, stopping the
//! Authority past `bundle_ttl_seconds` makes every call `PolicyBundleStale`, and a restarted
//! Authority brings the sidecar back.

use firma_sidecar::pipeline::{DenyReason, Pipeline};
use firma_testing::authority::Server;
use firma_testing::pipeline::*;
use firma_testing::{free_port, text};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `firma authority -c CFG ARGS…`, which must succeed; returns stdout.
fn firma(cfg: &Path, args: &[&str]) -> String {
    let cfg = cfg.to_str().expect("utf8");
    let mut all = vec!["authority", "-c", cfg];
    all.extend_from_slice(args);
    let out = firma_testing::firma(&all);
    assert!(
        out.status.success(),
        "firma authority {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn authority_config(env: &Env, port: u16) -> PathBuf {
    let issuance = env.path("issuance");
    std::fs::create_dir_all(&issuance).expect("mkdir");
    std::fs::copy(
        firma_testing::repo_root().join("policies/issuance/dev/issuance.cedar"),
        issuance.join("issuance.cedar"),
    )
    .expect("copy issuance");
    let revocations = env.path("revocations.txt");
    std::fs::write(&revocations, "").expect("touch");
    let cfg = env.path("authority.toml");
    let s = |p: &Path| p.display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "[authority]\nlisten_addr = \"127.0.0.1:{port}\"\npolicy_dir = {:?}\n\
             issuance_policy_dir = {:?}\nrevocation_file = {:?}\nkey_file = {:?}\n\
             max_ttl_seconds = 3600\nbundle_ttl_seconds = 1\nlog_level = \"info\"\n",
            s(&env.policy_dir),
            s(&issuance),
            s(&revocations),
            s(&env.path("authority.key")),
        ),
    )
    .expect("write authority config");
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_streams_drive_revocation_staleness_and_recovery() {
    let env = Env::new();
    let port = free_port();
    let cfg = authority_config(&env, port);
    let mut authority = Server::start(&cfg);

    // A seed minted by the real CLI.
    let seed = env.path("seed.toml");
    firma(
        &cfg,
        &[
            "issue",
            "--agent-id",
            "tenant-acme",
            "--session-id",
            "s-1",
            "--action",
            CHAT,
            "--action",
            SEND,
            "--resource-scope",
            "*",
            "--ttl-seconds",
            "600",
            "--output",
            seed.to_str().expect("utf8"),
        ],
    );
    let seeded: toml::Value =
        toml::from_str(&std::fs::read_to_string(&seed).expect("seed")).expect("seed toml");
    let token_id = seeded["token_id"].as_str().expect("token_id").to_owned();

    let cache = env.path("cache");
    let opts = Opts {
        bundle_ttl: 3,
        authority_url: Some(format!("http://127.0.0.1:{port}")),
        cache_dir: Some(cache.clone()),
        ..Opts::default()
    };
    let p: Pipeline = env.pipeline(&[seed], &opts).await;
    let chat = req("POST", "api.openai.com", "/v1/chat/completions", &[]);
    let d = p.decide(&chat).await;
    assert!(d.is_allow(), "{d:?}");
    eventually_async(Duration::from_secs(2), async || {
        cache.join("genai-app.cedar").is_file().then_some(())
    })
    .await
    .expect("bundle cached in [sidecar.policy] dir");

    // Revocation: the next call after `revocations add` returns is denied within 1 s.
    firma(&cfg, &["revocations", "add", &token_id]);
    let t = Instant::now();
    let revoked = eventually_async(Duration::from_secs(5), async || {
        (p.decide(&chat).await.reason == Some(DenyReason::CapabilityRevoked)).then(|| t.elapsed())
    })
    .await
    .expect("revocation reached the sidecar");
    eprintln!("revocation reached the pipeline {revoked:?} after `revocations add` returned");
    assert!(
        revoked < Duration::from_secs(1),
        "revocation took {revoked:?}"
    );

    // A fresh header token keeps working; a policy edit on the authority propagates.
    let tok = env.token(&env.claims("t-2", "tenant-acme", "s-2", &[CHAT], "*"));
    let chat2 = req(
        "POST",
        "api.openai.com",
        "/v1/chat/completions",
        &[("x-firma-capability", &tok)],
    );
    assert!(p.decide(&chat2).await.is_allow());
    let stop_chat = env.policy_dir.join("stop-chat.cedar");
    std::fs::write(
        &stop_chat,
        "@id(\"stop-chat\")\nforbid (principal, action == Firma::Action::\"model.inference.chat\", resource);\n",
    )
    .expect("write policy");
    let d = eventually_async(Duration::from_secs(5), async || {
        let d = p.decide(&chat2).await;
        (d.reason == Some(DenyReason::PolicyDenied)).then_some(d)
    })
    .await
    .expect("policy edit propagated");
    assert_eq!(d.matched_policies, vec!["stop-chat".to_string()]);
    std::fs::remove_file(&stop_chat).expect("rm");
    eventually_async(Duration::from_secs(5), async || {
        p.decide(&chat2).await.is_allow().then_some(())
    })
    .await
    .expect("policy removal propagated");

    // Authority gone: allowed until bundle_ttl_seconds passes without a refresh, then stale.
    authority.kill();
    let stopped = Instant::now();
    let stale_after = eventually_async(Duration::from_secs(10), async || {
        (p.decide(&chat2).await.reason == Some(DenyReason::PolicyBundleStale))
            .then(|| stopped.elapsed())
    })
    .await
    .expect("stale after the authority stopped");
    eprintln!("PolicyBundleStale {stale_after:?} after the authority stopped (sidecar ttl 3 s)");
    assert!(
        stale_after >= Duration::from_secs(1),
        "stale too early: {stale_after:?}"
    );

    // Back up on the same address: the stream reconnects and decisions recover.
    let _authority = Server::start(&cfg);
    eventually_async(Duration::from_secs(20), async || {
        p.decide(&chat2).await.is_allow().then_some(())
    })
    .await
    .expect("recovered after the authority restarted");
    // The revocation replayed on reconnect still holds.
    assert_eq!(
        p.decide(&chat).await.reason,
        Some(DenyReason::CapabilityRevoked)
    );
}
