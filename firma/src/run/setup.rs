//! What a run needs on disk: the state directory kept between runs (keys and MITM CA, so trust
//! is set up once) and the per-run directory (policies, rules, capability seed, CA bundle,
//! control socket), and the sidecar configuration built from them.

use super::{Args, Refused};
use crate::config::FirmaConfig;
use crate::shipped::{self, Issue, RuleKey};
use anyhow::{Context, bail};
use firma_sidecar::config::{
    AuditSink, CredentialConfig, CredentialMode, InterceptMode, SidecarConfig, WorkloadConfig,
};
use firma_sidecar::connector::placeholder;
use firma_sidecar::tls::ca::CertificateAuthority;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// System trust stores, first found wins (Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine/BSD).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The state directory: `authority.key` (signs the run's capabilities), `audit.key` (signs the
/// audit), `firma-ca/` (the MITM CA), `audit/` (one signed log per run), `runs/` (per run,
/// removed at exit).
pub struct State {
    pub dir: PathBuf,
}

/// `--state-dir`, else `$XDG_STATE_HOME/firma`, else `/var/lib/firma` as root and
/// `~/.local/state/firma` otherwise.
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("firma");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/firma");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local/state/firma")
}

impl State {
    /// Opens (creating on first use) the state directory; keys and CA are generated once,
    /// under a lock so two first runs at once do not both generate them.
    ///
    /// Modes: the directory is 0711 (traversable, not listable; CMD, run as another user, can
    /// read nothing in it: keys and `firma-ca/` are owner-only too), the lock file 0600 (a child that could open it could take
    /// `LOCK_EX` and block every other `firma run` on the host), `runs/` and `audit/` 0700.
    /// Existing files and directories are brought to these modes on every open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        shipped::make_dir(dir, 0o711)?;
        let lock = open_lock(&dir.join(".lock"))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", dir.display()));
        }
        let this = Self { dir: dir.into() };
        shipped::ensure_key(&this.authority_key())?;
        shipped::ensure_key(&this.audit_key())?;
        let (ca, created) = CertificateAuthority::load_or_init(&this.ca_dir())?;
        if created {
            eprintln!(
                "firma: created the MITM CA {} (kept for later runs)",
                ca.cert_path().display()
            );
        }
        shipped::make_dir(&this.dir.join("audit"), 0o700)?;
        shipped::make_dir(&this.dir.join("runs"), 0o700)?;
        Ok(this)
    }

    pub fn authority_key(&self) -> PathBuf {
        self.dir.join("authority.key")
    }
    pub fn audit_key(&self) -> PathBuf {
        self.dir.join("audit.key")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("firma-ca")
    }
}

/// Opens the state lock file: owner-only (0600, also when an older firma left it 0644), never
/// through a symlink.
fn open_lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    lock.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(lock)
}

/// Names and numbers unique to one run.
#[derive(Debug, Clone)]
pub struct RunIds {
    /// `firma-run-<pid>-<hex>`: the cgroup and pin directory names.
    pub name: String,
    pub session_id: String,
    pub port: u16,
    /// The DNS guard's port (UDP and TCP, both loopbacks).
    pub dns_port: u16,
    pub mark: u32,
}

impl RunIds {
    pub fn new() -> anyhow::Result<Self> {
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = rand::random::<u32>() ^ nanos;
        let name = format!("firma-run-{pid}-{:06x}", tag & 0xff_ffff);
        let port = free_dual_port()?;
        let dns_port = free_dns_port(port)?;
        Ok(Self {
            session_id: format!("run-{pid}-{:06x}", tag & 0xff_ffff),
            name,
            port,
            dns_port,
            // Non-zero, and different from a system sidecar's default mark ("FIRM").
            mark: 0x4652_0000 | (tag & 0xffff),
        })
    }
}

/// A port free on both 127.0.0.1 and ::1 (the transparent listeners bind both).
fn free_dual_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = v4.local_addr()?.port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free on both 127.0.0.1 and ::1 (is IPv6 loopback disabled?)")
}

/// A port free for UDP and TCP on both 127.0.0.1 and ::1, other than `not` (the DNS guard).
fn free_dns_port(not: u16) -> anyhow::Result<u16> {
    use std::net::{TcpListener, UdpSocket};
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").context("binding 127.0.0.1:0/udp")?;
        let port = udp.local_addr()?.port();
        if port != not
            && UdpSocket::bind(("::1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no port free for UDP and TCP on both 127.0.0.1 and ::1 (for the DNS guard)")
}

/// The per-run directory, everything the sidecar reads, and what the child gets.
pub struct Prepared {
    pub config: SidecarConfig,
    pub audit_path: Option<PathBuf>,
    pub audit_public_key: Option<PathBuf>,
    /// Holds `ca-bundle.pem`; removed when dropped.
    pub ca_bundle_dir: tempfile::TempDir,
    /// Environment variables holding secrets the sidecar injects, each with the placeholder
    /// the child gets instead (docs/run.md, "Placeholder credentials").
    pub placeholders: BTreeMap<String, String>,
    pub cgroup_rel: String,
}

/// `HOST=ENVVAR` or `HOST=ENVVAR:HEADER`.
#[derive(Debug, Clone)]
pub struct CredentialArg {
    pub host: String,
    pub env: String,
    pub header: Option<String>,
}

pub fn parse_credential(s: &str) -> Result<CredentialArg, String> {
    let bad = || {
        format!("{s:?}: expected HOST=ENVVAR (Authorization: Bearer <value>) or HOST=ENVVAR:HEADER")
    };
    let (host, rest) = s.split_once('=').ok_or_else(bad)?;
    let (env, header) = match rest.split_once(':') {
        Some((e, h)) => (e, Some(h.trim().to_string())),
        None => (rest, None),
    };
    let host = host.trim().to_ascii_lowercase();
    if host.is_empty() || host.contains(['*', '/', ':']) || env.trim().is_empty() {
        return Err(bad());
    }
    if header
        .as_deref()
        .is_some_and(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(bad());
    }
    Ok(CredentialArg {
        host,
        env: env.trim().to_string(),
        header,
    })
}

fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

fn qp(p: &Path) -> String {
    q(p.to_string_lossy())
}

/// Copies the `*.cedar` and `*.cedarschema` files of `from` into `to`.
fn copy_policies(from: &Path, to: &Path) -> anyhow::Result<()> {
    shipped::make_dir(to, 0o755)?;
    let entries =
        std::fs::read_dir(from).with_context(|| format!("--policy {}", from.display()))?;
    for e in entries {
        let path = e?.path();
        let ext = path.extension().and_then(|x| x.to_str());
        if matches!(ext, Some("cedar" | "cedarschema"))
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Flag values that are wrong whatever the machine: refused (exit 78) before anything is made.
pub fn check_args(args: &Args) -> Result<(), String> {
    use firma_sidecar::ebpf::allow;
    for a in &args.allow_udp {
        allow::parse_udp(a).map_err(|why| format!("--allow-udp: {why}"))?;
    }
    for a in &args.allow_loopback {
        allow::parse_loopback(a).map_err(|why| format!("--allow-loopback: {why}"))?;
    }
    for h in &args.allow_hosts {
        split_allow_host(h)?;
    }
    for u in &args.allow_mcp {
        split_mcp_url(u)?;
    }
    if !args.mcp_tools.is_empty() && args.allow_mcp.is_empty() {
        return Err("--mcp-tools needs --allow-mcp URL".into());
    }
    for t in &args.mcp_tools {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(format!(
                "--mcp-tools {t:?}: expected MCP tool names ([A-Za-z0-9_.-]{{1,128}}), comma-separated"
            ));
        }
    }
    Ok(())
}

/// `--allow-mcp https://HOST[:PORT]/PATH`: the lowercase host, the port (443 by default,
/// `http://` 80) and the path pattern.
pub fn split_mcp_url(raw: &str) -> Result<(String, u16, String), String> {
    let bad = |why: &str| format!("--allow-mcp {raw:?}: {why} (expected https://HOST[:PORT]/PATH)");
    let (default_port, rest) = if let Some(r) = raw.strip_prefix("https://") {
        (443, r)
    } else if let Some(r) = raw.strip_prefix("http://") {
        (80, r)
    } else {
        return Err(bad("not an http(s) URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => return Err(bad("no path")),
    };
    if path.contains(['?', '#', '"', '\\', ' ']) || !path.is_ascii() {
        return Err(bad(
            "the path must be plain ASCII without query or fragment",
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("bad port"))?,
        ),
        None => (authority, default_port),
    };
    if host.is_empty() || host.contains(['*', '@', '[', '"', '\\']) || !host.is_ascii() {
        return Err(bad("bad host"));
    }
    Ok((host.to_ascii_lowercase(), port, path.to_owned()))
}

/// The MCP action classes `--allow-mcp` puts in the capability.
pub const MCP_ACTIONS: [&str; 8] = [
    "mcp.session",
    "mcp.initialize",
    "mcp.notification",
    "mcp.tools.list",
    "mcp.tools.call",
    "mcp.resources.read",
    "mcp.prompts.get",
    "mcp.other",
];

/// The mapping rules and Cedar permits of `--allow-mcp` / `--mcp-tools`.
pub fn mcp_rules(args: &Args) -> Result<(String, String, Vec<String>), String> {
    let mut rules = String::from("# firma run --allow-mcp: MCP endpoints (docs/mcp.md).\n");
    let mut permits = String::from("// firma run --allow-mcp / --mcp-tools\n");
    let mut hosts = Vec::new();
    let tools: Vec<String> = args.mcp_tools.iter().map(q).collect();
    for raw in &args.allow_mcp {
        let (host, port, path) = split_mcp_url(raw)?;
        rules.push_str(&format!(
            "[[rule]]\nhost = {}\nports = [{port}]\npath = {}\naction_class = \"mcp.session\"\nmcp = {{}}\n",
            q(&host),
            q(&path)
        ));
        let on = format!(
            "resource has host && resource.host == {} && resource has path && resource.path like {}",
            q(&host),
            q(&path)
        );
        permits.push_str(&format!(
            "permit (principal, action in [Firma::Action::\"mcp.session\", Firma::Action::\"mcp.initialize\", Firma::Action::\"mcp.notification\", Firma::Action::\"mcp.tools.list\", Firma::Action::\"mcp.other\"], resource) when {{ {on} }};\n"
        ));
        if tools.is_empty() {
            permits.push_str(&format!(
                "permit (principal, action in [Firma::Action::\"mcp.tools.call\", Firma::Action::\"mcp.resources.read\", Firma::Action::\"mcp.prompts.get\"], resource) when {{ {on} }};\n"
            ));
        } else {
            permits.push_str(&format!(
                "permit (principal, action == Firma::Action::\"mcp.tools.call\", resource) when {{ {on} && context has mcp && context.mcp has name && [{}].contains(context.mcp.name) }};\n",
                tools.join(", ")
            ));
        }
        hosts.push(host);
    }
    Ok((rules, permits, hosts))
}

/// `--allow-host HOST[:PORT]`: the lowercase host and its port, if one was named.
pub fn split_allow_host(raw: &str) -> Result<(String, Option<u16>), String> {
    let h = raw.trim();
    let bad = || {
        format!(
            "--allow-host {h:?}: expected a host name (exact, or *.suffix), optionally with :PORT"
        )
    };
    let (host, port) = match h.rsplit_once(':') {
        Some((host, p)) => {
            let port: u16 = p.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
            (host, Some(port))
        }
        None => (h, None),
    };
    let bare = host.strip_prefix("*.").unwrap_or(host);
    if bare.is_empty() || bare.contains(['*', '/', ':', ' ', '"', '\\']) || !bare.is_ascii() {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Builds the run: writes the run directory, issues the capability, assembles the config.
pub fn prepare(state: &State, ids: &RunIds, args: &Args) -> anyhow::Result<Prepared> {
    let run_dir = state.dir.join("runs").join(&ids.name);
    shipped::make_dir(&run_dir, 0o700)?;
    let cgroup_rel = format!("/{}", ids.name);

    // The base: a full firma.toml given with --config, or the embedded defaults.
    let mut cfg = match &args.config {
        Some(file) => {
            let f = FirmaConfig::load(file).map_err(crate::ConfigFailure)?;
            f.sidecar().map_err(crate::ConfigFailure)?.clone()
        }
        None => embedded_base(state, &run_dir, args)?,
    };
    let file_cfg = args
        .config
        .as_ref()
        .map(|f| FirmaConfig::load(f).map_err(crate::ConfigFailure))
        .transpose()?;

    // Policies: --policy DIR, else the config's local dir, else the shipped policy. Copied so
    // that --allow-host can add its permits beside them.
    let policy_dir = run_dir.join("policies");
    let source = args.policy.clone().or_else(|| {
        args.config.as_ref().and_then(|_| {
            cfg.policy
                .authority_urls()
                .is_empty()
                .then(|| cfg.policy.dir.clone())
                .flatten()
        })
    });
    match &source {
        Some(dir) => copy_policies(dir, &policy_dir)?,
        None if args.config.is_some() && !args.allow_hosts.is_empty() => {
            return Err(Refused(format!(
                "--allow-host needs a local policy directory: the config streams its policy from {} (pass --policy DIR)",
                cfg.policy.authority_url.as_deref().unwrap_or("the authority")
            ))
            .into());
        }
        None if args.config.is_some() => {}
        None => shipped::write_runtime_policies(&policy_dir)?,
    }
    if source.is_some() || args.config.is_none() {
        cfg.policy.dir = Some(policy_dir.clone());
        cfg.policy.authority_url = None;
        cfg.policy.authority_urls.clear();
    }

    // Mapping rules: --rules FILE replaces them; --allow-host adds one whole-host rule per
    // host that no rule claims whole yet.
    if let Some(rules) = &args.rules {
        cfg.mapping.rules_path = Some(rules.clone());
        cfg.mapping.rules_paths.clear();
    }
    let mut existing: BTreeSet<RuleKey> = BTreeSet::new();
    for p in cfg.mapping.all_paths() {
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading mapping rules {}", p.display()))?;
        existing.extend(shipped::rule_keys(&text, &p)?);
    }
    // HOST -> the ports named with it (443 when named without one).
    let mut allow_ports: std::collections::BTreeMap<String, BTreeSet<u16>> = Default::default();
    for raw in &args.allow_hosts {
        let (h, port) = split_allow_host(raw).map_err(Refused)?;
        allow_ports
            .entry(h)
            .or_default()
            .insert(port.unwrap_or(443));
    }
    let allow: Vec<String> = allow_ports.keys().cloned().collect();
    if !allow.is_empty() {
        let mut rules = String::from(
            "# firma run --allow-host: whole-host rules for hosts no shipped rule claims whole.\n",
        );
        let mut permits = String::from("// firma run --allow-host\n");
        for (h, ports) in &allow_ports {
            let key = |method: &str| RuleKey {
                method: method.into(),
                host: h.clone(),
                path: "*".into(),
            };
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            let ports_line = format!("ports = [{}]\n", list.join(", "));
            let named_port = ports.iter().any(|p| *p != 443);
            if !existing.contains(&key("*")) {
                rules.push_str(&format!(
                    "[[rule]]\nhost = {}\n{ports_line}action_class = \"communication.external.send\"\n",
                    q(h)
                ));
            } else if named_port {
                // A rule already claims the host whole: its ports come from a CONNECT rule
                // (which classifies only blind tunnels to the host).
                if existing.contains(&key("CONNECT")) {
                    return Err(Refused(format!(
                        "--allow-host {h}:PORT: the mapping rules already claim {h} whole (also for CONNECT); list the port in their `ports`"
                    ))
                    .into());
                }
                rules.push_str(&format!(
                    "[[rule]]\nmethod = \"CONNECT\"\nhost = {}\n{ports_line}action_class = \"communication.external.send\"\n",
                    q(h)
                ));
            }
            let cond = match h.strip_prefix("*.") {
                Some(sfx) => format!("resource.host like {}", q(format!("*.{sfx}"))),
                None => format!("resource.host == {}", q(h)),
            };
            permits.push_str(&format!(
                "permit (principal, action, resource) when {{ resource has \"host\" && {cond} }};\n"
            ));
        }
        let rules_file = run_dir.join("allow-host-rules.toml");
        shipped::write(&rules_file, &rules, 0o644)?;
        cfg.mapping.rules_paths.push(rules_file);
        shipped::write(&policy_dir.join("allow-hosts.cedar"), &permits, 0o644)?;
    }

    // --allow-mcp: one MCP rule per endpoint, its permits beside the policy.
    let mut mcp_hosts = Vec::new();
    if !args.allow_mcp.is_empty() {
        if args.config.is_some() && source.is_none() {
            return Err(Refused(
                "--allow-mcp needs a local policy directory (pass --policy DIR)".into(),
            )
            .into());
        }
        let (rules, permits, hosts) = mcp_rules(args).map_err(Refused)?;
        let rules_file = run_dir.join("allow-mcp-rules.toml");
        shipped::write(&rules_file, &rules, 0o644)?;
        cfg.mapping.rules_paths.push(rules_file);
        shipped::write(&policy_dir.join("allow-mcp.cedar"), &permits, 0o644)?;
        mcp_hosts = hosts;
    }

    // MITM every host a rule names (so denials are HTTP 403s with a reason, not closed
    // connections) plus the allowed and credential hosts.
    let mut intercept: BTreeSet<String> = cfg
        .interceptor
        .https_mitm
        .intercept_hosts
        .iter()
        .cloned()
        .collect();
    intercept.extend(
        existing
            .iter()
            .map(|k| k.host.clone())
            .filter(|h| h != "*")
            .chain(allow.iter().cloned())
            .chain(mcp_hosts.iter().cloned())
            .chain(args.credentials.iter().map(|c| c.host.clone())),
    );
    cfg.interceptor.https_mitm.enabled = true;
    cfg.interceptor.https_mitm.intercept_hosts = intercept.into_iter().collect();

    for c in &args.credentials {
        cfg.credentials.retain(|x| x.host != c.host);
        let (header, prefix) = match &c.header {
            Some(h) => (h.clone(), String::new()),
            None => ("Authorization".to_string(), "Bearer ".to_string()),
        };
        cfg.credentials.push(CredentialConfig {
            host: c.host.clone(),
            mode: CredentialMode::Basic,
            header,
            prefix,
            value_from_env: Some(c.env.clone()),
            secret_path: None,
            secret_key: None,
            strip_headers: None,
            strip_query_params: None,
            vault: None,
        });
    }
    cfg.connector
        .extra_root_certs
        .extend(args.upstream_ca.iter().cloned());

    // The capability: issued in-process with the state's authority key (defaults), or with the
    // config's [authority] when it has one.
    let mut actions: Vec<String> = if args.actions.is_empty() {
        shipped::DEFAULT_ACTIONS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.actions.clone()
    };
    if !args.allow_mcp.is_empty() {
        for a in MCP_ACTIONS {
            if !actions.iter().any(|x| x == a) {
                actions.push(a.to_string());
            }
        }
    }
    let issuance_dir = run_dir.join("issuance");
    let (key_file, issuance) = match file_cfg.as_ref().and_then(|f| f.authority.as_ref()) {
        Some(a) if args.config.is_some() => (a.key_file.clone(), a.issuance_policy_dir.clone()),
        _ => {
            shipped::write_issuance_policy(&issuance_dir)?;
            (state.authority_key(), issuance_dir.clone())
        }
    };
    if args.config.is_none() || file_cfg.as_ref().is_some_and(|f| f.authority.is_some()) {
        let issued = Issue {
            key_file: &key_file,
            issuance_dir: &issuance,
            agent_id: &args.agent_id,
            session_id: &ids.session_id,
            actions: &actions,
            ttl_seconds: args.ttl_seconds,
        }
        .issue()
        .map_err(|e| {
            Refused(format!(
                "issuing the run's capability: {}",
                crate::describe(&e)
            ))
        })?;
        let seed = run_dir.join("capability.toml");
        firma_authority::issuance::write_seed(&seed, &issued.seed())?;
        cfg.capability_seed.paths.push(seed);
    }

    // Audit: --audit FILE, else the config's, else one file per run in the state directory.
    if let Some(a) = &args.audit {
        cfg.audit.sink = AuditSink::File;
        cfg.audit.path = Some(a.clone());
        if cfg.audit.signing_key_path.is_none() {
            cfg.audit.signing_key_path = Some(state.audit_key());
        }
    }
    let audit_path = match cfg.audit.sink {
        AuditSink::File => cfg.audit.path.clone(),
        _ => None,
    };
    let audit_public_key = cfg
        .audit
        .signing_key_path
        .as_deref()
        .map(firma_common::keys::public_key_path);

    // Transparent mode on this run's own cgroup, port, mark, pins and control socket.
    cfg.interceptor.mode = InterceptMode::Transparent;
    cfg.interceptor.drain_timeout_secs = cfg.interceptor.drain_timeout_secs.min(5);
    cfg.dns.port = ids.dns_port;
    let t = &mut cfg.interceptor.transparent;
    t.port = ids.port;
    t.socket_mark = ids.mark;
    t.pin_dir = PathBuf::from(firma_sidecar::ebpf::bpffs::DEFAULT_BPFFS).join(&ids.name);
    t.control_socket = run_dir.join("sidecar.sock");
    t.allow_ephemeral_pins = false;
    t.workloads = vec![WorkloadConfig {
        cgroup: Some(cgroup_rel.clone()),
        pod: None,
        agent_id: args.agent_id.clone(),
        session_id: Some(ids.session_id.clone()),
    }];
    t.allow_udp.extend(args.allow_udp.iter().cloned());
    t.allow_loopback.extend(args.allow_loopback.iter().cloned());
    cfg.log.level = args.log_level.clone();
    if let Some(ms) = args.enforcement_timeout_ms {
        cfg.constraint_enforcement.enforcement_timeout_ms = ms;
    }
    // The run's own ports (chosen above) can never be opened to CMD.
    let own = cfg.own_ports();
    for a in &cfg.interceptor.transparent.allow_loopback {
        let parsed = firma_sidecar::ebpf::allow::parse_loopback(a).map_err(Refused)?;
        firma_sidecar::ebpf::allow::check_not_sidecar(&parsed, &own)
            .map_err(|why| Refused(format!("--allow-loopback {a}: {why}")))?;
    }

    let placeholders = cfg
        .credentials
        .iter()
        .filter_map(|c| c.value_from_env.clone())
        .map(|var| (var, placeholder::generate()))
        .collect();
    let ca_dir = cfg.ca.dir.clone();
    let ca_bundle_dir = write_ca_bundle(&run_dir, &ca_dir)?;
    Ok(Prepared {
        config: cfg,
        audit_path,
        audit_public_key,
        ca_bundle_dir,
        placeholders,
        cgroup_rel,
    })
}

/// The embedded defaults as a firma.toml text (parsed by the one config loader, so the run's
/// config obeys the same rules as a file's), with the shipped mapping rules written out.
fn embedded_base(state: &State, run_dir: &Path, args: &Args) -> anyhow::Result<SidecarConfig> {
    let rules = run_dir.join("mapping-rules.toml");
    shipped::write(&rules, shipped::MAPPING_RULES, 0o644)?;
    let audit = match &args.audit {
        Some(a) => a.clone(),
        None => state.dir.join("audit").join(format!(
            "{}.jsonl",
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )),
    };
    let text = format!(
        r#"[sidecar.interceptor]
mode = "transparent"

[sidecar.interceptor.https_mitm]
enabled = true

[sidecar.ca]
dir = {ca}

[sidecar.mapping]
rules_path = {rules}

[sidecar.policy]
dir = {policies}

[sidecar.authority]
public_key_path = {pubkey}

[sidecar.audit]
sink = "file"
path = {audit}
signing_key_path = {audit_key}
fsync = "interval"
"#,
        ca = qp(&state.ca_dir()),
        rules = qp(&rules),
        policies = qp(&run_dir.join("policies")),
        pubkey = qp(&firma_common::keys::public_key_path(&state.authority_key())),
        audit = qp(&audit),
        audit_key = qp(&state.audit_key()),
    );
    let path = run_dir.join("firma.toml");
    shipped::write(&path, &text, 0o644)?;
    let f = FirmaConfig::parse(&text, &path).map_err(crate::ConfigFailure)?;
    Ok(f.sidecar().map_err(crate::ConfigFailure)?.clone())
}

/// System roots + the Firma CA, readable by the child: clients that replace their trust store
/// with `SSL_CERT_FILE` & co. still reach the hosts Firma does not intercept.
fn write_ca_bundle(run_dir: &Path, ca_dir: &Path) -> anyhow::Result<tempfile::TempDir> {
    let ca_cert = ca_dir.join("firma-ca.crt");
    let (_ca, _) = CertificateAuthority::load_or_init(ca_dir)?;
    let firma = std::fs::read_to_string(&ca_cert)
        .with_context(|| format!("reading {}", ca_cert.display()))?;
    let base = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    let mut text = match &base {
        Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
        None => {
            eprintln!(
                "firma: warning: no system trust store found ({}); the child trusts only the Firma CA",
                SYSTEM_BUNDLES.join(", ")
            );
            String::new()
        }
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# Firma MITM CA\n");
    text.push_str(&firma);
    // In a fresh directory under the temp dir, not the run directory: the state directory may
    // sit where an unprivileged child cannot traverse (/root), and the bundle must be readable.
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .context("creating the CA bundle directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("setting the mode of the CA bundle directory")?;
    let path = dir.path().join("ca-bundle.pem");
    shipped::write(&path, &text, 0o644)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_host_flags() {
        assert_eq!(
            split_allow_host("API.example.org").unwrap(),
            ("api.example.org".into(), None)
        );
        assert_eq!(
            split_allow_host("*.example.org:8443").unwrap(),
            ("*.example.org".into(), Some(8443))
        );
        for bad in ["", "h:0", "h:x", "h:70000", "a:b:1", "h/p", "*", "h :1"] {
            assert!(split_allow_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn allow_mcp_flags() {
        assert_eq!(
            split_mcp_url("https://MCP.example.com/mcp").unwrap(),
            ("mcp.example.com".into(), 443, "/mcp".into())
        );
        assert_eq!(
            split_mcp_url("http://h:8080/messages/*").unwrap(),
            ("h".into(), 8080, "/messages/*".into())
        );
        for bad in [
            "mcp.example.com/mcp",
            "https://h",
            "https://h/mcp?x=1",
            "https://h:0/mcp",
            "https://*.h/mcp",
            "https://h/a b",
            "ftp://h/mcp",
        ] {
            assert!(split_mcp_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn credential_flags() {
        let c = parse_credential("API.openai.com=OPENAI_API_KEY").unwrap();
        assert_eq!(
            (c.host.as_str(), c.env.as_str(), c.header),
            ("api.openai.com", "OPENAI_API_KEY", None)
        );
        let c = parse_credential("api.anthropic.com=ANTHROPIC_API_KEY:x-api-key").unwrap();
        assert_eq!(c.header.as_deref(), Some("x-api-key"));
        for bad in [
            "",
            "host",
            "=VAR",
            "host=",
            "*.x.com=VAR",
            "h/p=VAR",
            "host=VAR:",
            "host=VAR:bad header",
        ] {
            assert!(parse_credential(bad).is_err(), "{bad:?} accepted");
        }
    }
}
