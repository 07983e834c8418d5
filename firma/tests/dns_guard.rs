//! The DNS guard end to end (docs/architecture.md, "DNS guard"): the real `firma sidecar` in
//! transparent mode with `redirect_dns` on (the default), a tagged test cgroup, a DNS responder
//! of the test's own at 10.77.0.53:53 (and 8.8.8.8:53: both on `lo` of the test's private network
//! namespace, nothing outside it) that logs every name it receives, and unmodified clients
//! (`getent hosts`, Python `socket.getaddrinfo`, `dig`, curl by name) with /etc/resolv.conf and
//! /etc/hosts bind-mounted in a private mount namespace.
//!
//! Proves: an allowed name resolves through the guard and the connection then works end to end;
//! `secret-data.paste.rs` and a random name get NXDOMAIN and the responder never sees them; a
//! client that asks 8.8.8.8 directly, or uses TCP, is redirected the same and sees the answer
//! come from the address it asked; other query types for allowed names are REFUSED; every query
//! is an audit event with name, type, decision, reason and the workload (cgroup, pid); the
//! untagged cgroup is untouched; after `kill -9` of the sidecar tagged DNS fails and nothing
//! reaches the responder; hostile input (garbage, compression loop, two questions, a TCP length
//! prefix that lies, a flood) is answered FORMERR or dropped, audited, and the sidecar survives.
//!
//! Every test needs root + BPF and prints SKIP otherwise (`firma_testing::kernel`).

use firma_testing::config::Mode;
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::prometheus::{self, Prometheus};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, free_dual_port, free_port, text, unique};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const RESPONDER: &str = "10.77.0.53";
const PUBLIC_RESOLVER: &str = "8.8.8.8";
const AGENT: &str = "tenant-acme";
const SECRET: &str = "secret-data.paste.rs";
const RANDOM: &str = "r4nd0m-7f3k9q.invalid-exfil.net";
const CANARY: &str = "sk-canary-dns-7a1c";

/// The test's own DNS server: UDP and TCP on 0.0.0.0:53, one log line per question received
/// (`udp|tcp NAME QTYPE`), A answers from a fixed table (10.77.0.99 for any other name, so a
/// leaked query would visibly resolve), empty NOERROR for other types.
const PY_RESPONDER: &str = r#"
import socket, struct, sys, threading
log = open(sys.argv[1], 'a', buffering=1)
ADDR = {'api.openai.com': '10.77.0.2', 'www.allowed.test': '10.77.0.7'}
def parse(q):
    i, labels = 12, []
    while q[i] != 0:
        n = q[i]
        labels.append(q[i + 1:i + 1 + n].decode('latin1'))
        i += 1 + n
    qtype, = struct.unpack('>H', q[i + 1:i + 3])
    return '.'.join(labels).lower(), qtype, i + 5
def answer(q, transport):
    name, qtype, end = parse(q)
    log.write(f'{transport} {name} {qtype}\n')
    hdr = q[:2] + b'\x81\x80' + struct.pack('>HHHH', 1, 1 if qtype == 1 else 0, 0, 0)
    body = q[12:end]
    if qtype == 1:
        body += b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 60, 4) + socket.inet_aton(ADDR.get(name, '10.77.0.99'))
    return hdr + body
def udp(s):
    while True:
        q, peer = s.recvfrom(4096)
        try:
            s.sendto(answer(q, 'udp'), peer)
        except Exception as e:
            log.write(f'udp error {e}\n')
def tcp_conn(c):
    with c:
        while True:
            h = c.recv(2, socket.MSG_WAITALL)
            if len(h) < 2:
                return
            q = c.recv(struct.unpack('>H', h)[0], socket.MSG_WAITALL)
            a = answer(q, 'tcp')
            c.sendall(struct.pack('>H', len(a)) + a)
def tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(('0.0.0.0', 53))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(('0.0.0.0', 53))
t.listen(64)
threading.Thread(target=udp, args=(u,), daemon=True).start()
threading.Thread(target=tcp, args=(t,), daemon=True).start()
print('READY', flush=True)
threading.Event().wait()
"#;

/// Python client: raw DNS over UDP or TCP to `server`, one query per case, printing what came
/// back (`RCODE n FROM addr:port` or `NOREPLY`/`ERROR e`).
const PY_RAW: &str = r#"
import socket, struct, sys
server, mode = sys.argv[1], sys.argv[2]
def q(name, qtype=1, qid=0x4242, qd=1):
    b = struct.pack('>HHHHHH', qid, 0x0100, qd, 0, 0, 0)
    for l in name.split('.'):
        b += bytes([len(l)]) + l.encode()
    return b + b'\x00' + struct.pack('>HH', qtype, 1)
def udp(payload, timeout=3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(payload, (server, 53))
        data, frm = s.recvfrom(4096)
        print('RCODE', data[3] & 15, 'FROM', f'{frm[0]}:{frm[1]}', 'ID', struct.unpack('>H', data[:2])[0], flush=True)
    except socket.timeout:
        print('NOREPLY', flush=True)
    except OSError as e:
        print('ERROR', e.errno, flush=True)
def tcp(payload, declared=None):
    try:
        s = socket.create_connection((server, 53), timeout=3)
        n = len(payload) if declared is None else declared
        s.sendall(struct.pack('>H', n) + payload)
        if declared is not None:
            s.shutdown(socket.SHUT_WR)
        h = s.recv(2, socket.MSG_WAITALL)
        if len(h) < 2:
            print('CLOSED', flush=True)
            return
        data = s.recv(struct.unpack('>H', h)[0], socket.MSG_WAITALL)
        print('RCODE', data[3] & 15, 'FROM', '%s:%d' % s.getpeername()[:2], flush=True)
    except socket.timeout:
        print('NOREPLY', flush=True)
    except OSError as e:
        print('ERROR', e.errno, flush=True)
if mode == 'name':
    udp(q(sys.argv[3]))
elif mode == 'tcp-name':
    tcp(q(sys.argv[3]))
elif mode == 'hostile':
    udp(b'\x01\x02\x03')                                   # runt: dropped
    loop = struct.pack('>HHHHHH', 0x5151, 0x0100, 1, 0, 0, 0) + b'\xc0\x0c\x00\x01\x00\x01'
    udp(loop)                                              # compression loop: FORMERR
    udp(q('api.openai.com', qd=2))                         # two questions: FORMERR
    udp(q('a' * 63 + '.' + 'b' * 63 + '.' + 'c' * 63 + '.' + 'd' * 63 + '.example'))  # name > 255
    udp(q('api.openai.com') + b'\x00' * 1400)              # oversized: FORMERR
    tcp(q('api.openai.com'), declared=500)                 # TCP length prefix lies
    udp(q('api.openai.com'))                               # still alive: answered
elif mode == 'flood':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(sys.argv[3])):
        s.sendto(q(f'flood{i}.{sys.argv[4]}', qid=i), (server, 53))
    print('SENT', flush=True)
"#;

/// The test's DNS responder; killed on drop.
struct Responder {
    child: Child,
    log: PathBuf,
}

impl Responder {
    fn start(dir: &Path) -> Self {
        let log = dir.join("responder.log");
        std::fs::write(&log, "").unwrap();
        let mut child = Command::new("python3")
            .args(["-c", PY_RESPONDER])
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the DNS responder");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "DNS responder did not start");
        Self { child, log }
    }

    /// Every name the responder received.
    fn names(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    responder: Responder,
    up: Upstream,
    d: Deployment,
    sc: Option<Sidecar>,
    cg: TestCgroup,
    hosts: PathBuf,
    resolv: PathBuf,
    _pins: TestPins,
}

const CREDENTIAL: &str = "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n";

impl Env {
    /// Responder, HTTPS upstream for api.openai.com at `DST_V4:443`, transparent sidecar (DNS
    /// guard upstream = the responder, `*.allowed.test` allowed), tagged cgroup attached.
    fn new() -> Self {
        Self::with_extra("")
    }

    /// As [`Env::new`], with `extra` appended to the sidecar's configuration.
    fn with_extra(extra: &str) -> Self {
        for a in [RESPONDER, PUBLIC_RESOLVER] {
            firma_testing::kernel::sh(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let tmp = tempfile::tempdir().unwrap();
        let responder = Responder::start(tmp.path());
        let up_addr = std::net::SocketAddr::new(DST_V4.parse().unwrap(), 443);
        let up = Upstream::start_at(tmp.path(), &["api.openai.com", "paste.rs"], up_addr);
        let pins = TestPins::new();
        let cg = TestCgroup::top(&unique("firma-dns")).expect("test cgroup");
        let dns = format!(
            "[sidecar.dns]\nport = {}\nupstream = [\"{RESPONDER}:53\"]\nallow = [\"*.allowed.test\"]\nqueries_per_second = 20\nburst = 40\n",
            free_dual_port()
        );
        let mut settings = Settings {
            upstream_hosts: Vec::new(),
            extra: format!("{CREDENTIAL}{dns}{extra}"),
            ..Settings::default()
        };
        let d = Deployment::new(Some(&up), &settings);
        std::mem::forget(tmp); // the upstream CA file and responder log must outlive the sidecar
        settings.mode = Mode::Transparent {
            port: free_dual_port(),
            pin_dir: pins.dir.clone(),
            control_socket: d.root().join("run/sidecar.sock"),
            allow_ephemeral_pins: None,
        };
        d.write(Some(&up), &settings);
        // No names in the hosts file: every lookup goes to DNS.
        let hosts = d.root().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
        let resolv = d.root().join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {RESPONDER}\noptions timeout:2 attempts:1\n"),
        )
        .unwrap();
        let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
        let env = Self {
            responder,
            up,
            d,
            sc: Some(sc),
            cg,
            hosts,
            resolv,
            _pins: pins,
        };
        env.attach();
        env
    }

    fn cg_path(&self) -> String {
        self.cg.rel_path()
    }

    fn attach(&self) {
        let out = firma_testing::firma(&[
            "sidecar",
            "-c",
            self.d.config.to_str().unwrap(),
            "attach",
            "--cgroup",
            &self.cg_path(),
            "--agent-id",
            AGENT,
            "--session-id",
            "s1",
        ]);
        assert!(
            out.status.success(),
            "attach failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// Runs `program args…` (in the tagged cgroup when `tagged`) with the test's resolv.conf and
    /// hosts file in a private mount namespace and no proxy variables. Returns its output and
    /// pid.
    fn run(&self, tagged: bool, program: &str, args: &[&str]) -> (Output, u32) {
        let mut cmd = Confine::hosts(&self.hosts)
            .resolv(&self.resolv)
            .cgroup_opt(tagged.then_some(self.cg.dir.as_path()))
            .command(program);
        cmd.args(args)
            .env("SSL_CERT_FILE", self.d.ca_cert())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for v in firma_testing::client::PROXY_VARS {
            cmd.env_remove(v);
        }
        let child = cmd.spawn().expect("spawn client");
        // unshare and sh exec in place, so this pid is the client's.
        let pid = child.id();
        (child.wait_with_output().expect("client output"), pid)
    }

    fn dig(&self, tagged: bool, args: &[&str]) -> String {
        let mut a = vec!["+tries=1", "+time=3"];
        a.extend_from_slice(args);
        let (out, _) = self.run(tagged, "dig", &a);
        text(&out.stdout)
    }

    fn raw(&self, tagged: bool, server: &str, mode: &str, args: &[&str]) -> String {
        let mut a = vec!["-c", PY_RAW, server, mode];
        a.extend_from_slice(args);
        let (out, _) = self.run(tagged, "python3", &a);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    /// DNS decision events for `qname` from the tagged cgroup.
    fn dns_events(&self, qname: &str) -> Vec<Value> {
        let path = self.cg_path();
        self.d
            .audit()
            .into_iter()
            .filter(|e| {
                e["event"] == "decision"
                    && e["conn"]["intercept"] == "dns"
                    && e["envelope"]["intent"]["dns"]["qname"] == qname
                    && e["workload"]["cgroup_path"] == path.as_str()
            })
            .collect()
    }

    fn log(&self) -> String {
        self.sc.as_ref().map(|s| s.log_text()).unwrap_or_default()
    }
}

fn dig_status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NONE")
}

fn dig_server(out: &str) -> &str {
    out.split(";; SERVER: ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or("NONE")
}

/// Allowed names resolve through the guard (UDP, TCP, every client) and the connection then
/// works end to end; denied names get NXDOMAIN and never reach the responder, whichever resolver
/// the client asks; everything is audited; the untagged cgroup is untouched.
#[test]
fn tagged_dns_goes_through_the_guard() {
    if !in_fresh_netns("tagged_dns_goes_through_the_guard") {
        return;
    }
    let env = Env::new();

    // Allowed: getent (glibc, connected UDP), resolved by the responder through the guard.
    let (out, pid) = env.run(true, "getent", &["hosts", "api.openai.com"]);
    assert!(
        text(&out.stdout).contains("10.77.0.2"),
        "getent api.openai.com: {out:?}\n{}",
        env.log()
    );
    assert!(env.responder.names().contains("udp api.openai.com 1"));
    let allowed = env.dns_events("api.openai.com");
    assert!(
        allowed.iter().any(|e| e["decision"]["outcome"] == "ALLOW"
            && e["envelope"]["intent"]["dns"]["qtype"] == "A"
            && e["workload"]["pid"] == pid
            && e["conn"]["original_dst"] == format!("{RESPONDER}:53")),
        "no ALLOW event for getent's query (pid {pid}): {allowed:#?}"
    );
    let outcome = env.d.audit().into_iter().find(|e| {
        e["event"] == "outcome" && e["envelope"]["intent"]["dns"]["qname"] == "api.openai.com"
    });
    assert_eq!(
        outcome
            .as_ref()
            .map(|o| o["envelope"]["intent"]["dns"]["rcode"].clone()),
        Some(Value::from("No Error")),
        "outcome of the allowed query: {outcome:#?}"
    );

    // ... and the connection then works end to end: curl by name, no --resolve.
    let ca = env.d.ca_cert();
    let (out, _) = env.run(
        true,
        "curl",
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\nSTATUS %{http_code}",
            "https://api.openai.com/v1/models",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("STATUS 200"),
        "curl by name: {stdout} {}\n{}",
        text(&out.stderr),
        env.log()
    );
    assert!(env.up.raw_contains(CANARY), "upstream did not get the call");

    // Python getaddrinfo, a name allowed by `[sidecar.dns] allow = ["*.allowed.test"]`.
    let (out, _) = env.run(
        true,
        "python3",
        &[
            "-c",
            "import socket,sys; print(socket.getaddrinfo(sys.argv[1], 443, socket.AF_INET)[0][4][0])",
            "www.allowed.test",
        ],
    );
    assert_eq!(text(&out.stdout).trim(), "10.77.0.7", "{out:?}");

    // dig over UDP and TCP: answers appear to come from the server dig asked.
    let o = env.dig(true, &["api.openai.com"]);
    assert_eq!(dig_status(&o), "NOERROR", "{o}");
    assert!(dig_server(&o).starts_with("10.77.0.53#53"), "{o}");
    let o = env.dig(true, &["+tcp", "api.openai.com"]);
    assert_eq!(dig_status(&o), "NOERROR", "{o}");
    assert!(env.responder.names().contains("tcp api.openai.com 1"));
    // Other types for an allowed name: REFUSED, nothing sent.
    let o = env.dig(true, &["api.openai.com", "TXT"]);
    assert_eq!(dig_status(&o), "REFUSED", "{o}");
    assert!(!env.responder.names().contains("api.openai.com 16"));

    // Denied: every client, UDP and TCP, the configured resolver or 8.8.8.8 directly.
    let (out, pid) = env.run(true, "getent", &["hosts", SECRET]);
    assert_eq!(out.status.code(), Some(2), "getent {SECRET}: {out:?}");
    let (out, _) = env.run(
        true,
        "python3",
        &[
            "-c",
            "import socket,sys\ntry:\n  socket.getaddrinfo(sys.argv[1], 443)\n  print('RESOLVED')\nexcept socket.gaierror as e:\n  print('GAIERROR', e.errno)",
            RANDOM,
        ],
    );
    assert_eq!(text(&out.stdout).trim(), "GAIERROR -2", "{out:?}"); // EAI_NONAME
    for args in [
        vec![SECRET],
        vec!["+tcp", SECRET],
        vec!["@8.8.8.8", SECRET],
        vec!["+tcp", "@8.8.8.8", SECRET],
        vec!["@8.8.8.8", RANDOM, "AAAA"],
    ] {
        let o = env.dig(true, &args);
        assert_eq!(dig_status(&o), "NXDOMAIN", "dig {args:?}: {o}");
        if args.contains(&"@8.8.8.8") {
            assert!(
                dig_server(&o).starts_with("8.8.8.8#53"),
                "dig {args:?}: {o}"
            );
        }
    }
    // The closing note's transcript: the attempt as the workload saw it.
    let o = env.dig(true, &["@8.8.8.8", SECRET]);
    eprintln!("TRANSCRIPT $ dig @8.8.8.8 {SECRET}   # tagged workload\n{o}");
    let raw = env.raw(true, PUBLIC_RESOLVER, "name", &[SECRET]);
    assert!(raw.contains("RCODE 3 FROM 8.8.8.8:53 ID 16962"), "{raw}");
    let raw = env.raw(true, PUBLIC_RESOLVER, "tcp-name", &[SECRET]);
    assert!(raw.contains("RCODE 3 FROM 8.8.8.8:53"), "{raw}");

    let names = env.responder.names();
    assert!(
        !names.contains("paste.rs") && !names.contains("invalid-exfil"),
        "a denied name reached the responder:\n{names}"
    );
    let denied = env.dns_events(SECRET);
    assert!(
        denied.iter().any(|e| e["decision"]["reason"] == "DnsDenied"
            && e["envelope"]["intent"]["dns"]["rcode"] == "Non-Existent Domain"
            && e["envelope"]["intent"]["resource"]["host"] == SECRET
            && e["workload"]["pid"] == pid
            && e["workload"]["agent_id"] == AGENT),
        "no DnsDenied event for getent's query (pid {pid}): {denied:#?}"
    );
    assert!(
        denied
            .iter()
            .any(|e| e["conn"]["original_dst"] == "8.8.8.8:53"
                && e["envelope"]["intent"]["dns"]["transport"] == "tcp"),
        "no audit of the TCP query to 8.8.8.8: {denied:#?}"
    );
    assert!(
        denied.iter().all(|e| e["decision"]["outcome"] == "DENY"),
        "{denied:#?}"
    );
    if let Some(e) = denied
        .iter()
        .find(|e| e["conn"]["original_dst"] == "8.8.8.8:53")
    {
        eprintln!("TRANSCRIPT audit event:\n{e}");
    }
    eprintln!("TRANSCRIPT responder log:\n{}", env.responder.names());
    assert!(
        !env.dns_events(RANDOM).is_empty(),
        "random name not audited"
    );

    // Untagged: untouched, straight to the responder, not audited.
    let o = env.dig(false, &[SECRET]);
    assert_eq!(dig_status(&o), "NOERROR", "untagged dig: {o}");
    assert!(env.responder.names().contains(&format!("udp {SECRET} 1")));
    assert!(
        env.d
            .audit()
            .iter()
            .filter(|e| e["envelope"]["intent"]["dns"]["qname"] == SECRET)
            .all(|e| e["workload"]["cgroup_path"] == env.cg_path().as_str()),
        "the untagged query was audited"
    );
}

/// `kill -9` of the sidecar: the pinned programs keep sending tagged DNS to the dead listener,
/// so lookups fail and nothing reaches the responder directly.
#[test]
fn dns_fails_closed_after_kill_9() {
    if !in_fresh_netns("dns_fails_closed_after_kill_9") {
        return;
    }
    let mut env = Env::new();
    let o = env.dig(true, &["api.openai.com"]);
    assert_eq!(dig_status(&o), "NOERROR", "before the kill: {o}");
    let mut sc = env.sc.take().unwrap();
    sc.kill();
    let before = env.responder.names();
    let (out, _) = env.run(true, "getent", &["hosts", "api.openai.com"]);
    assert_ne!(out.status.code(), Some(0), "getent after kill -9: {out:?}");
    for args in [vec!["api.openai.com"], vec!["+tcp", "@8.8.8.8", SECRET]] {
        let o = env.dig(true, &args);
        assert!(
            !o.contains("status: NOERROR") && !o.contains("status: NXDOMAIN"),
            "dig {args:?} got an answer with the sidecar dead: {o}"
        );
    }
    let raw = env.raw(true, RESPONDER, "name", &["api.openai.com"]);
    assert!(
        raw.contains("ERROR 111") || raw.contains("NOREPLY"),
        "UDP query after kill -9: {raw}"
    );
    assert_eq!(
        env.responder.names(),
        before,
        "a query reached the responder with the sidecar dead"
    );
    // The untagged cgroup still resolves (the responder is alive).
    let o = env.dig(false, &["api.openai.com"]);
    assert_eq!(dig_status(&o), "NOERROR", "untagged after kill: {o}");
}

/// Hostile input: answered FORMERR or dropped, audited as `MalformedRequest`; a flood is cut by
/// the per-workload rate limit and summarised in the audit; the sidecar keeps answering.
#[test]
fn hostile_dns_input_is_refused_and_audited() {
    if !in_fresh_netns("hostile_dns_input_is_refused_and_audited") {
        return;
    }
    let env = Env::new();
    let out = env.raw(true, RESPONDER, "hostile", &[]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert_eq!(lines[0], "NOREPLY", "runt: {out}");
    assert!(lines[1].starts_with("RCODE 1 "), "compression loop: {out}");
    assert!(lines[2].starts_with("RCODE 1 "), "two questions: {out}");
    assert!(
        lines[3].starts_with("RCODE 1 "),
        "name over 255 bytes: {out}"
    );
    assert!(lines[4].starts_with("RCODE 1 "), "oversized: {out}");
    assert_eq!(lines[5], "CLOSED", "lying TCP length: {out}");
    assert!(
        lines[6].starts_with("RCODE 0 FROM 10.77.0.53:53"),
        "after the hostile input: {out}"
    );
    let path = env.cg_path();
    let malformed: Vec<Value> = env
        .d
        .audit()
        .into_iter()
        .filter(|e| {
            e["decision"]["reason"] == "MalformedRequest"
                && e["conn"]["intercept"] == "dns"
                && e["workload"]["cgroup_path"] == path.as_str()
        })
        .collect();
    assert_eq!(malformed.len(), 6, "{malformed:#?}");
    assert!(
        malformed
            .iter()
            .any(|e| e["envelope"]["intent"]["dns"]["malformed"]
                .as_str()
                .is_some_and(|m| m.contains("TCP length prefix says 500"))),
        "{malformed:#?}"
    );
    assert!(
        !env.responder
            .names()
            .contains("udp api.openai.com 1\nudp api.openai.com 1")
    );

    // A flood of 2,000 distinct names: at most burst + rate x time are decided, the rest are
    // dropped (by the guard, or by the kernel when the listener's socket buffer is full) and the
    // guard's drops summarised in one audit event; the responder sees none (all denied).
    let out = env.raw(true, RESPONDER, "flood", &["2000", "exfil.example"]);
    assert!(out.contains("SENT"), "{out}");
    let dropped = assert_eventually(
        Duration::from_secs(15),
        "a rate-limit summary in the audit",
        || {
            env.d.audit().iter().find_map(|e| {
                (e["decision"]["reason"] == "DnsDenied"
                    && e["workload"]["cgroup_path"] == path.as_str())
                .then(|| e["envelope"]["intent"]["dns"]["rate_limited"].as_u64())
                .flatten()
            })
        },
    );
    // Decided: written one by one, or (past the workload's 20 denials per 10 s audit rate)
    // counted in a `deny_summary` of kind `denied` (docs/architecture.md, audit aggregation).
    let audit = env.d.audit();
    let decided = audit
        .iter()
        .filter(|e| {
            e["envelope"]["intent"]["dns"]["qname"]
                .as_str()
                .is_some_and(|q| q.starts_with("flood"))
        })
        .count()
        + audit
            .iter()
            .filter(|e| {
                e["event"] == "deny_summary"
                    && e["aggregate"]["kind"] == "denied"
                    && e["decision"]["reason"] == "DnsDenied"
                    && e["workload"]["cgroup_path"] == path.as_str()
            })
            .map(|e| e["aggregate"]["count"].as_u64().unwrap_or(0) as usize)
            .sum::<usize>();
    eprintln!("flood: {decided} decided one by one, {dropped} dropped by the rate limit");
    // Not exactly `burst` (40): the queries above already took tokens and the bucket refills at
    // 20/s while the flood is read, and under load the kernel drops some before the guard does.
    assert!(
        (10..400).contains(&decided) && dropped > 100,
        "{decided} flood queries decided one by one, {dropped} dropped"
    );
    assert!(!env.responder.names().contains("flood"));
    let o = env.dig(true, &["api.openai.com"]);
    assert_eq!(dig_status(&o), "NOERROR", "after the flood: {o}");
    // Every DNS event is a signed, chained line like any other.
    let out = firma_testing::firma(&[
        "audit",
        "verify",
        env.d.audit_path.to_str().unwrap(),
        "--public-key",
        env.d.root().join("audit.pub").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The DNS guard's metrics, scraped by a real Prometheus inside the test's network namespace,
/// count exactly the queries the test makes, by outcome and type class: dig over UDP and TCP
/// (allowed A and AAAA, denied names, a refused type), the hostile inputs (FORMERR, dropped), and
/// an allowed query after the responder is gone (an upstream error, answered SERVFAIL). Every
/// answered query is timed once, by who answered.
#[test]
fn dns_metrics_count_every_query_in_prometheus() {
    const NAME: &str = "dns_metrics_count_every_query_in_prometheus";
    if !in_fresh_netns(NAME) {
        return;
    }
    let Some(bin) = prometheus::binary(NAME) else {
        return;
    };
    let admin = free_port();
    let mut env = Env::with_extra(&format!(
        "\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:{admin}\"\n"
    ));
    let dir = env.d.root().join("prometheus");
    let prom = Prometheus::start(&bin, &dir, &[("sidecar", format!("127.0.0.1:{admin}"))]);

    for _ in 0..3 {
        assert_eq!(dig_status(&env.dig(true, &["api.openai.com"])), "NOERROR");
    }
    assert_eq!(
        dig_status(&env.dig(true, &["+tcp", "api.openai.com"])),
        "NOERROR"
    );
    for _ in 0..2 {
        assert_eq!(
            dig_status(&env.dig(true, &["api.openai.com", "AAAA"])),
            "NOERROR"
        );
    }
    for _ in 0..2 {
        assert_eq!(dig_status(&env.dig(true, &[SECRET])), "NXDOMAIN");
    }
    assert_eq!(
        dig_status(&env.dig(true, &["@8.8.8.8", RANDOM, "AAAA"])),
        "NXDOMAIN"
    );
    assert_eq!(
        dig_status(&env.dig(true, &["api.openai.com", "TXT"])),
        "REFUSED"
    );
    // Runt and lying TCP length: dropped; four FORMERR; one good A query last.
    let out = env.raw(true, RESPONDER, "hostile", &[]);
    assert_eq!(out.lines().count(), 7, "{out}");
    // The responder gone: the guard's upstream fails, the client gets SERVFAIL.
    let _ = env.responder.child.kill();
    let _ = env.responder.child.wait();
    let o = env.dig(true, &["+time=8", "api.openai.com"]);
    assert_eq!(dig_status(&o), "SERVFAIL", "{o}");

    let q = |outcome: &str, qtype: &str| {
        format!("firma_sidecar_dns_queries_total{{outcome=\"{outcome}\",qtype=\"{qtype}\"}}")
    };
    let within = Duration::from_secs(20);
    let expected = [
        ("allowed", "A", 6.0), // 3 UDP + 1 TCP + the hostile run's last + the SERVFAIL one
        ("allowed", "AAAA", 2.0),
        ("denied", "A", 2.0),
        ("denied", "AAAA", 1.0),
        ("refused", "other", 1.0),
        ("malformed", "unknown", 4.0),
        ("dropped", "unknown", 2.0),
    ];
    for (outcome, qtype, n) in expected {
        prom.wait_for_value(&q(outcome, qtype), n, within);
    }
    let total: f64 = expected.iter().map(|e| e.2).sum();
    prom.wait_for_value("sum(firma_sidecar_dns_queries_total)", total, within);
    prom.wait_for_value("sum(firma_sidecar_dns_upstream_errors_total)", 1.0, within);
    // Answered: everything but the two dropped; the allowed ones by the upstream path.
    prom.wait_for_value(
        "firma_sidecar_dns_answer_duration_seconds_count{answered_by=\"upstream\"}",
        8.0,
        within,
    );
    prom.wait_for_value(
        "firma_sidecar_dns_answer_duration_seconds_count{answered_by=\"guard\"}",
        8.0,
        within,
    );
    // The same queries as decisions in the audit (one per query; the dropped runt too).
    let dns_decisions = env
        .d
        .audit()
        .iter()
        .filter(|e| e["event"] == "decision" && e["conn"]["intercept"] == "dns")
        .count();
    assert_eq!(
        dns_decisions as f64, total,
        "DNS decision events in the audit"
    );
    eprintln!(
        "PROMETHEUS sum by (outcome, qtype): {:?}",
        prom.query("sum by (outcome, qtype) (firma_sidecar_dns_queries_total)")
    );
    eprintln!(
        "PROMETHEUS upstream errors: {:?}",
        prom.query("firma_sidecar_dns_upstream_errors_total")
    );
    let (_, scrape) = prometheus::get(&format!("http://127.0.0.1:{admin}/metrics"));
    for line in scrape
        .lines()
        .filter(|l| l.contains("_dns_") && !l.contains("_bucket{"))
    {
        eprintln!("SCRAPE {line}");
    }
    drop(env.sc.take());
}
