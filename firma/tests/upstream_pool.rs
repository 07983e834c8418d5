//! Upstream HTTP/2 and the shared connection pool (docs/upstream-pool.md), black-box: the real
//! `firma sidecar` in http_proxy mode, curl clients that each open a new connection, and the
//! local HTTPS upstream counting the TLS connections it accepts and the HTTP version of each
//! request.

use firma_testing::client::*;
use firma_testing::sidecar::*;
use firma_testing::upstream::*;
use firma_testing::*;
use std::time::Duration;

const CANARY: &str = "sk-canary-pool-4e2a";

fn credential() -> String {
    "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n".into()
}

/// One connection worker: the pool is per worker (docs/upstream-pool.md), and these tests count
/// upstream connections across client connections.
fn setup(alpn: &[&[u8]]) -> (Upstream, Deployment, Sidecar) {
    setup_with(alpn, 1)
}

fn setup_with(alpn: &[&[u8]], workers: u16) -> (Upstream, Deployment, Sidecar) {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start_with_alpn(
        tmp.path(),
        &["api.openai.com", "api.acme-vendor.com"],
        "127.0.0.1:0".parse().unwrap(),
        alpn,
    );
    let s = Settings {
        extra: credential(),
        workers: Some(workers),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &s);
    std::fs::copy(&up.ca_path, d.root().join("upstream-ca.crt")).unwrap();
    std::mem::forget(tmp);
    let sc = d.start(&[("FIRMA_TEST_OPENAI_KEY", CANARY)]);
    (up, d, sc)
}

/// `n` requests, each from a new curl process (a new client connection to the sidecar).
fn new_connection_requests(sc: &Sidecar, d: &Deployment, url: &str, n: usize) {
    for i in 0..n {
        let out = curl(&sc.proxy_url(), &d.ca_cert(), url, &[]);
        assert_eq!(out.status, 200, "request {i}: {out:?}\n{}", sc.log_text());
    }
}

fn outcomes(d: &Deployment, host: &str) -> Vec<serde_json::Value> {
    d.audit()
        .into_iter()
        .filter(|e| e["event"] == "outcome" && e["envelope"]["intent"]["resource"]["host"] == host)
        .collect()
}

#[test]
fn h2_upstream_is_used_when_offered_and_shared_across_client_connections() {
    let (up, d, sc) = setup(&[b"h2", b"http/1.1"]);
    new_connection_requests(&sc, &d, "https://api.openai.com/v1/models", 5);
    let seen = up.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|r| r.version == "HTTP/2.0"), "{seen:?}");
    assert!(
        seen.iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {CANARY}"))
    );
    assert!(
        seen.iter().all(|r| r.headers["host"] == "api.openai.com"),
        "{seen:?}"
    );
    assert_eq!(
        up.connection_count(),
        1,
        "five client connections shared one upstream HTTP/2 connection"
    );
    let outs = assert_eventually(Duration::from_secs(5), "5 outcomes", || {
        let o = outcomes(&d, "api.openai.com");
        (o.len() == 5).then_some(o)
    });
    assert!(
        outs.iter()
            .all(|e| e["connector"]["upstream_protocol"] == "h2")
    );
    assert_eq!(outs[0]["connector"]["upstream_reused"], false);
    assert!(
        outs[1..]
            .iter()
            .all(|e| e["connector"]["upstream_reused"] == true)
    );
}

#[test]
fn http1_only_upstream_falls_back_and_is_pooled() {
    let (up, d, sc) = setup(&[b"http/1.1"]);
    new_connection_requests(&sc, &d, "https://api.openai.com/v1/models", 4);
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|r| r.version == "HTTP/1.1"), "{seen:?}");
    assert!(seen.iter().all(|r| r.headers["host"] == "api.openai.com"));
    assert_eq!(
        up.connection_count(),
        1,
        "sequential requests reused one connection"
    );
    let outs = assert_eventually(Duration::from_secs(5), "4 outcomes", || {
        let o = outcomes(&d, "api.openai.com");
        (o.len() == 4).then_some(o)
    });
    assert!(
        outs.iter()
            .all(|e| e["connector"]["upstream_protocol"] == "http/1.1")
    );
}

/// Two hosts at the same address, one with an injected credential: never the same upstream
/// connection (host, TLS name and credential identity are all in the pool key), each request
/// with the SNI of its own host, and the credential only on its host's requests.
#[test]
fn hosts_and_credentials_never_share_an_upstream_connection() {
    let (up, d, sc) = setup(&[b"h2", b"http/1.1"]);
    for _ in 0..2 {
        new_connection_requests(&sc, &d, "https://api.openai.com/v1/models", 1);
        new_connection_requests(&sc, &d, "https://api.acme-vendor.com/v1/send", 1);
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(up.connection_count(), 2, "{seen:?}");
    for r in &seen {
        let host = r.sni.as_deref().unwrap();
        assert_eq!(
            r.headers.contains_key("authorization"),
            host == "api.openai.com",
            "{r:?}"
        );
    }
    let openai_conn: Vec<usize> = seen
        .iter()
        .filter(|r| r.sni.as_deref() == Some("api.openai.com"))
        .map(|r| r.conn)
        .collect();
    let vendor_conn: Vec<usize> = seen
        .iter()
        .filter(|r| r.sni.as_deref() == Some("api.acme-vendor.com"))
        .map(|r| r.conn)
        .collect();
    assert!(openai_conn.iter().all(|c| !vendor_conn.contains(c)));
}

/// A client that aborts while its HTTP/1.1 exchange is still in flight: that upstream
/// connection is not handed to the next request (it is closed), and the next requests work.
#[test]
fn aborted_exchange_does_not_poison_the_pool() {
    let (up, d, sc) = setup(&[b"http/1.1"]);
    // /slow answers after 1.5 s; curl gives up after 0.5 s, mid-exchange.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "0.5",
            "--noproxy",
            "",
            "--proxy",
            &sc.proxy_url(),
            "--cacert",
        ])
        .arg(d.ca_cert())
        .arg("https://api.acme-vendor.com/slow?ms=1500")
        .output()
        .unwrap();
    assert!(!out.status.success());
    new_connection_requests(&sc, &d, "https://api.acme-vendor.com/v1/send", 2);
    let seen = up.seen();
    assert_eq!(seen[0].path, "/slow");
    let models: Vec<_> = seen.iter().filter(|r| r.path == "/v1/send").collect();
    assert_eq!(models.len(), 2);
    // The slow exchange's connection was busy or closed: the next request could not take it.
    assert!(models.iter().all(|r| r.conn != seen[0].conn), "{seen:?}");
}

/// Two workers: client connections alternate between them and each worker dials and keeps its
/// own upstream connection (a request never uses a connection another thread drives); within a
/// worker, connections are still reused.
#[test]
fn each_connection_worker_keeps_its_own_upstream_connections() {
    let (up, d, sc) = setup_with(&[b"http/1.1"], 2);
    new_connection_requests(&sc, &d, "https://api.openai.com/v1/models", 6);
    let seen = up.seen();
    assert_eq!(seen.len(), 6);
    assert_eq!(
        up.connection_count(),
        2,
        "six client connections over two workers: one upstream connection each"
    );
    let outs = assert_eventually(Duration::from_secs(5), "6 outcomes", || {
        let o = outcomes(&d, "api.openai.com");
        (o.len() == 6).then_some(o)
    });
    let reused = outs
        .iter()
        .filter(|e| e["connector"]["upstream_reused"] == true)
        .count();
    assert_eq!(reused, 4, "{outs:?}");
}
