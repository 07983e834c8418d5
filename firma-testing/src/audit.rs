//! Audit test helpers: an audit signing key, events made from real pipeline decisions, and the
//! `firma audit` binary.

use crate::pipeline::Env;
use crate::process::firma_bin;
use firma_sidecar::audit::{AuditInput, AuditLog, ConnectorOutcome};
use firma_sidecar::config::{AuditConfig, AuditSink, FsyncPolicy};
use firma_sidecar::pipeline::{Pipeline, RequestContext};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Generates an audit key pair in `env`; returns (private, public) paths.
pub fn audit_key(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    firma_common::keys::generate(&env.path(name), false).expect("audit key")
}

pub fn file_config(path: &Path, key: &Path) -> AuditConfig {
    AuditConfig {
        sink: AuditSink::File,
        path: Some(path.to_path_buf()),
        signing_key_path: Some(key.to_path_buf()),
        fsync: FsyncPolicy::Always,
        ..AuditConfig::default()
    }
}

pub fn grpc_config(url: &str, key: &Path) -> AuditConfig {
    AuditConfig {
        sink: AuditSink::Grpc,
        grpc_url: Some(url.to_owned()),
        signing_key_path: Some(key.to_path_buf()),
        ..AuditConfig::default()
    }
}

/// Decides `r` and records it as an interceptor would (with a connector outcome on allow).
pub async fn decide_and_record(p: &Pipeline, log: &AuditLog, r: &RequestContext) {
    let d = p.decide(r).await;
    let connector = d.is_allow().then_some(ConnectorOutcome {
        credential_injected: true,
        credential_source: Some("basic"),
        upstream_status: Some(200),
        aborted: None,
        upstream_us: 1500,
        ..ConnectorOutcome::default()
    });
    log.record(AuditInput {
        conn: &r.conn,
        method: Some(r.method.as_str()),
        host: Some(&r.host),
        port: r.port,
        path: Some(&r.path),
        decision: &d,
        connector,
    });
}

/// Runs `firma audit verify FILE --public-key K…`; returns (success, stdout).
pub fn verify(file: &Path, keys: &[&Path]) -> (bool, String) {
    let mut cmd = Command::new(firma_bin());
    cmd.args(["audit", "verify"]).arg(file);
    for k in keys {
        cmd.arg("--public-key").arg(k);
    }
    let out = cmd.output().expect("run firma audit verify");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).expect("audit line is JSON")
}
