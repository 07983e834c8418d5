//! Authority HA on a real 3-member etcd cluster (loopback ports), real `firma` binaries: two
//! Authorities share revocations; a revocation added through A reaches a sidecar streaming
//! from B within 1 s (the lag is printed); `kill -9` of the sidecar's Authority under load
//! fails over to the other with no stale decision and no revocation lost; the cluster keeps
//! working without one member, fails closed without a quorum and recovers by itself once the
//! quorum is back (docs/scale-out.md).

use firma_testing::authority::Server;
use firma_testing::client::curl;
use firma_testing::config::PolicySource;
use firma_testing::etcd::{self, EtcdCluster};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma, free_port, text};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The sidecar's bundle TTL: no bundle for this long denies `PolicyBundleStale`.
const SIDECAR_TTL_S: u64 = 3;

struct Stack {
    etcd: EtcdCluster,
    up: Upstream,
    d: Deployment,
    /// Authority configs (A, B) and their URLs.
    cfgs: Vec<PathBuf>,
    /// A second sidecar config: `authority_urls` in the reverse order, its own audit file.
    reversed: PathBuf,
    urls: Vec<String>,
    _tmp: tempfile::TempDir,
}

fn authority_toml(root: &Path, port: u16, etcd: &EtcdCluster) -> String {
    format!(
        "[authority]\nlisten_addr = \"127.0.0.1:{port}\"\npolicy_dir = {:?}\n\
         issuance_policy_dir = {:?}\nkey_file = {:?}\nmax_ttl_seconds = 3600\n\
         bundle_ttl_seconds = 1\nlog_level = \"info\"\n\n[authority.etcd]\nendpoints = {}\n\
         stale_after_ms = 1000\n",
        root.join("policies").display().to_string(),
        root.join("issuance").display().to_string(),
        root.join("authority.key").display().to_string(),
        etcd.endpoints_toml(),
    )
}

/// etcd, two Authority configs on it, an upstream and a sidecar deployment whose
/// `authority_urls` lists `order` (indexes into A, B).
fn stack(test: &str, order: &[usize]) -> Option<Stack> {
    if let Err(why) = etcd::available() {
        firma_testing::skip(test, &why);
        return None;
    }
    let etcd = EtcdCluster::start(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let settings = Settings {
        upstream_hosts: vec!["api.openai.com".into()],
        intercept_hosts: vec!["api.openai.com".into()],
        strict_hosts: Vec::new(),
        constraint_enforcement: (SIDECAR_TTL_S, 2000),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &settings);
    let mut cfgs = Vec::new();
    let mut urls = Vec::new();
    for name in ["a", "b"] {
        let port = free_port();
        let cfg = d.root().join(format!("authority-{name}.toml"));
        std::fs::write(&cfg, authority_toml(d.root(), port, &etcd)).expect("write");
        cfgs.push(cfg);
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    let mut t = d.toml(Some(&up), &settings);
    t.policy = PolicySource::Authorities {
        urls: order.iter().map(|i| urls[*i].clone()).collect(),
        cache_dir: None,
    };
    t.write(&d.config).expect("write sidecar config");
    let reversed = d.root().join("firma-reversed.toml");
    t.policy = PolicySource::Authorities {
        urls: order.iter().rev().map(|i| urls[*i].clone()).collect(),
        cache_dir: None,
    };
    if let Some(a) = t.audit.as_mut() {
        a.path = d.root().join("audit-reversed.jsonl");
    }
    t.write(&reversed).expect("write second sidecar config");
    Some(Stack {
        etcd,
        up,
        d,
        cfgs,
        reversed,
        urls,
        _tmp: tmp,
    })
}

impl Stack {
    /// `firma authority -c <cfg i> ARGS…` (not asserted).
    fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        let mut all = vec!["authority", "-c", self.cfgs[i].to_str().expect("utf8")];
        all.extend_from_slice(args);
        firma(&all)
    }

    fn revoke(&self, i: usize, token_id: &str) {
        let out = self.cli(i, &["revocations", "add", token_id]);
        assert!(
            out.status.success(),
            "revocations add: {}",
            text(&out.stderr)
        );
    }

    fn seed_token_id(&self) -> String {
        let seed: toml::Value = toml::from_str(
            &std::fs::read_to_string(self.d.root().join("seed.toml")).expect("seed"),
        )
        .expect("seed toml");
        seed["token_id"].as_str().expect("token_id").to_owned()
    }

    /// One chat call as session `s1` (the seeded capability) or with a header token.
    fn call(&self, sc: &Sidecar, token: Option<&str>) -> firma_testing::client::CurlOut {
        let header = match token {
            Some(t) => format!("x-firma-capability: {t}"),
            None => "x-firma-session: s1".to_owned(),
        };
        curl(
            &sc.proxy_url(),
            &self.d.ca_cert(),
            "https://api.openai.com/v1/chat/completions",
            &["-H", &header, "-d", "{\"model\":\"m\",\"messages\":[]}"],
        )
    }
}

/// Polls the sidecar's log until it applied the revocation of `token_id`; returns when.
fn applied(sc: &Sidecar, token_id: &str, within: Duration) -> Instant {
    let needle = format!("revoked capability {token_id}");
    let deadline = Instant::now() + within;
    loop {
        if sc.log_text().contains(&needle) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "revocation of {token_id} not applied within {within:?}:\n{}",
            sc.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn revocation_via_one_authority_reaches_a_sidecar_on_the_other_and_failover_keeps_it() {
    // The sidecar lists B first: it streams from B.
    let Some(s) = stack(
        "revocation_via_one_authority_reaches_a_sidecar_on_the_other_and_failover_keeps_it",
        &[1, 0],
    ) else {
        return;
    };
    let mut a = Server::start(&s.cfgs[0]);
    let mut b = Server::start(&s.cfgs[1]);
    let sc = s.d.start(&[]);
    let b_addr = &s.urls[1][7..];
    assert_eventually(Duration::from_secs(10), "sidecar streams from B", || {
        sc.log_text()
            .contains(&format!("connected to authority {b_addr}"))
    });
    assert_eq!(s.call(&sc, None).status, 200, "{}", sc.log_text());

    // Revoke through A (CLI); the sidecar streams from B.
    let token_id = s.seed_token_id();
    s.revoke(0, &token_id);
    let t0 = Instant::now();
    let lag = applied(&sc, &token_id, Duration::from_secs(5)) - t0;
    eprintln!(
        "revocation via authority A reached the sidecar streaming from B {:.1} ms after `revocations add` returned",
        lag.as_secs_f64() * 1000.0
    );
    assert!(lag < Duration::from_secs(1), "revocation lag {lag:?}");
    let out = s.call(&sc, None);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CapabilityRevoked");
    let before = s.up.count();
    assert!(
        b.log_text().contains("revocations updated from etcd"),
        "{}",
        b.log_text()
    );

    // Under load with a fresh capability, kill -9 B: the sidecar fails over to A.
    let fresh =
        s.d.issue_token("tenant-acme", "s-load", "model.inference.chat", "*");
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::new(s);
    let load = {
        let (s, stop, fresh) = (s.clone(), stop.clone(), fresh.clone());
        let sc_url = sc.proxy_url();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = curl(
                    &sc_url,
                    &s.d.ca_cert(),
                    "https://api.openai.com/v1/chat/completions",
                    &[
                        "-H",
                        &format!("x-firma-capability: {fresh}"),
                        "-d",
                        "{\"model\":\"m\",\"messages\":[]}",
                    ],
                );
                statuses.push((out.status, out.json()["reason"].clone()));
            }
            statuses
        })
    };
    assert_eventually(Duration::from_secs(10), "load running", || {
        s.up.count() >= before + 3
    });
    b.kill();
    let killed = Instant::now();
    let a_addr = &s.urls[0][7..];
    assert_eventually(Duration::from_secs(10), "sidecar fails over to A", || {
        sc.log_text()
            .contains(&format!("connected to authority {a_addr}"))
    });
    eprintln!(
        "bundle stream failed over to A {:.0} ms after kill -9 of B",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    // Past the sidecar's bundle TTL on A alone: still allowed (A keeps the bundle fresh).
    let served = s.up.count();
    assert_eventually(
        Duration::from_secs(SIDECAR_TTL_S * 3),
        "calls served past the bundle TTL after the kill",
        || killed.elapsed() > Duration::from_secs(SIDECAR_TTL_S + 1) && s.up.count() > served + 3,
    );
    // A revocation added through A after the failover arrives, the old one still holds.
    let fresh_id = s.d.root().join("s-load.toml");
    let fresh_seed: toml::Value =
        toml::from_str(&std::fs::read_to_string(fresh_id).expect("seed")).expect("toml");
    let fresh_token_id = fresh_seed["token_id"].as_str().expect("id").to_owned();
    s.revoke(0, &fresh_token_id);
    let t1 = Instant::now();
    let lag = applied(&sc, &fresh_token_id, Duration::from_secs(5)) - t1;
    eprintln!(
        "after failover, revocation via A reached the sidecar {:.1} ms after `revocations add` returned",
        lag.as_secs_f64() * 1000.0
    );
    assert!(lag < Duration::from_secs(1), "revocation lag {lag:?}");
    stop.store(true, Ordering::Relaxed);
    let statuses = load.join().expect("load thread");
    // No call was decided on a stale bundle, none failed for another reason than the revocation.
    let ok = statuses.iter().filter(|(c, _)| *c == 200).count();
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|(c, r)| !(*c == 200 || (*c == 403 && r == "CapabilityRevoked")))
        .collect();
    eprintln!(
        "load: {} calls, {ok} allowed across the failover",
        statuses.len()
    );
    assert!(
        unexpected.is_empty(),
        "unexpected answers under failover: {unexpected:?}\n{}",
        sc.log_text()
    );
    assert_eq!(s.call(&sc, None).json()["reason"], "CapabilityRevoked");
    let audit = s.d.audit_text();
    assert!(
        !audit.contains("PolicyBundleStale"),
        "a call was denied stale across the failover"
    );
    a.terminate(Duration::from_secs(5));
    s.etcd.assert_no_ping_abuse();
}

/// The token id of the capability `Deployment::issue_token` wrote for `session`.
fn token_id_of(d: &Deployment, session: &str) -> String {
    let v: toml::Value = toml::from_str(
        &std::fs::read_to_string(d.root().join(format!("{session}.toml"))).expect("seed"),
    )
    .expect("toml");
    v["token_id"].as_str().expect("id").to_owned()
}

/// Revokes `token_id` through Authority `via` and waits for `sc` to apply it; prints the lag
/// counted from the start of `revocations add` (an upper bound: it includes the CLI's own start)
/// and from its return, and returns the latter.
fn revoke_and_measure(s: &Stack, via: usize, token_id: &str, sc: &Sidecar, what: &str) -> Duration {
    let started = Instant::now();
    s.revoke(via, token_id);
    let returned = Instant::now();
    let at = applied(sc, token_id, Duration::from_secs(10));
    eprintln!(
        "{what}: revocation applied at most {:.1} ms after `revocations add` started ({:.1} ms after it returned)",
        (at - started).as_secs_f64() * 1000.0,
        (at - returned).as_secs_f64() * 1000.0
    );
    at - returned
}

#[test]
fn etcd_member_loss_keeps_working_quorum_loss_fails_closed_and_quorum_back_recovers() {
    let Some(mut s) = stack(
        "etcd_member_loss_keeps_working_quorum_loss_fails_closed_and_quorum_back_recovers",
        &[0, 1],
    ) else {
        return;
    };
    let a = Server::start(&s.cfgs[0]);
    let b = Server::start(&s.cfgs[1]);
    // `sc` streams from A, `sc_b` from B.
    let sc = s.d.start(&[]);
    let sc_b = Sidecar::start(&s.reversed, &[]);
    let b_addr = &s.urls[1][7..];
    assert_eventually(
        Duration::from_secs(10),
        "second sidecar streams from B",
        || {
            sc_b.log_text()
                .contains(&format!("connected to authority {b_addr}"))
        },
    );
    assert_eq!(s.call(&sc, None).status, 200, "{}", sc.log_text());
    let token =
        s.d.issue_token("tenant-acme", "s-one", "model.inference.chat", "*");
    let token_two =
        s.d.issue_token("tenant-acme", "s-two", "model.inference.chat", "*");
    let token_out =
        s.d.issue_token("tenant-acme", "s-out", "model.inference.chat", "*");

    // One member down: revocations still commit and propagate (once the two left have a
    // leader, should the dead one have been it).
    s.etcd.kill_member(0);
    let killed = Instant::now();
    s.etcd.wait_healthy(Duration::from_secs(20));
    eprintln!(
        "one etcd member killed: quorum reads again after {:.0} ms",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    let id = s.seed_token_id();
    let lag = revoke_and_measure(
        &s,
        1,
        &id,
        &sc,
        "one etcd member down, via B to the sidecar on A",
    );
    assert!(lag < Duration::from_secs(1), "revocation lag {lag:?}");
    assert_eq!(s.call(&sc, None).json()["reason"], "CapabilityRevoked");
    assert_eq!(s.call(&sc, Some(&token)).status, 200);

    // Quorum lost: `revocations add` fails (nothing is recorded), the Authorities refuse to
    // stream, and once the sidecars' bundle TTL has passed every call is denied stale.
    s.etcd.kill_member(1);
    let lost = Instant::now();
    // (A write that timed out may still be committed once the quorum is back: etcd keeps the
    // proposal. The operator is told it failed and may retry; checked after recovery below.)
    let out = s.cli(0, &["revocations", "add", &token_id_of(&s.d, "s-out")]);
    assert!(!out.status.success(), "add without quorum must fail");
    let err = text(&out.stderr);
    assert!(err.contains("etcd"), "{err}");
    eprintln!("revocations add without quorum: {}", err.trim());
    for (name, sc) in [("A", &sc), ("B", &sc_b)] {
        let out = assert_eventually(
            Duration::from_secs(SIDECAR_TTL_S + 10),
            "calls denied PolicyBundleStale without quorum",
            || {
                let out = s.call(sc, Some(&token));
                (out.status == 403 && out.json()["reason"] == "PolicyBundleStale").then_some(out)
            },
        );
        eprintln!(
            "without quorum: the sidecar on {name} denies PolicyBundleStale {:.1} s after the second member died",
            lost.elapsed().as_secs_f64()
        );
        assert!(out.json()["denied"] == true);
        assert!(
            sc.log_text().contains("out of sync"),
            "the sidecar was told why: {}",
            sc.log_text()
        );
    }
    assert_eventually(
        Duration::from_secs(10),
        "the stale denials are audited",
        || s.d.audit_text().contains("\"PolicyBundleStale\""),
    );

    // Quorum back (the last member killed restarts on its data): without restarting any
    // Authority or sidecar, both Authorities resynchronise and stream again, the capability
    // works on both sidecars, and a revocation through either reaches the sidecar on the other
    // within 1 s.
    s.etcd.start_member(1);
    let back = Instant::now();
    s.etcd.wait_healthy(Duration::from_secs(30));
    eprintln!(
        "quorum back: etcd reads with quorum {:.0} ms after the restart",
        back.elapsed().as_secs_f64() * 1000.0
    );
    for (name, sc) in [("A", &sc), ("B", &sc_b)] {
        let r = firma_testing::eventually(
            Duration::from_secs(30),
            "calls allowed again once the quorum is back",
            || s.call(sc, Some(&token)).status == 200,
        );
        if let Err(e) = r {
            panic!(
                "{e} (sidecar on {name})\n--- A:\n{}\n--- B:\n{}\n--- sidecar:\n{}",
                a.log_text(),
                b.log_text(),
                sc.log_text()
            );
        }
        eprintln!(
            "quorum back: the sidecar on {name} allows again {:.1} s after the member restarted",
            back.elapsed().as_secs_f64()
        );
    }
    for (srv, name) in [(&a, "A"), (&b, "B")] {
        let log = srv.log_text();
        assert!(
            log.contains("revocation store in sync: serving streams"),
            "Authority {name} back in sync:\n{log}"
        );
    }
    // Both Authorities converged on what etcd holds: the add that failed without quorum is
    // either recorded (then both sidecars have it) or not (then neither has).
    let out = s.cli(1, &["revocations", "list"]);
    assert!(out.status.success(), "list: {}", text(&out.stderr));
    let out_id = token_id_of(&s.d, "s-out");
    let recorded = text(&out.stdout).contains(&out_id);
    eprintln!("the add that failed without quorum was recorded after all: {recorded}");
    // (A replayed revocation is not logged by the sidecar: check what it decides.)
    for (sc, name) in [(&sc, "A"), (&sc_b, "B")] {
        let out = s.call(sc, Some(&token_out));
        if recorded {
            assert_eq!(out.status, 403, "sidecar on {name}: {out:?}");
            assert_eq!(out.json()["reason"], "CapabilityRevoked");
        } else {
            assert_eq!(out.status, 200, "sidecar on {name}: {out:?}");
        }
    }
    // A revocation through B reaches the sidecar on A, one through A the sidecar on B; each
    // sidecar also replayed or received the other's (both Authorities hold the same set).
    let (one, two) = (token_id_of(&s.d, "s-one"), token_id_of(&s.d, "s-two"));
    let lag = revoke_and_measure(&s, 1, &one, &sc, "quorum back, via B to the sidecar on A");
    assert!(lag < Duration::from_secs(1), "revocation lag {lag:?}");
    let lag = revoke_and_measure(&s, 0, &two, &sc_b, "quorum back, via A to the sidecar on B");
    assert!(lag < Duration::from_secs(1), "revocation lag {lag:?}");
    for (sc, other) in [(&sc, &two), (&sc_b, &one)] {
        applied(sc, other, Duration::from_secs(1));
        applied(sc, &id, Duration::from_secs(1));
    }
    for (sc, name) in [(&sc, "A"), (&sc_b, "B")] {
        for t in [&token, &token_two] {
            let out = s.call(sc, Some(t));
            assert_eq!(out.status, 403, "sidecar on {name}: {out:?}");
            assert_eq!(out.json()["reason"], "CapabilityRevoked");
        }
    }
    drop((a, b));
    s.etcd.assert_no_ping_abuse();
}

/// The admin token the `Revoke` tests give Authority A (through this variable).
const ADMIN_ENV: &str = "FIRMA_TEST_ADMIN_TOKEN";
const ADMIN_TOKEN: &str = "a-test-admin-token-0123456789-abcdefghij";

/// Adds `admin_token_env` to Authority `i`'s `[authority]` table.
fn enable_revoke_rpc(s: &Stack, i: usize) {
    let text = std::fs::read_to_string(&s.cfgs[i]).expect("read");
    let text = text.replacen(
        "\n[authority.etcd]",
        &format!("admin_token_env = \"{ADMIN_ENV}\"\n\n[authority.etcd]"),
        1,
    );
    std::fs::write(&s.cfgs[i], text).expect("write");
}

/// `firma authority -c CFG` with `envs`, spawned (not waited for).
fn spawn_authority(cfg: &Path, envs: &[(&str, &str)]) -> firma_testing::process::Process {
    let mut cmd = firma_testing::process::firma_command(
        &firma_testing::firma_bin(),
        &["authority", "-c", &cfg.display().to_string()],
    );
    cmd.envs(envs.iter().copied());
    firma_testing::process::Process::spawn(cmd).expect("spawn firma authority")
}

/// Python stubs for proto/authority.proto under `out` (grpcio-tools, as authority_python.rs).
fn python_stubs(out: &Path) {
    let pkg = out.join("firma_proto");
    std::fs::create_dir_all(&pkg).expect("mkdir");
    std::fs::write(pkg.join("__init__.py"), "").expect("write");
    let proto = firma_testing::repo_root().join("proto");
    let o = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", pkg.display()))
        .arg(format!("--grpc_python_out={}", pkg.display()))
        .arg(proto.join("authority.proto"))
        .output()
        .expect("python3 (pip install grpcio grpcio-tools)");
    assert!(
        o.status.success(),
        "cannot generate Python stubs (pip install grpcio grpcio-tools): {}",
        text(&o.stderr)
    );
}

/// `tests/python/revoke.py` (grpcio) against `addr`, with `token` as FIRMA_ADMIN_TOKEN.
fn python_revoke(
    stubs: &Path,
    addr: &str,
    token_id: &str,
    token: Option<&str>,
) -> serde_json::Value {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(firma_testing::repo_root().join("tests/python/revoke.py"))
        .arg(stubs)
        .arg(addr)
        .arg(token_id)
        .env("NO_PROXY", "*")
        .env_remove("FIRMA_ADMIN_TOKEN");
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "grpc_proxy",
    ] {
        cmd.env_remove(v);
    }
    if let Some(t) = token {
        cmd.env("FIRMA_ADMIN_TOKEN", t);
    }
    let out = cmd.output().expect("python3");
    assert!(out.status.success(), "revoke.py: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("revoke.py prints JSON")
}

#[test]
fn grpc_revoke_needs_the_admin_token_and_reaches_a_sidecar_on_the_other_authority() {
    // The sidecar streams from B; revocations are sent to A over gRPC.
    let Some(s) = stack(
        "grpc_revoke_needs_the_admin_token_and_reaches_a_sidecar_on_the_other_authority",
        &[1, 0],
    ) else {
        return;
    };
    enable_revoke_rpc(&s, 0);
    // The variable named by admin_token_env must hold a token: startup fails otherwise.
    for envs in [vec![], vec![(ADMIN_ENV, "short")]] {
        let mut p = spawn_authority(&s.cfgs[0], &envs);
        assert_eventually(
            Duration::from_secs(20),
            "authority refuses to start",
            || !p.alive(),
        );
        let log = p.log_text();
        assert!(
            log.contains("authority.admin_token_env") && log.contains(ADMIN_ENV),
            "{log}"
        );
        assert!(!log.contains("authority ready"), "{log}");
    }
    let mut a = spawn_authority(&s.cfgs[0], &[(ADMIN_ENV, ADMIN_TOKEN)]);
    a.wait_for("authority ready", Duration::from_secs(20))
        .expect("authority A");
    assert!(a.log_text().contains("admin Revoke RPC enabled"));
    let a_addr = &s.urls[0][7..];
    let b = Server::start(&s.cfgs[1]);
    let sc = s.d.start(&[]);
    let b_addr = &s.urls[1][7..];
    assert_eventually(Duration::from_secs(10), "sidecar streams from B", || {
        sc.log_text()
            .contains(&format!("connected to authority {b_addr}"))
    });
    assert_eq!(s.call(&sc, None).status, 200, "{}", sc.log_text());
    let stubs = s.d.root().join("stubs");
    python_stubs(&stubs);
    let id = s.seed_token_id();

    // Hostile callers: no token, a wrong one, a token for an Authority without the key, a
    // malformed id. Nothing is recorded by any of them.
    let refused = [
        (a_addr, id.as_str(), None, "UNAUTHENTICATED"),
        (
            a_addr,
            id.as_str(),
            Some("a-test-admin-token-0123456789-abcdefghiJ"),
            "UNAUTHENTICATED",
        ),
        (a_addr, id.as_str(), Some(""), "UNAUTHENTICATED"),
        (b_addr, id.as_str(), Some(ADMIN_TOKEN), "PERMISSION_DENIED"),
        (a_addr, "has space", Some(ADMIN_TOKEN), "INVALID_ARGUMENT"),
    ];
    for (addr, token_id, token, code) in refused {
        let r = python_revoke(&stubs, addr, token_id, token);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["code"], code, "{r}");
    }
    assert!(a.log_text().contains("refused Revoke"), "{}", a.log_text());
    let listed = s.cli(0, &["revocations", "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(
        !text(&listed.stdout).contains(&id),
        "a refused Revoke recorded something: {}",
        text(&listed.stdout)
    );
    assert_eq!(
        s.call(&sc, None).status,
        200,
        "still allowed after the refused calls"
    );

    // The admin: recorded in etcd, applied by the sidecar streaming from B.
    let started = Instant::now();
    let r = python_revoke(&stubs, a_addr, &id, Some(ADMIN_TOKEN));
    let returned = Instant::now();
    assert_eq!(r, serde_json::json!({"ok": true, "added": true}));
    let at = applied(&sc, &id, Duration::from_secs(5));
    eprintln!(
        "gRPC Revoke on A reached the sidecar streaming from B at most {:.1} ms after the Python client started ({:.1} ms after Revoke returned)",
        (at - started).as_secs_f64() * 1000.0,
        (at - returned).as_secs_f64() * 1000.0
    );
    assert!(at - returned < Duration::from_secs(1));
    let out = s.call(&sc, None);
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(out.json()["reason"], "CapabilityRevoked");
    assert!(text(&s.cli(1, &["revocations", "list"]).stdout).contains(&id));
    // Again: already revoked, the first time is kept.
    let r = python_revoke(&stubs, a_addr, &id, Some(ADMIN_TOKEN));
    assert_eq!(r, serde_json::json!({"ok": true, "added": false}));
    assert!(
        a.log_text().contains("revoked capability (admin Revoke)"),
        "{}",
        a.log_text()
    );
    drop(b);
    s.etcd.assert_no_ping_abuse();
}
