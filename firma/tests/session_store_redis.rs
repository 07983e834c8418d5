//! Session state shared on Redis (docs/scale-out.md, "Session state on Redis"): the real
//! `firma sidecar` twice, both with `[sidecar.session_store] backend = "redis"` on a real
//! `redis-server` started by the test on a loopback port, one session (`tenant-acme`/`s1`)
//! whose calls land on both, the local upstream counting what it serves, and both signed audit
//! files. Per scenario: what each client got, what the upstream saw, what both audits say, and
//! what Redis holds.
//!
//! - a budget of 10 calls, 30 concurrent calls over an http_proxy and a transparent sidecar
//!   (root + BPF, own network namespace): exactly 10 forwarded; then Redis `kill -9`
//!   (`SessionStoreUnavailable`, 503, audited on both) and restarted (recovery without a sidecar
//!   restart; the counts survived in Redis's append-only file);
//! - a token budget spent by streamed responses over the same two sidecars;
//! - hostile: a client that aborts mid-stream and a sidecar `kill -9`'d mid-stream: neither
//!   reservation holds the budget (settled, resp. expired after `reservation_ttl_seconds`,
//!   while a live sidecar's long stream keeps its reservation extended);
//! - `on_unavailable = "local_allowance"`: a bounded number of calls while Redis is down,
//!   audited as such, replayed into the shared count on recovery.

use firma_testing::client::{CurlOut, PROXY_VARS, curl};
use firma_testing::config::Mode;
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::redis::{self, Redis};
use firma_testing::sidecar::{Deployment, OPENAI_KEY_ENV, Settings, Sidecar, token_budget_policy};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma, skip, text, unique};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const CANARY: &str = "sk-canary-redis-7c21";
const AGENT: &str = "tenant-acme";
const HOST: &str = "api.openai.com";
const MODELS: &str = "https://api.openai.com/v1/models";
const CHAT: &str = "https://api.openai.com/v1/chat/completions";
/// The call counter of session `s1` for the chat action class (key layout in
/// `firma-sidecar/src/pipeline/session_store/scripts.rs`).
const COUNT_KEY: &str = "firma:n:2:s1:model.inference.chat";
const USAGE_KEY: &str = "firma:us:s1";
const RESERVATIONS_KEY: &str = "firma:rs:s1";
/// `(bundle_ttl_seconds, enforcement_timeout_ms)`: 30 concurrent calls contending for one
/// session on a loaded 2-core machine can take more than the harness's 2 s to decide; an
/// `EnforcementTimeout` there would say nothing about the store.
const ENFORCEMENT: (u64, u64) = (90, 10_000);

/// At most ten calls of the chat class per session.
const TEN_CALLS: &str = r#"
@id("ten-calls")
permit (principal, action == Firma::Action::"model.inference.chat", resource)
when { context.action_count <= 10 };
"#;

/// The admin listener and the shared store on `redis` (after the credential). A loaded 2-core
/// CI machine running 30 curl processes and two sidecars can stall one round trip well past the
/// 200 ms default, which would be an outage: the tests allow 1.5 s.
fn extra(redis: &Redis, store_extra: &str) -> String {
    format!(
        "\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n\n[sidecar.session_store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout_ms = 1500\n{store_extra}",
        redis.url()
    )
}

fn redis_skip(test: &str) -> bool {
    match redis::skip_reason() {
        Some(why) => {
            skip(test, &why);
            true
        }
        None => false,
    }
}

/// An http_proxy sidecar for `AGENT`/`s1` on `up`, sharing `redis`.
fn proxy_sidecar(up: &Upstream, redis: &Redis, policy: &str, store: &str) -> (Deployment, Sidecar) {
    let s = Settings {
        constraint_enforcement: ENFORCEMENT,
        ..Settings::llm(&[HOST], policy, &extra(redis, store))
    };
    let d = Deployment::new(Some(up), &s);
    let sc = d.start(&[(OPENAI_KEY_ENV, CANARY)]);
    (d, sc)
}

/// Decision events for api.openai.com in `d`'s audit once there are `n`.
fn decisions(d: &[&Deployment], n: usize) -> Vec<Value> {
    assert_eventually(Duration::from_secs(20), "decisions audited", || {
        let all: Vec<Value> = d
            .iter()
            .flat_map(|d| d.audit_for("api.openai.com"))
            .collect();
        (all.len() >= n).then_some(all)
    })
}

fn reason(e: &Value) -> &str {
    e["decision"]["reason"].as_str().unwrap_or("")
}

fn allowed(e: &Value) -> bool {
    e["decision"]["outcome"] == "ALLOW"
}

/// `firma audit verify` passes on `d`'s audit file.
fn verify(d: &Deployment) {
    let out = firma(&[
        "audit",
        "verify",
        d.audit_path.to_str().unwrap(),
        "--public-key",
        d.root().join("audit.pub").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Redis's clock in unix ms (the clock reservation deadlines are on).
fn redis_ms(r: &Redis) -> i64 {
    let t = r.cli(&["TIME"]);
    let mut it = t.lines().map(|l| l.trim().parse::<i64>().unwrap_or(0));
    let (s, us) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    s * 1000 + us / 1000
}

/// Deadlines (ms) of the reservations held for `s1`.
fn deadlines(r: &Redis) -> Vec<i64> {
    r.cli(&["ZRANGE", RESERVATIONS_KEY, "0", "-1", "WITHSCORES"])
        .lines()
        .skip(1)
        .step_by(2)
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// An http_proxy and a transparent sidecar on one Redis (root + BPF, own network namespace).

struct Pair {
    redis: Redis,
    up: Upstream,
    proxy_d: Deployment,
    proxy: Sidecar,
    tp_d: Deployment,
    tp: Sidecar,
    cg: TestCgroup,
    hosts: PathBuf,
    _pins: TestPins,
    _tmp: tempfile::TempDir,
}

impl Pair {
    fn new(policy: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let redis = Redis::start(&tmp.path().join("redis"));
        let up_addr = std::net::SocketAddr::new(DST_V4.parse().unwrap(), 443);
        let up = Upstream::start_at(tmp.path(), &["api.openai.com"], up_addr);
        let (proxy_d, proxy) = proxy_sidecar(&up, &redis, policy, "");

        let pins = TestPins::new();
        let cg = TestCgroup::top(&unique("firma-redis")).expect("test cgroup");
        let mut s = Settings {
            upstream_hosts: Vec::new(),
            constraint_enforcement: ENFORCEMENT,
            ..Settings::llm(&[HOST], policy, &extra(&redis, ""))
        };
        let tp_d = Deployment::new(Some(&up), &s);
        s.mode = Mode::Transparent {
            port: firma_testing::free_dual_port(),
            pin_dir: pins.dir.clone(),
            control_socket: tp_d.root().join("run/sidecar.sock"),
            allow_ephemeral_pins: None,
        };
        tp_d.write(Some(&up), &s);
        let hosts = tp_d.root().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n::1 localhost\n{DST_V4} api.openai.com\n"),
        )
        .unwrap();
        let tp = tp_d.start_with_hosts(&[(OPENAI_KEY_ENV, CANARY)], &hosts);
        let cg_path = format!("/{}", cg.dir.file_name().unwrap().to_string_lossy());
        let out = firma(&[
            "sidecar",
            "-c",
            tp_d.config.to_str().unwrap(),
            "attach",
            "--cgroup",
            &cg_path,
            "--agent-id",
            AGENT,
            "--session-id",
            "s1",
        ]);
        assert!(out.status.success(), "attach: {}", text(&out.stderr));
        Self {
            redis,
            up,
            proxy_d,
            proxy,
            tp_d,
            tp,
            cg,
            hosts,
            _pins: pins,
            _tmp: tmp,
        }
    }

    fn via_proxy(&self, url: &str, args: &[&str]) -> CurlOut {
        curl(&self.proxy.proxy_url(), &self.proxy_d.ca_cert(), url, args)
    }

    /// curl inside the tagged cgroup with no proxy: redirected by the kernel.
    fn via_transparent(&self, url: &str, args: &[&str]) -> CurlOut {
        let script = format!(
            "mount --bind '{}' /etc/hosts && echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            self.hosts.display(),
            self.cg.dir.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .args(["sh", "curl", "-sS", "--max-time", "20", "--cacert"])
            .arg(self.tp_d.ca_cert())
            .args(args)
            .args(["-w", "\n%{http_code}", url]);
        for v in PROXY_VARS {
            cmd.env_remove(v);
        }
        let out = cmd.output().expect("curl");
        let stdout = text(&out.stdout);
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
        CurlOut {
            status: code.trim().parse().unwrap_or(0),
            body: body.to_string(),
            stderr: text(&out.stderr),
        }
    }

    /// Call `i` of a batch: even ones through the http_proxy sidecar, odd ones transparent.
    fn call(&self, i: usize, url: &str, args: &[&str]) -> CurlOut {
        if i.is_multiple_of(2) {
            self.via_proxy(url, args)
        } else {
            self.via_transparent(url, args)
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- http_proxy ---\n{}\n--- transparent ---\n{}\n--- redis ---\n{}",
            self.proxy.log_text(),
            self.tp.log_text(),
            self.redis.log()
        )
    }
}

/// 30 concurrent calls against a budget of 10, spread over both sidecars: exactly 10 reach the
/// upstream, each count 1..=10 is seen once in the audits; Redis killed: both sidecars deny
/// `SessionStoreUnavailable` (503), audited, and report the store down; Redis restarted on the
/// same data: both recover without a restart and the budget is still spent.
#[test]
fn two_sidecars_share_a_budget_of_ten_calls_and_recover_from_a_redis_restart() {
    const NAME: &str = "two_sidecars_share_a_budget_of_ten_calls_and_recover_from_a_redis_restart";
    if redis_skip(NAME) || !in_fresh_netns(NAME) {
        return;
    }
    let mut p = Pair::new(TEN_CALLS);
    let outs: Vec<CurlOut> = std::thread::scope(|s| {
        let p = &p;
        let calls: Vec<_> = (0..30)
            .map(|i| s.spawn(move || p.call(i, MODELS, &[])))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let ok: Vec<usize> = (0..30).filter(|i| outs[*i].status == 200).collect();
    let denied = outs.iter().filter(|o| o.status == 403).count();
    assert_eq!(ok.len() + denied, 30, "{outs:?}\n{}", p.logs());
    for o in outs.iter().filter(|o| o.status == 403) {
        assert_eq!(o.json()["reason"], "PolicyDenied", "{o:?}\n{}", p.logs());
        assert!(
            o.json()["detail"]
                .as_str()
                .unwrap()
                .contains("action_count = 11"),
            "{o:?}"
        );
    }
    println!(
        "30 concurrent calls over both sidecars: {} allowed ({} through http_proxy, {} transparent), {denied} denied; upstream saw {}",
        ok.len(),
        ok.iter().filter(|i| *i % 2 == 0).count(),
        ok.iter().filter(|i| *i % 2 == 1).count(),
        p.up.count()
    );
    assert_eq!(ok.len(), 10, "{}", p.logs());
    assert_eq!(p.up.count(), 10);
    assert_eq!(p.redis.cli(&["GET", COUNT_KEY]), "10");
    let ev = decisions(&[&p.proxy_d, &p.tp_d], 30);
    assert_eq!(ev.len(), 30);
    let mut counts: Vec<i64> = ev
        .iter()
        .filter(|e| allowed(e))
        .map(|e| {
            let d = e["decision"]["detail"].as_str().unwrap();
            let n = d.split("action_count = ").nth(1).unwrap();
            n[..n.find(')').unwrap()].parse().unwrap()
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=10).collect::<Vec<_>>(),
        "each count decided once"
    );
    assert_eq!(
        ev.iter().filter(|e| reason(e) == "PolicyDenied").count(),
        20
    );
    // Both sidecars took part (transparent decisions carry the workload).
    assert!(
        p.tp_d
            .audit_for("api.openai.com")
            .iter()
            .all(|e| e["workload"]["cgroup_path"].is_string())
    );
    assert_eq!(p.proxy_d.audit_for("api.openai.com").len(), 15);
    assert_eq!(p.tp_d.audit_for("api.openai.com").len(), 15);
    for sc in [&p.proxy, &p.tp] {
        assert_eq!(sc.metric("firma_sidecar_session_store_up"), Some(1.0));
    }

    // Redis dies: fail closed, 503 + Retry-After (retryable), audited by both sidecars.
    p.redis.kill();
    for i in 0..2 {
        let out = p.call(i, MODELS, &["-D", "-"]);
        assert_eq!(out.status, 503, "{out:?}\n{}", p.logs());
        assert!(
            out.body.to_ascii_lowercase().contains("retry-after: 1"),
            "{out:?}"
        );
        let body = out.body.rsplit("\r\n\r\n").next().unwrap_or_default();
        let v: Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(v["reason"], "SessionStoreUnavailable", "{out:?}");
    }
    let ev = decisions(&[&p.proxy_d, &p.tp_d], 32);
    assert_eq!(
        ev.iter()
            .filter(|e| reason(e) == "SessionStoreUnavailable")
            .count(),
        2
    );
    for d in [&p.proxy_d, &p.tp_d] {
        assert!(
            d.audit_for("api.openai.com")
                .iter()
                .any(|e| reason(e) == "SessionStoreUnavailable")
        );
    }
    assert_eq!(
        p.up.count(),
        10,
        "nothing forwarded while the store is down"
    );
    for sc in [&p.proxy, &p.tp] {
        assert_eq!(sc.metric("firma_sidecar_session_store_up"), Some(0.0));
        assert!(
            sc.log_text().contains("SESSION STORE UNAVAILABLE"),
            "{}",
            sc.log_text()
        );
    }

    // Redis back on the same data: no sidecar restart; the spent budget is still spent, and a
    // fresh session is served.
    p.redis.restart();
    for sc in [&p.proxy, &p.tp] {
        assert_eventually(Duration::from_secs(10), "store up again", || {
            sc.metric("firma_sidecar_session_store_up") == Some(1.0)
        });
    }
    let out = p.via_transparent(MODELS, &[]);
    assert_eq!(out.status, 403, "{out:?}");
    assert!(
        out.json()["detail"]
            .as_str()
            .unwrap()
            .contains("action_count = 11"),
        "{out:?}"
    );
    let token = p
        .proxy_d
        .issue_token(AGENT, "s2", "model.inference.chat", "*");
    let out = p.via_proxy(MODELS, &["-H", &format!("x-firma-capability: {token}")]);
    assert_eq!(out.status, 200, "{out:?}\n{}", p.logs());
    assert_eq!(p.up.count(), 11);
    assert_eq!(
        p.redis.cli(&["GET", "firma:n:2:s2:model.inference.chat"]),
        "1"
    );
    verify(&p.proxy_d);
    verify(&p.tp_d);
}

/// A 5,000-token session budget, 20 concurrent streamed calls of 1,000 output tokens over both
/// sidecars (the SSE usage is what is charged): exactly 5 are served whichever sidecar took
/// them, the upstream serves 5 x 1,100 tokens, Redis holds the settled total and no
/// reservation.
#[test]
fn two_sidecars_share_a_token_budget_spent_by_streamed_responses() {
    const NAME: &str = "two_sidecars_share_a_token_budget_spent_by_streamed_responses";
    if redis_skip(NAME) || !in_fresh_netns(NAME) {
        return;
    }
    let p = Pair::new(&token_budget_policy(5_000));
    let body = r#"{"model":"gpt-4o-mini","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let args = [
        "-H",
        "content-type: application/json",
        "-H",
        "x-test-sse-gap-ms: 300",
        "--data-binary",
        body,
    ];
    let outs: Vec<CurlOut> = std::thread::scope(|s| {
        let (p, args) = (&p, &args);
        let calls: Vec<_> = (0..20)
            .map(|i| s.spawn(move || p.call(i, CHAT, args)))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let ok: Vec<&CurlOut> = outs.iter().filter(|o| o.status == 200).collect();
    let denied: Vec<&CurlOut> = outs.iter().filter(|o| o.status == 403).collect();
    assert_eq!(ok.len() + denied.len(), 20, "{outs:?}\n{}", p.logs());
    for o in &ok {
        assert!(
            o.body.contains("\"usage\"") && o.body.contains("[DONE]"),
            "{o:?}"
        );
    }
    for o in &denied {
        assert_eq!(o.json()["reason"], "PolicyDenied", "{o:?}");
        assert!(
            o.json()["detail"]
                .as_str()
                .unwrap()
                .contains("forbidden by budget"),
            "{o:?}"
        );
    }
    println!(
        "20 concurrent streamed calls over both sidecars: {} allowed, {} denied; upstream served {} tokens",
        ok.len(),
        denied.len(),
        p.up.served_tokens()
    );
    assert_eq!(ok.len(), 5, "{}", p.logs());
    assert_eq!(p.up.count(), 5);
    assert_eq!(p.up.served_tokens(), 5 * 1_100);
    assert_eventually(Duration::from_secs(20), "all settled", || {
        p.redis.hget_i64(USAGE_KEY, "rt") == 0 && p.redis.hget_i64(USAGE_KEY, "out") == 5_000
    });
    assert_eq!(p.redis.hget_i64(USAGE_KEY, "in"), 500);
    assert_eq!(p.redis.hget_i64("firma:ua:tenant-acme", "out"), 5_000);
    let outcomes: Vec<Value> = assert_eventually(Duration::from_secs(20), "usage outcomes", || {
        let o: Vec<Value> = [&p.proxy_d, &p.tp_d]
            .iter()
            .flat_map(|d| d.audit())
            .filter(|e| e["event"] == "outcome" && !e["connector"]["usage"].is_null())
            .collect();
        (o.len() >= 5).then_some(o)
    });
    assert_eq!(outcomes.len(), 5);
    for e in &outcomes {
        assert_eq!(e["connector"]["usage"]["charged"], "reported", "{e}");
        assert_eq!(e["connector"]["usage"]["output_tokens"], 1000, "{e}");
    }
    let ev = decisions(&[&p.proxy_d, &p.tp_d], 20);
    assert_eq!(ev.iter().filter(|e| allowed(e)).count(), 5);
    assert_eq!(
        ev.iter().filter(|e| reason(e) == "PolicyDenied").count(),
        15
    );
    verify(&p.proxy_d);
    verify(&p.tp_d);
}

// ---------------------------------------------------------------------------------------------
// Two http_proxy sidecars on loopback (no root needed).

/// A streamed call through `sc` that the upstream holds open (`x-test-sse-gap-ms`), as a
/// background curl.
fn open_stream(sc: &Sidecar, d: &Deployment, max_tokens: i64) -> std::process::Child {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "120",
        "--proxy",
        &sc.proxy_url(),
        "--noproxy",
        "",
    ])
    .arg("--cacert")
    .arg(d.ca_cert())
    .args([
        "-H",
        "content-type: application/json",
        "-H",
        "x-test-sse-gap-ms: 100000",
    ])
    .args(["--data-binary", &body, CHAT])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.spawn().expect("curl")
}

fn small_call(sc: &Sidecar, d: &Deployment) -> CurlOut {
    curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        CHAT,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"model":"gpt-4o-mini","max_tokens":1}"#,
        ],
    )
}

/// Hostile: a client that aborts mid-stream gets its reservation settled (charged as the
/// reservation, released from the in-flight total); a sidecar `kill -9`'d mid-stream leaves a
/// reservation that blocks the budget only until `reservation_ttl_seconds` after its last
/// extension, while a live sidecar keeps extending the reservation of its long stream.
#[test]
fn an_aborted_client_and_a_killed_sidecar_do_not_hold_the_budget() {
    const NAME: &str = "an_aborted_client_and_a_killed_sidecar_do_not_hold_the_budget";
    if redis_skip(NAME) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let redis = Redis::start(&tmp.path().join("redis"));
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let policy = token_budget_policy(30_000);
    let store = "reservation_ttl_seconds = 3\n";
    let (a_d, a) = proxy_sidecar(&up, &redis, &policy, store);
    let (b_d, mut b) = proxy_sidecar(&up, &redis, &policy, store);

    // 1. The client leaves mid-stream: the reservation is settled, not left in flight.
    let mut client = open_stream(&a, &a_d, 20_000);
    assert_eventually(Duration::from_secs(20), "stream forwarded", || {
        up.count() == 1
    });
    let reserved = redis.hget_i64(USAGE_KEY, "rt");
    assert!(reserved > 20_000, "reserved {reserved}");
    let _ = client.kill();
    let _ = client.wait();
    assert_eventually(Duration::from_secs(20), "aborted stream settled", || {
        redis.hget_i64(USAGE_KEY, "rt") == 0
    });
    let charged = redis.hget_i64(USAGE_KEY, "in") + redis.hget_i64(USAGE_KEY, "out");
    assert_eq!(
        charged, reserved,
        "the client that left is charged its reservation"
    );
    assert!(deadlines(&redis).is_empty());

    // 2. A long stream on B keeps its reservation past the TTL while B lives...
    let mut stream = open_stream(&b, &b_d, 10_000);
    assert_eventually(Duration::from_secs(20), "second stream forwarded", || {
        up.count() == 2
    });
    let first = deadlines(&redis);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eventually(
        Duration::from_secs(20),
        "reservation extended past its first deadline",
        || redis_ms(&redis) > first[0] && deadlines(&redis).first().is_some_and(|d| *d > first[0]),
    );
    let out = small_call(&a, &a_d);
    assert_eq!(
        out.status, 403,
        "the live reservation holds the budget: {out:?}"
    );
    assert!(
        out.json()["detail"]
            .as_str()
            .unwrap()
            .contains("of which reserved 10"),
        "{out:?}"
    );

    // ... and B dies: the reservation expires on Redis's clock, and the budget is free again.
    b.kill();
    let _ = stream.kill();
    let _ = stream.wait();
    let last = assert_eventually(Duration::from_secs(10), "deadline stops moving", || {
        let d = deadlines(&redis);
        d.first().copied()
    });
    assert_eventually(
        Duration::from_secs(20),
        "the dead sidecar's deadline passes",
        || redis_ms(&redis) > last && deadlines(&redis).first().is_none_or(|d| *d <= last),
    );
    let out = small_call(&a, &a_d);
    assert_eq!(out.status, 200, "{out:?}\n{}", a.log_text());
    assert_eventually(Duration::from_secs(20), "nothing left in flight", || {
        redis.hget_i64(USAGE_KEY, "rt") == 0 && deadlines(&redis).is_empty()
    });
    assert_eq!(up.count(), 3);
    let ev = decisions(&[&a_d], 3);
    assert_eq!(ev.iter().filter(|e| allowed(e)).count(), 2);
    verify(&a_d);
}

/// `on_unavailable = "local_allowance"`, `local_allowance = 2`: with Redis down a session gets
/// two more calls on this sidecar (audited as allowed from the local allowance), then
/// `SessionStoreUnavailable`; on recovery the two are added to the shared count.
#[test]
fn the_local_allowance_is_bounded_audited_and_replayed() {
    const NAME: &str = "the_local_allowance_is_bounded_audited_and_replayed";
    if redis_skip(NAME) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(&tmp.path().join("redis"));
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let store = "on_unavailable = \"local_allowance\"\nlocal_allowance = 2\n";
    let (d, sc) = proxy_sidecar(&up, &redis, TEN_CALLS, store);
    let get = || curl(&sc.proxy_url(), &d.ca_cert(), MODELS, &[]);
    for _ in 0..3 {
        assert_eq!(get().status, 200);
    }
    assert_eq!(redis.cli(&["GET", COUNT_KEY]), "3");
    redis.kill();
    let outs: Vec<u16> = (0..3).map(|_| get().status).collect();
    assert_eq!(outs, [200, 200, 503], "{}", sc.log_text());
    let ev = decisions(&[&d], 6);
    let local: Vec<&Value> = ev
        .iter()
        .filter(|e| {
            e["decision"]["detail"]
                .as_str()
                .is_some_and(|s| s.contains("from the local allowance"))
        })
        .collect();
    assert_eq!(local.len(), 2, "{ev:?}");
    assert!(local.iter().all(|e| allowed(e)));
    assert!(
        local[1]["decision"]["detail"]
            .as_str()
            .unwrap()
            .contains("action_count = 5")
    );
    assert_eq!(reason(&ev[5]), "SessionStoreUnavailable");
    assert_eq!(
        sc.metric("firma_sidecar_session_store_local_allowed_total"),
        Some(2.0)
    );
    redis.restart();
    assert_eventually(Duration::from_secs(10), "replayed", || {
        redis.cli(&["GET", COUNT_KEY]) == "5"
    });
    assert_eventually(Duration::from_secs(10), "store up again", || {
        sc.metric("firma_sidecar_session_store_up") == Some(1.0)
    });
    let out = get();
    assert_eq!(out.status, 200);
    assert_eq!(redis.cli(&["GET", COUNT_KEY]), "6");
    assert_eq!(up.count(), 6);
    verify(&d);
}
