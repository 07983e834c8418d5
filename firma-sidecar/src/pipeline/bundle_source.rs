//! Where the runtime bundle comes from: the Authority stream (cached in `[sidecar.policy] dir`
//! when set) or, without an Authority, the local `[sidecar.policy] dir`.
//!
//! A local directory is loaded at startup (a broken one stops startup) and re-read every
//! `max(1, bundle_ttl_seconds / 3)` seconds; each successful read refreshes the bundle, so a
//! local bundle only goes stale if the directory stops loading. A cached copy of a streamed
//! bundle is installed at startup with the cache's modification time as its refresh time, so
//! an old cache is stale at once and a fresh one bridges a short Authority outage.

use super::stage2::PolicyStore;
use firma_common::errors::Chain;
use firma_common::policy::{PolicyBundle, PolicyError};
use firma_common::proto::authority::PolicyBundle as PbBundle;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Name of the schema file written into a cache directory.
const CACHE_SCHEMA: &str = "bundle.cedarschema";

/// Reload period of a local directory.
pub fn reload_period(bundle_ttl: Duration) -> Duration {
    Duration::from_secs((bundle_ttl.as_secs() / 3).max(1))
}

/// Re-reads `dir` forever, installing it on each successful read.
pub async fn watch_dir(dir: PathBuf, store: Arc<PolicyStore>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (d, s) = (dir.clone(), store.clone());
        // Reading and compiling (up to a second for 10,000 policies) off the runtime's threads.
        let loaded = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            PolicyBundle::load_dir(&d).map(|bundle| {
                let installed = s.install(&bundle);
                (bundle, installed, started.elapsed())
            })
        })
        .await;
        match loaded {
            Ok(Ok((bundle, installed, took))) => match installed {
                Ok(true) => tracing::info!(
                    target: "firma_sidecar::policy",
                    "installed runtime bundle {} from {} ({} file(s), read and compiled in {} ms)",
                    bundle.version,
                    dir.display(),
                    bundle.file_count(),
                    took.as_millis()
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    target: "firma_sidecar::policy",
                    "{}: refusing changed bundle, keeping the previous one until it goes stale: {}",
                    dir.display(),
                    Chain(&e)
                ),
            },
            Ok(Err(e)) => tracing::error!(target: "firma_sidecar::policy", "{}", Chain(&e)),
            Err(e) => tracing::error!(target: "firma_sidecar::policy", "reload task failed: {e}"),
        }
    }
}

/// Installs a bundle received from the Authority, caching it in `cache` when given.
pub fn on_streamed(store: &PolicyStore, cache: Option<&Path>, msg: PbBundle) {
    let bundle = match PolicyBundle::from_proto(msg) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(target: "firma_sidecar::policy", "refusing streamed bundle: {e}");
            return;
        }
    };
    match off_runtime(|| store.install(&bundle)) {
        Ok(changed) => {
            if changed {
                tracing::info!(
                    target: "firma_sidecar::policy",
                    "installed runtime bundle {} from the authority ({} file(s))",
                    bundle.version,
                    bundle.file_count()
                );
            }
            if let Some(dir) = cache
                && let Err(e) = write_cache(dir, &bundle, changed)
            {
                tracing::warn!(target: "firma_sidecar::policy", "cannot cache bundle in {}: {e}", dir.display());
            }
        }
        Err(e) => tracing::error!(
            target: "firma_sidecar::policy",
            "refusing streamed bundle {}: {}",
            bundle.version,
            Chain(&e)
        ),
    }
}

/// Runs `f` (compiling a bundle: up to a second for 10,000 policies) without holding up the
/// other tasks of a multi-threaded runtime (`block_in_place`); inline anywhere else.
fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A plain file name: no directories, not hidden.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && name.ends_with(".cedar")
}

/// Writes `bundle` into `dir` (files replaced atomically, stale `.cedar` files removed). An
/// unchanged bundle only touches the schema file, which dates the cache.
fn write_cache(dir: &Path, bundle: &PolicyBundle, changed: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, text: &str| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(name))
    };
    if changed {
        if let Some(bad) = bundle.files.iter().find(|f| !safe_name(&f.name)) {
            return Err(std::io::Error::other(format!(
                "policy file name {:?} is not a plain *.cedar name",
                bad.name
            )));
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ours = bundle.files.iter().any(|f| f.name == name);
            if (name.ends_with(".cedar") || name.ends_with(".cedarschema"))
                && !ours
                && name != CACHE_SCHEMA
            {
                std::fs::remove_file(&path)?;
            }
        }
        for f in &bundle.files {
            write(&f.name, &f.content)?;
        }
    }
    write(CACHE_SCHEMA, &bundle.schema)
}

/// Installs a cached bundle from `dir` if there is one, dated by its modification time.
pub fn load_cache(store: &PolicyStore, dir: &Path) -> Result<bool, PolicyError> {
    let schema = dir.join(CACHE_SCHEMA);
    let Ok(meta) = std::fs::metadata(&schema) else {
        return Ok(false);
    };
    let bundle = PolicyBundle::load_dir(dir)?;
    let age = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    let refreshed = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    match store.install_at(&bundle, refreshed) {
        Ok(_) => {
            tracing::info!(
                target: "firma_sidecar::policy",
                "installed cached runtime bundle {} from {} (cached {}s ago)",
                bundle.version,
                dir.display(),
                age.as_secs()
            );
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(target: "firma_sidecar::policy", "ignoring cached bundle in {}: {e}", dir.display());
            Ok(false)
        }
    }
}
