//! Audit collection at scale, real `firma` binaries: two `firma audit collect` replicas, two
//! sidecars (`sink = "grpc"`, both collectors listed) under load from real curl clients; one
//! collector is killed (SIGKILL) mid-stream. Every event of every sidecar must then be in the
//! collectors' files (in exactly one, apart from the submission the killed collector had written
//! but not acknowledged, which reaches the other one again, identical, and is reported), and
//! `firma audit verify A B` must rebuild both chains with no gap. Hostile: a tampered line, a
//! repeated line, a missing stretch and the same file given twice are reported
//! (docs/scale-out.md, "Audit collection").

use firma_testing::client::curl;
use firma_testing::process::Process;
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{firma, firma_bin, free_port, text};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// curl clients per sidecar: enough to keep events flowing while the collector is killed, few
/// enough for a loaded 2-core CI machine.
const CLIENTS: usize = 2;

/// The `grpc` sink's largest submission (`firma_sidecar::audit::grpc::BATCH`).
const SUBMISSION: usize = 512;

struct Line {
    chain: String,
    seq: u64,
    event: String,
    text: String,
}

fn parse(file: &Path) -> Vec<Line> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some(Line {
                chain: v["chain_id"].as_str()?.to_owned(),
                seq: v["seq"].as_u64()?,
                event: v["event"].as_str().unwrap_or_default().to_owned(),
                text: l.to_owned(),
            })
        })
        .collect()
}

/// Lines per chain in `file`.
fn per_chain(file: &Path) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in parse(file) {
        *m.entry(l.chain).or_default() += 1;
    }
    m
}

fn collector(port: u16, out: &Path, keys: &[PathBuf]) -> Process {
    let mut cmd = std::process::Command::new(firma_bin());
    cmd.args(["audit", "collect", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--output")
        .arg(out)
        .env("RUST_LOG", "firma_authority=debug");
    for k in keys {
        cmd.arg("--public-key").arg(k);
    }
    let mut p = Process::spawn(cmd).expect("spawn firma audit collect");
    p.wait_for("audit collector listening", Duration::from_secs(20))
        .expect("collector up");
    p
}

fn verify(files: &[&Path], keys: &[PathBuf], extra: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = vec!["audit".into(), "verify".into()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.extend(files.iter().map(|f| f.display().to_string()));
    for k in keys {
        args.push("--public-key".into());
        args.push(k.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = firma(&refs);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("$ firma {}\n{report}", refs.join(" "));
    (out.status.success(), report)
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, format!("{}\n", lines.join("\n"))).expect("write");
}

/// A sidecar of its own deployment (own audit key, so its own chain) shipping to `collectors`.
/// A sidecar shipping to `collectors` in that order, and its admin (metrics) port.
fn sidecar(up: &Upstream, collectors: &[u16]) -> (Deployment, Sidecar, u16) {
    let admin = free_port();
    let settings = Settings {
        upstream_hosts: vec!["api.openai.com".into()],
        intercept_hosts: vec!["api.openai.com".into()],
        strict_hosts: Vec::new(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(up), &settings);
    let mut t = d.toml(Some(up), &settings);
    t.audit = None;
    let urls: Vec<String> = collectors
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    t.extra = format!(
        "[sidecar.audit]\nsink = \"grpc\"\ngrpc_url = {}\ngrpc_urls = [{}]\nsigning_key_path = \"{}\"\n\n[sidecar.admin]\nlisten_addr = \"127.0.0.1:{admin}\"\n",
        urls[0],
        urls[1..].join(", "),
        d.root().join("audit.key").display()
    );
    t.write(&d.config).expect("write firma.toml");
    let sc = d.start(&[]);
    (d, sc, admin)
}

/// Stops the load when the test ends, also by a failed assertion (the clients then report
/// only the first failure, not the sidecars going away).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_collector_killed_under_load_loses_and_duplicates_nothing() {
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1?}] {what}", t0.elapsed());
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let (pa, pb) = (free_port(), free_port());
    let (d1, sc1, admin1) = sidecar(&up, &[pa, pb]);
    let (d2, sc2, admin2) = sidecar(&up, &[pa, pb]);
    let keys = vec![d1.root().join("audit.pub"), d2.root().join("audit.pub")];
    let (file_a, file_b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    let mut coll_a = collector(pa, &file_a, &keys);
    let coll_b = collector(pb, &file_b, &keys);

    // Load: CLIENTS curl clients per sidecar, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = StopOnDrop(stop.clone());
    let sent = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut clients = Vec::new();
    for (i, (d, sc)) in [(&d1, &sc1), (&d2, &sc2)].into_iter().enumerate() {
        for c in 0..CLIENTS {
            let (stop, sent) = (stop.clone(), sent[i].clone());
            let (proxy, ca) = (sc.proxy_url(), d.ca_cert());
            clients.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = curl(
                        &proxy,
                        &ca,
                        "https://api.openai.com/v1/chat/completions",
                        &[
                            "-H",
                            "x-firma-session: s1",
                            "-d",
                            "{\"model\":\"m\",\"messages\":[]}",
                        ],
                    );
                    if out.status != 200 && stop.load(Ordering::Relaxed) {
                        break; // the test ended early (a failed assertion)
                    }
                    assert_eq!(out.status, 200, "sidecar {i} client {c}: {out:?}");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }

    // Both sidecars ship to A; kill -9 A while they are still sending.
    firma_testing::eventually(
        Duration::from_secs(60),
        "both sidecars' events reach collector A",
        || {
            let m = per_chain(&file_a);
            m.len() == 2 && m.values().all(|n| *n >= 20)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: A holds {:?}\ncollector A:\n{}\nsidecar 1:\n{}\nsidecar 2:\n{}",
            per_chain(&file_a),
            coll_a.log_text(),
            sc1.log_text(),
            sc2.log_text()
        )
    });
    phase("events of both sidecars in A");
    coll_a.kill();
    let in_a_at_kill = parse(&file_a).len();
    let sent_at_kill: u64 = sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    eprintln!("collector A killed after {in_a_at_kill} line(s), {sent_at_kill} request(s)");

    // The sidecars fail over to B under load.
    firma_testing::eventually(
        Duration::from_secs(60),
        "both sidecars' events reach collector B after the failover",
        || {
            let m = per_chain(&file_b);
            m.len() == 2 && m.values().all(|n| *n >= 20)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: B holds {:?}\ncollector B:\n{}\nsidecar 1:\n{}\nsidecar 2:\n{}",
            per_chain(&file_b),
            coll_b.log_text(),
            sc1.log_text(),
            sc2.log_text()
        )
    });
    phase("both sidecars failed over to B");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let sent: Vec<u64> = sent.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    assert_eq!(
        parse(&file_a).len(),
        in_a_at_kill,
        "nothing written to A after the kill"
    );
    for (sc, admin) in [(&sc1, admin1), (&sc2, admin2)] {
        assert!(
            sc.log_text()
                .contains(&format!("failing over to 127.0.0.1:{pb}")),
            "{}",
            sc.log_text()
        );
        // Operators see it without reading logs.
        let (status, scrape) =
            firma_testing::prometheus::get(&format!("http://127.0.0.1:{admin}/metrics"));
        assert_eq!(status, 200, "{scrape}");
        let metric = |name: &str| firma_testing::prometheus::sample(&scrape, name);
        assert!(
            metric("firma_sidecar_audit_collector_failovers_total") >= Some(1.0),
            "{scrape}"
        );
        assert!(
            metric("firma_sidecar_audit_events_shipped_total") >= Some(20.0),
            "{scrape}"
        );
    }

    // Every request's decision reaches the collectors: one decision event per request per chain.
    let chain_of = |d: &Deployment| {
        let pk = firma_common::keys::load_verifying_key(&d.root().join("audit.pub")).expect("pub");
        firma_common::audit::key_id(&pk)
    };
    let key_ids = [chain_of(&d1), chain_of(&d2)];
    let decisions = |lines: &[Line], key_id: &str| -> usize {
        let mut seqs: Vec<(&str, u64)> = lines
            .iter()
            .filter(|l| {
                l.event == "decision" && l.text.contains(&format!("\"key_id\":\"{key_id}\""))
            })
            .map(|l| (l.chain.as_str(), l.seq))
            .collect();
        seqs.sort();
        seqs.dedup();
        seqs.len()
    };
    let counts = || {
        let mut all = parse(&file_a);
        all.extend(parse(&file_b));
        [decisions(&all, &key_ids[0]), decisions(&all, &key_ids[1])]
    };
    firma_testing::eventually(
        Duration::from_secs(90),
        "every request's decision is in a collector file",
        || (0..2).all(|i| counts()[i] as u64 == sent[i]),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: sent {sent:?}, decisions {:?}\nsidecar 1:\n{}\nsidecar 2:\n{}",
            counts(),
            sc1.log_text(),
            sc2.log_text()
        )
    });

    phase("every request's decision collected");
    // Each event in exactly one file, apart from identical overlaps of at most one submission.
    let (a, b) = (parse(&file_a), parse(&file_b));
    let mut held: HashMap<(String, u64), Vec<(usize, String)>> = HashMap::new();
    for (f, lines) in [(0, &a), (1, &b)] {
        for l in lines {
            held.entry((l.chain.clone(), l.seq))
                .or_default()
                .push((f, l.text.clone()));
        }
    }
    let mut chains: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut in_both = 0usize;
    for ((chain, seq), copies) in &held {
        chains.entry(chain.clone()).or_default().push(*seq);
        match copies.as_slice() {
            [_] => {}
            [(0, x), (1, y)] => {
                assert_eq!(x, y, "chain {chain} seq {seq}: the two copies differ");
                in_both += 1;
            }
            other => panic!(
                "chain {chain} seq {seq} held {} times in one file: {other:?}",
                other.len()
            ),
        }
    }
    assert_eq!(chains.len(), 2, "one chain per sidecar");
    for (chain, seqs) in &mut chains {
        seqs.sort();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs.last().copied(),
            Some(n - 1),
            "chain {chain}: seq 0 to {} with no gap",
            n - 1
        );
    }
    assert!(
        in_both <= 2 * SUBMISSION,
        "{in_both} event(s) in both files: more than the one unacknowledged submission per sidecar"
    );
    eprintln!(
        "sent {sent:?} request(s); A holds {} line(s), B {} line(s); {in_both} held by both (identical)",
        a.len(),
        b.len()
    );

    // Each file verifies on its own as a replica's file; together they rebuild both chains.
    for f in [&file_a, &file_b] {
        let (ok, report) = verify(&[f], &keys, &["--part"]);
        assert!(ok && report.contains("in 2 chain(s)"), "{report}");
    }
    // A holds each chain from seq 0 in one stretch: it also verifies as a single file; B
    // starts mid-chain, which only the replica view accepts.
    assert!(verify(&[&file_a], &keys, &[]).0);
    let (ok, report) = verify(&[&file_b], &keys, &[]);
    assert!(!ok && report.contains("expected seq 0"), "{report}");
    let (ok, report) = verify(&[&file_a, &file_b], &keys, &[]);
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!(
            "OK: {} event(s) in 2 chain(s) across 2 file(s); every chain is complete from seq 0, no gap, no fork ({in_both} event(s) held by two files",
            held.len()
        )),
        "{report}"
    );

    phase("verified");
    // Hostile 1: a stretch of B missing (down to a signed line, so B still verifies alone).
    let max_in_a: HashMap<&str, u64> = a.iter().fold(HashMap::new(), |mut m, l| {
        let e = m.entry(l.chain.as_str()).or_insert(l.seq);
        *e = (*e).max(l.seq);
        m
    });
    let chain = b[0].chain.clone();
    let first_new = b
        .iter()
        .position(|l| l.chain == chain && max_in_a.get(chain.as_str()).is_none_or(|m| l.seq > *m))
        .expect("B holds lines A does not");
    let signed = (first_new..b.len())
        .find(|&i| b[i].chain == chain && b[i].text.contains("\"signature\":\""))
        .expect("a signed line");
    let cut: Vec<String> = b
        .iter()
        .enumerate()
        .filter(|(i, l)| l.chain != chain || !(first_new..=signed).contains(i))
        .map(|(_, l)| l.text.clone())
        .collect();
    let file_cut = tmp.path().join("b-cut.jsonl");
    write_lines(&file_cut, &cut);
    assert!(
        verify(&[&file_cut], &keys, &["--part"]).0,
        "the cut file verifies alone"
    );
    let (ok, report) = verify(&[&file_a, &file_cut], &keys, &[]);
    assert!(
        !ok && report.contains(&format!(
            "GAP: chain {chain}: seq {} to {} are in none of the files",
            b[first_new].seq, b[signed].seq
        )),
        "{report}"
    );

    // Hostile 2: a line of B rewritten.
    let mut tampered: Vec<String> = b.iter().map(|l| l.text.clone()).collect();
    let at = tampered.len() / 2;
    tampered[at] = tampered[at].replacen("\"decision\"", "\"decisioN\"", 1);
    if tampered[at] == b[at].text {
        tampered[at] = tampered[at].replacen('{', "{ ", 1);
    }
    let file_t = tmp.path().join("b-tampered.jsonl");
    write_lines(&file_t, &tampered);
    let (ok, report) = verify(&[&file_a, &file_t], &keys, &[]);
    assert!(!ok && report.contains("b-tampered.jsonl:"), "{report}");
    assert!(report.contains("FAILED: first bad line is"), "{report}");

    // Hostile 3: lines of B repeated at its end (a collector writes each seq once).
    let mut dup: Vec<String> = b.iter().map(|l| l.text.clone()).collect();
    dup.extend(b[..3].iter().map(|l| l.text.clone()));
    let file_d = tmp.path().join("b-dup.jsonl");
    write_lines(&file_d, &dup);
    let (ok, report) = verify(&[&file_a, &file_d], &keys, &[]);
    assert!(!ok && report.contains("comes again"), "{report}");
    assert!(
        report.contains(&format!("first bad line is {} of", b.len() + 1)),
        "{report}"
    );

    // Hostile 4: one file given twice would count every line as an overlap.
    let (ok, report) = verify(&[&file_a, &file_a], &keys, &[]);
    assert!(!ok && report.contains("given twice"), "{report}");
}
