//! `[sidecar.*]`: the enforcement sidecar's section of `firma.toml`.

use firma_common::config::{ConfigError, LogFormat, check_admin_addr, check_log_level};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Output tokens reserved per choice for a request that names no `max_tokens`
/// (`[sidecar.llm] reserve_output_tokens`).
pub const DEFAULT_RESERVE_OUTPUT_TOKENS: i64 = 32_768;

/// `[sidecar.*]`: everything the enforcement sidecar reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub interceptor: InterceptorConfig,
    #[serde(default)]
    pub ca: CaConfig,
    pub mapping: MappingConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub constraint_enforcement: ConstraintEnforcementConfig,
    #[serde(default)]
    pub capability_seed: CapabilitySeedConfig,
    #[serde(default)]
    pub capability_validation: CapabilityValidationConfig,
    pub authority: SidecarAuthorityConfig,
    #[serde(default)]
    pub connector: ConnectorConfig,
    /// `[[sidecar.credentials]]`, one per host that gets a credential injected.
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub llm: LlmConfig,
    #[serde(default)]
    pub mcp: McpConfig,
    /// `[sidecar.session_store]`: where session counters and budgets live (docs/scale-out.md).
    #[serde(default)]
    pub session_store: crate::pipeline::session_store::config::SessionStoreConfig,
    /// `[sidecar.node]`: the Kubernetes node agent (pods tagged from their CRI annotations);
    /// absent = off. Needs `mode = "transparent"`. See docs/kubernetes.md.
    #[serde(default)]
    pub node: Option<NodeConfig>,
    /// `[sidecar.ext_authz]`: serve Envoy's ext_authz gRPC API (docs/deployment-shapes.md).
    #[serde(default)]
    pub ext_authz: Option<ExtAuthzConfig>,
}

/// `[sidecar.ext_authz]`: Firma as Envoy's external authorizer (`crate::ext_authz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// gRPC listener for `envoy.service.auth.v3.Authorization/Check`, e.g. `"127.0.0.1:9191"`.
    pub listen_addr: String,
    /// Envoy originates TLS to the upstream, verified for the request's host (its cluster's
    /// `UpstreamTlsContext` with `sni` and a trusted CA): only then may a credential be set on a
    /// request whose downstream scheme is `http`. Default false: credentialed hosts are denied
    /// `InsecureUpstream` unless the downstream itself was `https`.
    #[serde(default)]
    pub upstream_tls: bool,
    /// Envoy's verified source principals (downstream mTLS identity) bound to an agent, as a
    /// workload binding is in transparent mode.
    #[serde(default)]
    pub principals: Vec<ExtAuthzPrincipal>,
}

/// `[[sidecar.ext_authz.principals]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzPrincipal {
    /// `attributes.source.principal` as Envoy reports it (e.g. `spiffe://corp/agent-a`).
    pub principal: String,
    pub agent_id: String,
    pub session_id: Option<String>,
}

/// `[sidecar.mcp]`: MCP endpoints (mapping rules with `mcp`, see docs/mcp.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// Largest JSON-RPC POST body read before its decision (bigger: `BodyTooLarge`); held within
    /// the shared body budget (`[sidecar.mapping] extract_body_budget_bytes`).
    #[serde(default = "default_mcp_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Write tool-call argument values into the audit (default: only their keys and a
    /// SHA-256, since arguments can carry secrets).
    #[serde(default)]
    pub audit_argument_values: bool,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_mcp_max_body_bytes(),
            audit_argument_values: false,
        }
    }
}

fn default_mcp_max_body_bytes() -> usize {
    1024 * 1024
}

/// `[sidecar.admin]`: the admin listener (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// e.g. `"127.0.0.1:9464"`; no admin listener (and no metrics recorded) when unset.
    pub listen_addr: Option<String>,
}

/// `[sidecar.dns]`: the DNS guard of transparent mode (`redirect_dns`). Tagged workloads resolve
/// names only through the sidecar's DNS listener, which answers names that can lead to an allowed
/// destination and NXDOMAIN for the rest (see docs/architecture.md, "DNS guard").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Port of the DNS listener (UDP and TCP) on 127.0.0.1 and [::1].
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// Names answered besides the intercept, mapping-rule, connector and credential hosts:
    /// exact names or `*.suffix` (any name below `suffix`, not `suffix` itself).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Resolvers allowed names are forwarded to (`"10.0.0.2"` or `"10.0.0.2:53"`); empty: the
    /// `nameserver` lines of /etc/resolv.conf at startup.
    #[serde(default)]
    pub upstream: Vec<String>,
    /// How long one upstream exchange may take before the next server is tried.
    #[serde(default = "default_dns_timeout")]
    pub upstream_timeout_ms: u64,
    /// Queries per second per workload cgroup (sustained); above it queries are dropped and
    /// counted, one audit `deny_summary` per workload per `[sidecar.audit] aggregate_window_secs`.
    #[serde(default = "default_dns_rate")]
    pub queries_per_second: u32,
    /// Burst above `queries_per_second`.
    #[serde(default = "default_dns_burst")]
    pub burst: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            port: default_dns_port(),
            allow: Vec::new(),
            upstream: Vec::new(),
            upstream_timeout_ms: default_dns_timeout(),
            queries_per_second: default_dns_rate(),
            burst: default_dns_burst(),
        }
    }
}

impl DnsConfig {
    fn validate(&self, file: &Path, transparent_port: u16) -> Result<(), ConfigError> {
        if self.port == 0 || self.port == transparent_port {
            return Err(ConfigError::invalid(
                file,
                "sidecar.dns.port",
                "expected a fixed port other than the transparent listener's (the kernel programs redirect DNS to it)",
            ));
        }
        for (key, v) in [
            ("queries_per_second", self.queries_per_second as u64),
            ("burst", self.burst as u64),
            ("upstream_timeout_ms", self.upstream_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.dns.{key}"),
                    "expected a positive number",
                ));
            }
        }
        for (i, name) in self.allow.iter().enumerate() {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            if bare.is_empty() || bare.contains('*') || bare.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.dns.allow[{i}]"),
                    format!("expected a host name or `*.suffix`, got {name:?}"),
                ));
            }
        }
        for (i, u) in self.upstream.iter().enumerate() {
            if parse_dns_server(u).is_none() {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.dns.upstream[{i}]"),
                    format!(
                        "expected an IP address or address:port like \"10.0.0.2:53\", got {u:?}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `"10.0.0.2"`, `"10.0.0.2:53"`, `"fd00::2"` or `"[fd00::2]:53"` as a socket address (port 53
/// when none is given).
pub fn parse_dns_server(s: &str) -> Option<std::net::SocketAddr> {
    let s = s.trim();
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Some(a);
    }
    s.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
}

fn default_dns_port() -> u16 {
    15053
}
fn default_dns_timeout() -> u64 {
    2000
}
fn default_dns_rate() -> u32 {
    50
}
fn default_dns_burst() -> u32 {
    100
}

/// `[sidecar.llm]`: token usage accounting for the LLM APIs (see docs/llm-policies.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Where per-session and per-agent usage totals are kept across restarts (written at most
    /// once a second and at shutdown). Without it totals start at zero on every start.
    pub usage_state_path: Option<PathBuf>,
    /// `[[sidecar.llm.prices]]`: USD per 1,000 tokens, by the model the request named.
    #[serde(default)]
    pub prices: Vec<ModelPrice>,
    /// Output tokens (per choice) a metered request reserves against budgets when it names no
    /// `max_tokens` (default 32,768; see docs/llm-policies.md, "Budgets that hold").
    pub reserve_output_tokens: Option<i64>,
}

impl LlmConfig {
    /// `reserve_output_tokens` or its default.
    pub fn reserve_output_tokens(&self) -> i64 {
        self.reserve_output_tokens
            .unwrap_or(DEFAULT_RESERVE_OUTPUT_TOKENS)
    }
}

/// One `[[sidecar.llm.prices]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub model: String,
    pub input_per_1k_usd: f64,
    pub output_per_1k_usd: f64,
}

/// How connections reach the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterceptMode {
    /// Apps set `HTTP_PROXY`/`HTTPS_PROXY`; absolute-form requests and `CONNECT`.
    HttpProxy,
    /// eBPF cgroup programs redirect tagged workloads' TCP connects; no app changes.
    Transparent,
}

/// `[sidecar.interceptor]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptorConfig {
    pub mode: InterceptMode,
    /// Proxy listener for `http_proxy` mode, e.g. `"127.0.0.1:8080"`.
    #[serde(default = "default_proxy_listen")]
    pub listen_addr: String,
    /// On SIGTERM, in-flight requests get this long before connections are cut.
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    /// Connection workers: single-threaded runtimes, each serving whole connections (see
    /// `crate::workers`). 0: half the available CPUs, at least 1.
    #[serde(default)]
    pub workers: u16,
    #[serde(default)]
    pub https_mitm: HttpsMitmConfig,
    #[serde(default)]
    pub transparent: TransparentConfig,
}

fn default_proxy_listen() -> String {
    "127.0.0.1:8080".into()
}
/// Most connection workers accepted (each is a thread with its own runtime).
pub const MAX_WORKERS: u16 = 256;

fn default_drain() -> u64 {
    30
}

/// `[sidecar.interceptor.https_mitm]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsMitmConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Hosts whose TLS the sidecar terminates: exact names or `*.example.com`.
    #[serde(default)]
    pub intercept_hosts: Vec<String>,
    /// Hosts always intercepted (even if not in `intercept_hosts`) whose MITM failure is never
    /// anything but a closed, audited connection.
    #[serde(default)]
    pub strict_hosts: Vec<String>,
    /// Opt-in, per host (exact or `*.example.com`): a client that rejects the Firma certificate
    /// (a certificate alert: it pins, or does not trust the Firma CA) is tunnelled blind to this
    /// host for 300 s (that client only: its cgroup in transparent mode, its address in
    /// `http_proxy` mode), with a destination-level decision. Empty (the default): a rejecting
    /// client gets its own connection closed and audited, and nothing else changes.
    #[serde(default)]
    pub fallback_hosts: Vec<String>,
}

/// `[sidecar.interceptor.transparent]`: eBPF redirection of tagged cgroups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// Port of the transparent listeners on 127.0.0.1 and [::1].
    #[serde(default = "default_transparent_port")]
    pub port: u16,
    /// Workloads attached at startup (more can be attached at runtime).
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// TCP destinations never redirected, e.g. `"10.0.0.0/8"` (an explicit operator choice).
    /// Loopback is not opened by this list: see `allow_loopback`.
    #[serde(default)]
    pub excluded_cidrs: Vec<String>,
    /// Destination ports never redirected.
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    /// Refuse UDP to port 443 from tagged workloads so QUIC cannot bypass the sidecar (clients
    /// fall back to TCP). `false` lets UDP/443 through to any address, as if every `ADDR:443`
    /// were in `allow_udp`.
    #[serde(default = "yes")]
    pub block_quic: bool,
    /// UDP is closed for tagged workloads: every datagram (connected or not, IPv4 and IPv6,
    /// UDP-Lite) is refused except DNS to the guard and these `"ADDR:PORT"` exceptions
    /// (`"[V6]:PORT"` for IPv6; loopback goes in `allow_loopback`).
    #[serde(default)]
    pub allow_udp: Vec<String>,
    /// Loopback (127.0.0.0/8, ::1) is closed for tagged workloads, TCP and UDP: a connect or
    /// send there is refused unless listed here as `"PORT"` (every loopback address) or
    /// `"ADDR:PORT"`. The sidecar's own ports (listener, DNS guard, admin) cannot be listed.
    #[serde(default)]
    pub allow_loopback: Vec<String>,
    /// DNS guard: UDP and TCP port 53 of tagged workloads, whatever the resolver address, go to
    /// the sidecar's DNS listener (`[sidecar.dns]`), which answers only allowed names. On by
    /// default; `false` leaves name resolution untouched (and open as an exfiltration channel).
    #[serde(default = "yes")]
    pub redirect_dns: bool,
    /// `SO_MARK` the sidecar puts on its own upstream sockets; marked sockets are never redirected.
    #[serde(default = "default_mark")]
    pub socket_mark: u32,
    /// bpffs directory where programs and maps are pinned so they outlive the process.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Owner-only Unix socket for `firma sidecar attach|detach|status`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Start even when `pin_dir` is on a bpffs that dies with the sidecar (one mounted in a
    /// private mount namespace): tagged traffic then goes direct after a crash. Off by default
    /// because that is fail-open; only for throwaway setups.
    #[serde(default)]
    pub allow_ephemeral_pins: bool,
    /// An extra IPv4 address the transparent listener binds and tagged IPv4 connects are sent
    /// to instead of 127.0.0.1: one reachable from pod network namespaces (the node's end of
    /// the pod network, e.g. the CNI bridge's gateway address), so pods with their own network
    /// namespace reach the node's sidecar. Unset: 127.0.0.1 only (workloads in the sidecar's
    /// own network namespace). Needs `redirect_dns = false` (the DNS guard listens on loopback).
    #[serde(default)]
    pub redirect_address: Option<std::net::Ipv4Addr>,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            port: default_transparent_port(),
            workloads: Vec::new(),
            excluded_cidrs: Vec::new(),
            excluded_ports: Vec::new(),
            block_quic: true,
            allow_udp: Vec::new(),
            allow_loopback: Vec::new(),
            redirect_dns: true,
            socket_mark: default_mark(),
            pin_dir: default_pin_dir(),
            control_socket: default_control_socket(),
            allow_ephemeral_pins: false,
            redirect_address: None,
        }
    }
}

fn default_transparent_port() -> u16 {
    15001
}
fn yes() -> bool {
    true
}
fn default_mark() -> u32 {
    0x4649_524d // "FIRM"
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/firma")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/firma/sidecar.sock")
}

/// `[sidecar.limits]`: what one connection, or one client, may hold, so idle or abusive
/// clients cannot exhaust descriptors that policy reloads and upstream connects need.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// An HTTP connection with no request in flight (HTTP/1 keep-alive between requests,
    /// HTTP/2 with no open stream) is closed after this long. A request waiting for its
    /// response, or a response still streaming, is never idle.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// A blind tunnel (non-intercepted TLS, unknown protocol) with no byte either way is closed
    /// after this long.
    #[serde(default = "default_tunnel_idle")]
    pub tunnel_idle_timeout_secs: u64,
    /// HTTP/2 PING interval on client connections (0: off); a peer that does not answer within
    /// `h2_keepalive_timeout_secs` is dropped.
    #[serde(default = "default_h2_ping")]
    pub h2_keepalive_interval_secs: u64,
    #[serde(default = "default_h2_ping_timeout")]
    pub h2_keepalive_timeout_secs: u64,
    /// Concurrent client connections; lowered at startup so two descriptors per connection
    /// plus `fd_reserve` fit in RLIMIT_NOFILE. Beyond it new connections are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent connections per client: peer IP in `http_proxy` mode, workload cgroup in
    /// `transparent` mode.
    #[serde(default = "default_max_per_client")]
    pub max_connections_per_client: usize,
    /// Descriptors kept free for everything that is not a client connection (policy reloads,
    /// audit, Vault, the control socket), on top of those open at startup.
    #[serde(default = "default_fd_reserve")]
    pub fd_reserve: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            idle_timeout_secs: default_idle(),
            tunnel_idle_timeout_secs: default_tunnel_idle(),
            h2_keepalive_interval_secs: default_h2_ping(),
            h2_keepalive_timeout_secs: default_h2_ping_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_per_client(),
            fd_reserve: default_fd_reserve(),
        }
    }
}

fn default_idle() -> u64 {
    60
}
fn default_tunnel_idle() -> u64 {
    300
}
fn default_h2_ping() -> u64 {
    30
}
fn default_h2_ping_timeout() -> u64 {
    20
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_per_client() -> usize {
    1024
}
fn default_fd_reserve() -> usize {
    64
}

/// One workload attached at startup: a cgroup (path or Kubernetes pod UID) bound to an agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// cgroup v2 path, absolute or relative to the cgroup2 mount.
    pub cgroup: Option<String>,
    /// Kubernetes pod UID, resolved to its cgroup (systemd and cgroupfs drivers).
    pub pod: Option<String>,
    pub agent_id: String,
    pub session_id: Option<String>,
}

/// `[sidecar.ca]`: the MITM certificate authority.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// Holds `firma-ca.crt` and `firma-ca.key` (0600); generated on first start.
    #[serde(default = "default_ca_dir")]
    pub dir: PathBuf,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            dir: default_ca_dir(),
        }
    }
}
fn default_ca_dir() -> PathBuf {
    PathBuf::from("/etc/firma/firma-ca")
}

/// `[sidecar.mapping]`: request -> action class rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub rules_path: Option<PathBuf>,
    #[serde(default)]
    pub rules_paths: Vec<PathBuf>,
    /// Deny requests no rule maps (`UnclassifiedIntent`); otherwise they pass and are audited.
    #[serde(default = "yes")]
    pub default_protected: bool,
    /// Largest request body read for a rule's `extract` (bigger: 413 `BodyTooLarge`). Fits
    /// multimodal requests (base64 images).
    #[serde(default = "default_extract_max_body_bytes")]
    pub extract_max_body_bytes: usize,
    /// Bytes of such bodies held in memory at once across all requests (more: 503
    /// `BodyBudgetExhausted` with `Retry-After`). At least `extract_max_body_bytes`.
    #[serde(default = "default_extract_body_budget_bytes")]
    pub extract_body_budget_bytes: usize,
}

fn default_extract_max_body_bytes() -> usize {
    32 * 1024 * 1024
}

fn default_extract_body_budget_bytes() -> usize {
    256 * 1024 * 1024
}

impl MappingConfig {
    /// `rules_path` followed by `rules_paths`.
    pub fn all_paths(&self) -> Vec<PathBuf> {
        self.rules_path
            .iter()
            .chain(self.rules_paths.iter())
            .cloned()
            .collect()
    }
}

/// `[sidecar.policy]`: where the runtime Cedar bundle comes from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Without `authority_url`: the bundle is read from here. With it: the last streamed
    /// bundle is cached here.
    pub dir: Option<PathBuf>,
    /// `https://host:port` (verified with `[sidecar.authority].ca_cert_path`) or
    /// `http://` on loopback.
    pub authority_url: Option<String>,
    /// Several Authorities sharing one revocation store (docs/scale-out.md), same URL rules,
    /// tried in order: a stream that fails moves to the next. Instead of `authority_url`.
    #[serde(default)]
    pub authority_urls: Vec<String>,
}

impl PolicyConfig {
    /// Every configured Authority URL, `authority_url` or `authority_urls`.
    pub fn authority_urls(&self) -> Vec<String> {
        self.authority_url
            .iter()
            .chain(self.authority_urls.iter())
            .cloned()
            .collect()
    }
}

/// `[sidecar.constraint_enforcement]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintEnforcementConfig {
    /// With no bundle update for this long, everything is denied `PolicyBundleStale`.
    #[serde(default = "default_sidecar_bundle_ttl")]
    pub bundle_ttl_seconds: u64,
    /// Stage 2 budget; exceeding it denies `EnforcementTimeout`.
    #[serde(default = "default_enforcement_timeout")]
    pub enforcement_timeout_ms: u64,
}

impl Default for ConstraintEnforcementConfig {
    fn default() -> Self {
        Self {
            bundle_ttl_seconds: default_sidecar_bundle_ttl(),
            enforcement_timeout_ms: default_enforcement_timeout(),
        }
    }
}
fn default_sidecar_bundle_ttl() -> u64 {
    90
}
fn default_enforcement_timeout() -> u64 {
    50
}

/// `[sidecar.capability_seed]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitySeedConfig {
    /// Seed TOML files written by `firma authority issue`; verified at startup.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

/// `[sidecar.capability_validation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityValidationConfig {
    #[serde(default = "default_skew")]
    pub clock_skew_tolerance_seconds: u64,
}

impl Default for CapabilityValidationConfig {
    fn default() -> Self {
        Self {
            clock_skew_tolerance_seconds: default_skew(),
        }
    }
}
fn default_skew() -> u64 {
    5
}

/// `[sidecar.authority]`: how the sidecar trusts the Authority.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarAuthorityConfig {
    /// The Authority's Ed25519 public key (`.pub` from `generate-key`).
    pub public_key_path: PathBuf,
    /// CA certificate that signed the Authority's TLS certificate.
    pub ca_cert_path: Option<PathBuf>,
}

/// `[sidecar.connector]`: upstream behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    #[serde(default = "default_upstream_timeout")]
    pub default_timeout_ms: u64,
    /// Extra PEM roots trusted for upstream TLS in addition to the webpki roots.
    #[serde(default)]
    pub extra_root_certs: Vec<PathBuf>,
    #[serde(default)]
    pub hosts: Vec<ConnectorHostConfig>,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: default_upstream_timeout(),
            extra_root_certs: Vec::new(),
            hosts: Vec::new(),
        }
    }
}
fn default_upstream_timeout() -> u64 {
    30_000
}

/// `[[sidecar.connector.hosts]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorHostConfig {
    pub host: String,
    /// Sustained requests per second allowed to this host.
    pub rps: Option<u32>,
    /// Requests allowed in a burst above `rps`.
    pub burst: Option<u32>,
    pub timeout_ms: Option<u64>,
    /// Connect here instead of resolving `host` (`"127.0.0.1:8443"`); useful without DNS.
    pub address: Option<String>,
    /// The error shape Firma's own answers (denials, aborts) carry for this host, so the
    /// provider's SDK shows the reason: `"openai"` (OpenAI-compatible APIs), `"anthropic"`, or
    /// `"firma"` (the plain body). Default: `openai` for api.openai.com, `anthropic` for
    /// api.anthropic.com, `firma` elsewhere.
    pub error_format: Option<ErrorFormat>,
}

/// Which provider's error shape a host's SDKs read (see `crate::error_shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorFormat {
    /// `{"denied","reason","detail"}` only.
    #[default]
    Firma,
    /// Adds `{"error": {"message", "type", "code", "param"}}`.
    Openai,
    /// Adds `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
}

/// Where a credential comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    /// An environment variable of the sidecar, read once at startup.
    Basic,
    /// A HashiCorp Vault secret, fetched lazily and cached.
    Vault,
}

/// `[[sidecar.credentials]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Exact host name; no wildcards, to bound a leak to one upstream.
    pub host: String,
    pub mode: CredentialMode,
    pub header: String,
    #[serde(default)]
    pub prefix: String,
    pub value_from_env: Option<String>,
    pub secret_path: Option<String>,
    pub secret_key: Option<String>,
    /// Headers that carry an API credential for this host, removed from every request to it
    /// before Firma's `header` is set (the agent's own key, or its placeholder, never leaves).
    /// Default: `authorization`, `x-api-key`, `api-key`, `x-goog-api-key`; `header` is always
    /// removed too.
    pub strip_headers: Option<Vec<String>>,
    /// Query parameters that carry an API credential for this host (`?key=` of Google APIs),
    /// removed from every request to it. Default: `key`, `api_key`, `api-key`, `apikey`,
    /// `access_token`.
    pub strip_query_params: Option<Vec<String>>,
    /// TOML places `[sidecar.credentials.vault]` inside the last `[[sidecar.credentials]]`
    /// entry; it describes the one Vault connection shared by every vault-mode credential.
    pub vault: Option<VaultConfig>,
}

/// `[sidecar.credentials.vault]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub addr: String,
    /// Static token; otherwise `VAULT_TOKEN`, otherwise AppRole from the env vars below.
    pub token: Option<String>,
    pub namespace: Option<String>,
    #[serde(default = "default_role_id_env")]
    pub approle_role_id_env: String,
    #[serde(default = "default_secret_id_env")]
    pub approle_secret_id_env: String,
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// PEM CA for Vault's TLS certificate.
    pub ca_cert_path: Option<PathBuf>,
    /// Fetched secrets are reused for this long; a rotation is visible after at most this.
    #[serde(default = "default_vault_cache")]
    pub cache_ttl_seconds: u64,
    #[serde(default = "default_vault_timeout")]
    pub timeout_ms: u64,
}

fn default_role_id_env() -> String {
    "VAULT_ROLE_ID".into()
}
fn default_secret_id_env() -> String {
    "VAULT_SECRET_ID".into()
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_vault_cache() -> u64 {
    60
}
fn default_vault_timeout() -> u64 {
    2_000
}

/// Where audit events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    /// JSON lines, hash-chained, in `path`.
    File,
    #[default]
    Stdout,
    /// Streamed to an audit collector at `grpc_url`.
    Grpc,
}

/// When the file sink calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every event: nothing acknowledged is lost on power failure.
    Always,
    /// At most every 100 ms, and on shutdown.
    #[default]
    Interval,
    /// Leave it to the OS.
    Never,
}

/// `[sidecar.audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default)]
    pub sink: AuditSink,
    pub path: Option<PathBuf>,
    pub grpc_url: Option<String>,
    /// More collector replicas: the sink ships to one collector at a time (first `grpc_url`,
    /// then these, in order) and fails over to the next when it fails, re-sending what the
    /// failed one did not acknowledge (docs/scale-out.md, "Audit collection").
    #[serde(default)]
    pub grpc_urls: Vec<String>,
    /// CA for the collector's TLS certificate.
    pub ca_cert_path: Option<PathBuf>,
    /// Ed25519 key (PKCS#8 PEM, 0600) that signs every event; generated with
    /// `firma authority generate-key`.
    pub signing_key_path: Option<PathBuf>,
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// Denials of one workload written one by one per aggregation window; further ones are
    /// counted into a signed `deny_summary` at the window's end (docs/architecture.md).
    #[serde(default = "default_aggregate_after")]
    pub aggregate_denials_after: u32,
    /// The aggregation window, 1 to 3600 s.
    #[serde(default = "default_aggregate_window")]
    pub aggregate_window_secs: u64,
    /// File sink: rotate the file once it reaches this size (at least 4096); unset: never.
    pub max_file_bytes: Option<u64>,
    /// File sink with rotation: rotated files kept (the oldest are deleted); unset: keep all.
    pub max_files: Option<u32>,
    /// File sink: WARN (and `audit_disk_low` = 1) while the audit filesystem has less free
    /// space than this; 0 turns the warning off (the free-space gauge stays).
    #[serde(default = "default_free_space_warn")]
    pub free_space_warn_bytes: u64,
    /// `[sidecar.audit.anchor]`: publish the chain head to etcd (docs/scale-out.md); off when
    /// unset.
    pub anchor: Option<AnchorConfig>,
}

/// `[sidecar.audit.anchor]`: where and how often the audit chain head is anchored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorConfig {
    /// etcd client URLs, `http://HOST:PORT` on loopback.
    pub endpoints: Vec<String>,
    /// Key prefix shared with the Authorities (`[authority.etcd] prefix`).
    #[serde(default = "default_anchor_prefix")]
    pub prefix: String,
    /// Publish period (100 to 60000 ms): what is written after the last anchor is unprotected.
    #[serde(default = "default_anchor_interval")]
    pub interval_ms: u64,
}

fn default_anchor_prefix() -> String {
    "/firma/".into()
}
fn default_anchor_interval() -> u64 {
    1000
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sink: AuditSink::default(),
            path: None,
            grpc_url: None,
            grpc_urls: Vec::new(),
            ca_cert_path: None,
            signing_key_path: None,
            fsync: FsyncPolicy::default(),
            aggregate_denials_after: default_aggregate_after(),
            aggregate_window_secs: default_aggregate_window(),
            max_file_bytes: None,
            max_files: None,
            free_space_warn_bytes: default_free_space_warn(),
            anchor: None,
        }
    }
}

fn default_aggregate_after() -> u32 {
    20
}
fn default_aggregate_window() -> u64 {
    10
}
fn default_free_space_warn() -> u64 {
    1 << 30
}

/// `[sidecar.log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`; `--log-format` on the command line wins.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_level() -> String {
    "info".into()
}

impl AuditConfig {
    /// The collectors of the `grpc` sink in failover order: `grpc_url`, then `grpc_urls`.
    pub fn collector_urls(&self) -> Vec<&str> {
        self.grpc_url
            .iter()
            .chain(&self.grpc_urls)
            .map(String::as_str)
            .collect()
    }

    /// `grpc_urls`: only with sink = "grpc", each an `http(s)://HOST:PORT` URL, no repeats.
    fn validate_collectors(&self, file: &Path) -> Result<(), ConfigError> {
        if self.grpc_urls.is_empty() {
            return Ok(());
        }
        let key = "sidecar.audit.grpc_urls";
        if self.sink != AuditSink::Grpc {
            return Err(ConfigError::invalid(
                file,
                key,
                "expected only with sink = \"grpc\"",
            ));
        }
        let urls = self.collector_urls();
        for (i, u) in urls.iter().enumerate() {
            let uri: Option<http::Uri> = u.parse().ok();
            let ok = uri.as_ref().is_some_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some()
                    && uri.port_u16().is_some()
            });
            if !ok {
                return Err(ConfigError::invalid(
                    file,
                    key,
                    format!("expected http://HOST:PORT or https://HOST:PORT URLs, got {u:?}"),
                ));
            }
            if urls[..i].contains(u) {
                return Err(ConfigError::invalid(
                    file,
                    key,
                    format!("expected each collector once (with grpc_url), got {u:?} twice"),
                ));
            }
        }
        Ok(())
    }

    /// Aggregation and rotation bounds.
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        self.validate_collectors(file)?;
        if let Some(a) = &self.anchor {
            firma_common::anchor::check_endpoints(
                file,
                "sidecar.audit.anchor.endpoints",
                &a.endpoints,
            )?;
            if !a.prefix.starts_with('/') || !a.prefix.ends_with('/') {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.audit.anchor.prefix",
                    format!(
                        "expected a key prefix starting and ending with `/`, got {:?}",
                        a.prefix
                    ),
                ));
            }
            if !(100..=60_000).contains(&a.interval_ms) {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.audit.anchor.interval_ms",
                    format!("expected 100 to 60000 milliseconds, got {}", a.interval_ms),
                ));
            }
            if self.sink == AuditSink::Stdout {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.audit.anchor",
                    "expected sink = \"file\" or \"grpc\" (stdout output is not verified later)",
                ));
            }
        }
        if !(1..=3600).contains(&self.aggregate_window_secs) {
            return Err(ConfigError::invalid(
                file,
                "sidecar.audit.aggregate_window_secs",
                "expected 1 to 3600 seconds",
            ));
        }
        let rotation = self.max_file_bytes.is_some() || self.max_files.is_some();
        if rotation && self.sink != AuditSink::File {
            return Err(ConfigError::invalid(
                file,
                if self.max_file_bytes.is_some() {
                    "sidecar.audit.max_file_bytes"
                } else {
                    "sidecar.audit.max_files"
                },
                "expected only with sink = \"file\"",
            ));
        }
        if self.max_file_bytes.is_some_and(|n| n < 4096) {
            return Err(ConfigError::invalid(
                file,
                "sidecar.audit.max_file_bytes",
                "expected at least 4096 bytes",
            ));
        }
        match self.max_files {
            Some(0) => Err(ConfigError::invalid(
                file,
                "sidecar.audit.max_files",
                "expected at least 1 (leave it unset to keep every rotated file)",
            )),
            Some(_) if self.max_file_bytes.is_none() => Err(ConfigError::invalid(
                file,
                "sidecar.audit.max_files",
                "expected together with max_file_bytes (files are rotated by size)",
            )),
            _ => Ok(()),
        }
    }
}

impl SidecarConfig {
    /// The sidecar's own ports on loopback (transparent listener, DNS guard, a fixed admin
    /// port): never reachable by tagged workloads.
    pub fn own_ports(&self) -> Vec<u16> {
        let mut own = vec![self.interceptor.transparent.port, self.dns.port];
        if let Some(a) = self.admin.listen_addr.as_deref()
            && let Ok(a) = a.parse::<std::net::SocketAddr>()
            && a.port() != 0
        {
            own.push(a.port());
        }
        own
    }

    /// `redirect_address` and `[sidecar.node]`: a routable address, and no DNS guard or
    /// interception mode they cannot work with.
    fn validate_node(&self, file: &Path) -> Result<(), ConfigError> {
        let t = &self.interceptor.transparent;
        if let Some(a) = t.redirect_address {
            if a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.interceptor.transparent.redirect_address",
                    format!(
                        "expected a unicast address of this node reachable from the pods (not loopback, 0.0.0.0, multicast or broadcast), got {a}"
                    ),
                ));
            }
            if t.redirect_dns {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.interceptor.transparent.redirect_dns",
                    "expected false with redirect_address (the DNS guard listens on loopback only, so tagged DNS would be refused)",
                ));
            }
        }
        if let Some(node) = &self.node {
            if !matches!(self.interceptor.mode, InterceptMode::Transparent) {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.node",
                    "expected [sidecar.interceptor] mode = \"transparent\" (the node agent tags pod cgroups)",
                ));
            }
            node.validate(file)?;
        }
        Ok(())
    }

    /// `allow_udp` and `allow_loopback`: well-formed, and no loopback allowance names one of
    /// the sidecar's own ports.
    fn validate_side_doors(&self, file: &Path) -> Result<(), ConfigError> {
        use crate::ebpf::allow;
        let t = &self.interceptor.transparent;
        for (i, e) in t.allow_udp.iter().enumerate() {
            allow::parse_udp(e).map_err(|why| {
                ConfigError::invalid(
                    file,
                    &format!("sidecar.interceptor.transparent.allow_udp[{i}]"),
                    why,
                )
            })?;
        }
        let own = self.own_ports();
        for (i, e) in t.allow_loopback.iter().enumerate() {
            allow::parse_loopback(e)
                .and_then(|a| allow::check_not_sidecar(&a, &own))
                .map_err(|why| {
                    ConfigError::invalid(
                        file,
                        &format!("sidecar.interceptor.transparent.allow_loopback[{i}]"),
                        why,
                    )
                })?;
        }
        Ok(())
    }

    /// The `[sidecar]` section of the file at `path`, validated; other sections are ignored.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&firma_common::config::read(path)?, path)
    }

    /// The `[sidecar]` section of `text`, validated; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = firma_common::config::parse_section(text, path, "sidecar")?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field rules that serde cannot express.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        check_log_level(file, "sidecar.log.level", &self.log.level)?;
        check_admin_addr(
            file,
            "sidecar.admin.listen_addr",
            self.admin.listen_addr.as_deref(),
        )?;
        if self
            .interceptor
            .listen_addr
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(ConfigError::invalid(
                file,
                "sidecar.interceptor.listen_addr",
                format!(
                    "expected a socket address like \"127.0.0.1:8080\", got {:?}",
                    self.interceptor.listen_addr
                ),
            ));
        }
        if self.interceptor.workers > MAX_WORKERS {
            return Err(ConfigError::invalid(
                file,
                "sidecar.interceptor.workers",
                format!(
                    "expected 0 (half the CPUs) to {MAX_WORKERS}, got {}",
                    self.interceptor.workers
                ),
            ));
        }
        if let Some(x) = &self.ext_authz {
            if x.listen_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.ext_authz.listen_addr",
                    format!(
                        "expected a socket address like \"127.0.0.1:9191\", got {:?}",
                        x.listen_addr
                    ),
                ));
            }
            if x.principals
                .iter()
                .any(|p| p.principal.is_empty() || p.agent_id.is_empty())
            {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.ext_authz.principals",
                    "expected a non-empty principal and agent_id in every entry",
                ));
            }
        }
        if self.mcp.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                file,
                "sidecar.mcp.max_body_bytes",
                "expected a positive number of bytes",
            ));
        }
        let l = &self.limits;
        for (key, value) in [
            ("idle_timeout_secs", l.idle_timeout_secs as usize),
            (
                "tunnel_idle_timeout_secs",
                l.tunnel_idle_timeout_secs as usize,
            ),
            (
                "h2_keepalive_timeout_secs",
                l.h2_keepalive_timeout_secs as usize,
            ),
            ("max_connections", l.max_connections),
            ("max_connections_per_client", l.max_connections_per_client),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.limits.{key}"),
                    "expected a positive number",
                ));
            }
        }
        for (i, p) in self.llm.prices.iter().enumerate() {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if p.model.trim().is_empty() || !ok(p.input_per_1k_usd) || !ok(p.output_per_1k_usd) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.llm.prices[{i}]"),
                    "expected a non-empty `model` and non-negative `input_per_1k_usd` / `output_per_1k_usd`",
                ));
            }
        }
        if self.llm.reserve_output_tokens.is_some_and(|v| v <= 0) {
            return Err(ConfigError::invalid(
                file,
                "sidecar.llm.reserve_output_tokens",
                "expected a positive number of tokens",
            ));
        }
        if self.mapping.extract_max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                file,
                "sidecar.mapping.extract_max_body_bytes",
                "expected a positive number of bytes",
            ));
        }
        if self.mapping.extract_body_budget_bytes < self.mapping.extract_max_body_bytes {
            return Err(ConfigError::invalid(
                file,
                "sidecar.mapping.extract_body_budget_bytes",
                format!(
                    "expected at least extract_max_body_bytes ({}), or no body that large could ever be read",
                    self.mapping.extract_max_body_bytes
                ),
            ));
        }
        if self.policy.dir.is_none() && self.policy.authority_urls().is_empty() {
            return Err(ConfigError::invalid(
                file,
                "sidecar.policy",
                "expected `dir` or `authority_url` (where the runtime Cedar bundle comes from)",
            ));
        }
        if self.policy.authority_url.is_some() && !self.policy.authority_urls.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "sidecar.policy.authority_urls",
                "expected either authority_url (one Authority) or authority_urls (several), not both",
            ));
        }
        for (i, w) in self.interceptor.transparent.workloads.iter().enumerate() {
            if w.cgroup.is_some() == w.pod.is_some() {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.interceptor.transparent.workloads[{i}]"),
                    "expected exactly one of `cgroup` or `pod`",
                ));
            }
        }
        self.validate_side_doors(file)?;
        self.validate_node(file)?;
        self.dns.validate(file, self.interceptor.transparent.port)?;
        let m = &self.interceptor.https_mitm;
        for (i, h) in m.fallback_hosts.iter().enumerate() {
            let key = format!("sidecar.interceptor.https_mitm.fallback_hosts[{i}]");
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty() || bare.contains(['*', '/', ' ']) {
                return Err(ConfigError::invalid(
                    file,
                    &key,
                    format!("expected a host name or `*.suffix`, got {h:?}"),
                ));
            }
            if m.strict_hosts.iter().any(|s| s.eq_ignore_ascii_case(h)) {
                return Err(ConfigError::invalid(
                    file,
                    &key,
                    format!("{h:?} is also in strict_hosts, which never fall back: pick one"),
                ));
            }
        }
        for (i, h) in self.connector.hosts.iter().enumerate() {
            if h.rps == Some(0) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.connector.hosts[{i}].rps"),
                    "expected a positive rate (omit it for no limit)",
                ));
            }
            if let Some(a) = &h.address
                && a.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sidecar.connector.hosts[{i}].address"),
                    format!("expected ip:port, got {a:?}"),
                ));
            }
        }
        let mut vaults = 0;
        for (i, c) in self.credentials.iter().enumerate() {
            let key = |k: &str| format!("sidecar.credentials[{i}].{k}");
            if c.host.contains('*') {
                return Err(ConfigError::invalid(
                    file,
                    &key("host"),
                    "expected an exact host name (wildcards are not supported for credentials)",
                ));
            }
            for (j, h) in c.strip_headers.iter().flatten().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(ConfigError::invalid(
                        file,
                        &key(&format!("strip_headers[{j}]")),
                        format!("expected an HTTP header name, got {h:?}"),
                    ));
                }
            }
            for (j, q) in c.strip_query_params.iter().flatten().enumerate() {
                if q.is_empty() || q.contains(['&', '=', '#', ' ']) {
                    return Err(ConfigError::invalid(
                        file,
                        &key(&format!("strip_query_params[{j}]")),
                        format!(
                            "expected a query parameter name (no `&`, `=`, `#`, space), got {q:?}"
                        ),
                    ));
                }
            }
            match c.mode {
                CredentialMode::Basic if c.value_from_env.is_none() => {
                    return Err(ConfigError::invalid(
                        file,
                        &key("value_from_env"),
                        "expected the name of an environment variable for mode = \"basic\"",
                    ));
                }
                CredentialMode::Vault if c.secret_path.is_none() || c.secret_key.is_none() => {
                    return Err(ConfigError::invalid(
                        file,
                        &key("secret_path"),
                        "expected `secret_path` and `secret_key` for mode = \"vault\"",
                    ));
                }
                _ => {}
            }
            vaults += usize::from(c.vault.is_some());
        }
        if vaults > 1 {
            return Err(ConfigError::invalid(
                file,
                "sidecar.credentials.vault",
                "expected at most one [sidecar.credentials.vault] block",
            ));
        }
        if self
            .credentials
            .iter()
            .any(|c| c.mode == CredentialMode::Vault)
            && self.vault().is_none()
        {
            return Err(ConfigError::invalid(
                file,
                "sidecar.credentials.vault",
                "expected a [sidecar.credentials.vault] block with `addr` for vault-mode credentials",
            ));
        }
        match self.audit.sink {
            AuditSink::File if self.audit.path.is_none() => {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.audit.path",
                    "expected a file path for sink = \"file\"",
                ));
            }
            AuditSink::Grpc if self.audit.collector_urls().is_empty() => {
                return Err(ConfigError::invalid(
                    file,
                    "sidecar.audit.grpc_url",
                    "expected a URL (or a `grpc_urls` list) for sink = \"grpc\"",
                ));
            }
            _ => {}
        }
        self.audit.validate(file)?;
        self.session_store.validate(file)?;
        Ok(())
    }

    /// The shared Vault connection, wherever TOML nested it.
    pub fn vault(&self) -> Option<&VaultConfig> {
        self.credentials.iter().find_map(|c| c.vault.as_ref())
    }
}

/// `[sidecar.node]`: the Kubernetes node agent (`node/`, docs/kubernetes.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The container runtime's CRI socket (containerd: `/run/containerd/containerd.sock`,
    /// CRI-O: `/var/run/crio/crio.sock`).
    #[serde(default = "default_cri_socket")]
    pub cri_socket: PathBuf,
    /// How often the pods are listed again (ms, 100..=60000). Attaching before the first
    /// connect does not depend on it (the OCI hook does that); it bounds how long a pod that
    /// stopped stays attached and how soon a pod is tagged when no hook is installed.
    #[serde(default = "default_resync_ms")]
    pub resync_interval_ms: u64,
}

fn default_cri_socket() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}
fn default_resync_ms() -> u64 {
    1000
}

impl NodeConfig {
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if !(100..=60_000).contains(&self.resync_interval_ms) {
            return Err(ConfigError::invalid(
                file,
                "sidecar.node.resync_interval_ms",
                format!(
                    "expected 100..=60000 (milliseconds), got {}",
                    self.resync_interval_ms
                ),
            ));
        }
        if !self.cri_socket.is_absolute() {
            return Err(ConfigError::invalid(
                file,
                "sidecar.node.cri_socket",
                format!(
                    "expected an absolute path to the runtime's CRI socket, got {}",
                    self.cri_socket.display()
                ),
            ));
        }
        Ok(())
    }
}
