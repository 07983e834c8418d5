//! Operations: a real Prometheus server (Debian's `prometheus`) scrapes a running sidecar and
//! authority during a short load of real `curl` calls. Through Prometheus's HTTP API the test
//! checks that the decision counters equal the requests made and the audit file's decision
//! events, per outcome; then that the sidecar's `/readyz` turns 503 naming `policy_bundle`
//! once the authority has been gone past the bundle TTL, and 200 again after it returns.
//! Everything listens on 127.0.0.1; Prometheus gets a generated `prometheus.yml` and a temp
//! storage dir, no network. A second test revokes capabilities issued over gRPC through the
//! real CLI while the sidecar is connected and checks the revocation lag histogram and the
//! issuance counters the same way.

use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_client::AuthorityClient;
use firma_testing::authority::Server;
use firma_testing::client::curl;
use firma_testing::config::PolicySource;
use firma_testing::prometheus::{self, Prometheus, get};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, free_port, text};
use std::time::{Duration, Instant};

const ALLOWED: usize = 40;
const DENIED: usize = 20;
/// The sidecar's `[sidecar.constraint_enforcement] bundle_ttl_seconds`.
const SIDECAR_BUNDLE_TTL: u64 = 3;

/// A sidecar fed by an authority, both with their admin listener on loopback.
struct Ops {
    d: Deployment,
    sidecar_admin: u16,
    authority_admin: u16,
}

impl Ops {
    /// Writes the shared `firma.toml`: the authority on a fixed port (so it can come back on
    /// the same address) pushes every second; the sidecar calls a bundle stale after
    /// `SIDECAR_BUNDLE_TTL` s without one.
    fn new(up: &Upstream, hosts: &[&str]) -> Self {
        let (grpc_port, sidecar_admin, authority_admin) = (free_port(), free_port(), free_port());
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let settings = Settings {
            upstream_hosts: hosts.clone(),
            intercept_hosts: hosts,
            strict_hosts: Vec::new(),
            extra: format!(
                "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:{sidecar_admin}\"\n"
            ),
            ..Settings::default()
        };
        let d = Deployment::new(Some(up), &settings);
        let mut t = d.toml(Some(up), &settings);
        t.policy = PolicySource::Authority {
            url: format!("http://127.0.0.1:{grpc_port}"),
            cache_dir: None,
        };
        t.constraint_enforcement = Some((SIDECAR_BUNDLE_TTL, 50));
        let rendered = t
            .render()
            .replacen(
                "listen_addr = \"127.0.0.1:0\"\n",
                &format!("listen_addr = \"127.0.0.1:{grpc_port}\"\nadmin_addr = \"127.0.0.1:{authority_admin}\"\n"),
                1,
            )
            .replacen("bundle_ttl_seconds = 30\n", "bundle_ttl_seconds = 1\n", 1);
        std::fs::write(&d.config, rendered).expect("write firma.toml");
        Self {
            d,
            sidecar_admin,
            authority_admin,
        }
    }

    fn targets(&self) -> [(&'static str, String); 2] {
        [
            ("sidecar", format!("127.0.0.1:{}", self.sidecar_admin)),
            ("authority", format!("127.0.0.1:{}", self.authority_admin)),
        ]
    }
}

#[test]
fn prometheus_scrapes_decisions_and_readyz_follows_the_bundle() {
    let Some(prometheus) =
        prometheus::binary("prometheus_scrapes_decisions_and_readyz_follows_the_bundle")
    else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com", "unmapped.example"]);
    let ops = Ops::new(&up, &["api.openai.com", "unmapped.example"]);
    let targets = ops.targets();
    let Ops {
        d,
        sidecar_admin,
        authority_admin,
    } = ops;
    let authority = Server::start(&d.config);
    let sidecar = Sidecar::start(&d.config, &[("FIRMA_TEST_OPENAI_KEY", "sk-canary-10")]);
    let sidecar_url = format!("http://127.0.0.1:{sidecar_admin}");
    assert!(
        sidecar
            .log_text()
            .contains(&format!("admin listening on 127.0.0.1:{sidecar_admin}")),
        "{}",
        sidecar.log_text()
    );
    assert_eq!(get(&format!("{sidecar_url}/healthz")).0, 200);
    assert_eventually(Duration::from_secs(10), "sidecar ready", || {
        get(&format!("{sidecar_url}/readyz")).0 == 200
    });
    let (code, body) = get(&format!("http://127.0.0.1:{authority_admin}/readyz"));
    assert_eq!(code, 200, "authority /readyz: {body}");

    // Prometheus, scraping both every second.
    let prom = Prometheus::start(&prometheus, &tmp.path().join("prometheus"), &targets);

    // The load: allowed chat calls and unmapped (UnclassifiedIntent) calls, interleaved.
    let proxy = sidecar.proxy_url();
    let ca = d.ca_cert();
    let started = Instant::now();
    let (mut allowed, mut denied) = (0, 0);
    for i in 0..ALLOWED + DENIED {
        if i % 3 == 2 {
            let out = curl(&proxy, &ca, "https://unmapped.example/anything", &[]);
            assert_eq!(out.status, 403, "{out:?}");
            denied += 1;
        } else {
            let out = curl(
                &proxy,
                &ca,
                "https://api.openai.com/v1/chat/completions",
                &[
                    "-X",
                    "POST",
                    "-H",
                    "content-type: application/json",
                    "-d",
                    "{}",
                ],
            );
            assert_eq!(out.status, 200, "{out:?}");
            allowed += 1;
        }
    }
    assert_eq!((allowed, denied), (ALLOWED, DENIED));
    eprintln!(
        "load: {} requests in {:?}",
        ALLOWED + DENIED,
        started.elapsed()
    );

    // Prometheus's view, once its last scrape has all of them.
    let total = (ALLOWED + DENIED) as f64;
    assert_eventually(
        Duration::from_secs(15),
        "prometheus saw every decision",
        || prom.scalar("sum(firma_sidecar_decisions_total)") == Some(total),
    );
    let by_outcome = prom.query("sum by (outcome) (firma_sidecar_decisions_total)");
    let by_reason =
        prom.query("sum by (outcome, reason, action_class) (firma_sidecar_decisions_total)");
    let upstream =
        prom.scalar("sum(firma_sidecar_stage_duration_seconds_count{stage=\"upstream\"})");
    let creds =
        prom.scalar("sum(firma_sidecar_credential_fetches_total{source=\"basic\",result=\"ok\"})");
    // Lines nobody waits for (outcomes, denials) reach the file up to 100 ms after their
    // request (docs/architecture.md, audit): wait until a scrape and the file agree.
    assert_eventually(
        Duration::from_secs(20),
        "audit_events_written = lines in the audit file",
        || prom.scalar("firma_sidecar_audit_events_written_total") == Some(d.audit().len() as f64),
    );
    // Counted only now: a denial's line may still have been held when the scrape above matched.
    // Denials over a workload's audit rate (20 per 10 s by default; these 20 from one client
    // are not over it) are counts in `deny_summary` events: decision events + those counts.
    let audit = d.audit();
    let audit_decisions = audit.iter().filter(|e| e["event"] == "decision").count()
        + audit
            .iter()
            .filter(|e| e["event"] == "deny_summary")
            .map(|e| e["aggregate"]["count"].as_u64().unwrap_or(0) as usize)
            .sum::<usize>();
    let audit_written = prom.scalar("firma_sidecar_audit_events_written_total");
    let streams = prom.query("firma_authority_connected_sidecars");
    let sends = prom.scalar("sum(firma_authority_stream_sends_total)");
    let conns = prom.scalar("sum(firma_sidecar_connections_total)");
    eprintln!("PROMETHEUS sum(firma_sidecar_decisions_total) = {total}");
    eprintln!("PROMETHEUS sum by (outcome): {by_outcome:?}");
    eprintln!("PROMETHEUS sum by (outcome, reason, action_class): {by_reason:?}");
    eprintln!(
        "PROMETHEUS upstream stage count = {upstream:?}; basic credential fetches = {creds:?}"
    );
    eprintln!("PROMETHEUS audit events written = {audit_written:?}; connections = {conns:?}");
    eprintln!("PROMETHEUS authority connected_sidecars: {streams:?}; stream sends = {sends:?}");
    eprintln!(
        "AUDIT decision events = {audit_decisions}; requests made = {}",
        ALLOWED + DENIED
    );

    assert_eq!(audit_decisions, ALLOWED + DENIED, "audit decision events");
    let outcome = |o: &str| {
        by_outcome
            .iter()
            .find(|(m, _)| m["outcome"] == o)
            .map(|(_, v)| *v)
    };
    assert_eq!(outcome("allow"), Some(ALLOWED as f64));
    assert_eq!(outcome("deny"), Some(DENIED as f64));
    assert!(
        by_reason.iter().any(|(m, v)| m["outcome"] == "deny"
            && m["reason"] == "UnclassifiedIntent"
            && *v == DENIED as f64),
        "{by_reason:?}"
    );
    assert!(
        by_reason.iter().any(|(m, v)| m["outcome"] == "allow"
            && m["action_class"] == "model.inference.chat"
            && *v == ALLOWED as f64),
        "{by_reason:?}"
    );
    assert_eq!(
        upstream,
        Some(ALLOWED as f64),
        "one upstream timing per allow"
    );
    assert_eq!(creds, Some(ALLOWED as f64), "one credential per allow");
    assert_eq!(conns, Some(total), "curl opens one connection per call");
    // Per-stage timings: mapping and overhead for every request; Stage 1, Stage 2 and the
    // connector for each allow (the unmapped requests stop at the mapping).
    for (q, want) in [
        (
            "firma_sidecar_stage_duration_seconds_count{stage=\"mapping\"}",
            total,
        ),
        (
            "firma_sidecar_stage_duration_seconds_count{stage=\"stage1\"}",
            ALLOWED as f64,
        ),
        (
            "firma_sidecar_stage_duration_seconds_count{stage=\"stage2\"}",
            ALLOWED as f64,
        ),
        (
            "firma_sidecar_stage_duration_seconds_count{stage=\"connector\"}",
            ALLOWED as f64,
        ),
        ("firma_sidecar_request_overhead_seconds_count", total),
        ("firma_sidecar_mitm_handshakes_total{result=\"ok\"}", total),
        (
            "firma_sidecar_mitm_handshakes_total{result=\"failed\"}",
            0.0,
        ),
        (
            "firma_sidecar_leaf_cache_hits_total + firma_sidecar_leaf_certificates_minted_total",
            total,
        ),
        ("sum(firma_sidecar_connections_active)", 0.0),
        ("firma_sidecar_audit_failures_total", 0.0),
        ("firma_sidecar_audit_sink_healthy", 1.0),
        ("sum(firma_sidecar_upstream_errors_total)", 0.0),
        ("firma_sidecar_rate_limited_total", 0.0),
    ] {
        prom.wait_for_value(q, want, Duration::from_secs(10));
    }
    let writes = prom
        .scalar("firma_sidecar_audit_write_duration_seconds_count")
        .unwrap_or(0.0);
    assert!(
        writes >= 1.0 && writes <= d.audit().len() as f64,
        "audit write batches {writes}"
    );
    // The sidecar runs the bundle version the authority serves.
    let versions = |q: &str| -> Vec<String> {
        prom.query(q)
            .iter()
            .filter_map(|(m, _)| m["version"].as_str().map(str::to_owned))
            .collect()
    };
    let sidecar_version = versions("firma_sidecar_bundle_info == 1");
    assert_eq!(
        sidecar_version,
        versions("firma_authority_bundle_info{kind=\"runtime\"} == 1"),
        "bundle versions"
    );
    assert_eq!(sidecar_version.len(), 1);
    // The authority re-sends every second: the bundle never gets near the sidecar's TTL.
    let age = prom.scalar("firma_sidecar_bundle_age_seconds");
    assert!(
        age.is_some_and(|a| (0.0..SIDECAR_BUNDLE_TTL as f64).contains(&a)),
        "bundle age {age:?}"
    );
    assert_eq!(prom.scalar("firma_sidecar_bundle_fresh"), Some(1.0));
    // Decisions plus allowed outcomes, all persisted (the file may hold a recovery line more).
    assert_eq!(
        audit_written,
        Some(d.audit().len() as f64),
        "audit_events_written = lines in the audit file"
    );
    assert!(
        streams
            .iter()
            .any(|(m, v)| m["stream"] == "bundles" && *v == 1.0),
        "{streams:?}"
    );
    assert!(sends.is_some_and(|s| s >= 2.0), "{sends:?}");

    // Readiness follows the bundle: authority gone past the TTL -> 503 naming the check.
    let mut authority = authority;
    authority.kill();
    let stopped = Instant::now();
    let (status, body) = assert_eventually(
        Duration::from_secs(SIDECAR_BUNDLE_TTL + 10),
        "sidecar /readyz 503 after the authority stopped",
        || {
            let (s, b) = get(&format!("{sidecar_url}/readyz"));
            (s == 503).then_some((s, b))
        },
    );
    let waited = stopped.elapsed();
    eprintln!("READYZ {status} after {waited:?}: {body}");
    assert!(
        waited >= Duration::from_secs(SIDECAR_BUNDLE_TTL - 1),
        "503 before the bundle TTL: {waited:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["ready"], false);
    assert_eq!(v["failing"], serde_json::json!(["policy_bundle"]), "{body}");
    let detail = v["checks"][0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("PolicyBundleStale"), "{body}");
    // And a request now is denied for the same reason.
    let out = curl(
        &proxy,
        &ca,
        "https://api.openai.com/v1/chat/completions",
        &["-X", "POST", "-d", "{}"],
    );
    assert_eq!(out.status, 403);
    assert_eq!(out.json()["reason"], "PolicyBundleStale");
    assert_eventually(
        Duration::from_secs(10),
        "prometheus sees bundle_fresh 0",
        || prom.scalar("firma_sidecar_bundle_fresh") == Some(0.0),
    );

    // The authority comes back on the same address: ready again.
    let _authority = Server::start(&d.config);
    let back = Instant::now();
    let (_, body) = assert_eventually(
        Duration::from_secs(30),
        "sidecar /readyz 200 after the authority returned",
        || {
            let (s, b) = get(&format!("{sidecar_url}/readyz"));
            (s == 200).then_some((s, b))
        },
    );
    eprintln!(
        "READYZ 200 {:?} after the authority restarted: {body}",
        back.elapsed()
    );
    let out = curl(
        &proxy,
        &ca,
        "https://api.openai.com/v1/chat/completions",
        &["-X", "POST", "-d", "{}"],
    );
    assert_eq!(out.status, 200, "{out:?}");

    // A scrape excerpt for the record.
    let (_, scrape) = get(&format!("{sidecar_url}/metrics"));
    for line in scrape
        .lines()
        .filter(|l| !l.contains("_bucket{") || l.contains("stage=\"stage2\""))
    {
        eprintln!("SCRAPE {line}");
    }
}

/// Revocations issued while Prometheus watches: `N_LIVE` through the real CLI (`firma authority
/// revocations add`) while the sidecar is connected, two hand-written hostile lines (no time;
/// a time at the end of i64), and one added while the authority is down, which the sidecar gets
/// in the replay after it reconnects. The lag histogram counts exactly the revocations that
/// carry a time and reached a running sidecar after its first sync; the two revoked before the
/// sidecar started (startup replay) are applied but not measured.
#[test]
fn prometheus_sees_the_revocation_lag_of_every_revocation() {
    const N_LIVE: usize = 5;
    let Some(prometheus) =
        prometheus::binary("prometheus_sees_the_revocation_lag_of_every_revocation")
    else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let ops = Ops::new(&up, &["api.openai.com"]);
    let d = &ops.d;
    let file = d.root().join("revocations.txt");
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // Revoked before the sidecar exists: one stamped an hour ago (in seconds, the older
    // format), one bare.
    std::fs::write(
        &file,
        format!("before-stamped {}\nbefore-bare\n", now_ms() / 1000 - 3600),
    )
    .expect("revocations.txt");
    let config = d.config.to_str().unwrap().to_owned();
    let revoke = |id: &str| {
        let out = firma_testing::firma(&["authority", "-c", &config, "revocations", "add", id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(&format!("revoked {id}")));
    };

    // The issuance policy permits everything but payment transfers.
    std::fs::write(
        d.root().join("issuance/no-payments.cedar"),
        "forbid (principal, action == Firma::Action::\"payment.transfer\", resource);\n",
    )
    .expect("issuance policy");
    let mut authority = Server::start(&d.config);
    let _sidecar = Sidecar::start(&d.config, &[("FIRMA_TEST_OPENAI_KEY", "sk-canary-10")]);
    let sidecar_url = format!("http://127.0.0.1:{}", ops.sidecar_admin);
    assert_eventually(Duration::from_secs(10), "sidecar ready", || {
        get(&format!("{sidecar_url}/readyz")).0 == 200
    });
    let prom = Prometheus::start(&prometheus, &tmp.path().join("prometheus"), &ops.targets());
    let wait = |q: &str, want: usize| prom.wait_for_value(q, want as f64, Duration::from_secs(20));
    let value = |q: &str| prom.scalar(q);

    // The startup replay: applied, not measured.
    wait(
        "firma_sidecar_revocations_applied_total{via=\"startup_replay\"}",
        2,
    );
    assert_eq!(
        value("firma_sidecar_revocation_lag_seconds_count"),
        Some(0.0)
    );

    // Capabilities issued over gRPC (the in-tree tonic client), plus one denied and one
    // invalid request; then the issued ones revoked through the CLI, live.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let url = authority.url();
    let (token_ids, refused) = rt.block_on(async {
        let mut c = AuthorityClient::connect(url).await.expect("connect");
        let ask = |action: &str, ttl: i64| pb::IssuanceRequest {
            agent_id: "tenant-acme".into(),
            session_id: "ops-1".into(),
            requested_actions: vec![action.into()],
            resource_scope: "*".into(),
            requested_ttl_seconds: ttl,
        };
        let mut ids = Vec::new();
        for _ in 0..N_LIVE {
            match c.issue_capability(ask("model.inference.chat", 600)).await {
                Ok(r) => match r.into_inner().result {
                    Some(pb::issuance_response::Result::Allowed(cap)) => ids.push(cap.token_id),
                    other => panic!("issuance: {other:?}"),
                },
                Err(s) => panic!("issuance: {s}"),
            }
        }
        let denied = c
            .issue_capability(ask("payment.transfer", 600))
            .await
            .expect("answered")
            .into_inner();
        let invalid = c.issue_capability(ask("no.such.class", 600)).await;
        (ids, (denied, invalid.map(|r| r.into_inner())))
    });
    assert!(
        matches!(
            refused.0.result,
            Some(pb::issuance_response::Result::Denied(_))
        ),
        "{refused:?}"
    );
    assert!(refused.1.is_err(), "unknown action class: {:?}", refused.1);
    wait(
        "firma_authority_issuances_total{result=\"allowed\",reason=\"\"}",
        N_LIVE,
    );
    wait(
        "firma_authority_issuances_total{result=\"denied\",reason=\"IssuanceDenied\"}",
        1,
    );
    wait(
        "firma_authority_issuances_total{result=\"invalid\",reason=\"InvalidRequest\"}",
        1,
    );
    let issued = Instant::now();
    for id in &token_ids {
        revoke(id);
    }
    wait("firma_sidecar_revocation_lag_seconds_count", N_LIVE);
    eprintln!(
        "{N_LIVE} live revocations measured {:?} after the first",
        issued.elapsed()
    );
    wait(
        "firma_sidecar_revocations_applied_total{via=\"stream\"}",
        N_LIVE,
    );
    wait("firma_authority_revocations_recorded_total", N_LIVE);
    // One stream, so the authority sent the replay (2) and each live revocation once.
    wait(
        "firma_authority_stream_sends_total{stream=\"revocations\"}",
        N_LIVE + 2,
    );
    wait("firma_sidecar_revocations", N_LIVE + 2);
    let sum = value("firma_sidecar_revocation_lag_seconds_sum").unwrap_or(f64::NAN);
    eprintln!("PROMETHEUS live lag: count {N_LIVE}, sum {sum:.3} s");
    // Each took the authority's file poll (250 ms) plus the stream: well under 5 s even here.
    assert!(sum > 0.0 && sum < 5.0 * N_LIVE as f64, "lag sum {sum}");
    assert_eq!(
        value("firma_sidecar_revocation_lag_seconds_bucket{le=~\"5(\\\\.0)?\"}"),
        Some(N_LIVE as f64),
        "every live lag below 5 s"
    );

    // Hostile lines written by hand: no time (unknown, not observed), a time at the end of i64
    // (clock skew: observed as 0, counted). Neither may poison the sum.
    let mut text_now = std::fs::read_to_string(&file).unwrap();
    text_now.push_str(&format!("hostile-bare\nhostile-future {}\n", i64::MAX));
    std::fs::write(&file, text_now).unwrap();
    wait("firma_sidecar_revocation_lag_unknown_total", 1);
    wait("firma_sidecar_revocation_clock_skew_total", 1);
    wait("firma_sidecar_revocation_lag_seconds_count", N_LIVE + 1);
    wait(
        "firma_sidecar_revocations_applied_total{via=\"stream\"}",
        N_LIVE + 2,
    );
    assert_eq!(
        value("firma_sidecar_revocation_lag_seconds_sum"),
        Some(sum),
        "the skewed one adds 0"
    );

    // Revoked while the authority is down: delivered by the replay after the reconnect,
    // measured with its original time (so at least the outage).
    authority.kill();
    revoke("while-down");
    let down = Instant::now();
    // A real span of time, not a wait on a condition: the outage must last well beyond a normal
    // lag (~0.1 s) so that a resync lag of >= 1.5 s proves the original revocation time
    // travelled (checked below).
    std::thread::sleep(Duration::from_millis(1500));
    let _authority = Server::start(&d.config);
    wait(
        "firma_sidecar_revocations_applied_total{via=\"resync_replay\"}",
        1,
    );
    let outage = down.elapsed().as_secs_f64();
    wait("firma_sidecar_revocation_lag_seconds_count", N_LIVE + 2);
    let after = value("firma_sidecar_revocation_lag_seconds_sum").unwrap_or(f64::NAN);
    eprintln!(
        "PROMETHEUS lag after the resync: count {}, sum {after:.3} s (the resync's lag {:.3} s, outage {outage:.3} s)",
        N_LIVE + 2,
        after - sum
    );
    assert!(
        after - sum >= 1.5 && after - sum < outage + 5.0,
        "resync lag {} for an outage of {outage}",
        after - sum
    );
    assert_eq!(
        value("firma_sidecar_revocation_lag_unknown_total"),
        Some(1.0)
    );
    assert_eq!(
        value("firma_sidecar_revocation_clock_skew_total"),
        Some(1.0)
    );
    assert_eq!(
        value("firma_sidecar_revocations_applied_total{via=\"startup_replay\"}"),
        Some(2.0),
        "the reconnect's replay of known ids applies nothing again"
    );
    wait("firma_sidecar_revocations", N_LIVE + 5);

    let (_, scrape) = get(&format!("{sidecar_url}/metrics"));
    for line in scrape.lines().filter(|l| l.contains("revocation")) {
        eprintln!("SCRAPE {line}");
    }
    eprintln!(
        "PROMETHEUS authority issuances before the restart: {:?}",
        prom.query("sum by (result, reason) (max_over_time(firma_authority_issuances_total[1m]))")
    );
    let (_, scrape) = get(&format!("http://127.0.0.1:{}/metrics", ops.authority_admin));
    for line in scrape
        .lines()
        .filter(|l| l.contains("revocation") && !l.starts_with("# HELP"))
    {
        eprintln!("AUTHORITY SCRAPE (restarted) {line}");
    }
}
