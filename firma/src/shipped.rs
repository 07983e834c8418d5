//! The shipped `policies/` compiled into the binary, so `firma run` and `firma init` work from
//! the binary alone (no checkout, nothing to copy by hand), plus the few steps both commands
//! share: writing the policy files, generating keys, issuing a capability in-process.

use anyhow::{Context, bail};
use firma_authority::issuance::{DenialCode, IssueRequest, Issued, Issuer};
use firma_common::keys;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `policies/mapping-rules.toml`: request -> action class.
pub const MAPPING_RULES: &str = include_str!("../../policies/mapping-rules.toml");
/// `policies/runtime/genai-app/genai-app.cedar`: the runtime (Stage 2) policy.
pub const RUNTIME_POLICY: &str = include_str!("../../policies/runtime/genai-app/genai-app.cedar");
/// `policies/issuance/dev/issuance.cedar`: mint anything (a local, single-user setup).
pub const ISSUANCE_POLICY: &str = include_str!("../../policies/issuance/dev/issuance.cedar");
/// File names the policies get when written out.
pub const RUNTIME_FILE: &str = "genai-app.cedar";
pub const ISSUANCE_FILE: &str = "issuance.cedar";
pub const SCHEMA_FILE: &str = "firma.cedarschema";

/// The action classes the shipped runtime policy permits (for some host): what a capability
/// gets when nobody asks for others.
pub const DEFAULT_ACTIONS: [&str; 2] = ["model.inference.chat", "communication.external.send"];

/// Creates `dir` (and parents) with `mode` on the directory itself.
pub fn make_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Writes `text` to `path` (atomically, with `mode`).
pub fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    keys::write_atomic(path, text.as_bytes(), mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the runtime policy and the schema into `dir`.
pub fn write_runtime_policies(dir: &Path) -> anyhow::Result<()> {
    make_dir(dir, 0o755)?;
    write(&dir.join(RUNTIME_FILE), RUNTIME_POLICY, 0o644)?;
    write(
        &dir.join(SCHEMA_FILE),
        firma_common::policy::SHIPPED_SCHEMA,
        0o644,
    )
}

/// Writes the issuance policy into `dir`.
pub fn write_issuance_policy(dir: &Path) -> anyhow::Result<()> {
    make_dir(dir, 0o755)?;
    write(&dir.join(ISSUANCE_FILE), ISSUANCE_POLICY, 0o644)
}

/// Generates an Ed25519 key pair at `path` (0600) + `.pub` unless both exist already.
pub fn ensure_key(path: &Path) -> anyhow::Result<PathBuf> {
    let public = keys::public_key_path(path);
    if !(path.exists() && public.exists()) {
        keys::generate(path, true)?;
    }
    Ok(public)
}

/// One mapping rule's identity, as duplicates are judged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleKey {
    pub method: String,
    pub host: String,
    pub path: String,
}

/// The rules of a mapping file (method, host, path), for deciding what to add and intercept.
pub fn rule_keys(text: &str, file: &Path) -> anyhow::Result<BTreeSet<RuleKey>> {
    let v: toml::Value =
        toml::from_str(text).with_context(|| format!("{}: not valid TOML", file.display()))?;
    let mut out = BTreeSet::new();
    for r in v
        .get("rule")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
    {
        let s = |k: &str| {
            r.get(k)
                .and_then(|x| x.as_str())
                .unwrap_or("*")
                .to_ascii_lowercase()
        };
        out.insert(RuleKey {
            method: s("method"),
            host: s("host"),
            path: s("path"),
        });
    }
    Ok(out)
}

/// Issues a capability in-process with the Authority's own issuance code (the same checks and
/// signing as `firma authority issue` and the `IssueCapability` RPC).
pub struct Issue<'a> {
    pub key_file: &'a Path,
    pub issuance_dir: &'a Path,
    pub agent_id: &'a str,
    pub session_id: &'a str,
    pub actions: &'a [String],
    pub ttl_seconds: i64,
}

impl Issue<'_> {
    pub fn issue(&self) -> anyhow::Result<Issued> {
        let key = keys::load_signing_key(self.key_file)?;
        let loaded = firma_authority::bundles::load("issuance", self.issuance_dir)?;
        let issuer = Issuer {
            key: &key,
            policies: &loaded.compiled,
            max_ttl_seconds: self.ttl_seconds.max(1) as u64,
        };
        let req = IssueRequest {
            agent_id: self.agent_id.into(),
            session_id: self.session_id.into(),
            actions: self.actions.to_vec(),
            resource_scope: "*".into(),
            ttl_seconds: self.ttl_seconds,
        };
        match issuer.issue(&req) {
            Ok(i) => Ok(i),
            Err(d) if d.code == DenialCode::InvalidRequest => bail!("{}", d.reason),
            Err(d) => bail!("{} [{}]", d.reason, d.code.as_str()),
        }
    }
}
