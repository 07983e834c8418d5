//! Harness for sidecar tests: a temp deployment (keys, seed capability, runtime policy,
//! mapping rules, CA dir), a local HTTPS upstream with its own CA that records every request,
//! the real `firma sidecar` with log capture, a RustyVault launcher, clients, and polling.
//! Reusable by transparent-mode tests: [`Upstream`], [`Deployment::write`], [`Sidecar`],
//! [`assert_eventually`].
#![allow(dead_code)] // each test binary uses a different subset

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FIRMA: &str = env!("CARGO_BIN_EXE_firma");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `firma ARGS…` to completion with `envs`.
pub fn firma(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(FIRMA)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .output()
        .expect("run firma")
}

/// Polls `f` every 20 ms until it is true or `within` passes; panics with `what`.
pub fn assert_eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("not true within {within:?}: {what}");
}

/// A free loopback port (bind :0, release). Small race, acceptable for tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Upstream: HTTPS (HTTP/1.1 + HTTP/2) with a test CA, recording every request.

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercase names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// SNI the client sent.
    pub sni: Option<String>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the upstream's certificate (give to `extra_root_certs`).
    pub ca_path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Every raw byte the upstream received, decrypted (for canary checks).
    pub raw: Arc<Mutex<Vec<u8>>>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Serves HTTPS on 127.0.0.1 for `names` (certificate SANs). `GET /slow?ms=N` answers after
    /// N ms; everything else answers 200 `{"ok":true,"path":…}`.
    pub fn start(dir: &Path, names: &[&str]) -> Self {
        Self::start_at(dir, names, "127.0.0.1:0".parse().unwrap())
    }

    /// As [`Upstream::start`], listening on `bind` (transparent-mode tests put it at an
    /// address inside their network namespace, which is what the client connects to).
    pub fn start_at(dir: &Path, names: &[&str], bind: SocketAddr) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "firma test upstream CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let ca_path = dir.join("upstream-ca.crt");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();

        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (seen2, raw2) = (seen.clone(), raw.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, raw) = (acceptor.clone(), seen2.clone(), raw2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, raw, sni) = (seen.clone(), raw.clone(), sni.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut headers = BTreeMap::new();
                            for (k, v) in parts.headers.iter() {
                                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                                headers
                                    .entry(k.as_str().to_string())
                                    .and_modify(|e: &mut String| {
                                        e.push_str(", ");
                                        e.push_str(&v)
                                    })
                                    .or_insert(v);
                            }
                            {
                                let mut r = raw.lock().unwrap();
                                r.extend_from_slice(
                                    format!("{} {}\r\n", parts.method, parts.uri).as_bytes(),
                                );
                                for (k, v) in parts.headers.iter() {
                                    r.extend_from_slice(k.as_str().as_bytes());
                                    r.extend_from_slice(b": ");
                                    r.extend_from_slice(v.as_bytes());
                                    r.extend_from_slice(b"\r\n");
                                }
                                r.extend_from_slice(&body);
                            }
                            let path = parts.uri.path().to_string();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: path.clone(),
                                headers,
                                body: body.to_vec(),
                                sni,
                            });
                            if path == "/slow" {
                                let ms = parts
                                    .uri
                                    .query()
                                    .and_then(|q| q.strip_prefix("ms="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(2000);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let out = serde_json::json!({"ok": true, "path": path}).to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(out),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_path,
            seen,
            raw,
            _rt: rt,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn raw_contains(&self, needle: &str) -> bool {
        let raw = self.raw.lock().unwrap();
        raw.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

// ---------------------------------------------------------------------------------------------
// Deployment: keys, seed, policy, config.

/// Settings for the `[sidecar.*]` tables; `Default` gives the seed-000 shape on loopback.
#[derive(Clone)]
pub struct Settings {
    pub intercept_hosts: Vec<String>,
    pub strict_hosts: Vec<String>,
    pub mitm: bool,
    pub default_protected: bool,
    pub drain_timeout_secs: u64,
    pub default_timeout_ms: u64,
    /// `[[sidecar.connector.hosts]]` extra lines per host (address is added for every
    /// upstream host automatically).
    pub host_extra: Vec<(String, String)>,
    /// Raw TOML appended at the end (credentials, vault).
    pub extra: String,
    /// Hosts routed to the upstream's address.
    pub upstream_hosts: Vec<String>,
    /// Runtime Cedar policy text.
    pub runtime_policy: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            intercept_hosts: vec![
                "api.openai.com".into(),
                "api.acme-vendor.com".into(),
                "paste.rs".into(),
                "unmapped.example".into(),
            ],
            strict_hosts: vec!["api.acme-vendor.com".into()],
            mitm: true,
            default_protected: true,
            drain_timeout_secs: 5,
            default_timeout_ms: 5000,
            host_extra: Vec::new(),
            extra: String::new(),
            upstream_hosts: vec![
                "api.openai.com".into(),
                "api.acme-vendor.com".into(),
                "paste.rs".into(),
                "unmapped.example".into(),
            ],
            runtime_policy: std::fs::read_to_string(
                repo_root().join("policies/runtime/genai-app/genai-app.cedar"),
            )
            .expect("shipped genai-app policy"),
        }
    }
}

pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ca_dir: PathBuf,
    pub audit_path: PathBuf,
}

fn toml_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

impl Deployment {
    /// Generates authority and audit keys, writes a permissive issuance policy, the runtime
    /// policy, issues one seed capability (agent `tenant-acme`, session `s1`, the two genai
    /// actions, scope `*`), and writes the config for `upstream`.
    pub fn new(upstream: Option<&Upstream>, s: &Settings) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        for d in ["issuance", "policies"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(
            root.join("issuance/issuance.cedar"),
            "permit (principal, action, resource);\n",
        )
        .unwrap();
        std::fs::write(root.join("policies/runtime.cedar"), &s.runtime_policy).unwrap();
        std::fs::write(root.join("revocations.txt"), "").unwrap();
        for k in ["authority.key", "audit.key"] {
            let out = firma(
                &[
                    "authority",
                    "generate-key",
                    "-o",
                    root.join(k).to_str().unwrap(),
                ],
                &[],
            );
            assert!(out.status.success(), "generate-key: {}", text(&out.stderr));
        }
        let d = Self {
            config: root.join("firma.toml"),
            ca_dir: root.join("ca"),
            audit_path: root.join("audit.jsonl"),
            dir,
        };
        d.write(upstream, s);
        let out = firma(
            &[
                "authority",
                "-c",
                d.config.to_str().unwrap(),
                "issue",
                "--agent-id",
                "tenant-acme",
                "--session-id",
                "s1",
                "--action",
                "model.inference.chat",
                "--action",
                "communication.external.send",
                "--resource-scope",
                "*",
                "--ttl-seconds",
                "3600",
                "--output",
                root.join("seed.toml").to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "issue: {}", text(&out.stderr));
        d
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)writes firma.toml.
    pub fn write(&self, upstream: Option<&Upstream>, s: &Settings) {
        let r = self.root().display().to_string();
        let mut hosts = String::new();
        if let Some(u) = upstream {
            for h in &s.upstream_hosts {
                let extra = s
                    .host_extra
                    .iter()
                    .filter(|(n, _)| n == h)
                    .map(|(_, e)| format!("{e}\n"))
                    .collect::<String>();
                hosts.push_str(&format!(
                    "[[sidecar.connector.hosts]]\nhost = {h:?}\naddress = \"{}\"\n{extra}\n",
                    u.addr
                ));
            }
        }
        let roots = upstream
            .map(|u| format!("extra_root_certs = [{:?}]", u.ca_path.display().to_string()))
            .unwrap_or_default();
        let cfg = format!(
            r#"[authority]
listen_addr = "127.0.0.1:0"
policy_dir = "{r}/policies"
issuance_policy_dir = "{r}/issuance"
revocation_file = "{r}/revocations.txt"
key_file = "{r}/authority.key"
max_ttl_seconds = 3600
bundle_ttl_seconds = 30
log_level = "info"

[sidecar.interceptor]
mode = "http_proxy"
listen_addr = "127.0.0.1:0"
drain_timeout_secs = {drain}

[sidecar.interceptor.https_mitm]
enabled = {mitm}
intercept_hosts = {ih}
strict_hosts = {sh}

[sidecar.ca]
dir = "{r}/ca"

[sidecar.mapping]
rules_path = "{repo}/policies/mapping-rules.toml"
default_protected = {dp}

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
fsync = "always"

[sidecar.log]
level = "info"

[sidecar.connector]
default_timeout_ms = {dt}
{roots}

{hosts}
{extra}
"#,
            repo = repo_root().display(),
            drain = s.drain_timeout_secs,
            mitm = s.mitm,
            ih = toml_list(&s.intercept_hosts),
            sh = toml_list(&s.strict_hosts),
            dp = s.default_protected,
            dt = s.default_timeout_ms,
            extra = s.extra,
        );
        std::fs::write(&self.config, cfg).unwrap();
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.ca_dir.join("firma-ca.crt")
    }

    /// Audit events written so far (parsed JSON lines).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap_or_default()
    }

    /// Decision events for `host` (envelope.intent.resource.host): one per decision; the
    /// `outcome` events that follow allows are in [`Deployment::audit`].
    pub fn audit_for(&self, host: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| {
                e["event"] == "decision" && e["envelope"]["intent"]["resource"]["host"] == host
            })
            .collect()
    }

    pub fn start(&self, envs: &[(&str, &str)]) -> Sidecar {
        Sidecar::start(&self.config, envs)
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar process.

pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    /// Starts `firma sidecar -c CONFIG`, waits for `sidecar ready`, reads the proxy address.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(FIRMA)
            .args(["sidecar", "-c", config.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("VAULT_TOKEN")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn firma sidecar");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut s = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.log_text().contains("sidecar ready") {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("sidecar exited early ({status}):\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = s.log_text();
        // http_proxy mode logs its listener; transparent mode its 127.0.0.1 listener first.
        let addr = text
            .split("http_proxy listening on ")
            .nth(1)
            .or_else(|| text.split("transparent listening on ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .expect("listening line");
        s.addr = addr.parse().expect("proxy address");
        s
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM our own child by pid; waits up to `timeout`.
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

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Result of one curl call.
#[derive(Debug)]
pub struct CurlOut {
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl CurlOut {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// `curl --proxy PROXY --cacert CA ARGS… URL`, printing the status on the last line.
pub fn curl(proxy: &str, ca: &Path, url: &str, args: &[&str]) -> CurlOut {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy", proxy, "--noproxy", ""])
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .args(["-w", "\n%{http_code}", url])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl");
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    CurlOut {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: text(&out.stderr),
    }
}

/// Sends raw bytes to `addr` and returns everything read until close (or 5 s).
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    text(&out)
}

// ---------------------------------------------------------------------------------------------
// RustyVault.

/// A RustyVault server on a free loopback port, initialised, unsealed, with the root token.
pub struct Vault {
    pub child: Child,
    pub addr: String,
    pub token: String,
    pub dir: PathBuf,
    port: u16,
}

/// `rvault` from PATH or ~/.cargo/bin; `None` when absent.
pub fn rvault_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").ok()?;
    let candidates = [PathBuf::from(home).join(".cargo/bin/rvault")];
    candidates.into_iter().find(|p| p.exists()).or_else(|| {
        let out = Command::new("which").arg("rvault").output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(text(&out.stdout).trim()))
    })
}

fn vault_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "5",
        "--noproxy",
        "*",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("X-Vault-Token: {t}")]);
    }
    if !body.is_empty() {
        c.args(["-d", body]);
    }
    let out = c.arg(format!("{addr}/v1/{path}")).output().expect("curl");
    let s = text(&out.stdout);
    let (b, code) = s.rsplit_once('\n').unwrap_or(("", s.as_str()));
    (code.trim().parse().unwrap_or(0), b.to_string())
}

impl Vault {
    pub fn start(dir: &Path) -> Option<Self> {
        let bin = rvault_bin()?;
        let port = free_port();
        let dir = dir.join("vault");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cfg = dir.join("config.hcl");
        std::fs::write(
            &cfg,
            format!(
                "storage \"file\" {{\n  path = \"{}\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\nlog_level = \"warn\"\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut v = Self {
            child: Self::spawn(&bin, &cfg, &dir),
            addr: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir,
            port,
        };
        v.wait_up();
        let (code, body) = vault_call(
            &v.addr,
            "PUT",
            "sys/init",
            None,
            r#"{"secret_shares":1,"secret_threshold":1}"#,
        );
        assert_eq!(code, 200, "vault init: {body}");
        let init: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.token = init["root_token"].as_str().unwrap().to_string();
        let key = init["keys"][0].as_str().unwrap().to_string();
        std::fs::write(v.dir.join("unseal.key"), &key).unwrap();
        v.unseal();
        Some(v)
    }

    fn spawn(bin: &Path, cfg: &Path, dir: &Path) -> Child {
        Command::new(bin)
            .arg("server")
            .arg(format!("--config={}", cfg.display()))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rvault")
    }

    fn wait_up(&self) {
        assert_eventually(Duration::from_secs(20), "rvault listening", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn unseal(&self) {
        let key = std::fs::read_to_string(self.dir.join("unseal.key")).unwrap();
        let (code, body) = vault_call(
            &self.addr,
            "PUT",
            "sys/unseal",
            None,
            &format!(r#"{{"key":"{key}"}}"#),
        );
        assert_eq!(code, 200, "unseal: {body}");
    }

    /// Writes `{key: value}` at the KV v1 path `secret/<rel>`.
    pub fn put(&self, rel: &str, key: &str, value: &str) {
        let (code, body) = vault_call(
            &self.addr,
            "POST",
            &format!("secret/{rel}"),
            Some(&self.token),
            &serde_json::json!({ key: value }).to_string(),
        );
        assert!(code == 200 || code == 204, "vault write: {code} {body}");
    }

    /// Enables AppRole, creates role `firma` and returns `(role_id, secret_id)`.
    pub fn approle(&self) -> (String, String) {
        let t = Some(self.token.as_str());
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "sys/auth/approle",
            t,
            r#"{"type":"approle"}"#,
        );
        assert!(c == 200 || c == 204, "enable approle: {c} {b}");
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "auth/approle/role/firma",
            t,
            r#"{"token_policies":"default"}"#,
        );
        assert!(c == 200 || c == 204, "create role: {c} {b}");
        let (c, b) = vault_call(&self.addr, "GET", "auth/approle/role/firma/role-id", t, "");
        assert_eq!(c, 200, "role-id: {b}");
        let role: serde_json::Value = serde_json::from_str(&b).unwrap();
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "auth/approle/role/firma/secret-id",
            t,
            "",
        );
        assert_eq!(c, 200, "secret-id: {b}");
        let secret: serde_json::Value = serde_json::from_str(&b).unwrap();
        (
            role["data"]["role_id"].as_str().unwrap().to_string(),
            secret["data"]["secret_id"].as_str().unwrap().to_string(),
        )
    }

    /// Stops the server (our own child, by handle).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        self.stop();
    }
}
