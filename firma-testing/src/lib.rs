//! The one test harness of the workspace, used by `firma/tests`, `vm-tests` and `bench`:
//!
//! - [`process`]: launchers for the real `firma` binary (log capture, readiness wait,
//!   terminate) and [`firma_bin`], which finds the freshly built binary;
//! - [`config`]: the one sidecar TOML template ([`config::SidecarToml`]);
//! - [`sidecar`], [`authority`]: temp deployments and the running processes;
//! - [`pki`], [`upstream`]: test CAs and the local HTTPS upstream that records requests;
//! - [`grpc`]: a real grpcio TLS server and client (Python);
//! - [`envoy`]: Envoy's binary, ext_authz YAML pieces and command line (peer of Firma);
//! - [`ws`]: a real WebSocket echo server and client (Python `websockets`);
//! - [`kernel`]: root/BPF checks, network namespaces, test cgroups and pin directories;
//! - [`run`]: `firma run` worlds (upstream posing as API hosts, hosts file, state dir);
//! - [`client`]: curl, raw exchanges, clients started inside a cgroup;
//! - [`vault`]: a RustyVault launcher;
//! - [`redis`]: a real `redis-server` (kill and restart on the same data) for the session store;
//! - [`prometheus`]: a real Prometheus server scraping loopback targets, and its query API;
//! - [`pipeline`], [`audit`]: in-process fixtures for the pipeline and audit libraries;
//! - [`kernel_suite`]: the kernel tests run both on a root host and inside the VM;
//! - [`assert_eventually`] and small helpers below.

pub mod audit;
pub mod authority;
pub mod client;
pub mod config;
pub mod confine;
pub mod envoy;
pub mod etcd;
pub mod grpc;
pub mod kernel;
pub mod kernel_suite;
pub mod mcp;
pub mod pipeline;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod run;
pub mod sidecar;
pub mod upstream;
pub mod vault;
pub mod ws;

pub use process::{firma, firma_bin, firma_env};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The repository root (for `policies/`, `proto/`, `tests/python/`).
/// The switch that turns every test skip into a failure. `.ci/run` sets it: on CI machines
/// (root, BPF, cgroup v2, every tool installed) a skip can only mean a broken setup, and a
/// suite that silently skips its kernel tests proves nothing.
pub const NO_SKIP_VAR: &str = "FIRMA_NO_SKIP";

/// Skips the calling test: prints `SKIP <test>: <why>` and returns, so the caller can
/// `return`. Under `FIRMA_NO_SKIP=1` it panics with the same text instead.
pub fn skip(test_name: &str, why: &str) {
    if std::env::var_os(NO_SKIP_VAR).is_some_and(|v| v == "1") {
        panic!("{test_name} would be skipped ({why}), but {NO_SKIP_VAR}=1 forbids skips");
    }
    eprintln!("SKIP {test_name}: {why}");
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("firma-testing sits in the workspace")
        .to_path_buf()
}

/// The shipped example policy file `policies/<rel>`.
pub fn shipped_policy(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join("policies").join(rel)).expect("shipped policy")
}

/// Lossy UTF-8 of process output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A free loopback port (bind :0, release). Small race, acceptable for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A free port on both 127.0.0.1 and ::1 (bound briefly to check).
pub fn free_dual_port() -> u16 {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = v4.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call (cgroups and pins of concurrent runs never clash).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// What a polled condition returns: `bool` (done or not) or `Option<T>` (done with a value).
pub trait Ready {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `f` every 20 ms until it is ready or `within` passes, as an error naming `what`.
pub fn eventually<R: Ready>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> R,
) -> Result<R::Value, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().ready() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("not true within {within:?}: {what}"));
        }
        // Poll interval of the wait on `f`, bounded by `within`.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As [`eventually`], panicking on timeout; returns the value of an `Option` condition.
pub fn assert_eventually<R: Ready>(within: Duration, what: &str, f: impl FnMut() -> R) -> R::Value {
    eventually(within, what, f).unwrap_or_else(|e| panic!("{e}"))
}
