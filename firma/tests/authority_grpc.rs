//! The running Authority over gRPC with the in-tree tonic client: issuance, the bundle stream
//! (push on connect, on edit within 1 s, periodic re-send, broken edits ignored), the
//! revocation stream (replay, then CLI additions within 1 s) and graceful shutdown.

use firma_common::capability::CapabilityClaims;
use firma_common::policy::PolicyBundle;
use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_client::AuthorityClient;
use firma_testing::authority::*;
use firma_testing::*;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const GENAI_ISSUANCE: &str = "issuance/genai-app/issuance.cedar";
const GENAI_RUNTIME: &str = "runtime/genai-app/genai-app.cedar";

async fn client(server: &Server) -> AuthorityClient<Channel> {
    AuthorityClient::connect(server.url())
        .await
        .expect("connect to authority")
}

fn request(agent: &str, actions: &[&str], ttl: i64) -> pb::IssuanceRequest {
    pb::IssuanceRequest {
        agent_id: agent.into(),
        session_id: "user-session-1".into(),
        requested_actions: actions.iter().map(|s| s.to_string()).collect(),
        resource_scope: "*".into(),
        requested_ttl_seconds: ttl,
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

async fn next<T>(stream: &mut tonic::Streaming<T>, within: Duration) -> Option<T> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(m)) => m,
        Ok(Err(status)) => panic!("stream error: {status}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_capability_allowed_and_denied() {
    let d = Deployment::new(
        &shipped_policy(GENAI_ISSUANCE),
        &shipped_policy(GENAI_RUNTIME),
    );
    let server = d.start();
    let mut c = client(&server).await;

    let resp = c
        .issue_capability(request(
            "tenant-acme",
            &["model.inference.chat", "communication.external.send"],
            900,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::issuance_response::Result::Allowed(cap)) = resp.result else {
        panic!("expected allowed, got {resp:?}");
    };
    let claims = CapabilityClaims::verify(&cap.raw_token, &d.verifying_key()).unwrap();
    assert_eq!(claims.token_id, cap.token_id);
    assert_eq!(claims.agent_id, "tenant-acme");
    assert_eq!(claims.exp - claims.iat, 900);
    assert_eq!((cap.issued_at, cap.expiry), (claims.iat, claims.exp));
    assert_eq!(cap.context_hash, claims.context_hash);

    let resp = c
        .issue_capability(request("tenant-acme", &["payment.transfer"], 900))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::issuance_response::Result::Denied(denied)) = resp.result else {
        panic!("expected denied, got {resp:?}");
    };
    assert_eq!(denied.code, "IssuanceDenied");
    assert_eq!(denied.policies, ["issuance:1"]);
    assert!(denied.reason.contains("issuance:1"), "{}", denied.reason);

    // Unknown tenant: nothing permits.
    let resp = c
        .issue_capability(request("tenant-initech", &["model.inference.chat"], 60))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::issuance_response::Result::Denied(denied)) = resp.result else {
        panic!("expected denied");
    };
    assert!(denied.policies.is_empty());

    // Clamp over gRPC too.
    let resp = c
        .issue_capability(request("tenant-acme", &["model.inference.chat"], 86_400))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::issuance_response::Result::Allowed(cap)) = resp.result else {
        panic!("expected allowed");
    };
    assert_eq!(cap.expiry - cap.issued_at, 3600);

    for (req, needle) in [
        (request("tenant-acme", &[], 60), "empty"),
        (
            request("tenant-acme", &["payment.steal"], 60),
            "unknown action class",
        ),
        (
            request("tenant-acme", &["model.inference.chat"], 0),
            "positive",
        ),
        (
            request("tenant-acme", &["model.inference.chat"], -1),
            "positive",
        ),
        (request("", &["model.inference.chat"], 60), "agent_id: "),
        (
            pb::IssuanceRequest {
                session_id: String::new(),
                ..request("tenant-acme", &["model.inference.chat"], 60)
            },
            "session_id: ",
        ),
    ] {
        // Malformed requests are a status, not a policy answer.
        let status = c.issue_capability(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{req:?}");
        assert!(
            status.message().starts_with("InvalidRequest: "),
            "{}",
            status.message()
        );
        assert!(status.message().contains(needle), "{}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_stream_pushes_on_connect_on_edit_and_keeps_last_good() {
    let d = Deployment::new(PERMIT_ALL, &shipped_policy(GENAI_RUNTIME));
    let server = d.start();
    let mut c = client(&server).await;
    let mut stream = c
        .stream_policy_bundles(pb::BundleStreamRequest {
            sidecar_id: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let first = next(&mut stream, Duration::from_secs(2))
        .await
        .expect("bundle on connect");
    let on_disk = PolicyBundle::load_dir(&d.policy_dir).unwrap();
    assert_eq!(first.version, on_disk.version);
    let received = PolicyBundle::from_proto(first.clone()).expect("integrity");
    received.compile().expect("streamed bundle compiles");
    assert_eq!(received.files[0].name, "runtime.cedar");

    // A valid edit arrives within 1 s.
    let edited = format!(
        "{}\n@id(\"block-evil\")\nforbid (principal, action, resource) when {{ resource has \"host\" && resource.host == \"evil.example\" }};\n",
        shipped_policy(GENAI_RUNTIME)
    );
    let t0 = Instant::now();
    std::fs::write(d.policy_dir.join("runtime.cedar"), &edited).unwrap();
    let update = next(&mut stream, Duration::from_millis(1000))
        .await
        .expect("edited bundle within 1 s");
    let latency = t0.elapsed();
    println!("bundle edit -> stream: {latency:?}");
    assert_ne!(update.version, first.version);
    assert_eq!(
        update.version,
        PolicyBundle::load_dir(&d.policy_dir).unwrap().version
    );
    let compiled = PolicyBundle::from_proto(update.clone())
        .unwrap()
        .compile()
        .unwrap();
    assert!(compiled.policy_ids().iter().any(|id| id == "block-evil"));

    // A broken edit is not streamed; the authority logs why.
    std::fs::write(
        d.policy_dir.join("runtime.cedar"),
        "permit (principal, action, resource) when { resource.nope };",
    )
    .unwrap();
    assert!(
        next(&mut stream, Duration::from_millis(1500))
            .await
            .is_none(),
        "invalid bundle must not be pushed"
    );
    assert_eventually(Duration::from_secs(2), "log names the broken file", || {
        server.log_text().contains("runtime.cedar:1").then_some(())
    });
    // A new client still gets the last good version.
    let mut fresh = client(&server)
        .await
        .stream_policy_bundles(pb::BundleStreamRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got = next(&mut fresh, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.version, update.version);

    // Fixing it streams again; adding a second file counts too.
    std::fs::write(d.policy_dir.join("runtime.cedar"), PERMIT_ALL).unwrap();
    std::fs::write(
        d.policy_dir.join("zz-extra.cedar"),
        "forbid (principal, action == Firma::Action::\"payment.transfer\", resource);",
    )
    .unwrap();
    let fixed = assert_eventually_async(&mut stream, Duration::from_secs(2), |b| {
        b.policies.len() == 2
    })
    .await;
    assert_eq!(
        fixed.version,
        PolicyBundle::load_dir(&d.policy_dir).unwrap().version
    );
}

/// Reads messages until one satisfies `ok` or `within` passes.
async fn assert_eventually_async(
    stream: &mut tonic::Streaming<pb::PolicyBundle>,
    within: Duration,
    ok: impl Fn(&pb::PolicyBundle) -> bool,
) -> pb::PolicyBundle {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = next(stream, left).await.expect("bundle before deadline");
        if ok(&msg) {
            return msg;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_is_resent_every_bundle_ttl() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("bundle_ttl_seconds = 30", "bundle_ttl_seconds = 1");
    std::fs::write(&d.config, cfg).unwrap();
    let server = d.start();
    let mut stream = client(&server)
        .await
        .stream_policy_bundles(pb::BundleStreamRequest::default())
        .await
        .unwrap()
        .into_inner();
    let a = next(&mut stream, Duration::from_secs(2)).await.unwrap();
    let b = next(&mut stream, Duration::from_millis(1800))
        .await
        .expect("re-send within bundle_ttl");
    assert_eq!(a.version, b.version);
    assert!(b.sent_at >= a.sent_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_stream_replays_then_streams_cli_additions() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    std::fs::write(&d.revocations, "already-1\nalready-2 1700000000\n").unwrap();
    let server = d.start();
    let mut stream = client(&server)
        .await
        .stream_revocations(pb::RevocationStreamRequest {
            sidecar_id: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The replay keeps each line's time (seconds in the file -> ms on the wire; bare -> 0).
    for (want, at) in [("already-1", 0), ("already-2", 1_700_000_000_000)] {
        let r = next(&mut stream, Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            (r.token_id.as_str(), r.replay, r.revoked_at_unix_ms),
            (want, true, at)
        );
    }

    let id = "79dd9ffb-ebc8-4883-8f1e-72eb74a26e33";
    let t0 = Instant::now();
    let before_ms = unix_ms();
    let out = d.authority(&["revocations", "add", id]);
    let after_ms = unix_ms();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = next(&mut stream, Duration::from_millis(1000))
        .await
        .expect("revocation within 1 s");
    println!("revocations add -> stream: {:?}", t0.elapsed());
    assert_eq!((r.token_id.as_str(), r.replay), (id, false));
    assert!(
        (before_ms..=after_ms).contains(&r.revoked_at_unix_ms),
        "revoked_at_unix_ms {} not within the CLI run [{before_ms}, {after_ms}]",
        r.revoked_at_unix_ms
    );

    // Compaction rewrites the file (new inode); later additions still arrive, nothing repeats.
    let out = d.authority(&["revocations", "compact"]);
    assert!(out.status.success());
    let out = d.authority(&["revocations", "add", "after-compact"]);
    assert!(out.status.success());
    let r = next(&mut stream, Duration::from_millis(1000))
        .await
        .expect("post-compact revocation");
    assert_eq!(r.token_id, "after-compact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly_with_open_streams() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let mut server = d.start();
    let mut c = client(&server).await;
    let mut bundles = c
        .stream_policy_bundles(pb::BundleStreamRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut bundles, Duration::from_secs(2)).await.unwrap();
    let mut revs = c
        .stream_revocations(pb::RevocationStreamRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = tokio::task::spawn_blocking(move || {
        let s = server.terminate(Duration::from_secs(4));
        (s, server.log_text())
    })
    .await
    .unwrap();
    let (Some(status), log) = status else {
        panic!("authority did not exit within 4 s of SIGTERM");
    };
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("authority stopped"), "{log}");
    // Streams end (cleanly or with an error), they do not hang.
    let ended = tokio::time::timeout(Duration::from_secs(2), revs.message()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "stream still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_policy_edits_apply_without_restart() {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let server = d.start();
    let mut c = client(&server).await;
    let ask = || request("tenant-acme", &["payment.transfer"], 60);
    let resp = c.issue_capability(ask()).await.unwrap().into_inner();
    assert!(matches!(
        resp.result,
        Some(pb::issuance_response::Result::Allowed(_))
    ));
    std::fs::write(
        d.issuance_dir.join("issuance.cedar"),
        shipped_policy(GENAI_ISSUANCE),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let resp = c.issue_capability(ask()).await.unwrap().into_inner();
        if let Some(pb::issuance_response::Result::Denied(d)) = resp.result {
            assert_eq!(d.policies, ["issuance:1"]);
            break;
        }
        assert!(Instant::now() < deadline, "issuance edit not applied");
        // Poll interval of the wait for the edited policy to be applied, bounded by `deadline`.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
