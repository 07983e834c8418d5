//! Transparent mode end to end: the real `firma sidecar` in `mode = "transparent"`, its eBPF
//! programs attached to a test cgroup with `firma sidecar attach`, a local HTTPS upstream
//! posing as api.openai.com / paste.rs at 10.77.0.2:443 inside the test's own network
//! namespace, the shipped runtime policy and mapping rules, a seeded capability, and unmodified
//! clients (curl, Python `requests`, Python `socket` + `ssl`, Node `fetch`) with no proxy
//! variables. Names come from a hosts file bind-mounted in a private mount namespace; clients
//! trust the Firma CA through their usual variables or flags.
//!
//! Proves, per client: allowed call reaches the upstream with the injected credential and not
//! the client's own; denied call gets 403 and reaches nobody; audit events carry the decision,
//! reason, cgroup path and the client's pid; the same client outside the cgroup goes direct.
//! Also: IPv6 destinations (the [::1] listener), no redirect loop when the destination port is
//! the sidecar's own, tagging the sidecar's own cgroup refused, unredirected connections closed
//! and audited, kill -9 fails closed and a restart re-adopts, detach, `WorkloadMismatch`, the
//! per-cgroup connection cap.
//!
//! Every test needs root + BPF and prints SKIP otherwise. Each runs in its own network
//! namespace (see `firma_testing::kernel`), with its own cgroups, pins and control socket.

use firma_testing::client::{PROXY_VARS, raw_exchange, run_in_cgroup};
use firma_testing::config::Mode;
use firma_testing::confine::Confine;
use firma_testing::kernel::{DST_V4, DST_V6, TestCgroup, TestPins, in_fresh_netns};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma, free_dual_port, text, unique};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const CANARY: &str = "sk-canary-transparent-51d0";
const CLIENT_KEY: &str = "Bearer agent-own-key";
const AGENT: &str = "tenant-acme";

/// One enforced deployment inside the current (fresh) network namespace.
struct Env {
    up: Upstream,
    d: Deployment,
    sc: Option<Sidecar>,
    /// The tagged workload cgroup.
    cg: TestCgroup,
    hosts: PathBuf,
    port: u16,
    _pins: TestPins,
}

/// The credential, and the admin listener (metrics recorded in every transparent test).
const CREDENTIAL: &str = "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n";

impl Env {
    /// Upstream on `DST_V4:443`, transparent sidecar started on a free port, tagged cgroup
    /// created but not attached yet.
    fn new() -> Self {
        Self::build(DST_V4, 443, free_dual_port())
    }

    /// Upstream on `up_ip:upstream_port` (the hosts file points the names there), sidecar
    /// listeners on `port`.
    fn build(up_ip: &str, upstream_port: u16, port: u16) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let up_addr = std::net::SocketAddr::new(up_ip.parse().unwrap(), upstream_port);
        let up = Upstream::start_at(tmp.path(), &["api.openai.com", "paste.rs"], up_addr);
        let pins = TestPins::new();
        let cg = TestCgroup::top(&unique("firma-e2e")).expect("test cgroup");
        // Transparent mode: the sidecar resolves the names from the hosts file and the original
        // destination must be one of their addresses. An upstream on another port than 443 is
        // named with its port by a configured address (which the binding takes as the name's).
        let upstream_hosts = if upstream_port == 443 {
            Vec::new()
        } else {
            vec!["api.openai.com".to_string(), "paste.rs".to_string()]
        };
        let mut settings = Settings {
            upstream_hosts,
            extra: CREDENTIAL.into(),
            ..Settings::default()
        };
        let d = Deployment::new(Some(&up), &settings);
        std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
        std::mem::forget(tmp); // the upstream CA file must outlive the sidecar
        settings.mode = Mode::Transparent {
            port,
            pin_dir: pins.dir.clone(),
            control_socket: d.root().join("run/sidecar.sock"),
            allow_ephemeral_pins: None,
        };
        d.write(Some(&up), &settings);
        let hosts = d.root().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n::1 localhost\n{up_ip} api.openai.com paste.rs\n"),
        )
        .unwrap();
        let sc = start_sidecar(&d, &hosts);
        Self {
            up,
            d,
            sc: Some(sc),
            cg,
            hosts,
            port,
            _pins: pins,
        }
    }

    fn cg_path(&self) -> String {
        format!("/{}", self.cg.dir.file_name().unwrap().to_string_lossy())
    }

    /// `firma sidecar -c F ARGS…` (the workload client).
    fn firma_sidecar(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["sidecar", "-c", self.d.config.to_str().unwrap()];
        full.extend_from_slice(args);
        firma(&full)
    }

    fn attach(&self) {
        let out = self.firma_sidecar(&[
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

    fn status_json(&self) -> serde_json::Value {
        let out = self.firma_sidecar(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn log(&self) -> String {
        self.sc.as_ref().map(|s| s.log_text()).unwrap_or_default()
    }

    /// Audit events from the tagged cgroup for `host`.
    fn audit_from_cg(&self, host: &str) -> Vec<serde_json::Value> {
        let path = self.cg_path();
        self.d
            .audit_for(host)
            .into_iter()
            .filter(|e| e["workload"]["cgroup_path"] == path.as_str())
            .collect()
    }
}

/// The sidecar sees the clients' hosts file: it resolves the decided name itself and the
/// original destination must be one of its addresses (the destination binding).
fn start_sidecar(d: &Deployment, hosts: &Path) -> Sidecar {
    d.start_with_hosts(&[("FIRMA_TEST_OPENAI_KEY", CANARY)], hosts)
}

/// The four unmodified clients.
#[derive(Debug, Clone, Copy)]
enum Client {
    Curl,
    PyRequests,
    PySocket,
    NodeFetch,
}

/// What a client run printed: HTTP status (0 if no response), body, the pid that connected,
/// and (raw socket only) the peer getpeername() returned.
#[derive(Debug)]
struct Run {
    status: u16,
    body: String,
    pid: u32,
    peer: Option<String>,
    stderr: String,
    exit: Option<i32>,
}

const PY_REQUESTS: &str = r#"
import sys, requests
url, body = sys.argv[1], sys.argv[2]
h = {'Authorization': 'Bearer agent-own-key'}
r = requests.post(url, data=body, headers=h, timeout=10) if body else requests.get(url, headers=h, timeout=10)
print(r.text)
print('STATUS', r.status_code)
"#;

const PY_SOCKET: &str = r#"
import os, socket, ssl, sys
from urllib.parse import urlsplit
url, body = urlsplit(sys.argv[1]), sys.argv[2].encode()
ctx = ssl.create_default_context()  # honours SSL_CERT_FILE
raw = socket.create_connection((url.hostname, url.port or 443), timeout=10)
print('PEER', *raw.getpeername()[:2])
s = ctx.wrap_socket(raw, server_hostname=url.hostname)
method = 'POST' if body else 'GET'
req = f'{method} {url.path or "/"} HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer agent-own-key\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n'
s.sendall(req.encode() + body)
data = b''
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, rest = data.partition(b'\r\n\r\n')
print(rest.decode(errors='replace'))
print('STATUS', head.split(b' ')[1].decode())
"#;

const NODE_FETCH: &str = r#"
const [url, body] = process.argv.slice(1);
const opts = { headers: { authorization: 'Bearer agent-own-key' } };
if (body) { opts.method = 'POST'; opts.body = body; }
fetch(url, opts).then(async r => {
  console.log(await r.text());
  console.log('STATUS', r.status);
}).catch(e => { console.error(String(e), e.cause ? String(e.cause) : ''); process.exit(3); });
"#;

/// Runs `client` (inside `cgroup` when given) with `hosts` as /etc/hosts in a private mount
/// namespace, trusting `ca`, with no proxy variables. `body` non-empty means POST.
fn run_client(
    client: Client,
    cgroup: Option<&Path>,
    hosts: &Path,
    ca: &Path,
    url: &str,
    body: &str,
) -> Run {
    let ca_s = ca.to_str().unwrap();
    let (program, args): (&str, Vec<String>) = match client {
        Client::Curl => {
            let mut a: Vec<String> = ["-sS", "--max-time", "10", "--cacert", ca_s, "-H"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.push(format!("Authorization: {CLIENT_KEY}"));
            if !body.is_empty() {
                a.extend(["-d".into(), body.into()]);
            }
            a.extend(["-w".into(), "\nSTATUS %{http_code}".into(), url.into()]);
            ("curl", a)
        }
        Client::PyRequests => (
            "python3",
            vec!["-c".into(), PY_REQUESTS.into(), url.into(), body.into()],
        ),
        Client::PySocket => (
            "python3",
            vec!["-c".into(), PY_SOCKET.into(), url.into(), body.into()],
        ),
        Client::NodeFetch => (
            "node",
            vec!["-e".into(), NODE_FETCH.into(), url.into(), body.into()],
        ),
    };
    let mut cmd = Confine::hosts(hosts).cgroup_opt(cgroup).command(program);
    cmd.args(&args);
    for v in PROXY_VARS.iter().chain(&["NO_PROXY", "no_proxy"]) {
        cmd.env_remove(v);
    }
    cmd.env("SSL_CERT_FILE", ca)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("NODE_EXTRA_CA_CERTS", ca);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    // unshare and sh exec in place, so this pid is the client's.
    let pid = child.id();
    let out = child.wait_with_output().expect("client output");
    let stdout = text(&out.stdout);
    let mut status = 0;
    let mut peer = None;
    let mut body_lines = Vec::new();
    for line in stdout.lines() {
        if let Some(s) = line.strip_prefix("STATUS ") {
            status = s.trim().parse().unwrap_or(0);
        } else if let Some(p) = line.strip_prefix("PEER ") {
            peer = Some(p.trim().to_string());
        } else {
            body_lines.push(line);
        }
    }
    Run {
        status,
        body: body_lines.join("\n"),
        pid,
        peer,
        stderr: text(&out.stderr),
        exit: out.status.code(),
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or(serde_json::Value::Null)
}

/// The scenario every client goes through (see the module doc).
fn client_is_enforced_only_inside_its_cgroup(client: Client) {
    let env = Env::new();
    env.attach();
    let status = env.status_json();
    assert!(
        status["workloads"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w["cgroup_path"] == env.cg_path().as_str() && w["agent_id"] == AGENT)),
        "status does not list the attached workload: {status}"
    );
    let firma_ca = env.d.ca_cert();

    // 1. Allowed: reaches the upstream through the sidecar with the credential injected.
    let run = run_client(
        client,
        Some(&env.cg.dir),
        &env.hosts,
        &firma_ca,
        "https://api.openai.com/v1/models",
        "",
    );
    assert_eq!(
        run.status,
        200,
        "{client:?} allowed call: {run:?}\n{}",
        env.log()
    );
    assert_eq!(json(&run.body)["path"], "/v1/models", "{run:?}");
    let seen = env.up.seen();
    assert_eq!(seen.len(), 1, "{client:?}: upstream requests {seen:?}");
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {CANARY}"),
        "{client:?}: the injected credential, not the client's own"
    );
    assert!(
        !env.up.raw_contains("agent-own-key"),
        "{client:?}: the client's own Authorization was forwarded"
    );
    assert_eq!(seen[0].sni.as_deref(), Some("api.openai.com"));
    if let Some(peer) = &run.peer {
        assert_eq!(
            peer,
            &format!("{DST_V4} 443"),
            "getpeername must show the original peer"
        );
    }
    assert_eventually(
        Duration::from_secs(5),
        "allow audited with workload",
        || {
            env.audit_from_cg("api.openai.com").iter().any(|e| {
                e["decision"]["outcome"] == "ALLOW"
                    && e["connector"]["credential_injected"] == true
                    && e["workload"]["pid"] == run.pid
                    && e["workload"]["agent_id"] == AGENT
                    && e["capability"]["agent_id"] == AGENT
            })
        },
    );

    // 2. Denied: 403 with the reason, the upstream sees nothing, audited.
    let run = run_client(
        client,
        Some(&env.cg.dir),
        &env.hosts,
        &firma_ca,
        "https://paste.rs/",
        "secret=1",
    );
    assert_eq!(run.status, 403, "{client:?} denied call: {run:?}");
    assert_eq!(json(&run.body)["reason"], "PolicyDenied", "{run:?}");
    assert_eq!(
        env.up.count(),
        1,
        "{client:?}: a denied call reached the upstream"
    );
    assert_eventually(Duration::from_secs(5), "deny audited with workload", || {
        env.audit_from_cg("paste.rs").iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["reason"] == "PolicyDenied"
                && e["connector"]["credential_injected"] == false
                && e["workload"]["pid"] == run.pid
        })
    });

    // 3. The same client outside the cgroup is not redirected: it talks to the upstream
    //    directly (so it must trust the upstream's own CA), with its own key and no audit.
    let audited = env.d.audit().len();
    let run = run_client(
        client,
        None,
        &env.hosts,
        &env.up.ca_path,
        "https://api.openai.com/v1/models",
        "",
    );
    assert_eq!(run.status, 200, "{client:?} untagged call: {run:?}");
    let seen = env.up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].headers["authorization"], CLIENT_KEY);
    // Nothing to wait for: had the call passed through the sidecar, its ALLOW would have been
    // persisted before the request left (audit before send), so before the upstream saw it.
    assert_eq!(
        env.d.audit().len(),
        audited,
        "an untagged client must not pass through the sidecar"
    );
}

#[test]
fn curl_in_tagged_cgroup_is_enforced_and_outside_is_not() {
    if in_fresh_netns("curl_in_tagged_cgroup_is_enforced_and_outside_is_not") {
        client_is_enforced_only_inside_its_cgroup(Client::Curl);
    }
}

#[test]
fn python_requests_in_tagged_cgroup_is_enforced_and_outside_is_not() {
    if in_fresh_netns("python_requests_in_tagged_cgroup_is_enforced_and_outside_is_not") {
        client_is_enforced_only_inside_its_cgroup(Client::PyRequests);
    }
}

#[test]
fn python_raw_socket_in_tagged_cgroup_is_enforced_and_outside_is_not() {
    if in_fresh_netns("python_raw_socket_in_tagged_cgroup_is_enforced_and_outside_is_not") {
        client_is_enforced_only_inside_its_cgroup(Client::PySocket);
    }
}

#[test]
fn node_fetch_in_tagged_cgroup_is_enforced_and_outside_is_not() {
    if in_fresh_netns("node_fetch_in_tagged_cgroup_is_enforced_and_outside_is_not") {
        client_is_enforced_only_inside_its_cgroup(Client::NodeFetch);
    }
}

/// An IPv6 destination arrives on the sidecar's [::1] listener and goes upstream to the
/// original IPv6 address, with the same enforcement.
#[test]
fn ipv6_destination_is_enforced_through_the_v6_listener() {
    if !in_fresh_netns("ipv6_destination_is_enforced_through_the_v6_listener") {
        return;
    }
    let env = Env::build(DST_V6, 443, free_dual_port());
    env.attach();
    let ca = env.d.ca_cert();
    let run = run_client(
        Client::PySocket,
        Some(&env.cg.dir),
        &env.hosts,
        &ca,
        "https://api.openai.com/v1/models",
        "",
    );
    assert_eq!(run.status, 200, "{run:?}\n{}", env.log());
    assert_eq!(run.peer.as_deref(), Some(&*format!("{DST_V6} 443")));
    assert_eq!(
        env.up.seen()[0].headers["authorization"],
        format!("Bearer {CANARY}")
    );
    let run = run_client(
        Client::Curl,
        Some(&env.cg.dir),
        &env.hosts,
        &ca,
        "https://paste.rs/",
        "x=1",
    );
    assert_eq!(run.status, 403, "{run:?}");
    assert_eq!(env.up.count(), 1);
    assert_eventually(Duration::from_secs(5), "v6 audit", || {
        env.audit_from_cg("api.openai.com")
            .iter()
            .any(|e| e["decision"]["outcome"] == "ALLOW" && e["workload"]["agent_id"] == AGENT)
    });
}

/// The upstream listens on the sidecar's own port (at the namespace address): a redirect of the
/// sidecar's upstream connection would loop into itself. One request must produce exactly one
/// upstream request and one audit event. Tagging a cgroup that contains the sidecar is refused,
/// and a connection reaching the listener without a kernel record is closed and audited.
#[test]
fn sidecar_upstream_is_never_redirected_even_to_its_own_port() {
    if !in_fresh_netns("sidecar_upstream_is_never_redirected_even_to_its_own_port") {
        return;
    }
    // The upstream port equals the transparent port.
    let port = free_dual_port();
    let env = Env::build(DST_V4, port, port);
    env.attach();
    let run = run_client(
        Client::Curl,
        Some(&env.cg.dir),
        &env.hosts,
        &env.d.ca_cert(),
        &format!("https://api.openai.com:{}/v1/models", env.port),
        "",
    );
    assert_eq!(run.status, 200, "{run:?}\n{}", env.log());
    assert_eq!(env.up.count(), 1, "exactly one upstream request (no loop)");
    // Nothing to wait for: a looping connection would have been decided (and its ALLOW
    // persisted) before the first request got its answer.
    let events = env.audit_from_cg("api.openai.com");
    assert_eq!(events.len(), 1, "one decision, no loop: {events:?}");
    assert_eq!(events[0]["decision"]["outcome"], "ALLOW");

    // Tagging a cgroup the sidecar runs in is refused.
    let sc_parent = TestCgroup::top(&unique("firma-e2e-sc")).expect("test cgroup");
    let sc_cg = sc_parent.dir.join("sidecar");
    std::fs::create_dir_all(&sc_cg).unwrap();
    let pid = env.sc.as_ref().unwrap().child.id();
    std::fs::write(sc_cg.join("cgroup.procs"), pid.to_string()).unwrap();
    let rel = format!("/{}", sc_parent.dir.file_name().unwrap().to_string_lossy());
    let out = env.firma_sidecar(&["attach", "--cgroup", &rel, "--agent-id", AGENT]);
    assert!(
        !out.status.success(),
        "attaching the sidecar's own cgroup must fail"
    );
    assert!(
        text(&out.stderr).contains("the sidecar itself runs in"),
        "{}",
        text(&out.stderr)
    );
    // Move the sidecar back out before its cgroup is removed.
    std::fs::write(Cgroup2Root::path().join("cgroup.procs"), pid.to_string()).unwrap();

    // A direct (unredirected) connection to the listener is closed and audited.
    let got = raw_exchange(
        format!("127.0.0.1:{}", env.port).parse().unwrap(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(
        got.is_empty(),
        "unredirected connection was served: {got:?}"
    );
    assert_eventually(Duration::from_secs(5), "unredirected audited", || {
        env.d.audit().iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("without a redirect record"))
        })
    });
}

/// The cgroup2 mount root.
struct Cgroup2Root;
impl Cgroup2Root {
    fn path() -> PathBuf {
        firma_sidecar::ebpf::Cgroup2::discover()
            .expect("cgroup2")
            .mount()
            .to_path_buf()
    }
}

/// kill -9 the sidecar: the pinned programs keep redirecting tagged connects to a port nobody
/// listens on, so they are refused and never reach the upstream directly. A restarted sidecar
/// re-adopts the pinned state (no re-attach) and traffic flows again.
#[test]
fn killed_sidecar_fails_closed_and_restart_readopts() {
    if !in_fresh_netns("killed_sidecar_fails_closed_and_restart_readopts") {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let url = "https://api.openai.com/v1/models";
    let ca = env.d.ca_cert();
    let run = run_client(Client::Curl, Some(&env.cg.dir), &env.hosts, &ca, url, "");
    assert_eq!(run.status, 200, "{run:?}");

    let mut sc = env.sc.take().unwrap();
    sc.child.kill().unwrap(); // SIGKILL to our own child
    sc.child.wait().unwrap();
    drop(sc);

    // curl: exit 7 = failed to connect. The upstream sees nothing new.
    for client in [Client::Curl, Client::PySocket] {
        let run = run_client(client, Some(&env.cg.dir), &env.hosts, &ca, url, "");
        assert_eq!(
            run.status, 0,
            "{client:?} got a response with no sidecar: {run:?}"
        );
        assert!(
            run.exit == Some(7) || run.stderr.contains("Connection refused"),
            "{client:?}: expected a refused connect: {run:?}"
        );
    }
    assert_eq!(
        env.up.count(),
        1,
        "a tagged client reached the upstream directly"
    );

    let sc = start_sidecar(&env.d, &env.hosts);
    assert!(
        sc.log_text().contains("re-adopted attached workload"),
        "{}",
        sc.log_text()
    );
    env.sc = Some(sc);
    let status = env.status_json();
    assert_eq!(
        status["workloads"][0]["cgroup_path"],
        env.cg_path().as_str()
    );
    let run = run_client(Client::Curl, Some(&env.cg.dir), &env.hosts, &ca, url, "");
    assert_eq!(run.status, 200, "after restart: {run:?}\n{}", env.log());
    assert_eq!(env.up.count(), 2);
    assert_eq!(
        env.up.seen()[1].headers["authorization"],
        format!("Bearer {CANARY}")
    );

    // detach removes everything: the client is no longer redirected.
    let out = env.firma_sidecar(&["detach", "--cgroup", &env.cg_path()]);
    assert!(out.status.success(), "detach: {}", text(&out.stderr));
    let run = run_client(
        Client::Curl,
        Some(&env.cg.dir),
        &env.hosts,
        &env.up.ca_path,
        url,
        "",
    );
    assert_eq!(run.status, 200, "after detach (direct): {run:?}");
    assert_eq!(env.up.seen()[2].headers["authorization"], CLIENT_KEY);
}

/// A valid token for another agent, presented by a workload bound to `tenant-acme`, is denied
/// `WorkloadMismatch`: the kernel's identity wins over what the app sends.
#[test]
fn token_for_another_agent_is_denied_workload_mismatch() {
    if !in_fresh_netns("token_for_another_agent_is_denied_workload_mismatch") {
        return;
    }
    let env = Env::new();
    env.attach();
    let raw = env
        .d
        .issue_token("other-agent", "s9", "model.inference.chat", "*");
    let out = Confine::hosts(&env.hosts)
        .cgroup(&env.cg.dir)
        .command("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(env.d.ca_cert())
        .args(["-H", &format!("x-firma-capability: {raw}")])
        .args([
            "-w",
            "\nSTATUS %{http_code}",
            "https://api.openai.com/v1/models",
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with("STATUS 403"),
        "{stdout}{}",
        text(&out.stderr)
    );
    let body = stdout.rsplit_once('\n').map_or("", |(b, _)| b);
    assert_eq!(json(body)["reason"], "WorkloadMismatch", "{body}");
    assert_eq!(env.up.count(), 0);
    assert_eventually(Duration::from_secs(5), "mismatch audited", || {
        env.audit_from_cg("api.openai.com")
            .iter()
            .any(|e| e["decision"]["reason"] == "WorkloadMismatch")
    });
}

/// `[sidecar.limits] max_connections_per_client` counts per workload cgroup in transparent
/// mode: a tagged process holding connections open gets the first N served (they sit in the
/// sniff phase) and the rest closed at once, reported by one WARN naming the cgroup.
#[test]
fn connections_per_workload_cgroup_are_capped() {
    if !in_fresh_netns("connections_per_workload_cgroup_are_capped") {
        return;
    }
    let mut env = Env::new();
    drop(env.sc.take());
    let mut cfg = std::fs::read_to_string(&env.d.config).unwrap();
    cfg.push_str("\n[sidecar.limits]\nmax_connections_per_client = 5\n");
    std::fs::write(&env.d.config, cfg).unwrap();
    env.sc = Some(start_sidecar(&env.d, &env.hosts));
    env.attach();
    let script = format!(
        r#"
import select, socket, time
conns = [socket.create_connection(("{DST_V4}", 443), timeout=5) for _ in range(8)]
for s in conns:
    s.setblocking(False)
# Wait (select, up to 10 s) until the refused ones are closed; the admitted ones stay open
# waiting for a ClientHello.
closed = set()
deadline = time.monotonic() + 10
while len(closed) < 3 and time.monotonic() < deadline:
    open_ = [s for s in conns if s not in closed]
    readable, _, _ = select.select(open_, [], [], 0.1)
    for s in readable:
        try:
            if s.recv(1) == b"":
                closed.add(s)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(s)
print("CLOSED", len(closed))
"#
    );
    let out = run_in_cgroup(Some(&env.cg.dir), "python3", &["-c", &script]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("CLOSED 3"),
        "8 connections, cap 5: {stdout}{}\n{}",
        text(&out.stderr),
        env.log()
    );
    // The WARN is logged before the refusals it reports; wait for the pipe reader to have it.
    assert_eventually(Duration::from_secs(10), "the limit WARN read", || {
        env.log().contains("connection limit reached")
    });
    let log = env.log();
    let warns: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .collect();
    assert_eq!(warns.len(), 1, "{log}");
    assert!(warns[0].contains("client=cgroup "), "{}", warns[0]);
}

/// `GET path` on the sidecar's admin listener: (status, body).
fn admin_get(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("admin listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The value of the sample line starting with `series` in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// The programs count redirected connects and refused UDP/443 in a per-CPU map; the sidecar's
/// `/metrics` sums it, and `/readyz` includes the `ebpf` check.
#[test]
fn kernel_counters_reach_the_admin_listener() {
    if !in_fresh_netns("kernel_counters_reach_the_admin_listener") {
        return;
    }
    let env = Env::new();
    env.attach();
    let admin: std::net::SocketAddr = env
        .sc
        .as_ref()
        .and_then(|s| s.logged("admin listening on "))
        .expect("admin address in the log");
    let (_, before) = admin_get(admin, "/metrics");
    let redirected_before =
        sample(&before, "firma_sidecar_ebpf_redirected_connects_total").expect("counter");
    let ca = env.d.ca_cert();
    for _ in 0..3 {
        let run = run_client(
            Client::Curl,
            Some(&env.cg.dir),
            &env.hosts,
            &ca,
            "https://api.openai.com/v1/models",
            "",
        );
        assert_eq!(run.status, 200, "{run:?}\n{}", env.log());
    }
    let udp = firma_testing::client::run_in_cgroup(
        Some(&env.cg.dir),
        "python3",
        &[
            "-c",
            &format!(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    s.sendto(b'x', ('{DST_V4}', 443)); print('SENT')\nexcept OSError as e:\n    print('REFUSED', e.errno)"
            ),
        ],
    );
    assert!(text(&udp.stdout).contains("REFUSED"), "{udp:?}");
    let (code, scrape) = admin_get(admin, "/metrics");
    assert_eq!(code, 200);
    let redirected = sample(&scrape, "firma_sidecar_ebpf_redirected_connects_total").unwrap();
    assert_eq!(redirected - redirected_before, 3.0, "{scrape}");
    assert!(
        sample(&scrape, "firma_sidecar_ebpf_udp443_refused_total").unwrap() >= 1.0,
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "firma_sidecar_ebpf_attached_workloads"),
        Some(1.0)
    );
    assert!(
        sample(
            &scrape,
            "firma_sidecar_connections_total{mode=\"transparent\"}"
        )
        .unwrap()
            >= 3.0,
        "{scrape}"
    );
    let (code, ready) = admin_get(admin, "/readyz");
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("\"name\":\"ebpf\",\"ok\":true"), "{ready}");
}
