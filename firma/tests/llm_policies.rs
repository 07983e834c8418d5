//! LLM-native policies end to end (docs/llm-policies.md): request attributes extracted from
//! JSON bodies by the shipped mapping rules and decided on by the shipped `runtime/llm` Cedar
//! policy, token usage read from JSON and SSE responses into per-session totals and budgets.
//! The real `firma sidecar` (http_proxy mode, MITM), curl and Python clients, the local HTTPS
//! upstream playing OpenAI and Anthropic, the signed audit file.

use firma_testing::client::*;
use firma_testing::confine::Confine;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-llm-77d0";
const HOSTS: [&str; 3] = ["api.openai.com", "api.anthropic.com", "paste.rs"];

fn llm_policy() -> String {
    shipped_policy("runtime/llm/llm.cedar")
}

fn setup_with(policy: String, extra: &str) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &HOSTS);
    let hosts: Vec<String> = HOSTS.map(String::from).to_vec();
    let s = Settings {
        intercept_hosts: hosts.clone(),
        strict_hosts: Vec::new(),
        upstream_hosts: hosts,
        runtime_policy: policy,
        extra: format!(
            "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n\n{extra}"
        ),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
    std::mem::forget(tmp);
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    (up, d, sc)
}

fn setup() -> (Upstream, Deployment, Sidecar) {
    setup_with(llm_policy(), "")
}

/// POST `body` (exact bytes) as JSON to `url` through the proxy.
fn post(sc: &Sidecar, d: &Deployment, url: &str, body: &str) -> CurlOut {
    curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        url,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ],
    )
}

const CHAT: &str = "https://api.openai.com/v1/chat/completions";

/// The decision event for the `n`-th request (0-based) to `host` `path`.
fn decision(d: &Deployment, host: &str, path: &str, n: usize) -> serde_json::Value {
    assert_eventually(Duration::from_secs(5), "decision audited", || {
        d.audit_for(host)
            .into_iter()
            .filter(|e| e["envelope"]["intent"]["resource"]["path"] == path)
            .nth(n)
    })
}

#[test]
fn model_allow_list_and_max_tokens_cap_decide_on_the_body() {
    let (up, d, sc) = setup();
    // Allowed model, cap respected: forwarded byte for byte (odd spacing kept).
    let body = r#"{"model":  "gpt-4o-mini" , "max_tokens":100, "messages":[{"role":"user","content":"hi"}]}"#;
    let out = post(&sc, &d, CHAT, body);
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body.as_bytes(), "body forwarded unchanged");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {CANARY}"));
    let e = decision(&d, "api.openai.com", "/v1/chat/completions", 0);
    assert_eq!(e["decision"]["outcome"], "ALLOW");
    assert_eq!(
        e["envelope"]["intent"]["request"],
        serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 100})
    );

    // A model off the list: denied by policy, never sent.
    let out = post(&sc, &d, CHAT, r#"{"model":"gpt-4o","messages":[]}"#);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "PolicyDenied");
    let e = decision(&d, "api.openai.com", "/v1/chat/completions", 1);
    assert_eq!(e["decision"]["reason"], "PolicyDenied");
    assert_eq!(e["envelope"]["intent"]["request"]["model"], "gpt-4o");

    // Over the max_tokens cap, under either field name the API accepts.
    for body in [
        r#"{"model":"gpt-4o-mini","max_tokens":8000}"#,
        r#"{"model":"gpt-4o-mini","max_completion_tokens":8000,"max_tokens":10}"#,
    ] {
        let out = post(&sc, &d, CHAT, body);
        assert_eq!(out.status, 403, "{body}: {out:?}");
        assert_eq!(out.json()["reason"], "PolicyDenied");
    }
    assert_eq!(up.count(), 1, "denied calls reached the upstream");

    // Anthropic Messages: its own rule and allow-list.
    let out = post(
        &sc,
        &d,
        "https://api.anthropic.com/v1/messages",
        r#"{"model":"claude-3-5-haiku-latest","max_tokens":1024,"messages":[]}"#,
    );
    assert_eq!(out.status, 200, "{out:?}");
    let out = post(
        &sc,
        &d,
        "https://api.anthropic.com/v1/messages",
        r#"{"model":"claude-opus-4","max_tokens":1024,"messages":[]}"#,
    );
    assert_eq!(out.status, 403, "{out:?}");

    // Listing models has no body and no context.request: allowed by its own clause.
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/models",
        &[],
    );
    assert_eq!(out.status, 200, "{out:?}");
}

/// Hostile bodies on a rule that extracts: not JSON, wrong types, duplicate keys (a parser
/// differential). Each is a 400 MalformedRequest, audited, never sent. (Over the size limit is
/// 413 BodyTooLarge: `large_bodies.rs`.)
#[test]
fn malformed_bodies_on_extracting_rules_are_refused_and_audited() {
    let (up, d, sc) = setup();
    let cases: Vec<(String, &str)> = vec![
        ("not json at all".into(), "not valid JSON"),
        (
            r#"{"model":"gpt-4o-mini","max_tokens":"lots"}"#.into(),
            "must be an integer",
        ),
        (
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.into(),
            "duplicate key",
        ),
    ];
    for (i, (body, why)) in cases.iter().enumerate() {
        let out = post(&sc, &d, CHAT, body);
        assert_eq!(out.status, 400, "case {i}: {out:?}");
        assert_eq!(out.json()["reason"], "MalformedRequest");
        let detail = out.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(why), "case {i}: {detail}");
        let e = decision(&d, "api.openai.com", "/v1/chat/completions", i);
        assert_eq!(e["decision"]["reason"], "MalformedRequest");
        assert!(e["decision"]["detail"].as_str().unwrap().contains(why));
    }
    assert_eq!(up.count(), 0);
    // A rule without `extract` streams any body, JSON or not.
    let out = post(&sc, &d, "https://api.openai.com/v1/models", "not json");
    assert_ne!(out.status, 400, "{out:?}");
}

/// A session budget of 400 tokens, and gpt-4o-mini priced.
const BUDGET_POLICY: &str = r#"
permit (principal, action == Firma::Action::"model.inference.chat", resource)
when {
  resource has "host" &&
  context has request && context.request has model &&
  ["gpt-4o-mini", "claude-3-5-haiku-latest"].contains(context.request.model) &&
  context has session && context.session.tokens_used < 400
};
"#;

fn llm_extra(state: &std::path::Path) -> String {
    format!(
        "[sidecar.llm]\nusage_state_path = {:?}\n\n[[sidecar.llm.prices]]\nmodel = \"gpt-4o-mini\"\ninput_per_1k_usd = 0.15\noutput_per_1k_usd = 0.6\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n",
        state.display().to_string()
    )
}

/// `outcome` events of LLM calls, in order.
fn usage_outcomes(d: &Deployment, n: usize) -> Vec<serde_json::Value> {
    assert_eventually(Duration::from_secs(10), "usage outcomes", || {
        let o: Vec<_> = d
            .audit()
            .into_iter()
            .filter(|e| e["event"] == "outcome" && !e["connector"]["usage"].is_null())
            .collect();
        (o.len() >= n).then_some(o)
    })
}

#[test]
fn usage_from_json_and_sse_counts_against_the_session_budget_across_restarts() {
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("usage.json");
    let (up, d, mut sc) = setup_with(BUDGET_POLICY.into(), &llm_extra(&state));

    // 1. JSON response: 100 in + 150 out = 250 tokens.
    let out = post(&sc, &d, CHAT, r#"{"model":"gpt-4o-mini","max_tokens":150}"#);
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let o = usage_outcomes(&d, 1);
    let u = &o[0]["connector"]["usage"];
    assert_eq!(u["input_tokens"], 100);
    assert_eq!(u["output_tokens"], 150);
    assert_eq!(u["total_tokens"], 250);
    // 100 * 0.15/1k + 150 * 0.6/1k = 0.015 + 0.09
    assert!(
        (u["cost_usd"].as_f64().unwrap() - 0.105).abs() < 1e-9,
        "{u}"
    );
    assert_eq!(o[0]["connector"]["upstream_status"], 200);

    // 2. Streamed (SSE, usage in the last chunk): 100 + 100; the session is now at 450, over
    //    the budget, but this call was decided at 250 and completes.
    let out = post(
        &sc,
        &d,
        CHAT,
        r#"{"model":"gpt-4o-mini","max_tokens":100,"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.body.contains("data: [DONE]"), "{}", out.body);
    let o = usage_outcomes(&d, 2);
    assert_eq!(o[1]["connector"]["usage"]["total_tokens"], 200);
    // The same usage on the admin listener's /metrics (docs/metrics.md).
    let scrape = admin_metrics(&sc);
    let sample = |series: &str| {
        scrape
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
    };
    assert_eq!(
        sample("firma_sidecar_llm_tokens_total{direction=\"input\",model=\"gpt-4o-mini\"}"),
        Some(200.0),
        "{scrape}"
    );
    assert_eq!(
        sample("firma_sidecar_llm_tokens_total{direction=\"output\",model=\"gpt-4o-mini\"}"),
        Some(250.0),
        "{scrape}"
    );
    let cost = sample("firma_sidecar_llm_cost_usd_total{model=\"gpt-4o-mini\"}").unwrap();
    assert!((cost - 0.18).abs() < 1e-6, "{scrape}");

    // 3. The next call is denied: the budget ran out.
    let out = post(&sc, &d, CHAT, r#"{"model":"gpt-4o-mini","max_tokens":1}"#);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "PolicyDenied");
    assert_eq!(up.count(), 2);

    // 4. Totals survive a restart (SIGTERM writes the snapshot): still denied.
    sc.terminate(Duration::from_secs(10));
    assert!(state.exists(), "usage state written at shutdown");
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    let out = post(&sc, &d, CHAT, r#"{"model":"gpt-4o-mini","max_tokens":1}"#);
    assert_eq!(out.status, 403, "{out:?}\n{}", sc.log_text());
    assert!(
        out.json()["detail"]
            .as_str()
            .unwrap()
            .contains("no policy permits it"),
        "{out:?}"
    );
    assert_eq!(up.count(), 2);
}

#[test]
fn anthropic_stream_usage_and_first_event_not_delayed() {
    let state_dir = tempfile::tempdir().unwrap();
    let (_up, d, sc) = setup_with(
        BUDGET_POLICY.into(),
        &llm_extra(&state_dir.path().join("u.json")),
    );
    // The upstream sends the first event at once and the rest 1500 ms later: the client must
    // see the first event long before the end (nothing buffers the stream).
    let script = r#"
import json, sys, time, requests
proxy, ca, url = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.monotonic()
r = requests.post(url, proxies={"https": proxy}, verify=ca, stream=True, timeout=20,
    headers={"x-test-sse-gap-ms": "1500"},
    data=json.dumps({"model": "claude-3-5-haiku-latest", "max_tokens": 64, "stream": True}))
first = None
events = 0
for line in r.iter_lines():
    if line.startswith(b"data:"):
        events += 1
        if first is None:
            first = time.monotonic() - t0
print(json.dumps({"status": r.status_code, "first": first, "total": time.monotonic() - t0, "events": events}))
"#;
    let out = firma_testing::client::in_cgroup_command(
        None,
        "python3",
        &[
            "-c",
            script,
            &sc.proxy_url(),
            d.ca_cert().to_str().unwrap(),
            "https://api.anthropic.com/v1/messages",
        ],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["events"], 6, "{v}");
    let (first, total) = (v["first"].as_f64().unwrap(), v["total"].as_f64().unwrap());
    assert!(total >= 1.5, "{v}");
    assert!(
        first < total - 1.0,
        "first event arrived {first:.3}s after the request, the stream ended at {total:.3}s: buffered? {v}"
    );
    let o = usage_outcomes(&d, 1);
    let u = &o[0]["connector"]["usage"];
    assert_eq!(
        (u["input_tokens"].as_i64(), u["output_tokens"].as_i64()),
        (Some(100), Some(64))
    );
    assert!(u["cost_usd"].is_null(), "no price for this model: {u}");
}

/// Transparent mode: an unmodified curl in a tagged cgroup (no proxy) calls api.openai.com
/// (10.77.0.2 in the test's namespace): the same extraction, policy and usage accounting.
#[test]
fn llm_policy_and_usage_in_tagged_cgroup() {
    use firma_testing::config::Mode;
    use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
    if !in_fresh_netns("llm_policy_and_usage_in_tagged_cgroup") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start_at(
        tmp.path(),
        &["api.openai.com"],
        format!("{DST_V4}:443").parse().unwrap(),
    );
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-llm")).expect("test cgroup");
    let mut s = Settings {
        upstream_hosts: Vec::new(),
        runtime_policy: BUDGET_POLICY.into(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    s.mode = Mode::Transparent {
        port: free_dual_port(),
        pin_dir: pins.dir.clone(),
        control_socket: d.root().join("sidecar.sock"),
        allow_ephemeral_pins: None,
    };
    d.write(Some(&up), &s);
    // The sidecar resolves api.openai.com itself (the original destination must be one of its
    // addresses): it sees the clients' hosts file.
    let hosts = tmp.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{DST_V4} api.openai.com\n"),
    )
    .unwrap();
    let _sc = d.start_with_hosts(&[], &hosts);
    let cg_path = format!("/{}", cg.dir.file_name().unwrap().to_string_lossy());
    let out = firma(&[
        "sidecar",
        "-c",
        d.config.to_str().unwrap(),
        "attach",
        "--cgroup",
        &cg_path,
        "--agent-id",
        "tenant-acme",
        "--session-id",
        "s1",
    ]);
    assert!(out.status.success(), "attach: {}", text(&out.stderr));
    let call = |body: &str| {
        let out = Confine::hosts(&hosts)
            .cgroup(&cg.dir)
            .command("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(d.ca_cert())
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ])
            .args(["-w", "\n%{http_code}", CHAT])
            .output()
            .unwrap();
        let t = text(&out.stdout);
        let (b, code) = t.trim_end().rsplit_once('\n').unwrap_or(("", t.trim()));
        (code.parse::<u16>().unwrap_or(0), b.to_string())
    };
    let (code, body) = call(r#"{"model":"gpt-4o","max_tokens":10}"#);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("PolicyDenied"));
    let (code, body) = call(r#"{"model":"gpt-4o-mini","max_tokens":320}"#);
    assert_eq!(code, 200, "{body}");
    let o = usage_outcomes(&d, 1);
    assert_eq!(o[0]["connector"]["usage"]["total_tokens"], 420);
    assert_eq!(o[0]["conn"]["intercept"], "transparent");
    let (code, body) = call(r#"{"model":"gpt-4o-mini","max_tokens":1}"#);
    assert_eq!(code, 403, "budget spent: {body}");
    assert_eq!(up.count(), 1);
}

/// The sidecar's `/metrics` (its admin listener address is read from the log).
fn admin_metrics(sc: &Sidecar) -> String {
    use std::io::{Read, Write};
    let admin: std::net::SocketAddr = sc.logged("admin listening on ").expect("admin address");
    let mut s = std::net::TcpStream::connect(admin).expect("admin listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}
