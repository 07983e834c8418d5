//! Authority deployments: a temp layout (config, key, policy dirs, revocation file) made with
//! the real binary, and a running `firma authority` whose bound address is read from its log.

use crate::firma;
use crate::pki::TestCa;
use crate::process::{Process, firma_bin, firma_command};
use crate::text;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

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

/// A running `firma authority`; killed on drop. Derefs to its [`Process`] (log, terminate).
pub struct Server {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `firma authority -c CONFIG`, waits for `authority ready`, reads the gRPC address.
    pub fn start(config: &Path) -> Self {
        let cmd = firma_command(
            &firma_bin(),
            &["authority", "-c", &config.display().to_string()],
        );
        let mut process = Process::spawn(cmd).expect("spawn firma authority");
        process
            .wait_for("authority ready", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("authority: {e}"));
        let addr = process
            .logged("gRPC listening on ")
            .expect("listening line with a socket address");
        Self { process, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Deref for Server {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
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
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new("firma test authority CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1", "::1"]);
    let ca_path = ca.write_pem(&dir.join("ca.crt"));
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, leaf.cert.pem()).unwrap();
    std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (ca_path, cert, key)
}
