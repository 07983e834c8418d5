//! Operations: a real Prometheus server (Debian's `prometheus`) scrapes a running sidecar and
//! authority during a short load of real `curl` calls. Through Prometheus's HTTP API the test
//! checks that the decision counters equal the requests made and the audit file's decision
//! events, per outcome; then that the sidecar's `/readyz` turns 503 naming `policy_bundle`
//! once the authority has been gone past the bundle TTL, and 200 again after it returns.
//! Everything listens on 127.0.0.1; Prometheus gets a generated `prometheus.yml` and a temp
//! storage dir, no network.

use firma_testing::authority::Server;
use firma_testing::client::curl;
use firma_testing::config::PolicySource;
use firma_testing::process::Process;
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, free_port, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ALLOWED: usize = 40;
const DENIED: usize = 20;
/// The sidecar's `[sidecar.constraint_enforcement] bundle_ttl_seconds`.
const SIDECAR_BUNDLE_TTL: u64 = 3;

/// `prometheus` from PATH or Debian's path; `None` (test skipped) when it is not installed.
fn prometheus_bin() -> Option<PathBuf> {
    let ok = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ["prometheus", "/usr/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| ok(p))
}

/// A plain GET on loopback with curl: (status, body).
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("curl");
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Runs an instant query against Prometheus's HTTP API; returns (labels, value) per series.
fn query(prom: &str, q: &str) -> Vec<(serde_json::Value, f64)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--noproxy", "*", "-G"])
        .arg(format!("{prom}/api/v1/query"))
        .args(["--data-urlencode", &format!("query={q}")])
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        v["status"] == "success" || v.is_null(),
        "query {q}: {}",
        text(&out.stdout)
    );
    v["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .map(|s| {
                    let value = s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(f64::NAN);
                    (s["metric"].clone(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The single value of `q`, if Prometheus has one.
fn scalar(prom: &str, q: &str) -> Option<f64> {
    match query(prom, q).as_slice() {
        [(_, v)] => Some(*v),
        _ => None,
    }
}

#[test]
fn prometheus_scrapes_decisions_and_readyz_follows_the_bundle() {
    let Some(prometheus) = prometheus_bin() else {
        // CI installs it (.ci/run): there a missing server is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no prometheus binary; .ci/run installs the Debian package"
        );
        eprintln!(
            "SKIP prometheus_scrapes_decisions_and_readyz_follows_the_bundle: no prometheus binary (apt-get install prometheus; .ci/run installs it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com", "unmapped.example"]);
    let (grpc_port, sidecar_admin, authority_admin, prom_port) =
        (free_port(), free_port(), free_port(), free_port());
    let settings = Settings {
        upstream_hosts: vec!["api.openai.com".into(), "unmapped.example".into()],
        intercept_hosts: vec!["api.openai.com".into(), "unmapped.example".into()],
        strict_hosts: Vec::new(),
        extra: format!(
            "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:{sidecar_admin}\"\n"
        ),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &settings);
    // The authority (same file, fixed port so it can come back on the same address) pushes
    // every second; the sidecar calls a bundle stale after 3 s without one.
    let mut t = d.toml(Some(&up), &settings);
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
    let prom_dir = tmp.path().join("prometheus");
    std::fs::create_dir_all(prom_dir.join("data")).expect("mkdir");
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['127.0.0.1:{sidecar_admin}']\n  - job_name: authority\n    static_configs:\n      - targets: ['127.0.0.1:{authority_admin}']\n"
        ),
    )
    .expect("prometheus.yml");
    let mut cmd = Command::new(&prometheus);
    cmd.arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--storage.tsdb.retention.time=1h");
    let _prom = Process::spawn(cmd).expect("spawn prometheus");
    let prom = format!("http://127.0.0.1:{prom_port}");
    assert_eventually(Duration::from_secs(30), "prometheus ready", || {
        get(&format!("{prom}/-/ready")).0 == 200
    });
    assert_eventually(Duration::from_secs(20), "both targets up", || {
        let up = query(&prom, "up");
        up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0)
    });

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
        || scalar(&prom, "sum(firma_sidecar_decisions_total)") == Some(total),
    );
    let audit_decisions = d
        .audit()
        .iter()
        .filter(|e| e["event"] == "decision")
        .count();
    let by_outcome = query(&prom, "sum by (outcome) (firma_sidecar_decisions_total)");
    let by_reason = query(
        &prom,
        "sum by (outcome, reason, action_class) (firma_sidecar_decisions_total)",
    );
    let upstream = scalar(
        &prom,
        "sum(firma_sidecar_stage_duration_seconds_count{stage=\"upstream\"})",
    );
    let creds = scalar(
        &prom,
        "sum(firma_sidecar_credential_fetches_total{source=\"basic\",result=\"ok\"})",
    );
    let audit_written = scalar(&prom, "firma_sidecar_audit_events_written_total");
    let streams = query(&prom, "firma_authority_connected_sidecars");
    let sends = scalar(&prom, "sum(firma_authority_stream_sends_total)");
    let conns = scalar(&prom, "sum(firma_sidecar_connections_total)");
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
        || scalar(&prom, "firma_sidecar_bundle_fresh") == Some(0.0),
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
