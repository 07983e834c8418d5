//! The one sidecar TOML template. Every harness (the sidecar and pipeline tests, the
//! transparent tests, the benchmark) describes its deployment as a [`SidecarToml`] and renders
//! it; tables left `None` are omitted, so the sidecar's defaults apply.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `[sidecar.interceptor]` mode.
#[derive(Clone, Debug)]
pub enum Mode {
    HttpProxy,
    /// `[sidecar.interceptor.transparent]` with these keys.
    Transparent {
        port: u16,
        pin_dir: PathBuf,
        control_socket: PathBuf,
        /// `allow_ephemeral_pins`, written only when set.
        allow_ephemeral_pins: Option<bool>,
    },
}

/// `[sidecar.interceptor.https_mitm]`.
#[derive(Clone, Debug)]
pub struct Mitm {
    pub enabled: bool,
    pub intercept_hosts: Vec<String>,
    /// Written only when set.
    pub strict_hosts: Option<Vec<String>>,
    /// `fallback_hosts` (opt-in MITM-to-tunnel fallback), written only when non-empty.
    pub fallback_hosts: Vec<String>,
}

/// Where `[sidecar.policy]` reads bundles from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    Dir(PathBuf),
    /// `authority_url`, with the bundle cache `dir` when given.
    Authority {
        url: String,
        cache_dir: Option<PathBuf>,
    },
    /// `authority_urls` (several Authorities, failed over in order).
    Authorities {
        urls: Vec<String>,
        cache_dir: Option<PathBuf>,
    },
}

/// `[sidecar.audit]` with the file sink.
#[derive(Clone, Debug)]
pub struct AuditFile {
    pub path: PathBuf,
    pub signing_key: PathBuf,
    /// `fsync`, written only when set (e.g. `"always"`).
    pub fsync: Option<String>,
}

/// One `[[sidecar.connector.hosts]]` entry.
#[derive(Clone, Debug)]
pub struct HostRoute {
    pub host: String,
    pub address: SocketAddr,
    /// Extra lines inside the entry.
    pub extra: String,
}

/// A `[[sidecar.credentials]]` entry injecting `Authorization: Bearer $ENV` for `host`.
#[derive(Clone, Debug)]
pub struct BearerFromEnv {
    pub host: String,
    pub env: String,
}

/// The standalone `[authority]` table the deployment's `firma authority issue` reads, with
/// everything under `root` (`policies/`, `issuance/`, `revocations.txt`, `authority.key`).
#[derive(Clone, Debug)]
pub struct AuthorityTable {
    pub root: PathBuf,
    /// `log_level`, written only when set.
    pub log_level: Option<String>,
}

/// `(bundle_ttl_seconds, enforcement_timeout_ms)` for tests: the shipped 50 ms Stage 2 budget
/// is for release builds; debug test binaries on a loaded 2-core CI machine exceed it now and
/// then (a descheduled thread). Tests of the budget itself set their own.
pub const TEST_CONSTRAINT_ENFORCEMENT: (u64, u64) = (90, 2000);

/// A whole `firma.toml` for a sidecar (and optionally the `[authority]` table next to it).
#[derive(Clone, Debug)]
pub struct SidecarToml {
    pub authority: Option<AuthorityTable>,
    pub mode: Mode,
    pub listen_addr: String,
    pub drain_timeout_secs: Option<u64>,
    /// `[sidecar.interceptor] workers` (connection threads); `None`: the sidecar's default.
    pub workers: Option<u16>,
    pub mitm: Option<Mitm>,
    pub ca_dir: Option<PathBuf>,
    pub rules_path: PathBuf,
    pub default_protected: bool,
    pub policy: PolicySource,
    /// `[sidecar.constraint_enforcement]` `(bundle_ttl_seconds, enforcement_timeout_ms)`.
    pub constraint_enforcement: Option<(u64, u64)>,
    pub seeds: Vec<PathBuf>,
    pub public_key: PathBuf,
    pub audit: Option<AuditFile>,
    /// `[sidecar.log] level`, written only when set.
    pub log_level: Option<String>,
    /// `[sidecar.connector]` is written when either of these is set.
    pub default_timeout_ms: Option<u64>,
    pub extra_root_certs: Vec<PathBuf>,
    pub hosts: Vec<HostRoute>,
    pub credentials: Vec<BearerFromEnv>,
    /// Raw TOML appended at the end (whole tables: credentials, vault, limits).
    pub extra: String,
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

impl SidecarToml {
    /// A minimal http_proxy sidecar on 127.0.0.1:0 with the shipped mapping rules, reading
    /// bundles from `policy_dir`; every optional table off.
    pub fn new(policy_dir: &Path, public_key: &Path) -> Self {
        Self {
            authority: None,
            mode: Mode::HttpProxy,
            listen_addr: "127.0.0.1:0".into(),
            drain_timeout_secs: None,
            workers: None,
            mitm: None,
            ca_dir: None,
            rules_path: crate::repo_root().join("policies/mapping-rules.toml"),
            default_protected: true,
            policy: PolicySource::Dir(policy_dir.to_path_buf()),
            constraint_enforcement: Some(TEST_CONSTRAINT_ENFORCEMENT),
            seeds: Vec::new(),
            public_key: public_key.to_path_buf(),
            audit: None,
            log_level: None,
            default_timeout_ms: None,
            extra_root_certs: Vec::new(),
            hosts: Vec::new(),
            credentials: Vec::new(),
            extra: String::new(),
        }
    }

    /// The layout of a deployment directory made by `firma authority generate-key`/`issue`:
    /// `[authority]` over `root`, `root/policies`, `root/seed.toml`, `root/ca`, and the signed
    /// audit file `root/audit.jsonl` with `root/audit.key`.
    pub fn deployment(root: &Path) -> Self {
        Self {
            authority: Some(AuthorityTable {
                root: root.to_path_buf(),
                log_level: None,
            }),
            ca_dir: Some(root.join("ca")),
            seeds: vec![root.join("seed.toml")],
            audit: Some(AuditFile {
                path: root.join("audit.jsonl"),
                signing_key: root.join("audit.key"),
                fsync: None,
            }),
            ..Self::new(&root.join("policies"), &root.join("authority.pub"))
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(a) = &self.authority {
            let r = &a.root;
            let _ = write!(
                s,
                "[authority]\nlisten_addr = \"127.0.0.1:0\"\npolicy_dir = {}\nissuance_policy_dir = {}\nrevocation_file = {}\nkey_file = {}\nmax_ttl_seconds = 3600\nbundle_ttl_seconds = 30\n",
                q(&r.join("policies")),
                q(&r.join("issuance")),
                q(&r.join("revocations.txt")),
                q(&r.join("authority.key")),
            );
            if let Some(l) = &a.log_level {
                let _ = writeln!(s, "log_level = {l:?}");
            }
            s.push('\n');
        }
        let mode = match self.mode {
            Mode::HttpProxy => "http_proxy",
            Mode::Transparent { .. } => "transparent",
        };
        let _ = writeln!(
            s,
            "[sidecar.interceptor]\nmode = \"{mode}\"\nlisten_addr = {:?}",
            self.listen_addr
        );
        if let Some(d) = self.drain_timeout_secs {
            let _ = writeln!(s, "drain_timeout_secs = {d}");
        }
        if let Some(w) = self.workers {
            let _ = writeln!(s, "workers = {w}");
        }
        if let Some(m) = &self.mitm {
            let _ = writeln!(
                s,
                "\n[sidecar.interceptor.https_mitm]\nenabled = {}\nintercept_hosts = {}",
                m.enabled,
                list(&m.intercept_hosts)
            );
            if let Some(h) = &m.strict_hosts {
                let _ = writeln!(s, "strict_hosts = {}", list(h));
            }
            if !m.fallback_hosts.is_empty() {
                let _ = writeln!(s, "fallback_hosts = {}", list(&m.fallback_hosts));
            }
        }
        if let Mode::Transparent {
            port,
            pin_dir,
            control_socket,
            allow_ephemeral_pins,
        } = &self.mode
        {
            let _ = writeln!(
                s,
                "\n[sidecar.interceptor.transparent]\nport = {port}\npin_dir = {}\ncontrol_socket = {}",
                q(pin_dir),
                q(control_socket)
            );
            if let Some(a) = allow_ephemeral_pins {
                let _ = writeln!(s, "allow_ephemeral_pins = {a}");
            }
        }
        if let Some(ca) = &self.ca_dir {
            let _ = writeln!(s, "\n[sidecar.ca]\ndir = {}", q(ca));
        }
        let _ = writeln!(
            s,
            "\n[sidecar.mapping]\nrules_path = {}\ndefault_protected = {}",
            q(&self.rules_path),
            self.default_protected
        );
        s.push_str("\n[sidecar.policy]\n");
        match &self.policy {
            PolicySource::Dir(d) => {
                let _ = writeln!(s, "dir = {}", q(d));
            }
            PolicySource::Authority { url, cache_dir } => {
                let _ = writeln!(s, "authority_url = {url:?}");
                if let Some(d) = cache_dir {
                    let _ = writeln!(s, "dir = {}", q(d));
                }
            }
            PolicySource::Authorities { urls, cache_dir } => {
                let _ = writeln!(s, "authority_urls = {urls:?}");
                if let Some(d) = cache_dir {
                    let _ = writeln!(s, "dir = {}", q(d));
                }
            }
        }
        if let Some((ttl, timeout)) = self.constraint_enforcement {
            let _ = writeln!(
                s,
                "\n[sidecar.constraint_enforcement]\nbundle_ttl_seconds = {ttl}\nenforcement_timeout_ms = {timeout}"
            );
        }
        let seeds: Vec<String> = self.seeds.iter().map(|p| q(p)).collect();
        let _ = writeln!(
            s,
            "\n[sidecar.capability_seed]\npaths = [{}]\n\n[sidecar.authority]\npublic_key_path = {}",
            seeds.join(", "),
            q(&self.public_key)
        );
        if let Some(a) = &self.audit {
            let _ = writeln!(
                s,
                "\n[sidecar.audit]\nsink = \"file\"\npath = {}\nsigning_key_path = {}",
                q(&a.path),
                q(&a.signing_key)
            );
            if let Some(f) = &a.fsync {
                let _ = writeln!(s, "fsync = {f:?}");
            }
        }
        if let Some(l) = &self.log_level {
            let _ = writeln!(s, "\n[sidecar.log]\nlevel = {l:?}");
        }
        if self.default_timeout_ms.is_some() || !self.extra_root_certs.is_empty() {
            s.push_str("\n[sidecar.connector]\n");
            if let Some(t) = self.default_timeout_ms {
                let _ = writeln!(s, "default_timeout_ms = {t}");
            }
            if !self.extra_root_certs.is_empty() {
                let roots: Vec<String> = self.extra_root_certs.iter().map(|p| q(p)).collect();
                let _ = writeln!(s, "extra_root_certs = [{}]", roots.join(", "));
            }
        }
        for h in &self.hosts {
            let _ = writeln!(
                s,
                "\n[[sidecar.connector.hosts]]\nhost = {:?}\naddress = \"{}\"",
                h.host, h.address
            );
            if !h.extra.is_empty() {
                let _ = writeln!(s, "{}", h.extra.trim_end());
            }
        }
        for c in &self.credentials {
            let _ = writeln!(
                s,
                "\n[[sidecar.credentials]]\nhost = {:?}\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = {:?}",
                c.host, c.env
            );
        }
        if !self.extra.is_empty() {
            let _ = writeln!(s, "\n{}", self.extra);
        }
        s
    }

    /// Renders into `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.render())
    }
}
