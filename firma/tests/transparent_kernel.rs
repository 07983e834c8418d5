//! Kernel side of transparent mode, tested directly through firma-sidecar's loader: a test
//! listener stands in for the sidecar. Every test runs in its own network namespace and cgroup
//! and needs root + BPF (otherwise it prints SKIP and passes).
//!
//! Proves: tagged TCP connects (IPv4, IPv6, v4-mapped) are redirected and the original
//! destination, pid and binding are found by peer address; getpeername shows the original
//! peer; untagged, excluded-CIDR, excluded-port and SO_MARK'ed connects are not redirected; UDP
//! to 443 is refused; entries are removed when connections close (bounded over 10,000
//! connections); a dead listener means refused connections, never direct access; a restart
//! re-adopts pinned state without double attaching; `--pod` resolution for both kubelet
//! cgroup drivers; detach removes everything.

use firma_sidecar::ebpf::{Cgroup2, Cidr, RedirectSettings, Redirector, Target};
use firma_testing::client::{PY_TCP_CLIENT, PY_UDP_CLIENT, run_in_cgroup};
use firma_testing::kernel::*;
use firma_testing::{assert_eventually, free_dual_port, unique};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const AGENT: &str = "agent-kernel";
const EXCLUDED_PORT: u16 = 4444;

fn settings(pins: &TestPins, port: u16) -> RedirectSettings {
    RedirectSettings {
        pin_dir: pins.dir.clone(),
        port,
        mark: 0x4649_524d,
        block_quic: true,
        redirect_dns: false,
        excluded_cidrs: vec![Cidr::parse(EXCLUDED_CIDR).unwrap()],
        excluded_ports: vec![EXCLUDED_PORT],
    }
}

/// Stands in for the sidecar: on 127.0.0.1:port and [::1]:port, answers each connection with
/// `ORIG <dst> <agent> <cgroup path> <pid>` from the redirector, or `NOENTRY`.
struct FakeSidecar {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeSidecar {
    fn start(port: u16, r: Arc<Redirector>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            let l = TcpListener::bind(&addr).expect("bind fake sidecar");
            l.set_nonblocking(true).unwrap();
            let (stop, accepted, r) = (stop.clone(), accepted.clone(), r.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let line = match r.original_destination(peer) {
                                Some(o) => {
                                    let w = r.workload(&o);
                                    format!(
                                        "ORIG {} {} {} {}\n",
                                        o.socket_addr(),
                                        w.as_ref().map_or("-", |w| w.agent_id.as_str()),
                                        w.as_ref().map_or("-", |w| w.cgroup_path.as_str()),
                                        o.pid
                                    )
                                }
                                None => "NOENTRY\n".into(),
                            };
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(line.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        Self {
            stop,
            accepted,
            threads,
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A real "upstream" inside the namespace that answers `UPSTREAM` and counts connections.
fn upstream(addr: SocketAddr) -> Arc<AtomicUsize> {
    let l = TcpListener::bind(addr).expect("bind upstream");
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            s2.fetch_add(1, Ordering::Relaxed);
            let _ = s.write_all(b"UPSTREAM\n");
        }
    });
    seen
}

fn py(cg: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut full = vec!["-c", PY_TCP_CLIENT];
    full.extend_from_slice(args);
    let out = run_in_cgroup(cg, "python3", &full);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn line<'a>(out: &'a str, tag: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(tag).map(str::trim))
        .unwrap_or_else(|| panic!("no {tag} in {out:?}"))
}

fn start(pins: &TestPins, port: u16) -> Arc<Redirector> {
    let (r, _logs) = Redirector::start(settings(pins, port)).expect("load eBPF redirector");
    Arc::new(r)
}

#[test]
fn tagged_connects_are_redirected_with_original_destination_and_peer() {
    if !in_fresh_netns("tagged_connects_are_redirected_with_original_destination_and_peer") {
        return;
    }
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-k-redirect")).expect("test cgroup");
    let port = free_dual_port();
    let r = start(&pins, port);
    let up4 = upstream(format!("{DST_V4}:4443").parse().unwrap());
    let up6 = upstream(format!("[{DST_V6}]:4443").parse().unwrap());
    let up_excl = upstream(format!("{EXCLUDED_V4}:4443").parse().unwrap());
    let up_port = upstream(format!("{DST_V4}:{EXCLUDED_PORT}").parse().unwrap());
    let sidecar = FakeSidecar::start(port, r.clone());
    let cg_path = format!("/{}", cg.dir.file_name().unwrap().to_str().unwrap());

    let out = r
        .attach(&Target::Cgroup(cg_path.clone()), AGENT, Some("sess-1"))
        .expect("attach");
    assert_eq!(out.links_created, firma_sidecar::ebpf::LINKS_PER_CGROUP);

    // IPv4.
    let o = py(Some(&cg.dir), &[DST_V4, "4443", "4"]);
    let pid = line(&o, "PID");
    assert_eq!(
        line(&o, "PEER"),
        format!("{DST_V4} 4443"),
        "getpeername shows the original peer"
    );
    assert_eq!(
        line(&o, "GOT"),
        format!("ORIG {DST_V4}:4443 {AGENT} {cg_path} {pid}")
    );
    // IPv6.
    let o = py(Some(&cg.dir), &[DST_V6, "4443", "6"]);
    assert_eq!(line(&o, "PEER"), format!("{DST_V6} 4443"));
    assert!(
        line(&o, "GOT").starts_with(&format!("ORIG [{DST_V6}]:4443 {AGENT} ")),
        "{o}"
    );
    // v4-mapped on an IPv6 socket: treated as IPv4.
    let mapped = format!("::ffff:{DST_V4}");
    let o = py(Some(&cg.dir), &[&mapped, "4443", "6"]);
    assert_eq!(line(&o, "PEER"), format!("{mapped} 4443"));
    assert!(
        line(&o, "GOT").starts_with(&format!("ORIG {DST_V4}:4443 {AGENT} ")),
        "{o}"
    );
    assert_eq!(
        up4.load(Ordering::Relaxed) + up6.load(Ordering::Relaxed),
        0,
        "upstream saw a tagged connect"
    );

    // Not redirected: untagged client, excluded CIDR, excluded port, sidecar's SO_MARK.
    assert_eq!(line(&py(None, &[DST_V4, "4443", "4"]), "GOT"), "UPSTREAM");
    assert_eq!(line(&py(None, &[DST_V6, "4443", "6"]), "GOT"), "UPSTREAM");
    assert_eq!(
        line(&py(Some(&cg.dir), &[EXCLUDED_V4, "4443", "4"]), "GOT"),
        "UPSTREAM"
    );
    assert_eq!(up_excl.load(Ordering::Relaxed), 1);
    let ep = EXCLUDED_PORT.to_string();
    assert_eq!(
        line(&py(Some(&cg.dir), &[DST_V4, &ep, "4"]), "GOT"),
        "UPSTREAM"
    );
    assert_eq!(up_port.load(Ordering::Relaxed), 1);
    let mark = 0x4649_524d_u32.to_string();
    assert_eq!(
        line(&py(Some(&cg.dir), &[DST_V4, "4443", "4", &mark]), "GOT"),
        "UPSTREAM"
    );

    // UDP to 443 refused (sendto and connect), other UDP untouched; untagged unaffected.
    for host in [DST_V4, DST_V6] {
        let u = run_in_cgroup(
            Some(&cg.dir),
            "python3",
            &["-c", PY_UDP_CLIENT, host, "443"],
        );
        let u = String::from_utf8_lossy(&u.stdout);
        assert!(
            u.contains("SENDTO refused 1") && u.contains("CONNECT refused 1"),
            "{u}"
        );
        let u = run_in_cgroup(
            Some(&cg.dir),
            "python3",
            &["-c", PY_UDP_CLIENT, host, "4443"],
        );
        let u = String::from_utf8_lossy(&u.stdout);
        assert!(u.contains("SENDTO ok") && u.contains("CONNECT ok"), "{u}");
    }
    let u = run_in_cgroup(None, "python3", &["-c", PY_UDP_CLIENT, DST_V4, "443"]);
    assert!(String::from_utf8_lossy(&u.stdout).contains("SENDTO ok"));

    // Closed connections leave no entries behind.
    assert_eventually(Duration::from_secs(5), "entries removed on close", || {
        (r.tracked() == (0, 0)).then_some(())
    });

    // Detach removes everything attach added; the workload then connects directly.
    r.detach(&Target::Cgroup(cg_path.clone())).expect("detach");
    assert!(
        !pins
            .dir
            .join("links")
            .join(out.cgroup_id.to_string())
            .exists()
    );
    assert!(r.status().is_empty());
    let before = up4.load(Ordering::Relaxed);
    assert_eq!(
        line(&py(Some(&cg.dir), &[DST_V4, "4443", "4"]), "GOT"),
        "UPSTREAM"
    );
    assert_eq!(up4.load(Ordering::Relaxed), before + 1);
    sidecar.stop();
}

#[test]
fn entries_stay_bounded_over_10000_connections() {
    if !in_fresh_netns("entries_stay_bounded_over_10000_connections") {
        return;
    }
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-k-bounded")).expect("test cgroup");
    let port = free_dual_port();
    let r = start(&pins, port);
    let sidecar = FakeSidecar::start(port, r.clone());
    r.attach(&Target::Cgroup(cg.dir.display().to_string()), AGENT, None)
        .expect("attach");
    let script = r#"
import socket, sys
n, ok = int(sys.argv[1]), 0
for i in range(n):
    s = socket.create_connection((sys.argv[2], 4443), timeout=5)
    if s.makefile().readline().startswith('ORIG'):
        ok += 1
    s.close()
print('OK', ok)
"#;
    let out = run_in_cgroup(Some(&cg.dir), "python3", &["-c", script, "10000", DST_V4]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        line(&text, "OK"),
        "10000",
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eventually(Duration::from_secs(10), "tracking maps drained", || {
        (r.tracked() == (0, 0)).then_some(())
    });
    assert!(sidecar.accepted.load(Ordering::Relaxed) >= 10_000);
    sidecar.stop();
}

#[test]
fn dead_sidecar_means_refused_and_restart_readopts_pins() {
    if !in_fresh_netns("dead_sidecar_means_refused_and_restart_readopts_pins") {
        return;
    }
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-k-failclosed")).expect("test cgroup");
    let port = free_dual_port();
    let up = upstream(format!("{DST_V4}:4443").parse().unwrap());
    let target = Target::Cgroup(cg.dir.display().to_string());
    {
        let r = start(&pins, port);
        assert_eq!(r.adopted_programs(), 0);
        r.attach(&target, AGENT, Some("s")).expect("attach");
        let sidecar = FakeSidecar::start(port, r.clone());
        assert!(line(&py(Some(&cg.dir), &[DST_V4, "4443", "4"]), "GOT").starts_with("ORIG"));
        sidecar.stop();
        // The redirector (process state) goes away here; pins stay, as after a crash.
    }
    let refused = run_in_cgroup(
        Some(&cg.dir),
        "python3",
        &["-c", PY_TCP_CLIENT, DST_V4, "4443", "4"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ConnectionRefusedError"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        up.load(Ordering::Relaxed),
        0,
        "a tagged workload reached upstream without the sidecar"
    );

    // Restart: programs, maps, links and the binding are re-adopted, not doubled.
    let r = start(&pins, port);
    assert_eq!(r.adopted_programs(), firma_sidecar::ebpf::LINKS_PER_CGROUP);
    let st = r.status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].0.agent_id, AGENT);
    assert_eq!(st[0].0.session_id.as_deref(), Some("s"));
    assert_eq!(st[0].1, firma_sidecar::ebpf::LINKS_PER_CGROUP);
    assert_eq!(
        r.attach(&target, AGENT, Some("s")).unwrap().links_created,
        0
    );
    let sidecar = FakeSidecar::start(port, r.clone());
    let o = py(Some(&cg.dir), &[DST_V4, "4443", "4"]);
    assert!(
        line(&o, "GOT").starts_with(&format!("ORIG {DST_V4}:4443 {AGENT}")),
        "{o}"
    );
    assert_eq!(up.load(Ordering::Relaxed), 0);
    r.detach(&target).unwrap();
    sidecar.stop();
}

#[test]
fn pod_uid_resolves_for_systemd_and_cgroupfs_drivers() {
    if !in_fresh_netns("pod_uid_resolves_for_systemd_and_cgroupfs_drivers") {
        return;
    }
    let pins = TestPins::new();
    let root = TestCgroup::top(&unique("firma-k-pods")).expect("test cgroup");
    let port = free_dual_port();
    let (r, _) = Redirector::start_with(
        firma_sidecar::ebpf::embedded_object().unwrap(),
        Cgroup2::at(&root.dir),
        settings(&pins, port),
    )
    .expect("load");
    let r = Arc::new(r);
    let sidecar = FakeSidecar::start(port, r.clone());
    let systemd_uid = "7d3c1a2b-0000-4000-8000-00000000000a";
    let cgroupfs_uid = "7d3c1a2b-0000-4000-8000-00000000000b";
    let guaranteed_uid = "7d3c1a2b-0000-4000-8000-00000000000c";
    let layouts = [
        (
            systemd_uid,
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                systemd_uid.replace('-', "_")
            ),
        ),
        (
            cgroupfs_uid,
            format!("kubepods/besteffort/pod{cgroupfs_uid}"),
        ),
        (
            guaranteed_uid,
            format!(
                "kubepods.slice/kubepods-pod{}.slice",
                guaranteed_uid.replace('-', "_")
            ),
        ),
    ];
    for (uid, rel) in &layouts {
        // Processes live in a container cgroup below the pod's.
        let container = root.dir.join(rel).join("cri-containerd-1.scope");
        std::fs::create_dir_all(&container).unwrap();
        let out = r
            .attach(&Target::Pod(uid.to_string()), &format!("agent-{uid}"), None)
            .expect("attach pod");
        assert_eq!(out.cgroup_path, format!("/{rel}"));
        let o = py(Some(&container), &[DST_V4, "4443", "4"]);
        assert!(
            line(&o, "GOT").starts_with(&format!(
                "ORIG {DST_V4}:4443 agent-{uid} /{rel}/cri-containerd-1.scope "
            )),
            "{o}"
        );
        r.detach(&Target::Pod(uid.to_string())).expect("detach pod");
    }
    sidecar.stop();
}

/// Measures connect() latency over 10,000 loopback-namespace connects, same run: untagged
/// (no program), tagged but excluded port (programs run, no redirect), tagged and redirected.
/// Prints the figures; asserts only that every connect succeeded.
#[test]
fn connect_overhead_with_and_without_redirect() {
    if !in_fresh_netns("connect_overhead_with_and_without_redirect") {
        return;
    }
    let pins = TestPins::new();
    let cg = TestCgroup::top(&unique("firma-k-bench")).expect("test cgroup");
    let port = free_dual_port();
    let r = start(&pins, port);
    let _up = upstream(format!("{DST_V4}:4443").parse().unwrap());
    let _up_excl = upstream(format!("{DST_V4}:{EXCLUDED_PORT}").parse().unwrap());
    let sidecar = FakeSidecar::start(port, r.clone());
    r.attach(&Target::Cgroup(cg.dir.display().to_string()), AGENT, None)
        .expect("attach");
    let script = r#"
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t = time.perf_counter_ns()
    s.connect((host, port))
    lat.append(time.perf_counter_ns() - t)
    s.close()
lat.sort()
print('RESULT n=%d mean_us=%.2f p50_us=%.2f p99_us=%.2f' % (n, sum(lat) / n / 1000, lat[n // 2] / 1000, lat[n * 99 // 100] / 1000))
"#;
    let ep = EXCLUDED_PORT.to_string();
    let runs: [(&str, Option<&std::path::Path>, &str); 3] = [
        ("untagged (no program)", None, "4443"),
        ("tagged, excluded port", Some(&cg.dir), &ep),
        ("tagged, redirected", Some(&cg.dir), "4443"),
    ];
    for (label, cgroup, p) in runs {
        let out = run_in_cgroup(cgroup, "python3", &["-c", script, DST_V4, p, "10000"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{label}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("connect latency, {label}: {}", line(&text, "RESULT"));
    }
    sidecar.stop();
}
