//! A throwaway Firma deployment for the benchmark: keys, a seed capability, the shipped runtime
//! policy and mapping rules, the config file, and the `firma sidecar` process itself.
//! Everything is produced by the real `firma` binary (`authority generate-key`, `authority
//! issue`), the same way an operator would.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The host the workload calls (MITM'd, mapped to `model.inference.chat`, permitted by the
/// shipped genai-app policy).
pub const HOST: &str = "api.openai.com";
/// The credential the sidecar injects (from this environment variable).
pub const CREDENTIAL_ENV: &str = "FIRMA_BENCH_OPENAI_KEY";
pub const CREDENTIAL: &str = "sk-bench-injected-7f3a";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `Authorization` value the upstream should see when the request went through Firma.
pub fn injected_auth() -> String {
    format!("Bearer {CREDENTIAL}")
}

/// Interception mode of the deployment.
pub enum Mode {
    /// `http_proxy` on 127.0.0.1 (port chosen by the sidecar).
    HttpProxy,
    /// `transparent` with its listeners on `port` and the eBPF pins/control socket given.
    Transparent {
        port: u16,
        pin_dir: PathBuf,
        control_socket: PathBuf,
    },
}

pub struct Deployment {
    pub root: PathBuf,
    pub config: PathBuf,
    pub audit_path: PathBuf,
    firma: PathBuf,
}

fn run_firma(firma: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(firma)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .with_context(|| format!("run {}", firma.display()))?;
    if !out.status.success() {
        bail!(
            "firma {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Deployment {
    /// Writes keys, policies, config and a seed capability (agent `tenant-acme`, session
    /// `bench`, action `model.inference.chat`) under `root`; `upstream` is where `HOST` is
    /// routed in http_proxy mode (transparent mode uses the original destination).
    pub fn new(
        firma: &Path,
        root: &Path,
        upstream: SocketAddr,
        upstream_ca: &Path,
        mode: &Mode,
    ) -> anyhow::Result<Self> {
        for d in ["issuance", "policies"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::write(
            root.join("issuance/issuance.cedar"),
            "permit (principal, action, resource);\n",
        )?;
        std::fs::copy(
            repo_root().join("policies/runtime/genai-app/genai-app.cedar"),
            root.join("policies/runtime.cedar"),
        )
        .context("copy the shipped genai-app runtime policy")?;
        std::fs::write(root.join("revocations.txt"), "")?;
        for k in ["authority.key", "audit.key"] {
            let p = root.join(k);
            run_firma(firma, &["authority", "generate-key", "-o", path_str(&p)?])?;
        }
        let d = Self {
            root: root.to_path_buf(),
            config: root.join("firma.toml"),
            audit_path: root.join("audit.jsonl"),
            firma: firma.to_path_buf(),
        };
        std::fs::write(&d.config, d.config_text(upstream, upstream_ca, mode)?)?;
        let seed = root.join("seed.toml");
        run_firma(
            firma,
            &[
                "authority",
                "-c",
                path_str(&d.config)?,
                "issue",
                "--agent-id",
                "tenant-acme",
                "--session-id",
                "bench",
                "--action",
                "model.inference.chat",
                "--resource-scope",
                "*",
                "--ttl-seconds",
                "3600",
                "--output",
                path_str(&seed)?,
            ],
        )?;
        Ok(d)
    }

    fn config_text(
        &self,
        upstream: SocketAddr,
        upstream_ca: &Path,
        mode: &Mode,
    ) -> anyhow::Result<String> {
        let r = self.root.display();
        let repo = repo_root();
        let repo = repo.display();
        let (mode_name, listen, mode_extra, hosts) = match mode {
            Mode::HttpProxy => (
                "http_proxy",
                "127.0.0.1:0".to_string(),
                String::new(),
                format!("[[sidecar.connector.hosts]]\nhost = {HOST:?}\naddress = \"{upstream}\"\n"),
            ),
            Mode::Transparent {
                port,
                pin_dir,
                control_socket,
            } => (
                "transparent",
                "127.0.0.1:0".to_string(),
                format!(
                    "[sidecar.interceptor.transparent]\nport = {port}\npin_dir = {:?}\ncontrol_socket = {:?}\n",
                    pin_dir.display().to_string(),
                    control_socket.display().to_string()
                ),
                String::new(),
            ),
        };
        // No `fsync` line: the audit file sink runs with its default policy.
        Ok(format!(
            r#"[authority]
listen_addr = "127.0.0.1:0"
policy_dir = "{r}/policies"
issuance_policy_dir = "{r}/issuance"
revocation_file = "{r}/revocations.txt"
key_file = "{r}/authority.key"
max_ttl_seconds = 3600
bundle_ttl_seconds = 30

[sidecar.interceptor]
mode = "{mode_name}"
listen_addr = "{listen}"

[sidecar.interceptor.https_mitm]
enabled = true
intercept_hosts = [{HOST:?}]

{mode_extra}
[sidecar.ca]
dir = "{r}/ca"

[sidecar.mapping]
rules_path = "{repo}/policies/mapping-rules.toml"
default_protected = true

[sidecar.policy]
dir = "{r}/policies"

[sidecar.capability_seed]
paths = ["{r}/seed.toml"]

[sidecar.authority]
public_key_path = "{r}/authority.pub"

[sidecar.audit]
sink = "file"
path = "{r}/audit.jsonl"
signing_key_path = "{r}/audit.key"

[sidecar.connector]
extra_root_certs = [{ca:?}]

{hosts}
[[sidecar.credentials]]
host = {HOST:?}
mode = "basic"
header = "Authorization"
prefix = "Bearer "
value_from_env = "{CREDENTIAL_ENV}"
"#,
            ca = upstream_ca.display().to_string(),
        ))
    }

    /// The Firma CA certificate (generated by the sidecar on first start).
    pub fn firma_ca(&self) -> PathBuf {
        self.root.join("ca/firma-ca.crt")
    }

    /// Audit events written so far (non-empty lines of the JSONL file).
    pub fn audit_events(&self) -> usize {
        std::fs::read_to_string(&self.audit_path)
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    /// Starts `firma sidecar -c CONFIG` (stderr to `sidecar.log`), waits for `sidecar ready`.
    pub fn start_sidecar(&self) -> anyhow::Result<Sidecar> {
        let log_path = self.root.join("sidecar.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&self.firma)
            .args(["sidecar", "-c", path_str(&self.config)?])
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env(CREDENTIAL_ENV, CREDENTIAL)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn firma sidecar")?;
        let mut sc = Sidecar {
            child,
            log_path,
            addr: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = sc.log();
            if text.contains("sidecar ready") {
                sc.addr = text
                    .split("http_proxy listening on ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|a| a.parse().ok());
                return Ok(sc);
            }
            if let Some(status) = sc.child.try_wait()? {
                bail!("sidecar exited early ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("sidecar not ready within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `firma sidecar -c CONFIG ARGS…` (control-socket commands such as `attach`).
    pub fn sidecar_command(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["sidecar", "-c", path_str(&self.config)?];
        full.extend_from_slice(args);
        run_firma(&self.firma, &full)
    }
}

pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// The running sidecar; killed (our own child, by handle) on drop.
pub struct Sidecar {
    child: Child,
    log_path: PathBuf,
    /// The http_proxy listener (None in transparent mode).
    pub addr: Option<SocketAddr>,
}

impl Sidecar {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process is still running (a crash under load invalidates the figures).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
