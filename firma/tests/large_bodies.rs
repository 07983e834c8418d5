//! Large request bodies on rules that read body attributes (docs/llm-policies.md): vision-sized
//! chat requests are forwarded and decided, bodies over `extract_max_body_bytes` get 413
//! `BodyTooLarge` as a response (not a reset) over HTTP/1.1 and HTTP/2, and concurrent uploads
//! stay within `extract_body_budget_bytes` (503 `BodyBudgetExhausted` + `Retry-After` beyond,
//! which clients retry). The real `firma sidecar` (http_proxy, MITM), curl and Python httpx
//! (HTTP/1.1 and HTTP/2), the local HTTPS upstream, the audit file, /proc/PID/status.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHAT: &str = "https://api.openai.com/v1/chat/completions";
const CHAT_PATH: &str = "/v1/chat/completions";
const HOSTS: [&str; 2] = ["api.openai.com", "paste.rs"];
const MIB: usize = 1024 * 1024;

/// A sidecar with the shipped LLM policy (gpt-4o-mini allowed, gpt-4o not) and `mapping` lines
/// added to `[sidecar.mapping]`.
fn setup(mapping: &str, workers: Option<u16>) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &HOSTS);
    std::mem::forget(tmp);
    let hosts: Vec<String> = HOSTS.map(String::from).to_vec();
    let s = Settings {
        intercept_hosts: hosts.clone(),
        strict_hosts: Vec::new(),
        upstream_hosts: hosts,
        runtime_policy: shipped_policy("runtime/llm/llm.cedar"),
        workers,
        default_timeout_ms: 60_000,
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    assert!(cfg.contains("[sidecar.mapping]\n"));
    let cfg = cfg.replacen(
        "[sidecar.mapping]\n",
        &format!("[sidecar.mapping]\n{mapping}"),
        1,
    );
    std::fs::write(&d.config, cfg).unwrap();
    let sc = d.start(&[]);
    (up, d, sc)
}

/// A chat request with one base64 "image" (deterministic bytes), exactly `len` bytes long.
fn vision_body(len: usize, model: &str) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"{model}","max_tokens":100,"messages":[{{"role":"user","content":[{{"type":"text","text":"What is in this image?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,"#
    );
    let tail = r#""}}]}]}"#;
    let n = len - head.len() - tail.len();
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u32 = 0x2545_f491;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(head.as_bytes());
    out.extend((0..n).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        B64[(x % 64) as usize]
    }));
    out.extend_from_slice(tail.as_bytes());
    assert_eq!(out.len(), len);
    out
}

fn write_body(d: &Deployment, name: &str, body: &[u8]) -> PathBuf {
    let p = d.root().join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// curl POST of `file` with `args` (e.g. `--http2`, `-H Expect:`), 60 s at most.
fn curl_post(sc: &Sidecar, d: &Deployment, file: &Path, args: &[&str]) -> CurlOut {
    let data = format!("@{}", file.display());
    let mut all = vec![
        "--max-time",
        "60",
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
    ];
    all.extend_from_slice(args);
    curl(&sc.proxy_url(), &d.ca_cert(), CHAT, &all)
}

fn httpx_ok() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import httpx, h2"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with httpx[http2] is required in CI"
        );
        eprintln!("SKIP: python3 with httpx[http2] missing (pip install 'httpx[http2]')");
    }
    ok
}

/// `tests/python/large_bodies.py`: `count` concurrent httpx POSTs of `file`, each 503
/// retried up to `retries` times.
fn httpx_post(
    sc: &Sidecar,
    d: &Deployment,
    file: &Path,
    http2: bool,
    count: usize,
    retries: u32,
) -> Vec<serde_json::Value> {
    run_httpx(&sc.proxy_url(), &d.ca_cert(), file, http2, count, retries)
}

fn run_httpx(
    proxy: &str,
    ca: &Path,
    file: &Path,
    http2: bool,
    count: usize,
    retries: u32,
) -> Vec<serde_json::Value> {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(repo_root().join("tests/python/large_bodies.py"))
        .args(["--url", CHAT, "--file"])
        .arg(file)
        .args(["--count", &count.to_string()])
        .args(["--retry-503", &retries.to_string()])
        .env("HTTPS_PROXY", proxy)
        .env("SSL_CERT_FILE", ca)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    if http2 {
        cmd.arg("--http2");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Node's http2 client (through a CONNECT to the proxy): POST `file` to the chat endpoint;
/// `{status, body, rstCode, errors}` once the response has ended (or the stream closed).
fn node_h2_post(sc: &Sidecar, d: &Deployment, file: &Path) -> serde_json::Value {
    const SCRIPT: &str = r#"
const http = require('http'), http2 = require('http2'), tls = require('tls'), fs = require('fs');
const [proxy, ca, file] = process.argv.slice(1);
const p = new URL(proxy);
const size = fs.statSync(file).size;
let status = null, body = '', errors = [];
const done = (rstCode) => { console.log(JSON.stringify({status, body, rstCode, errors})); process.exit(0); };
setTimeout(() => { errors.push('timeout'); done(null); }, 60000);
http.request({host: p.hostname, port: p.port, method: 'CONNECT', path: 'api.openai.com:443'})
  .on('connect', (res, socket) => {
    const s = tls.connect({socket, servername: 'api.openai.com', ca: fs.readFileSync(ca), ALPNProtocols: ['h2']});
    const client = http2.connect('https://api.openai.com', {createConnection: () => s});
    client.on('error', e => errors.push('session: ' + e.code));
    const st = client.request({':method': 'POST', ':path': '/v1/chat/completions',
      'content-type': 'application/json', 'content-length': String(size)});
    st.on('response', h => { status = h[':status']; });
    st.on('data', c => { body += c; });
    st.on('error', e => errors.push('stream: ' + e.code));
    // The response ended: what the client saw (the reset that follows it is not waited for).
    st.on('end', () => done(st.rstCode));
    st.on('close', () => done(st.rstCode));
    fs.createReadStream(file).pipe(st);
  })
  .on('error', e => { errors.push('connect: ' + e.code); done(null); })
  .end();
"#;
    let out = std::process::Command::new("node")
        .args(["-e", SCRIPT])
        .arg(sc.proxy_url())
        .arg(d.ca_cert())
        .arg(file)
        .output()
        .expect("node (CI installs nodejs)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

/// Decision events for the chat path, in order, once there are `n`.
fn decisions(d: &Deployment, n: usize) -> Vec<serde_json::Value> {
    assert_eventually(Duration::from_secs(10), "decisions audited", || {
        let v: Vec<_> = d
            .audit_for("api.openai.com")
            .into_iter()
            .filter(|e| e["envelope"]["intent"]["resource"]["path"] == CHAT_PATH)
            .collect();
        (v.len() >= n).then_some(v)
    })
}

/// `VmHWM` / `VmRSS` of `pid` in bytes.
fn mem_kb(pid: u32, field: &str) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 1024
}

#[test]
fn vision_request_of_12_mb_is_forwarded_and_its_model_decided() {
    let (up, d, sc) = setup("", None);
    let allowed = vision_body(12_000_000, "gpt-4o-mini");
    let denied = vision_body(12_000_000, "gpt-4o");
    let ok_file = write_body(&d, "vision-ok.json", &allowed);
    let bad_file = write_body(&d, "vision-bad.json", &denied);

    // curl over HTTP/1.1 (with its Expect: 100-continue) and HTTP/2.
    for args in [&["--http1.1"][..], &["--http2"][..]] {
        let out = curl_post(&sc, &d, &ok_file, args);
        assert_eq!(out.status, 200, "{args:?}: {out:?}\n{}", sc.log_text());
    }
    let mut forwarded = 2;
    if httpx_ok() {
        for http2 in [false, true] {
            let r = httpx_post(&sc, &d, &ok_file, http2, 1, 0);
            assert_eq!(r[0]["status"], 200, "httpx http2={http2}: {r:?}");
        }
        forwarded += 2;
    }
    let seen = up.seen();
    assert_eq!(seen.len(), forwarded);
    for s in &seen {
        assert_eq!(s.body.len(), allowed.len(), "upstream got every byte");
        assert!(s.body == allowed, "upstream got the same bytes");
    }
    for e in decisions(&d, forwarded) {
        assert_eq!(e["decision"]["outcome"], "ALLOW", "{e}");
        assert_eq!(
            e["envelope"]["intent"]["request"],
            serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 100})
        );
    }

    // The same size with a model the policy refuses: decided on the body, denied, not sent.
    let out = curl_post(&sc, &d, &bad_file, &["--http2"]);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "PolicyDenied");
    let mut denials = 1;
    if httpx_ok() {
        let r = httpx_post(&sc, &d, &bad_file, false, 1, 0);
        assert_eq!(r[0]["status"], 403, "{r:?}");
        assert_eq!(r[0]["reason"], "PolicyDenied");
        denials += 1;
    }
    assert_eq!(up.count(), forwarded, "a denied body reached the upstream");
    let all = decisions(&d, forwarded + denials);
    for e in &all[forwarded..] {
        assert_eq!(e["decision"]["reason"], "PolicyDenied", "{e}");
        assert_eq!(e["envelope"]["intent"]["request"]["model"], "gpt-4o");
    }
}

#[test]
fn body_over_the_limit_gets_413_as_a_response_over_http1_and_http2() {
    // The documented default limit (32 MiB): nothing configured.
    let (up, d, sc) = setup("", None);
    let over = vision_body(40 * 1_000_000, "gpt-4o-mini");
    let file = write_body(&d, "over.json", &over);
    // Past what the sidecar drains before answering (128 MiB).
    let huge = vision_body(150 * 1_000_000, "gpt-4o-mini");
    let huge_file = write_body(&d, "huge.json", &huge);

    let mut cases: Vec<(&str, CurlOut)> = vec![
        // Expect: 100-continue (curl's default above 1 MiB): answered before the upload.
        ("curl http1.1", curl_post(&sc, &d, &file, &["--http1.1"])),
        // No Expect: the body is read and discarded, then answered.
        (
            "curl http1.1 no-expect",
            curl_post(&sc, &d, &file, &["--http1.1", "-H", "Expect:"]),
        ),
        // Chunked, no declared size: refused once the limit is crossed.
        (
            "curl http1.1 chunked",
            curl_post(
                &sc,
                &d,
                &file,
                &[
                    "--http1.1",
                    "-H",
                    "Expect:",
                    "-H",
                    "Transfer-Encoding: chunked",
                ],
            ),
        ),
        ("curl http2", curl_post(&sc, &d, &file, &["--http2"])),
    ];
    let mut expected = Vec::new();
    for (name, out) in cases.drain(..) {
        assert_eq!(out.status, 413, "{name}: {out:?}\n{}", sc.log_text());
        assert_eq!(out.json()["reason"], "BodyTooLarge", "{name}: {out:?}");
        assert!(
            !out.stderr.contains("framing layer"),
            "{name}: reset instead of a response: {}",
            out.stderr
        );
        expected.push(name.to_string());
    }
    if httpx_ok() {
        for http2 in [false, true] {
            let r = httpx_post(&sc, &d, &file, http2, 1, 0);
            assert_eq!(r[0]["status"], 413, "httpx http2={http2}: {r:?}");
            assert_eq!(r[0]["reason"], "BodyTooLarge");
            expected.push(format!("httpx http2={http2}"));
        }
    }
    // 150 MB over HTTP/2, not drained: the complete 413, then RST_STREAM(NO_ERROR) while the
    // client is still sending. Node's http2 client shows the response (curl 7.88 calls that
    // reset a framing error, curl 8 does not: docs/llm-policies.md).
    let node = node_h2_post(&sc, &d, &huge_file);
    assert_eq!(node["status"], 413, "node: {node}");
    let body: serde_json::Value =
        serde_json::from_str(node["body"].as_str().unwrap()).unwrap_or_default();
    assert_eq!(body["reason"], "BodyTooLarge", "node: {node}");
    assert_eq!(node["errors"], serde_json::json!([]), "node: {node}");
    expected.push("node http2 150 MB".into());

    assert_eq!(up.count(), 0, "an over-limit body was forwarded");
    let all = decisions(&d, expected.len());
    assert_eq!(all.len(), expected.len(), "one decision per request");
    for (e, name) in all.iter().zip(&expected) {
        assert_eq!(e["decision"]["outcome"], "DENY", "{name}: {e}");
        assert_eq!(e["decision"]["reason"], "BodyTooLarge", "{name}: {e}");
        let detail = e["decision"]["detail"].as_str().unwrap();
        assert!(detail.contains("33554432"), "{name}: {detail}");
    }
    // The sidecar still serves a normal request afterwards.
    let small = write_body(&d, "small.json", &vision_body(2_000, "gpt-4o-mini"));
    let out = curl_post(&sc, &d, &small, &["--http2"]);
    assert_eq!(out.status, 200, "{out:?}");
}

/// 10 clients upload 20 MB each at once while the budget holds 100 MiB: what does not fit is
/// refused 503 with Retry-After and succeeds when retried, every body reaches the upstream
/// whole, and the sidecar's peak RSS stays under baseline + budget + workers x body + 64 MiB.
#[test]
fn concurrent_20_mb_uploads_stay_within_the_body_budget() {
    if !httpx_ok() {
        return;
    }
    let budget = 100 * MIB;
    let workers = 2;
    let (up, d, sc) = setup(
        &format!("extract_body_budget_bytes = {budget}\n"),
        Some(workers),
    );
    let pid = sc.process.child.id();
    let body = vision_body(20 * 1_000_000, "gpt-4o-mini");
    let file = write_body(&d, "twenty.json", &body);
    // Warm up (TLS, leaf certificate, upstream pool) with a small request.
    let small = write_body(&d, "small.json", &vision_body(2_000, "gpt-4o-mini"));
    assert_eq!(curl_post(&sc, &d, &small, &["--http2"]).status, 200);
    let baseline = mem_kb(pid, "VmHWM:");

    // Five over HTTP/1.1 and five over HTTP/2, all released at once per process.
    let h1 = {
        let (sc_url, ca, file) = (sc.proxy_url(), d.ca_cert(), file.clone());
        std::thread::spawn(move || run_httpx(&sc_url, &ca, &file, false, 5, 20))
    };
    let mut results = httpx_post(&sc, &d, &file, true, 5, 20);
    results.extend(h1.join().unwrap());
    let peak = mem_kb(pid, "VmHWM:");

    let refused: u64 = results
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(1) - 1)
        .sum();
    for r in &results {
        assert_eq!(r["status"], 200, "{results:?}");
    }
    let seen = up.seen();
    let bodies: Vec<_> = seen.iter().filter(|s| s.path == CHAT_PATH).collect();
    assert_eq!(bodies.len(), 11, "10 uploads and the warm-up forwarded");
    for s in bodies.iter().filter(|s| s.body.len() > 2_000) {
        assert!(s.body == body, "upstream got a different body");
    }
    // Audit: 11 allows, one BodyBudgetExhausted denial per 503 the clients saw.
    let all = decisions(&d, 11 + refused as usize);
    let allows = all
        .iter()
        .filter(|e| e["decision"]["outcome"] == "ALLOW")
        .count();
    let busy = all
        .iter()
        .filter(|e| e["decision"]["reason"] == "BodyBudgetExhausted")
        .count();
    assert_eq!((allows, busy as u64), (11, refused), "{all:?}");

    let bound = baseline + budget + workers as usize * body.len() + 64 * MIB;
    eprintln!(
        "large_bodies: VmHWM baseline {} MB, after 10 x 20 MB {} MB (bound {} MB), 503s retried: {refused}",
        baseline / 1_000_000,
        peak / 1_000_000,
        bound / 1_000_000
    );
    assert!(
        peak <= bound,
        "sidecar peak RSS {peak} B over the bound {bound} B (baseline {baseline})"
    );
}

/// A raw HTTP/1.1 client (Python, TLS through `CONNECT`) that sends `head` then `sent` bytes of
/// `body_file` and half-closes (`eof`) or waits; prints the status lines it got back.
const LIAR: &str = r#"
import socket, ssl, sys
proxy, ca, body_file, declared, sent, eof = sys.argv[1:7]
host, port = proxy.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=60)
s.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
got = b""
while b"\r\n\r\n" not in got:
    got += s.recv(1)
t = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="api.openai.com")
body = open(body_file, "rb").read()[: int(sent)]
t.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
          b"Content-Type: application/json\r\nContent-Length: " + declared.encode() + b"\r\n\r\n" + body)
if eof == "1":
    t.shutdown(socket.SHUT_WR)
out = b""
try:
    while True:
        b = t.recv(65536)
        if not b:
            break
        out += b
except (OSError, ssl.SSLError):
    pass
print(" ".join(l.split(b" ")[1].decode() for l in out.split(b"\r\n") if l.startswith(b"HTTP/1.1 ")))
"#;

fn liar(
    sc: &Sidecar,
    d: &Deployment,
    file: &Path,
    declared: usize,
    sent: usize,
    eof: bool,
) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", LIAR, &sc.addr.to_string()])
        .arg(d.ca_cert())
        .arg(file)
        .args([
            declared.to_string(),
            sent.to_string(),
            u8::from(eof).to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Clients whose `Content-Length` lies about a body the rule reads: one declares 12 MB and
/// sends 1 MB before closing its side; one declares 12 MB and sends a valid body of 1 MB; one
/// declares less than it sends (the rest is smuggled as a "next request"). Each is refused and
/// audited, nothing but the declared bytes of a complete body reaches the upstream, and the
/// sidecar goes on serving.
#[test]
fn bodies_whose_content_length_lies_are_refused_and_audited() {
    let (up, d, mut sc) = setup("", None);
    let file = write_body(&d, "liar.json", &vision_body(12_000_000, "gpt-4o-mini"));

    // Declares 12 MB, sends 1 MB, then EOF: the body ends short of its length.
    let status = liar(&sc, &d, &file, 12_000_000, 1_000_000, true);
    assert!(!status.contains("200"), "short body answered {status}");
    let e = decisions(&d, 1).remove(0);
    assert_eq!(e["decision"]["outcome"], "DENY", "{e}");
    assert_eq!(e["decision"]["reason"], "MalformedRequest", "{e}");
    assert_eq!(up.count(), 0, "a short body was forwarded");

    // Declares 12 MB, sends a complete, valid 1 MB chat body, then EOF: still short.
    let small = vision_body(1_000_000, "gpt-4o-mini");
    let small_file = write_body(&d, "liar-small.json", &small);
    let status = liar(&sc, &d, &small_file, 12_000_000, 1_000_000, true);
    assert!(
        !status.contains("200"),
        "short valid body answered {status}"
    );
    let all = decisions(&d, 2);
    assert_eq!(
        all[1]["decision"]["reason"], "MalformedRequest",
        "{}",
        all[1]
    );
    assert_eq!(up.count(), 0, "a short body was forwarded");

    // Declares 1 MB, sends 1 MB of a valid body plus 2 MB more: the declared body is decided
    // and forwarded as declared; the rest is not a request head and is refused.
    let mut long = small.clone();
    long.extend(std::iter::repeat_n(b'a', 2_000_000));
    let long_file = write_body(&d, "liar-long.json", &long);
    let status = liar(&sc, &d, &long_file, small.len(), long.len(), false);
    // The rest is refused and the connection closed (the 400 may be cut by the close while
    // the client is still sending): never a second answered request.
    assert_eq!(
        status.split(' ').next(),
        Some("200"),
        "declared body answered {status}"
    );
    assert!(
        !status.contains("200 200"),
        "smuggled bytes answered {status}"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].body == small,
        "the upstream got exactly the declared bytes"
    );
    let all = decisions(&d, 3);
    assert_eq!(all[2]["decision"]["outcome"], "ALLOW", "{}", all[2]);
    // The smuggled bytes never became a request: refused as a malformed head (no path).
    assert_eventually(Duration::from_secs(10), "smuggled head audited", || {
        d.audit_for("api.openai.com")
            .into_iter()
            .find(|e| {
                e["decision"]["reason"] == "MalformedRequest"
                    && e["envelope"]["intent"]["resource"]["path"] != CHAT_PATH
            })
            .map(|_| ())
    });
    assert!(sc.alive(), "the sidecar died:\n{}", sc.log_text());
    let ok = curl_post(&sc, &d, &small_file, &["--http2"]);
    assert_eq!(ok.status, 200, "{ok:?}");
}
