//! Shared fixtures for the pipeline and audit tests: a real Authority key pair, real signed
//! seeds and tokens, the shipped Cedar policies and mapping rules, and request builders.

use crate::config::{PolicySource, SidecarToml};
use crate::repo_root;
use firma_common::capability::{CapabilityClaims, CapabilitySeed, now_unix};
use firma_common::keys::{SigningKey, load_signing_key};
use firma_sidecar::config::SidecarConfig;
use firma_sidecar::pipeline::{
    ConnectionInfo, Decision, DenyReason, DestinationContext, InterceptKind, Pipeline,
    RequestContext, Workload,
};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const CHAT: &str = "model.inference.chat";
pub const SEND: &str = "communication.external.send";

/// A temp directory with an Authority key pair, the seed 000 runtime policy and the shipped
/// mapping rules.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub key: SigningKey,
    pub pub_path: PathBuf,
    pub policy_dir: PathBuf,
    pub rules: PathBuf,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("authority.key");
        let (_, pub_path) = firma_common::keys::generate(&key_path, false).expect("generate key");
        let key = load_signing_key(&key_path).expect("load key");
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).expect("mkdir");
        std::fs::copy(
            repo_root().join("policies/runtime/genai-app/genai-app.cedar"),
            policy_dir.join("genai-app.cedar"),
        )
        .expect("copy genai-app.cedar");
        let rules = repo_root().join("policies/mapping-rules.toml");
        Self {
            dir,
            key,
            pub_path,
            policy_dir,
            rules,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Claims valid for 10 minutes.
    pub fn claims(
        &self,
        token_id: &str,
        agent: &str,
        session: &str,
        actions: &[&str],
        scope: &str,
    ) -> CapabilityClaims {
        let now = now_unix();
        CapabilityClaims {
            token_id: token_id.into(),
            agent_id: agent.into(),
            session_id: session.into(),
            action_set: actions.iter().map(|a| (*a).to_owned()).collect(),
            resource_scope: scope.into(),
            iat: now - 5,
            exp: now + 600,
            context_hash: "00".repeat(32),
        }
    }

    pub fn token(&self, c: &CapabilityClaims) -> String {
        c.sign(&self.key).expect("sign")
    }

    /// Writes a seed file as `firma authority issue` would.
    pub fn seed(&self, c: &CapabilityClaims) -> PathBuf {
        let p = self.path(&format!("{}.toml", c.token_id));
        let seed = CapabilitySeed::new(self.token(c), c);
        std::fs::write(&p, toml::to_string(&seed).expect("toml")).expect("write seed");
        p
    }

    /// A `[sidecar.*]` config reading the local policy dir (or the authority in `opts`),
    /// written to `firma.toml` and parsed.
    pub fn config(&self, seeds: &[PathBuf], opts: &Opts) -> SidecarConfig {
        let mut t = SidecarToml::new(&self.policy_dir, &self.pub_path);
        t.listen_addr = "127.0.0.1:8080".into();
        t.rules_path = opts.rules.clone().unwrap_or_else(|| self.rules.clone());
        t.default_protected = opts.default_protected;
        if let Some(url) = &opts.authority_url {
            t.policy = PolicySource::Authority {
                url: url.clone(),
                cache_dir: opts.cache_dir.clone(),
            };
        }
        t.constraint_enforcement = Some((opts.bundle_ttl, opts.timeout_ms));
        t.seeds = seeds.to_vec();
        let text = t.render();
        let file = self.path("firma.toml");
        std::fs::write(&file, &text).expect("write config");
        SidecarConfig::parse(&text, &file).expect("config parses")
    }

    pub async fn pipeline(&self, seeds: &[PathBuf], opts: &Opts) -> Pipeline {
        Pipeline::start(&self.config(seeds, opts))
            .await
            .expect("pipeline starts")
    }
}

pub struct Opts {
    pub default_protected: bool,
    pub bundle_ttl: u64,
    pub timeout_ms: u64,
    pub authority_url: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub rules: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            default_protected: true,
            bundle_ttl: 90,
            // Generous: debug builds on a shared 2-core machine.
            timeout_ms: 2_000,
            authority_url: None,
            cache_dir: None,
            rules: None,
        }
    }
}

pub fn conn(workload: Option<Workload>) -> ConnectionInfo {
    ConnectionInfo {
        conn_id: 7,
        kind: if workload.is_some() {
            InterceptKind::Transparent
        } else {
            InterceptKind::HttpProxy
        },
        peer: "127.0.0.1:40000".parse().expect("addr"),
        original_dst: None,
        workload,
    }
}

pub fn workload(agent: &str, session: Option<&str>) -> Workload {
    Workload {
        cgroup_id: 4242,
        cgroup_path: "/firma-test/agent".into(),
        pid: 1234,
        agent_id: agent.into(),
        session_id: session.map(str::to_owned),
    }
}

/// A request as an interceptor would build it.
pub fn req(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> RequestContext {
    req_from(conn(None), method, host, path, headers)
}

pub fn req_from(
    conn: ConnectionInfo,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> RequestContext {
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    RequestContext {
        conn,
        method: method.parse().expect("method"),
        host: host.into(),
        port: 443,
        path: firma_sidecar::pipeline::path::NormalPath::new(path).expect("a normalisable path"),
        headers: h,
        tls: true,
        request: None,
    }
}

pub fn dest(host: Option<&str>, addr: Option<&str>) -> DestinationContext {
    let mut c = conn(None);
    c.original_dst = addr.map(|a| a.parse().expect("addr"));
    DestinationContext {
        conn: c,
        host: host.map(str::to_owned),
        port: 443,
    }
}

pub fn reason(d: &Decision) -> Option<DenyReason> {
    d.reason
}

/// Polls `f` until it returns `Some` or `deadline` passes.
pub async fn eventually_async<T>(
    deadline: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        // Poll interval of a wait on the condition `f`, bounded by `deadline`.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
