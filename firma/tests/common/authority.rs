//! Harness for Authority tests: a temp deployment (config, key, policy dirs, revocation file),
//! the real `firma` binary, a running `firma authority` whose bound address is read from its
//! startup log, and polling helpers.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FIRMA: &str = env!("CARGO_BIN_EXE_firma");

/// Repository root (for `policies/`, `proto/`, `tests/python/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped example policy file `policies/<rel>`.
pub fn shipped_policy(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join("policies").join(rel)).expect("shipped policy")
}

/// Runs `firma ARGS…` to completion.
pub fn firma(args: &[&str]) -> Output {
    Command::new(FIRMA)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("run firma")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A temp deployment laid out like the issuance guide's `/tmp/firma-standalone`.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub key: PathBuf,
    pub public_key: PathBuf,
    pub issuance_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub revocations: PathBuf,
}

impl Deployment {
    /// Writes `issuance.cedar` and `runtime.cedar`, generates the key with the binary,
    /// touches the revocation file and writes a config listening on `127.0.0.1:0`.
    pub fn new(issuance: &str, runtime: &str) -> Self {
        Self::with_extra(issuance, runtime, "")
    }

    /// As [`Deployment::new`], with extra lines appended to the `[authority]` section.
    pub fn with_extra(issuance: &str, runtime: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let issuance_dir = root.join("issuance");
        let policy_dir = root.join("config/policies");
        std::fs::create_dir_all(&issuance_dir).unwrap();
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(issuance_dir.join("issuance.cedar"), issuance).unwrap();
        std::fs::write(policy_dir.join("runtime.cedar"), runtime).unwrap();
        let key = root.join("firma-authority.key");
        let out = firma(&["authority", "generate-key", "-o", key.to_str().unwrap()]);
        assert!(out.status.success(), "generate-key: {}", text(&out.stderr));
        let revocations = root.join("revocations.txt");
        std::fs::write(&revocations, "").unwrap();
        let config = root.join("config/firma.toml");
        let d = Self {
            public_key: key.with_extension("pub"),
            dir,
            config,
            key,
            issuance_dir,
            policy_dir,
            revocations,
        };
        d.write_config("127.0.0.1:0", extra);
        d
    }

    pub fn write_config(&self, listen: &str, extra: &str) {
        let cfg = format!(
            "[authority]\nlisten_addr = \"{listen}\"\npolicy_dir = \"{}\"\nissuance_policy_dir = \"{}\"\nrevocation_file = \"{}\"\nkey_file = \"{}\"\nmax_ttl_seconds = 3600\nbundle_ttl_seconds = 30\nlog_level = \"info\"\n{extra}",
            self.policy_dir.display(),
            self.issuance_dir.display(),
            self.revocations.display(),
            self.key.display()
        );
        std::fs::write(&self.config, cfg).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `firma authority -c CONFIG ARGS…`
    pub fn authority(&self, args: &[&str]) -> Output {
        let mut all = vec!["authority", "-c", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        firma(&all)
    }

    pub fn verifying_key(&self) -> firma_common::keys::VerifyingKey {
        firma_common::keys::load_verifying_key(&self.public_key).expect("public key")
    }

    /// Starts `firma authority -c CONFIG` and waits for `authority ready`.
    pub fn start(&self) -> Server {
        Server::start(&self.config)
    }
}

/// A running `firma authority`; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(config: &Path) -> Self {
        let mut child = Command::new(FIRMA)
            .args(["authority", "-c", config.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn firma authority");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("authority exited early ({status}):\n{}", server.log_text());
            }
            let ready = server.log_text().contains("authority ready");
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "authority not ready:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let line = server
            .log_lines()
            .into_iter()
            .find(|l| l.contains("gRPC listening on "))
            .expect("listening line");
        let addr = line
            .split("gRPC listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address");
        server.addr = addr.parse().expect("socket address in log");
        server
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM (to our own child, by pid) and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some` or `within` passes; panics with `what` on timeout.
pub fn assert_eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a seed file written by `firma authority issue`.
pub fn read_seed(path: &Path) -> firma_common::capability::CapabilitySeed {
    toml::from_str(&std::fs::read_to_string(path).expect("seed file")).expect("seed TOML")
}

pub const PERMIT_ALL: &str = "permit (principal, action, resource);\n";

/// A CA and a server certificate for `localhost` / 127.0.0.1 / ::1, written as PEM into
/// `dir`: (ca.crt, server.crt, server.key with mode 0600).
pub fn write_tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "firma test authority CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let ca = dir.join("ca.crt");
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (ca, cert, key)
}
