//! A workload cannot drown the audit (real binary, http_proxy mode, a Python client).
//!
//! 100,000 denied requests with 14 KB paths from one client, pipelined on keep-alive
//! connections: every one is answered 403 and none reaches the upstream; the audit holds every
//! denial exactly (individual `decision` events + `deny_summary` counts = 100,000) in a bounded
//! size on disk, each line bounded whatever the path; the file sink rotated and `firma audit
//! verify DIR` passes; removing, reordering, truncating or dropping the first rotated file is
//! detected; an allow in the middle of the flood is its own event. The free-space watermark
//! gauge and WARN fire with a threshold above the free space; as root, on a small tmpfs, the
//! watermark turns on when the disk fills and off when space returns.

use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DENIALS: u64 = 100_000;
/// One request in this many carries the 14 KB path.
const LONG_EVERY: u64 = 1_000;
/// The bound this test holds the whole audit set to (see docs/operations.md).
const MAX_AUDIT_BYTES: u64 = 1024 * 1024;
const MAX_FILE_BYTES: u64 = 4096;
const PATH_BYTES: usize = 14 * 1024;

/// Rewrites `[sidecar.audit]` of the deployment: the file in `dir`, plus `keys`.
fn audit_config(d: &Deployment, dir: &Path, keys: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace(
            &format!("path = \"{}\"", d.audit_path.display()),
            &format!("path = \"{}\"", audit.display()),
        )
        .replace("[sidecar.audit]\n", &format!("[sidecar.audit]\n{keys}\n"));
    std::fs::write(&d.config, cfg).unwrap();
    audit
}

fn events(files: &[PathBuf]) -> Vec<Value> {
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn set(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("audit.jsonl."))
        .collect();
    rotated.sort();
    rotated.push(dir.join("audit.jsonl"));
    rotated
}

fn verify(d: &Deployment, path: &Path) -> (bool, String) {
    let out = firma(&[
        "audit",
        "verify",
        path.to_str().unwrap(),
        "--public-key",
        d.root().join("audit.pub").to_str().unwrap(),
    ]);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// Sends `total` absolute-form requests for `http://unmapped.example/...` through the proxy,
/// pipelined 200 at a time on 4 keep-alive connections; one in `long_every` has a path of
/// `path_bytes` (the rest are short: a debug-build sidecar parses 14 KB heads slowly); prints
/// the 403 count.
const FLOOD: &str = r#"
import socket, sys, threading
proxy_port, total, path_bytes, long_every = (int(a) for a in sys.argv[1:5])
def req(path):
    return ("GET http://unmapped.example%s HTTP/1.1\r\nHost: unmapped.example\r\n\r\n" % path).encode()
long_req = req("/" + "a" * (path_bytes - 1))
counts = []
def run(c, n):
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=120)
    got, buf = 0, b""
    while got < n:
        k = min(200, n - got)
        batch = b"".join(long_req if (got + i) % long_every == 0 else req("/flood/%d/%d" % (c, got + i)) for i in range(k))
        s.sendall(batch)
        seen = 0
        while seen < k:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise SystemExit("closed after %d" % (got + seen))
            buf += chunk
            n403 = buf.count(b"HTTP/1.1 403 ")
            if n403:
                seen += n403
                buf = buf[buf.rfind(b"HTTP/1.1 403 ") + 1:]
        got += k
    s.close()
    counts.append(got)
threads = [threading.Thread(target=run, args=(c, max(1, total // 4))) for c in range(min(4, total))]
for t in threads: t.start()
for t in threads: t.join()
print("DENIED", sum(counts))
"#;

#[test]
fn a_denial_flood_is_aggregated_rotated_bounded_and_verifiable() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.acme-vendor.com", "unmapped.example"]);
    let d = Deployment::new(
        Some(&up),
        &Settings {
            extra: "[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n".into(),
            ..Settings::default()
        },
    );
    let dir = d.root().join("audit");
    // The threshold is above any disk's free space: the watermark is on from the first check.
    let audit = audit_config(
        &d,
        &dir,
        &format!(
            "max_file_bytes = {MAX_FILE_BYTES}\nfree_space_warn_bytes = {}",
            1u64 << 62
        ),
    );
    let mut sc = d.start(&[]);
    let proxy_port = sc.proxy_url().rsplit(':').next().unwrap().to_string();

    assert_eventually(Duration::from_secs(10), "the watermark gauge", || {
        sc.metric("firma_sidecar_audit_disk_low") == Some(1.0)
    });
    let free = sc
        .metric("firma_sidecar_audit_disk_free_bytes")
        .unwrap_or(0.0);
    assert!(free > 0.0, "free bytes gauge: {free}");
    assert!(
        sc.log_text().contains("AUDIT DISK LOW"),
        "{}",
        sc.log_text()
    );

    // First, one denial with a 14 KB path on its own: written one by one, bounded.
    let one = Command::new("python3")
        .args(["-c", FLOOD, &proxy_port, "1", &PATH_BYTES.to_string(), "1"])
        .output()
        .expect("python3");
    assert!(text(&one.stdout).contains("DENIED 1"), "{one:?}");
    // FIRMA_FLOOD_DENIALS: a smaller flood for a quick local look (the rotation and size
    // assertions are made for the default 100,000).
    let flood_total: u64 = std::env::var("FIRMA_FLOOD_DENIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DENIALS);
    let started = Instant::now();
    let mut py = Command::new("python3")
        .args([
            "-c",
            FLOOD,
            &proxy_port,
            &flood_total.to_string(),
            &PATH_BYTES.to_string(),
            &LONG_EVERY.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    // An allow in the middle of the flood, from another client: never aggregated.
    let ca = d.ca_cert();
    let allowed = firma_testing::client::curl(
        &sc.proxy_url(),
        &ca,
        "https://api.acme-vendor.com/v1/x",
        &[],
    );
    assert_eq!(allowed.status, 200, "{allowed:?}");
    let deadline = Instant::now() + Duration::from_secs(600);
    let out = loop {
        if let Some(status) = py.try_wait().unwrap() {
            assert!(status.success(), "flood client failed");
            let mut s = String::new();
            use std::io::Read;
            py.stdout.take().unwrap().read_to_string(&mut s).unwrap();
            break s;
        }
        assert!(Instant::now() < deadline, "flood client took over 600 s");
        // Poll interval of the wait for the flood client to exit, bounded by `deadline`.
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    assert!(out.contains(&format!("DENIED {flood_total}")), "{out}");
    assert_eq!(up.count(), 1, "only the allowed call reached the upstream");
    assert_eq!(
        sc.metric("firma_sidecar_decisions_total{outcome=\"deny\",reason=\"UnclassifiedIntent\",action_class=\"\"}"),
        Some((flood_total + 1) as f64),
        "every denial counted in the metrics"
    );
    // Graceful stop: the current window's summaries are written at flush.
    sc.terminate(Duration::from_secs(20));

    let files = set(&dir);
    let all = events(&files);
    let flood = |e: &&Value| e["envelope"]["intent"]["resource"]["host"] == "unmapped.example";
    let individual: Vec<&Value> = all
        .iter()
        .filter(flood)
        .filter(|e| e["event"] == "decision")
        .collect();
    let summaries: Vec<&Value> = all
        .iter()
        .filter(flood)
        .filter(|e| e["event"] == "deny_summary")
        .collect();
    let summarised: u64 = summaries
        .iter()
        .map(|e| e["aggregate"]["count"].as_u64().unwrap())
        .sum();
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let longest = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::len)
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap();
    eprintln!(
        "FLOOD: {flood_total} denials (1 in {LONG_EVERY} with a {PATH_BYTES}-byte path) in {:.1} s: {} written one by one, {summarised} in {} deny_summary event(s); audit {bytes} bytes in {} file(s), longest line {longest} bytes",
        took.as_secs_f64(),
        individual.len(),
        summaries.len(),
        files.len()
    );
    assert_eq!(
        individual.len() as u64 + summarised,
        flood_total + 1,
        "every denial accounted for exactly"
    );
    assert!(!summaries.is_empty() && summarised > flood_total / 2);
    assert!(bytes < MAX_AUDIT_BYTES, "audit set {bytes} bytes");
    assert!(longest < 8 * 1024, "longest line {longest} bytes");
    let first = individual[0];
    let path = first["envelope"]["intent"]["resource"]["path"]
        .as_str()
        .unwrap();
    assert!(
        path.ends_with(&format!("…[truncated: {PATH_BYTES} bytes]")),
        "{}",
        &path[path.len().saturating_sub(80)..]
    );
    let s = summaries[0];
    assert_eq!(s["decision"]["outcome"], "DENY");
    assert_eq!(s["decision"]["reason"], "UnclassifiedIntent");
    assert_eq!(s["aggregate"]["key"]["workload"], "peer:127.0.0.1");
    assert_eq!(s["aggregate"]["sample"].as_array().unwrap().len(), 3);
    assert!(
        s["aggregate"]["first_timestamp"].is_string()
            && s["aggregate"]["last_timestamp"].is_string()
    );
    // The allow is its own decision event, with its outcome.
    let allows: Vec<&Value> = all
        .iter()
        .filter(|e| e["event"] == "decision" && e["decision"]["outcome"] == "ALLOW")
        .collect();
    assert_eq!(allows.len(), 1, "one ALLOW decision");

    // Rotation happened; every rotated file starts with its signed rotation event.
    assert!(files.len() >= 3, "rotated files: {files:?}");
    for (i, f) in files.iter().enumerate().skip(1) {
        let head: Value =
            serde_json::from_str(std::fs::read_to_string(f).unwrap().lines().next().unwrap())
                .unwrap();
        assert_eq!(head["event"], "rotation", "{}", f.display());
        assert_eq!(head["file_index"], i as u64 + 1, "{}", f.display());
    }
    let (ok, out) = verify(&d, &dir);
    assert!(
        ok && out.contains(&format!("across {} file(s)", files.len())),
        "{out}"
    );
    // The active file alone verifies too, noting where its chain comes from.
    let (ok, out) = verify(&d, &audit);
    assert!(ok && out.contains("continues its chain from"), "{out}");

    // Tampering with the set.
    let tampered = |name: &str, edit: &dyn Fn(&Path)| {
        let t = d.root().join(name);
        std::fs::create_dir_all(&t).unwrap();
        for f in &files {
            std::fs::copy(f, t.join(f.file_name().unwrap())).unwrap();
        }
        edit(&t);
        verify(&d, &t)
    };
    let name = |i: usize| format!("audit.jsonl.{i:06}");
    let (ok, out) = tampered("removed", &|t| {
        std::fs::remove_file(t.join(name(2))).unwrap()
    });
    assert!(!ok && out.contains("rotated file 2 is missing"), "{out}");
    // The newest rotated file removed: only the active file's rotation event tells.
    let last = files.len() - 1;
    let (ok, out) = tampered("removed_last", &|t| {
        std::fs::remove_file(t.join(name(last))).unwrap()
    });
    assert!(
        !ok && out.contains(&format!("rotated file {last} is missing")),
        "{out}"
    );
    let (ok, out) = tampered("reordered", &|t| {
        std::fs::rename(t.join(name(1)), t.join("x")).unwrap();
        std::fs::rename(t.join(name(2)), t.join(name(1))).unwrap();
        std::fs::rename(t.join("x"), t.join(name(2))).unwrap();
    });
    assert!(!ok && out.contains("FAILED"), "{out}");
    let (ok, out) = tampered("truncated", &|t| {
        let f = t.join(name(1));
        let text = std::fs::read_to_string(&f).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.pop();
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    });
    assert!(!ok && out.contains("FAILED"), "{out}");
    assert!(
        out.contains("not covered by a signature") || out.contains("is broken"),
        "{out}"
    );
    let (ok, out) = tampered("head-removed", &|t| {
        std::fs::remove_file(t.join(name(1))).unwrap()
    });
    assert!(
        !ok && out.contains("retention does not explain it"),
        "{out}"
    );
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// As root: a 2 MB tmpfs holds the audit, the watermark is 1 MB. Free space above it: gauge 0;
/// a filler takes it below: gauge 1 and `AUDIT DISK LOW` within one check; space back: 0.
#[test]
fn the_free_space_watermark_follows_the_disk() {
    if !is_root() {
        firma_testing::skip(
            "the_free_space_watermark_follows_the_disk",
            "needs root to mount a tmpfs",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.acme-vendor.com"]);
    let d = Deployment::new(
        Some(&up),
        &Settings {
            extra: "[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n".into(),
            ..Settings::default()
        },
    );
    let disk = d.root().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&disk)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    audit_config(
        &d,
        &disk,
        &format!("free_space_warn_bytes = {}", 1024 * 1024),
    );
    let mut sc = d.start(&[]);
    assert_eventually(Duration::from_secs(10), "watermark off", || {
        sc.metric("firma_sidecar_audit_disk_low") == Some(0.0)
    });
    let before = sc.metric("firma_sidecar_audit_disk_free_bytes").unwrap();
    assert!(before > 1024.0 * 1024.0, "{before}");
    std::fs::write(disk.join("filler"), vec![b'x'; 1536 * 1024]).unwrap();
    assert_eventually(Duration::from_secs(15), "watermark on", || {
        sc.metric("firma_sidecar_audit_disk_low") == Some(1.0)
    });
    let low = sc.metric("firma_sidecar_audit_disk_free_bytes").unwrap();
    assert!(low < 1024.0 * 1024.0, "{low}");
    assert!(
        sc.log_text().contains("AUDIT DISK LOW"),
        "{}",
        sc.log_text()
    );
    // Still serving: a warning, not a failure.
    let out = firma_testing::client::curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.acme-vendor.com/v1/x",
        &[],
    );
    assert_eq!(out.status, 200, "{out:?}");
    std::fs::remove_file(disk.join("filler")).unwrap();
    assert_eventually(Duration::from_secs(15), "watermark off again", || {
        sc.metric("firma_sidecar_audit_disk_low") == Some(0.0)
    });
    assert!(
        sc.log_text().contains("audit disk space back above"),
        "{}",
        sc.log_text()
    );
    sc.terminate(Duration::from_secs(10));
}
