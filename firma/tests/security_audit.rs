//! Security regressions (http_proxy mode, real binary, real clients): credentials never leave
//! in cleartext; every request the upstream saw has its ALLOW decision in a chain that
//! verifies, whatever the client does; the audit sink fails closed on a full disk and never
//! leaves a torn line; one client cannot switch interception off for another; later requests
//! on a connection get the same framing checks as the first.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CANARY: &str = "sk-canary-security-91b2";

fn credential(host: &str) -> String {
    format!(
        "[[sidecar.credentials]]\nhost = {host:?}\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_KEY\"\n"
    )
}

fn setup(settings: Settings) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(
        tmp.path(),
        &["api.openai.com", "api.acme-vendor.com", "paste.rs"],
    );
    let d = Deployment::new(Some(&up), &settings);
    std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
    std::mem::forget(tmp);
    let sc = d.start(&[("FIRMA_TEST_KEY", CANARY)]);
    (up, d, sc)
}

/// Decision events (not outcomes) with `outcome`.
fn decisions(d: &Deployment, outcome: &str) -> Vec<serde_json::Value> {
    d.audit()
        .into_iter()
        .filter(|e| e["event"] == "decision" && e["decision"]["outcome"] == outcome)
        .collect()
}

fn verify(d: &Deployment, file: &Path) -> (bool, String) {
    let out = firma(&[
        "audit",
        "verify",
        file.to_str().unwrap(),
        "--public-key",
        d.root().join("audit.pub").to_str().unwrap(),
    ]);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// A plain TCP listener that records every byte it receives (what a cleartext credential
/// would be seen by on the wire).
struct Recorder {
    addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    conns: Arc<Mutex<usize>>,
}

impl Recorder {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(0));
        let (b, c) = (bytes.clone(), conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                *c.lock().unwrap() += 1;
                let b = b.clone();
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        b.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                });
            }
        });
        Self { addr, bytes, conns }
    }

    fn saw(&self, needle: &str) -> bool {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).contains(needle)
    }
}

/// Absolute-form `http://`, `CONNECT host:80` + plaintext, and h2c with `:scheme http` to a
/// host with a credential: denied `InsecureUpstream`, audited, nothing reaches the wire.
#[test]
fn credential_never_leaves_in_cleartext() {
    let plain = Recorder::start();
    let (_up, d, sc) = setup(Settings {
        upstream_hosts: vec!["api.acme-vendor.com".into(), "paste.rs".into()],
        extra: format!(
            "{}\n[[sidecar.connector.hosts]]\nhost = \"api.openai.com\"\naddress = \"{}\"\n",
            credential("api.openai.com"),
            plain.addr
        ),
        ..Settings::default()
    });
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();

    // 1. Absolute-form plain HTTP through the proxy.
    let out = curl(&proxy, &ca, "http://api.openai.com/v1/models", &[]);
    assert_eq!(out.status, 403, "{out:?}\n{}", sc.log_text());
    assert_eq!(out.json()["reason"], "InsecureUpstream", "{out:?}");

    // 2. CONNECT to port 80, then plaintext inside the tunnel.
    let out = curl(
        &proxy,
        &ca,
        "http://api.openai.com:80/v1/models",
        &["--proxytunnel"],
    );
    assert_eq!(out.status, 403, "{out:?}\n{}", sc.log_text());
    assert_eq!(out.json()["reason"], "InsecureUpstream", "{out:?}");

    // 3. h2c (prior knowledge) to the proxy with :scheme http (hyper's client, real frames).
    let status = h2c_get(sc.addr, "http://api.openai.com/v1/models");
    assert_eq!(status, 403, "h2c\n{}", sc.log_text());

    // Each client already has its 403: every request was decided, and a denial sends nothing
    // afterwards, so the upstream's silence needs no wait once the denials are audited.
    assert_eventually(
        Duration::from_secs(5),
        "three InsecureUpstream denials audited",
        || {
            decisions(&d, "DENY")
                .iter()
                .filter(|e| e["decision"]["reason"] == "InsecureUpstream")
                .count()
                == 3
        },
    );
    assert!(
        !plain.saw(CANARY),
        "credential seen in cleartext on the wire"
    );
    assert_eq!(*plain.conns.lock().unwrap(), 0, "nothing may be sent");
    assert!(decisions(&d, "ALLOW").is_empty());
}

/// One HTTP/2 request over cleartext (prior knowledge) with an absolute URI; returns the status.
fn h2c_get(proxy: SocketAddr, uri: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(uri)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        send.send_request(req).await.unwrap().status().as_u16()
    })
}

/// Clients that give up after the request is sent (HTTP/1 close, HTTP/2 close mid-stream)
/// leave the upstream with the whole request: each of those has its ALLOW decision in a chain
/// that verifies, and an outcome saying the client went away.
#[test]
fn every_request_the_upstream_saw_is_audited_whatever_the_client_does() {
    let (up, d, sc) = setup(Settings {
        extra: credential("api.acme-vendor.com"),
        ..Settings::default()
    });
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();
    for http in ["--http1.1", "--http2"] {
        for _ in 0..3 {
            let out = curl(
                &proxy,
                &ca,
                "https://api.acme-vendor.com/slow?ms=1200",
                &[http, "--max-time", "0.6", "-d", "payload=secret-body"],
            );
            assert_eq!(out.status, 0, "the client gave up: {out:?}");
        }
    }
    // A normal one too.
    let ok = curl(&proxy, &ca, "https://api.acme-vendor.com/v1/x", &[]);
    assert_eq!(ok.status, 200, "{ok:?}");
    // The upstream finishes the slow ones.
    assert_eventually(Duration::from_secs(10), "upstream saw 7 requests", || {
        up.count() == 7
    });
    // Each ALLOW is persisted before its request leaves, so it is in the file already; the
    // six `client_gone` outcomes are written when the sidecar notices the clients left.
    let allows = decisions(&d, "ALLOW");
    assert_eq!(
        allows.len(),
        up.count(),
        "every request the upstream saw has its ALLOW decision\n{}",
        d.audit_text()
    );
    let gone = || {
        d.audit()
            .into_iter()
            .filter(|e| e["event"] == "outcome" && e["connector"]["client_gone"] == true)
            .count()
    };
    assert_eventually(Duration::from_secs(10), "six client_gone outcomes", || {
        gone() >= 6
    });
    assert_eq!(gone(), 6, "{}", d.audit_text());
    let (ok, out) = verify(&d, &d.audit_path);
    assert!(ok, "{out}");
}

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with `dir/filler`.
fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![b'x'; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(b"x");
}

/// The audit file's filesystem fills up: allowed requests are denied `AuditUnavailable` (the
/// upstream sees none of them), nothing is torn, it recovers when space returns, a restart
/// after a torn line cuts it and records a recovery event, and the chain verifies.
#[test]
fn audit_fails_closed_on_a_full_disk_and_recovers() {
    if !nix_is_root() {
        firma_testing::skip(
            "audit_fails_closed_on_a_full_disk_and_recovers",
            "needs root to mount a tmpfs",
        );
        return;
    }
    let (up, d, mut sc) = setup(Settings {
        extra: format!(
            "{}\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n",
            credential("api.acme-vendor.com")
        ),
        ..Settings::default()
    });
    let _ = sc.terminate(Duration::from_secs(5));
    let disk = d.root().join("disk");
    assert!(mount_tmpfs(&disk, "256k"), "mount tmpfs");
    let _unmount = Unmount(disk.clone());
    let audit = disk.join("audit.jsonl");
    let cfg = std::fs::read_to_string(&d.config).unwrap().replace(
        &format!("path = \"{}\"", d.audit_path.display()),
        &format!("path = \"{}\"", audit.display()),
    );
    std::fs::write(&d.config, cfg).unwrap();
    let mut sc = d.start(&[("FIRMA_TEST_KEY", CANARY)]);
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();
    let get = || curl(&proxy, &ca, "https://api.acme-vendor.com/v1/x", &[]);
    let count_allows = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "decision" && e["decision"]["outcome"] == "ALLOW")
            .count()
    };
    for _ in 0..3 {
        assert_eq!(get().status, 200);
    }
    fill(&disk);
    // The file's last page may still hold a few events; then every allow is refused.
    let mut refused = false;
    for _ in 0..40 {
        if get().status == 403 {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a full disk must stop allowed requests\n{}",
        sc.log_text()
    );
    let before = up.count();
    for _ in 0..5 {
        let out = get();
        assert_eq!(out.status, 403, "{out:?}");
        assert_eq!(out.json()["reason"], "AuditUnavailable", "{out:?}");
    }
    assert_eq!(up.count(), before, "nothing allowed unaudited");
    assert!(
        sc.log_text().contains("AUDIT FAILING"),
        "loud log\n{}",
        sc.log_text()
    );
    // The admin listener says so too: not ready (audit_sink), events counted as lost.
    let (status, body) = sc.admin_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"failing\":[\"audit_sink\"]"), "{body}");
    assert_eq!(sc.metric("firma_sidecar_audit_sink_healthy"), Some(0.0));
    let lost = sc
        .metric("firma_sidecar_audit_failures_total")
        .unwrap_or(0.0);
    assert!(
        lost >= 5.0,
        "audit_failures_total {lost} after 5 refused requests"
    );
    let raw = std::fs::read(&audit).unwrap();
    assert_eq!(raw.last(), Some(&b'\n'), "no torn line");
    // Space returns: requests flow again.
    std::fs::remove_file(disk.join("filler")).unwrap();
    assert_eventually(Duration::from_secs(5), "recovered", || get().status == 200);
    assert!(sc.log_text().contains("audit sink recovered"));
    assert_eq!(sc.admin_get("/readyz").0, 200);
    assert_eq!(sc.metric("firma_sidecar_audit_sink_healthy"), Some(1.0));
    // Every answered request was decided and an ALLOW is persisted before its request leaves;
    // the fence makes sure no later decision is still on its way to the file.
    d.audit_fence_in(&sc, &audit);
    assert_eq!(
        count_allows(),
        up.count(),
        "ALLOW decisions == requests upstream"
    );
    let (ok, out) = verify(&d, &audit);
    assert!(ok, "{out}");

    // A crash mid-line: the restart cuts it and says so in a signed event.
    let _ = sc.terminate(Duration::from_secs(5));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap()
        .write_all(b"{\"event\":\"decision\",\"torn")
        .unwrap();
    let sc2 = d.start(&[("FIRMA_TEST_KEY", CANARY)]);
    assert_eq!(
        curl(
            &sc2.proxy_url(),
            &ca,
            "https://api.acme-vendor.com/v1/x",
            &[]
        )
        .status,
        200
    );
    // The recovery event is written at startup, before the sidecar is ready; the fence proves
    // the writer is past it.
    d.audit_fence_in(&sc2, &audit);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("\"torn"), "torn tail cut");
    assert!(text.contains("\"event\":\"recovery\""), "{text}");
    let (ok, out) = verify(&d, &audit);
    assert!(ok, "{out}");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| text(&o.stdout).trim() == "0")
}

/// With the opt-in fallback (`fallback_hosts`), a client that rejects the Firma CA makes the
/// sidecar fall back to a blind tunnel for that client only: a client at another address is
/// still intercepted (and gets its credential). Without it (the default, see
/// `hostile_destination.rs`) nothing changes even for clients at the same address.
/// A client that closes a TLS session without close_notify is not a malformed request.
#[test]
fn one_client_cannot_switch_interception_off_for_another() {
    let (up, d, sc) = setup(Settings {
        // The admin listener shows when the sidecar has noticed the last client's close.
        extra: format!(
            "{}[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n",
            credential("api.openai.com")
        ),
        fallback_hosts: vec!["api.openai.com".into()],
        ..Settings::default()
    });
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();
    // Client A (127.0.0.1) rejects our certificate (no --cacert: the system roots).
    for _ in 0..3 {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--noproxy", "", "--proxy", &proxy])
            .arg("https://api.openai.com/v1/models")
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
    // Client B from 127.0.0.2 is still intercepted.
    let out = curl(
        &proxy,
        &ca,
        "https://api.openai.com/v1/models",
        &["--interface", "127.0.0.2"],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", sc.log_text());
    assert!(
        up.seen()
            .iter()
            .any(|s| s.headers.get("authorization") == Some(&format!("Bearer {CANARY}"))),
        "B's request was intercepted and injected"
    );

    // close without close_notify: python's ssl socket closed without unwrap().
    let before = decisions(&d, "DENY").len();
    let script = format!(
        r#"
import socket, ssl
s = socket.create_connection(("127.0.0.1", {port}), source_address=("127.0.0.3", 0))
s.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
assert b"200" in s.recv(1024)
ctx = ssl.create_default_context(cafile={ca:?})
t = ctx.wrap_socket(s, server_hostname="api.openai.com")
t.getpeercert()
import os
os.close(t.detach())  # the fd goes without close_notify
"#,
        port = sc.addr.port(),
        ca = ca.display().to_string(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The client has exited; wait until the sidecar has noticed the close (no client
    // connection left open), then fence the audit: a denial for it would be in the file by then.
    assert_eventually(Duration::from_secs(10), "the sidecar saw the close", || {
        sc.metric("firma_sidecar_connections_active{mode=\"http_proxy\"}") == Some(0.0)
    });
    let fence = d.audit_fence(&sc);
    let denials: Vec<_> = decisions(&d, "DENY")
        .into_iter()
        .filter(|e| e["envelope"]["intent"]["resource"]["path"] != fence.as_str())
        .collect();
    assert_eq!(
        denials.len(),
        before,
        "closing without close_notify is not a denial\n{}",
        d.audit_text()
    );
}

/// Runs a Python TLS client through CONNECT that sends `first` then `second` on one
/// connection and returns everything it read.
fn two_requests(sc: &Sidecar, ca: &Path, first: &str, second: &str) -> String {
    let script = format!(
        r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", {port}))
s.sendall(b"CONNECT api.acme-vendor.com:443 HTTP/1.1\r\nHost: api.acme-vendor.com:443\r\n\r\n")
assert b"200" in s.recv(1024)
ctx = ssl.create_default_context(cafile={ca:?})
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(s, server_hostname="api.acme-vendor.com")
t.sendall({first:?}.encode() + {second:?}.encode())
t.settimeout(5)
out = b""
try:
    while True:
        b = t.recv(65536)
        if not b: break
        out += b
except Exception:
    pass
sys.stdout.write(out.decode("latin-1"))
"#,
        port = sc.addr.port(),
        ca = ca.display().to_string(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    text(&out.stdout)
}

/// Smuggling shapes and oversized heads on the *second* request of a keep-alive connection
/// get the same 400 `MalformedRequest`, audit event and no upstream request as on the first.
#[test]
fn later_requests_on_a_connection_get_the_same_checks() {
    let (up, d, sc) = setup(Settings::default());
    let ca = d.ca_cert();
    let first = "GET /v1/first HTTP/1.1\r\nHost: api.acme-vendor.com\r\n\r\n";
    let cases = [
        (
            "POST /v1/smuggle HTTP/1.1\r\nHost: api.acme-vendor.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string(),
            "Transfer-Encoding",
        ),
        (
            format!(
                "GET /v1/big HTTP/1.1\r\nHost: api.acme-vendor.com\r\nX-Big: {}\r\n\r\n",
                "a".repeat(70_000)
            ),
            "64 KiB",
        ),
    ];
    for (second, why) in cases {
        let before = up.count();
        let out = two_requests(&sc, &ca, first, &second);
        assert!(out.starts_with("HTTP/1.1 200"), "first answered: {out}");
        assert!(
            out.contains("HTTP/1.1 400") && out.contains("MalformedRequest"),
            "second refused: {out}\n{}",
            sc.log_text()
        );
        assert_eq!(
            up.count(),
            before + 1,
            "only the first reached the upstream"
        );
        assert_eventually(Duration::from_secs(5), "audited", || {
            decisions(&d, "DENY").iter().any(|e| {
                e["decision"]["reason"] == "MalformedRequest"
                    && e["decision"]["detail"]
                        .as_str()
                        .is_some_and(|s| s.contains(why))
            })
        });
    }
    assert!(up.seen().iter().all(|s| s.path == "/v1/first"));
}

/// A `CONNECT` to a host that is tunnelled (not intercepted) is decided with the CONNECT
/// request's own Firma headers: a bad `x-firma-capability` there is refused, not ignored.
#[test]
fn connect_headers_select_the_tunnel_capability() {
    let (up, d, sc) = setup(Settings {
        intercept_hosts: vec!["api.openai.com".into()],
        strict_hosts: Vec::new(),
        ..Settings::default()
    });
    let proxy = sc.proxy_url();
    let upstream_ca = d.root().join("upstream-ca.crt");
    let bad = curl(
        &proxy,
        &upstream_ca,
        "https://api.acme-vendor.com/v1/x",
        &[
            "--proxy-header",
            "x-firma-capability: v4.public.not-a-token",
        ],
    );
    assert_eq!(bad.status, 0, "the CONNECT was refused: {bad:?}");
    assert!(bad.stderr.contains("403"), "{bad:?}");
    assert_eventually(Duration::from_secs(5), "CONNECT denial audited", || {
        decisions(&d, "DENY").iter().any(|e| {
            e["decision"]["reason"] == "CapabilityInvalid"
                && e["envelope"]["intent"]["resource"]["host"] == "api.acme-vendor.com"
        })
    });
    // Without the header the seeded capability applies and the tunnel opens (end-to-end TLS
    // with the upstream itself: Firma sees no request inside).
    let ok = curl(
        &proxy,
        &upstream_ca,
        "https://api.acme-vendor.com/v1/x",
        &[],
    );
    assert_eq!(ok.status, 200, "{ok:?}\n{}", sc.log_text());
    assert_eq!(up.count(), 1);
    assert_eventually(Duration::from_secs(5), "tunnel outcome with bytes", || {
        d.audit().iter().any(|e| {
            e["event"] == "outcome" && e["connector"]["bytes_down"].as_u64().unwrap_or(0) > 0
        })
    });
}

/// An HTTP/2 client that breaks the protocol (a SETTINGS frame of invalid size) ends its
/// connection with a GOAWAY and one `MalformedRequest` audit event, like HTTP/1 garbage does.
#[test]
fn http2_protocol_errors_are_audited() {
    let (up, d, sc) = setup(Settings::default());
    let before = decisions(&d, "DENY").len();
    let mut s = std::net::TcpStream::connect(sc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // SETTINGS with a 5-byte payload: FRAME_SIZE_ERROR (RFC 9113 6.5).
    s.write_all(&[0, 0, 5, 0x4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    // A GOAWAY frame (type 0x7) came back before the close.
    assert!(
        out.windows(4).any(|w| w[3] == 0x7 && w[0] == 0),
        "GOAWAY expected: {out:?}"
    );
    assert_eventually(Duration::from_secs(5), "protocol error audited", || {
        decisions(&d, "DENY").len() == before + 1
            && decisions(&d, "DENY").iter().any(|e| {
                e["decision"]["reason"] == "MalformedRequest"
                    && e["decision"]["detail"]
                        .as_str()
                        .is_some_and(|s| s.contains("malformed HTTP request"))
            })
    });
    assert_eq!(up.count(), 0);
}

/// `kill -9` of the sidecar while requests are in flight upstream: every request the upstream
/// received has its ALLOW decision in the file (written before the request left), and the
/// chain verifies; the restarted sidecar continues it.
#[test]
fn kill_9_mid_request_loses_no_decision() {
    let (up, d, mut sc) = setup(Settings {
        extra: credential("api.acme-vendor.com"),
        ..Settings::default()
    });
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (p, c) = (proxy.clone(), ca.clone());
            std::thread::spawn(move || {
                curl(
                    &p,
                    &c,
                    &format!("https://api.acme-vendor.com/slow?ms=1500&i={i}"),
                    &["-d", "x=1"],
                )
            })
        })
        .collect();
    assert_eventually(Duration::from_secs(10), "upstream has them all", || {
        up.count() == 4
    });
    let _ = sc.child.kill(); // SIGKILL
    let _ = sc.child.wait();
    for c in clients {
        assert_ne!(c.join().unwrap().status, 200, "cut by the kill");
    }
    assert_eq!(decisions(&d, "ALLOW").len(), up.count());
    let (ok, out) = verify(&d, &d.audit_path);
    assert!(ok, "{out}");
    let sc2 = d.start(&[("FIRMA_TEST_KEY", CANARY)]);
    let ok = curl(
        &sc2.proxy_url(),
        &ca,
        "https://api.acme-vendor.com/v1/x",
        &[],
    );
    assert_eq!(ok.status, 200);
    // The new ALLOW was persisted before its request left; the fence shows nothing else from
    // the killed run arrives late.
    d.audit_fence(&sc2);
    assert_eq!(decisions(&d, "ALLOW").len(), up.count());
    let (ok, out) = verify(&d, &d.audit_path);
    assert!(ok, "{out}");
}
