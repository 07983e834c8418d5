//! `firma init [DIR]`: a working deployment in one directory (docs/run.md): a commented
//! `firma.toml` whose every path points inside DIR, the authority and audit keys, the MITM CA,
//! the shipped policies and mapping rules, a sample capability seed. Afterwards
//! `firma authority -c DIR/firma.toml` and `firma sidecar -c DIR/firma.toml` start unedited.

use crate::config::FirmaConfig;
use crate::shipped::{self, Issue};
use anyhow::{Context, bail};
use firma_common::capability::rfc3339;
use firma_sidecar::tls::ca::CertificateAuthority;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Directory to create [default: ./firma].
    #[arg(value_name = "DIR", default_value = "firma")]
    dir: PathBuf,
    /// Write into an existing DIR, replacing its keys, CA, policies and config.
    #[arg(long)]
    force: bool,
    /// Agent of the sample capability seed.
    #[arg(long, default_value = "local-agent")]
    agent_id: String,
}

/// Lifetime of the sample seed (the config's `max_ttl_seconds`).
const SEED_TTL: i64 = 3600;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.dir.exists() && !args.force {
        bail!(
            "{} exists; refusing to overwrite it (pass --force to replace its keys, CA, policies and config)",
            args.dir.display()
        );
    }
    shipped::make_dir(&args.dir, 0o755)?;
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let p = |rel: &str| dir.join(rel);

    firma_common::keys::generate(&p("authority.key"), true)?;
    firma_common::keys::generate(&p("audit.key"), true)?;
    let ca = CertificateAuthority::init(&p("firma-ca"), true)?;
    shipped::write_runtime_policies(&p("policies"))?;
    shipped::write_issuance_policy(&p("issuance"))?;
    shipped::write(&p("mapping-rules.toml"), shipped::MAPPING_RULES, 0o644)?;
    if !p("revocations.txt").exists() {
        shipped::write(&p("revocations.txt"), "", 0o644)?;
    }
    shipped::make_dir(&p("cache/policies"), 0o700)?;
    shipped::make_dir(&p("run"), 0o700)?;

    let hosts: BTreeSet<String> =
        shipped::rule_keys(shipped::MAPPING_RULES, &p("mapping-rules.toml"))?
            .into_iter()
            .map(|k| k.host)
            .filter(|h| h != "*")
            .collect();
    let text = config_text(&dir, &hosts.into_iter().collect::<Vec<_>>());
    let config = p("firma.toml");
    // Checked by the one loader before it is written: init never leaves a config that fails.
    FirmaConfig::parse(&text, &config).map_err(crate::ConfigFailure)?;
    shipped::write(&config, &text, 0o644)?;

    let actions: Vec<String> = shipped::DEFAULT_ACTIONS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let issued = Issue {
        key_file: &p("authority.key"),
        issuance_dir: &p("issuance"),
        agent_id: &args.agent_id,
        session_id: "s1",
        actions: &actions,
        ttl_seconds: SEED_TTL,
    }
    .issue()
    .context("issuing the sample capability")?;
    firma_authority::issuance::write_seed(&p("seed.toml"), &issued.seed())?;

    let c = config.display();
    println!("wrote {}:", dir.display());
    println!("  firma.toml            the config (http_proxy mode; transparent section explained)");
    println!("  authority.key/.pub    signs capabilities; audit.key/.pub signs the audit log");
    println!(
        "  {}  the MITM CA clients must trust",
        ca.cert_path()
            .strip_prefix(&dir)
            .unwrap_or(ca.cert_path())
            .display()
    );
    println!("  policies/ issuance/ mapping-rules.toml   the shipped policies and rules");
    println!(
        "  seed.toml             capability for agent {} session s1 ({}), expires {}",
        args.agent_id,
        actions.join(", "),
        rfc3339(issued.claims.exp)
    );
    println!("next:");
    println!("  firma authority -c {c} &");
    println!("  firma sidecar -c {c} &");
    println!(
        "  curl --proxy http://127.0.0.1:8080 --cacert {} https://paste.rs/ -d hi   # 403 PolicyDenied",
        ca.cert_path().display()
    );
    println!(
        "  firma audit verify {} --public-key {}",
        p("audit.jsonl").display(),
        p("audit.pub").display()
    );
    println!(
        "  firma authority -c {c} issue --agent-id {} --session-id s1 --action model.inference.chat --ttl-seconds 3600 --output {}   # a fresh seed",
        args.agent_id,
        p("seed.toml").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn q(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

/// The commented firma.toml (every key of policies/firma.toml, paths inside `dir`).
fn config_text(dir: &Path, intercept: &[String]) -> String {
    let p = |rel: &str| q(&dir.join(rel));
    let hosts = intercept
        .iter()
        .map(|h| toml::Value::String(h.clone()).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Written by `firma init`. Every path points inside this directory.
#   firma authority -c {cfg}     # the Authority (gRPC on [::1]:50051)
#   firma sidecar -c {cfg}       # the sidecar (HTTP proxy on 127.0.0.1:8080)
# Every key, with its default, is documented in the repository's policies/firma.toml.

[authority]
listen_addr = "[::1]:50051"          # plaintext only on loopback; set tls_cert_path/tls_key_path otherwise
policy_dir = {policies}              # runtime Cedar policy, streamed to sidecars (edits reach them within 1 s)
issuance_policy_dir = {issuance}     # consulted before minting a capability (this one mints anything)
revocation_file = {revocations}      # `firma authority -c F revocations add TOKEN_ID`
key_file = {authority_key}           # 0600; the sidecar verifies with authority.pub
max_ttl_seconds = 3600
bundle_ttl_seconds = 30
log_level = "info"

[sidecar.interceptor]
# "http_proxy": clients set HTTPS_PROXY=http://127.0.0.1:8080 and trust firma-ca/firma-ca.crt.
# "transparent": no client settings; eBPF programs redirect the TCP connects of tagged cgroups
# (needs root; see [sidecar.interceptor.transparent] below and `firma sidecar attach`).
mode = "http_proxy"
listen_addr = "127.0.0.1:8080"
drain_timeout_secs = 30

[sidecar.interceptor.https_mitm]
enabled = true
# Hosts whose TLS the sidecar terminates to decide per request: the hosts the mapping rules name.
intercept_hosts = [{hosts}]
strict_hosts = []                    # hosts always intercepted, a failed interception closes
fallback_hosts = []                  # opt-in: a client rejecting the CA is tunnelled blind (300 s)

# Used only with mode = "transparent" (root): tagged cgroups' connects go to 127.0.0.1/[::1]:port.
[sidecar.interceptor.transparent]
port = 15001
excluded_cidrs = []                  # TCP destinations never redirected, e.g. ["10.0.0.0/8"]
excluded_ports = []
block_quic = true                    # refuse UDP/443 so QUIC cannot bypass the sidecar
allow_udp = []                       # UDP is closed but DNS to the guard; exceptions "ADDR:PORT"
allow_loopback = []                  # loopback is closed; open "PORT" or "ADDR:PORT" (never the sidecar's)
redirect_dns = true                  # tagged workloads resolve through the DNS guard ([sidecar.dns]):
                                     # names that can lead to an allowed destination, NXDOMAIN for the rest
pin_dir = "/sys/fs/bpf/firma"        # bpffs; pins outlive the sidecar so a crash fails closed
control_socket = {control}           # `firma sidecar -c F attach --cgroup /agent --agent-id {agent}`
allow_ephemeral_pins = false
# Workloads attached at start (more with `firma sidecar -c F attach`):
# [[sidecar.interceptor.transparent.workloads]]
# cgroup = "/agents/support"
# agent_id = "local-agent"
# session_id = "s1"

[sidecar.limits]
idle_timeout_secs = 60
max_connections = 4096
max_connections_per_client = 1024

[sidecar.ca]
dir = {ca}                           # firma-ca.crt (give to clients) and firma-ca.key (0600)

[sidecar.mapping]
rules_path = {rules}                 # request (method, host, path) -> action class
default_protected = true             # unmapped requests are denied UnclassifiedIntent

[sidecar.policy]
authority_url = "http://[::1]:50051" # the runtime bundle streams from the Authority...
dir = {cache}                        # ...and is cached here

[sidecar.constraint_enforcement]
bundle_ttl_seconds = 90              # no bundle update for this long: everything is denied
enforcement_timeout_ms = 50

[sidecar.capability_seed]
paths = [{seed}]                     # capabilities known at start (`firma authority issue --output`)

[sidecar.authority]
public_key_path = {authority_pub}

[sidecar.connector]
default_timeout_ms = 30000
extra_root_certs = []                # PEM files trusted for upstreams besides the public roots

# Credentials the sidecar injects (the agent never sees them). The variable must be set in the
# sidecar's environment, or it refuses to start; uncomment and run
# `OPENAI_API_KEY=sk-... firma sidecar -c {cfg}`. Give the agent a placeholder instead
# (OPENAI_API_KEY=sk-firma-placeholder-dev): its SDK starts, the sidecar replaces it with the
# real key on api.openai.com and denies it anywhere else (CredentialLeak).
# [[sidecar.credentials]]
# host = "api.openai.com"
# mode = "basic"
# header = "Authorization"
# prefix = "Bearer "
# value_from_env = "OPENAI_API_KEY"

[sidecar.audit]
sink = "file"
path = {audit}                       # `firma audit verify audit.jsonl --public-key audit.pub`
signing_key_path = {audit_key}
fsync = "interval"

[sidecar.log]
level = "info"
"#,
        cfg = dir.join("firma.toml").display(),
        policies = p("policies"),
        issuance = p("issuance"),
        revocations = p("revocations.txt"),
        authority_key = p("authority.key"),
        authority_pub = p("authority.pub"),
        control = p("run/sidecar.sock"),
        agent = "local-agent",
        ca = p("firma-ca"),
        rules = p("mapping-rules.toml"),
        cache = p("cache/policies"),
        seed = p("seed.toml"),
        audit = p("audit.jsonl"),
        audit_key = p("audit.key"),
    )
}
