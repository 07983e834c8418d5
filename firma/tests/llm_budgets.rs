//! Budgets that hold, one reading of the body, and the Realtime API's model
//! (docs/llm-policies.md), tried as a hostile agent would: concurrent calls racing a budget,
//! a stream that never asks for its usage, a client that leaves before the usage arrives, an
//! upstream that reports negative usage, case-variant duplicate keys, two max_tokens fields,
//! and a WebSocket upgrade naming its model in the query string. The real `firma sidecar`
//! (http_proxy mode, MITM), curl / Python clients, the local upstream playing OpenAI (its
//! `served_tokens` is what a provider would bill), the signed audit file.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-budget-41f2";
const HOSTS: [&str; 2] = ["api.openai.com", "api.anthropic.com"];
const CHAT: &str = "https://api.openai.com/v1/chat/completions";

fn setup(policy: &str) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &HOSTS);
    let d = Deployment::new(Some(&up), &Settings::llm(&HOSTS, policy, ""));
    std::mem::forget(tmp);
    let sc = d.start(&[(OPENAI_KEY_ENV, CANARY)]);
    (up, d, sc)
}

/// POST `body` (exact bytes) as JSON through the proxy, with extra headers.
fn post(sc: &Sidecar, d: &Deployment, body: &str, headers: &[&str]) -> CurlOut {
    let mut args = vec!["-H", "content-type: application/json"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", body]);
    curl(&sc.proxy_url(), &d.ca_cert(), CHAT, &args)
}

/// The first `n` `outcome` events that carry usage, in order.
fn usage_outcomes(d: &Deployment, n: usize) -> Vec<serde_json::Value> {
    assert_eventually(Duration::from_secs(20), "usage outcomes", || {
        let o: Vec<_> = d
            .audit()
            .into_iter()
            .filter(|e| e["event"] == "outcome" && !e["connector"]["usage"].is_null())
            .collect();
        (o.len() >= n).then_some(o)
    })
}

/// Decision events of calls to `path`, in order.
fn decisions(d: &Deployment, path: &str) -> Vec<serde_json::Value> {
    d.audit_for("api.openai.com")
        .into_iter()
        .filter(|e| e["envelope"]["intent"]["resource"]["path"] == path)
        .collect()
}

/// The `n`-th (0-based) decision event of calls to `path`, once it is written.
fn nth_decision(d: &Deployment, path: &str, n: usize) -> serde_json::Value {
    assert_eventually(Duration::from_secs(10), "decision audited", || {
        decisions(d, path).into_iter().nth(n)
    })
}

fn chat_decisions(d: &Deployment) -> Vec<serde_json::Value> {
    decisions(d, "/v1/chat/completions")
}

/// 20 calls of 50,000 tokens each at once against a 200,000-token session budget. Every
/// decision sees the reservations of the calls still in flight (the upstream holds each answer
/// 2 s), so exactly 4 pass, and what the upstream serves stays within the budget plus one
/// reservation. Before reservations all 20 passed (~1,000,000 tokens).
#[test]
fn twenty_concurrent_calls_never_spend_more_than_the_budget_plus_one_reservation() {
    const BUDGET: i64 = 200_000;
    let (up, d, sc) = setup(&token_budget_policy(BUDGET));
    let body = r#"{"model":"gpt-4o-mini","max_tokens":50000,"messages":[{"role":"user","content":"write a lot"}]}"#;
    let outs: Vec<CurlOut> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..20)
            .map(|_| s.spawn(|| post(&sc, &d, body, &["x-test-delay-ms: 2000"])))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let allowed = outs.iter().filter(|o| o.status == 200).count();
    let denied: Vec<&CurlOut> = outs.iter().filter(|o| o.status == 403).collect();
    assert_eq!(allowed + denied.len(), 20, "{outs:?}\n{}", sc.log_text());
    for o in &denied {
        assert_eq!(o.json()["reason"], "PolicyDenied", "{o:?}");
        let detail = o.json()["detail"].as_str().unwrap().to_string();
        assert!(
            detail.contains("forbidden by budget") && detail.contains("session tokens_used = "),
            "{o:?}"
        );
    }
    let o = usage_outcomes(&d, allowed);
    let reservation = 50_000 + body.len() as i64;
    for e in &o {
        let u = &e["connector"]["usage"];
        assert_eq!(u["charged"], "reported", "{e}");
        assert_eq!(u["reserved_tokens"], reservation, "{e}");
    }
    let served = up.served_tokens();
    println!(
        "upstream served {served} tokens for {allowed} of 20 concurrent calls; budget {BUDGET}, one reservation {reservation}, budget + one reservation {}",
        BUDGET + reservation
    );
    assert!(
        served <= BUDGET + reservation,
        "served {served} > budget {BUDGET} + one reservation {reservation}"
    );
    assert_eq!(
        allowed, 4,
        "each call spends 50,100: the 5th would start at 200,400"
    );
    assert_eq!(up.count(), allowed);
    nth_decision(&d, "/v1/chat/completions", 19);
    let decided = chat_decisions(&d);
    assert_eq!(decided.len(), 20);
    assert_eq!(
        decided
            .iter()
            .filter(|e| e["decision"]["matched_policies"] == serde_json::json!(["budget"]))
            .count(),
        16
    );
    // Settled: the session is over its budget; the next call is denied too.
    let out = post(&sc, &d, r#"{"model":"gpt-4o-mini","max_tokens":1}"#, &[]);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(up.count(), allowed);
}

/// A stream that does not ask for its usage: the sidecar sets
/// `stream_options.include_usage: true` (also over the client's own `false`), the upstream
/// sees it with every other member as sent, and the usage is counted. A case-variant
/// `Stream_Options` (which a case-insensitive upstream could read instead) is refused.
#[test]
fn a_stream_without_include_usage_is_counted() {
    let (up, d, sc) = setup(&token_budget_policy(1_000_000));
    let bodies = [
        r#"{"model":"gpt-4o-mini","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"hi \"there\""}]}"#,
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":false},"max_tokens":200}"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        let out = post(&sc, &d, body, &[]);
        assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
        assert!(
            out.body.contains("\"usage\""),
            "client sees the usage chunk: {}",
            out.body
        );
        assert!(out.body.contains("data: [DONE]"), "{}", out.body);
        let seen = &up.seen()[i];
        let sent: serde_json::Value = serde_json::from_str(body).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(got["stream_options"]["include_usage"], true, "{got}");
        for (k, v) in sent.as_object().unwrap() {
            if k != "stream_options" {
                assert_eq!(&got[k], v, "{k} forwarded as sent");
            }
        }
        assert_eq!(
            seen.headers.get("content-length").map(String::as_str),
            Some(seen.body.len().to_string().as_str()),
            "Content-Length follows the rewritten body"
        );
    }
    let o = usage_outcomes(&d, 2);
    for (e, out_tokens) in o.iter().zip([300, 200]) {
        let u = &e["connector"]["usage"];
        assert_eq!(u["charged"], "reported", "{e}");
        assert_eq!(u["output_tokens"], out_tokens, "{e}");
        assert_eq!(u["input_tokens"], 100, "{e}");
    }
    // A call that names no max_tokens reserves the configured ceiling (default 32,768).
    let body = r#"{"model":"gpt-4o-mini"}"#;
    assert_eq!(post(&sc, &d, body, &[]).status, 200);
    let o = usage_outcomes(&d, 3);
    assert_eq!(
        o[2]["connector"]["usage"]["reserved_tokens"],
        32_768 + body.len() as i64
    );

    let out = post(
        &sc,
        &d,
        r#"{"model":"gpt-4o-mini","stream":true,"Stream_Options":{"include_usage":false}}"#,
        &[],
    );
    assert_eq!(out.status, 400, "{out:?}");
    assert_eq!(out.json()["reason"], "MalformedRequest");
    assert!(
        out.json()["detail"]
            .as_str()
            .unwrap()
            .contains("Stream_Options"),
        "{out:?}"
    );
    let e = nth_decision(&d, "/v1/chat/completions", 3);
    assert_eq!(e["decision"]["reason"], "MalformedRequest");
    assert_eq!(up.count(), 3);
}

/// The client reads the first event of a stream and hangs up, before the usage (sent 5 s
/// later) could pass. The call is charged its reservation (or, if the sidecar saw the end, the
/// usage): the session's 1,000-token budget is spent and the next call is denied. Before,
/// such a call cost nothing.
#[test]
fn a_client_that_leaves_early_is_still_charged() {
    let (up, d, sc) = setup(&token_budget_policy(1_000));
    let script = r#"
import json, sys, requests
proxy, ca, url = sys.argv[1], sys.argv[2], sys.argv[3]
r = requests.post(url, proxies={"https": proxy}, verify=ca, stream=True, timeout=20,
    headers={"x-test-sse-gap-ms": "5000", "content-type": "application/json"},
    data=json.dumps({"model": "gpt-4o-mini", "max_tokens": 900, "stream": True,
                     "stream_options": {"include_usage": True},
                     "messages": [{"role": "user", "content": "count to a thousand"}]}))
first = None
for line in r.iter_lines():
    if line.startswith(b"data:"):
        first = line.decode()
        break
r.close()
print(json.dumps({"status": r.status_code, "first": first}))
"#;
    let out = in_cgroup_command(
        None,
        "python3",
        &[
            "-c",
            script,
            &sc.proxy_url(),
            d.ca_cert().to_str().unwrap(),
            CHAT,
        ],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["status"], 200, "{v}");
    assert!(
        v["first"]
            .as_str()
            .unwrap()
            .contains("chat.completion.chunk")
    );
    let o = usage_outcomes(&d, 1);
    let u = &o[0]["connector"]["usage"];
    assert!(u["total_tokens"].as_i64().unwrap() >= 1_000, "{}", o[0]);
    if u["charged"] == "reservation" {
        assert_eq!(
            o[0]["connector"]["aborted"], "ResponseIncomplete",
            "{}",
            o[0]
        );
        assert!(
            u["note"].as_str().unwrap().contains("did not complete"),
            "{u}"
        );
    }
    let out = post(&sc, &d, r#"{"model":"gpt-4o-mini","max_tokens":1}"#, &[]);
    assert_eq!(out.status, 403, "{out:?}");
    assert!(out.json()["detail"].as_str().unwrap().contains("budget"));
    assert_eq!(up.count(), 1);
}

/// An upstream reporting negative (or absurd) usage cannot hand a budget back: the report is
/// refused, the reservation is charged, the audit says why, and the budget still holds.
#[test]
fn negative_or_absurd_usage_does_not_reset_the_budget() {
    let (up, d, sc) = setup(&token_budget_policy(1_000));
    let out = post(&sc, &d, r#"{"model":"gpt-4o-mini","max_tokens":600}"#, &[]);
    assert_eq!(out.status, 200, "{out:?}");
    let body = r#"{"model":"gpt-4o-mini","max_tokens":300}"#;
    let out = post(&sc, &d, body, &["x-test-output-tokens: -1000000"]);
    assert_eq!(out.status, 200, "decided at 700 < 1000: {out:?}");
    let o = usage_outcomes(&d, 2);
    assert_eq!(o[0]["connector"]["usage"]["total_tokens"], 700);
    let u = &o[1]["connector"]["usage"];
    assert_eq!(u["charged"], "reservation", "{u}");
    assert_eq!(u["total_tokens"], 300 + body.len() as i64, "{u}");
    assert!(
        u["note"]
            .as_str()
            .unwrap()
            .contains("completion_tokens = -1000000"),
        "{u}"
    );
    let out = post(&sc, &d, r#"{"model":"gpt-4o-mini","max_tokens":1}"#, &[]);
    assert_eq!(out.status, 403, "the budget was not reset: {out:?}");
    assert_eq!(up.count(), 2);

    // Absurd: more tokens than any response holds. Refused the same way (fresh deployment:
    // the first session is spent).
    let (_up2, d2, sc2) = setup(&token_budget_policy(1_000_000));
    let out = post(&sc2, &d2, body, &["x-test-output-tokens: 900000000000"]);
    assert_eq!(out.status, 200, "{out:?}");
    let o = usage_outcomes(&d2, 1);
    let u = &o[0]["connector"]["usage"];
    assert_eq!(u["charged"], "reservation", "{u}");
    assert!(u["note"].as_str().unwrap().contains("900000000000"), "{u}");
}

/// Parser differentials, on the shipped LLM policy: a case-variant duplicate of `model` and
/// a case-only variant of `max_tokens` (a case-insensitive upstream would read them) are
/// refused; with both `max_completion_tokens` and `max_tokens` the larger decides, and the
/// body leaves as sent.
#[test]
fn body_attributes_are_read_the_strict_way() {
    let (up, d, sc) = setup(&shipped_policy("runtime/llm/llm.cedar"));
    for (i, (body, why)) in [
        (
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
            "upstreams disagree",
        ),
        (r#"{"MODEL":"gpt-4o"}"#, "only in case"),
        (
            r#"{"model":"gpt-4o-mini","Max_Tokens":100000}"#,
            "only in case",
        ),
        // U+212A KELVIN SIGN, which Unicode case folding reads as `k`.
        (
            "{\"model\":\"gpt-4o-mini\",\"max_to\u{212A}ens\":100000}",
            "only in case",
        ),
    ]
    .iter()
    .enumerate()
    {
        let out = post(&sc, &d, body, &[]);
        assert_eq!(out.status, 400, "{body}: {out:?}");
        assert_eq!(out.json()["reason"], "MalformedRequest");
        let e = nth_decision(&d, "/v1/chat/completions", i);
        assert_eq!(e["decision"]["reason"], "MalformedRequest", "{e}");
        assert!(
            e["decision"]["detail"].as_str().unwrap().contains(why),
            "{body}: {e}"
        );
    }
    assert_eq!(up.count(), 0);

    // The cap (4,096) applies to the larger of the two limits, whichever field carries it.
    for (i, body) in [
        r#"{"model":"gpt-4o-mini","max_completion_tokens":100,"max_tokens":100000}"#,
        r#"{"model":"gpt-4o-mini","max_completion_tokens":100000,"max_tokens":100}"#,
    ]
    .iter()
    .enumerate()
    {
        let out = post(&sc, &d, body, &[]);
        assert_eq!(out.status, 403, "{body}: {out:?}");
        let e = nth_decision(&d, "/v1/chat/completions", 4 + i);
        assert_eq!(e["envelope"]["intent"]["request"]["max_tokens"], 100000);
        assert_eq!(
            e["decision"]["matched_policies"],
            serde_json::json!(["llm-max-tokens-cap"])
        );
    }
    assert_eq!(up.count(), 0);
    let body = r#"{"model":"gpt-4o-mini", "max_completion_tokens":100,"max_tokens":200}"#;
    let out = post(&sc, &d, body, &[]);
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        up.seen()[0].body,
        body.as_bytes(),
        "both fields forwarded as sent"
    );
    let e = nth_decision(&d, "/v1/chat/completions", 6);
    assert_eq!(e["envelope"]["intent"]["request"]["max_tokens"], 200);
}

/// The Realtime API on the shipped policy: `GET /v1/realtime?model=…` (WebSocket upgrade)
/// is decided on the query string's model. A model off the realtime list is denied; under the
/// token budget a realtime session (whose frames Firma cannot count) is denied unless the
/// agent is named as exempt; the exempt agent with a listed model gets its session. Query
/// tricks (a second `model`, a case variant) are refused.
#[test]
fn realtime_model_from_the_query_string() {
    use firma_testing::config::HostRoute;
    use firma_testing::ws::{WsEcho, client_args, client_result};
    let tmp = tempfile::tempdir().unwrap();
    let echo = WsEcho::start(
        tmp.path(),
        &["api.openai.com"],
        "127.0.0.1:0".parse().unwrap(),
    );
    let s = Settings {
        upstream_hosts: Vec::new(),
        runtime_policy: shipped_policy("runtime/llm/llm.cedar"),
        extra: OPENAI_CREDENTIAL.into(),
        ..Settings::default()
    };
    let d = Deployment::new(None, &s);
    let mut t = d.toml(None, &s);
    t.extra_root_certs = vec![echo.ca_path.clone()];
    t.hosts = vec![HostRoute {
        host: "api.openai.com".into(),
        address: echo.addr,
        extra: String::new(),
    }];
    t.write(&d.config).unwrap();
    let sc = d.start(&[(OPENAI_KEY_ENV, CANARY)]);
    let voice = d.issue_token("tenant-voice", "voice-1", "model.inference.chat", "*");
    let open = |query: &str, cap: Option<&str>| {
        let url = format!("wss://api.openai.com/v1/realtime{query}");
        let mut cmd = in_cgroup_command(
            None,
            "python3",
            &client_args(&url, &d.ca_cert(), Some(&sc.proxy_url())),
        );
        if let Some(c) = cap {
            cmd.env("FIRMA_TEST_CAPABILITY", c);
        }
        client_result(&cmd.output().unwrap())
    };
    let seen = std::cell::Cell::new(0);
    // The decision of the call just made (the n-th so far).
    let last_decision = || {
        let e = nth_decision(&d, "/v1/realtime", seen.get());
        seen.set(seen.get() + 1);
        e
    };
    let denied = |v: &serde_json::Value, status: u16, reason: &str| {
        assert_eq!(v["status"], status, "{v}");
        let body: serde_json::Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["reason"], reason, "{v}");
    };

    // Budgeted agent (the seed's tenant-acme), listed model: fail closed.
    let v = open("?model=gpt-4o-mini-realtime-preview", None);
    denied(&v, 403, "PolicyDenied");
    let e = last_decision();
    assert_eq!(
        e["envelope"]["intent"]["request"]["model"],
        "gpt-4o-mini-realtime-preview"
    );
    assert_eq!(
        e["decision"]["matched_policies"],
        serde_json::json!(["llm-realtime-unmetered"])
    );

    // Exempt agent, model off the realtime list (the old "GET without a body" clause let it
    // through): denied, the audit names the model.
    for model in ["gpt-4o", "gpt-4o-mini"] {
        let v = open(&format!("?model={model}"), Some(&voice));
        denied(&v, 403, "PolicyDenied");
        let e = last_decision();
        assert_eq!(e["envelope"]["intent"]["request"]["model"], model, "{e}");
        assert!(
            e["decision"]["detail"]
                .as_str()
                .unwrap()
                .contains("no policy permits it"),
            "{e}"
        );
    }
    // No model at all: denied too.
    denied(&open("", Some(&voice)), 403, "PolicyDenied");
    assert!(last_decision()["envelope"]["intent"]["request"]["model"].is_null());

    // Query tricks: a second model, a case variant, '+' that readers decode differently.
    for q in [
        "?model=gpt-4o-mini-realtime-preview&model=gpt-4o",
        "?model=gpt-4o-mini-realtime-preview&Model=gpt-4o",
        "?MODEL=gpt-4o",
    ] {
        let v = open(q, Some(&voice));
        denied(&v, 400, "MalformedRequest");
        assert_eq!(last_decision()["decision"]["reason"], "MalformedRequest");
    }
    assert!(echo.sessions().is_empty(), "{:?}", echo.sessions());

    // Exempt agent, listed model: the session is relayed.
    let v = open("?model=gpt-4o-mini-realtime-preview", Some(&voice));
    assert_eq!(v["status"], 101, "{v}\n{}", sc.log_text());
    assert_eq!(v["echoes"][0], "ping-1");
    let e = last_decision();
    assert_eq!(e["decision"]["outcome"], "ALLOW");
    assert_eq!(e["capability"]["agent_id"], "tenant-voice");
    assert_eq!(
        e["decision"]["matched_policies"],
        serde_json::json!(["llm-realtime-models"])
    );
    let sessions = assert_eventually(Duration::from_secs(5), "server session ended", || {
        let s = echo.sessions();
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        sessions[0]["path"],
        "/v1/realtime?model=gpt-4o-mini-realtime-preview"
    );
    assert_eq!(sessions[0]["authorization"], format!("Bearer {CANARY}"));
}
