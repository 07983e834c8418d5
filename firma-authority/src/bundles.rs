//! Policy bundles as the Authority holds them: loaded from a directory, compiled, and
//! republished through a `watch` channel whenever the directory's content changes.
//!
//! Change detection polls the directory's content hash (the bundle `version`) every 250 ms:
//! it cannot miss an editor's rename-over-save, needs no platform watcher, and keeps the
//! "pushed within 1 s" promise. An edit that does not compile is logged once and ignored;
//! the last good bundle stays in force (fail safe: sidecars keep a valid policy).

pub mod metrics;

use crate::error::AuthorityError;
use firma_common::policy::{CompiledPolicies, PolicyBundle, PolicyError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a policy directory is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A bundle and its compiled form (always a pair that compiled together).
#[derive(Debug)]
pub struct LoadedBundle {
    pub bundle: PolicyBundle,
    pub compiled: CompiledPolicies,
}

fn load_and_compile(dir: &Path) -> Result<LoadedBundle, PolicyError> {
    let bundle = PolicyBundle::load_dir(dir)?;
    let compiled = bundle.compile()?;
    Ok(LoadedBundle { bundle, compiled })
}

/// Loads `dir` once, failing with the file and line of any problem. `which` names the bundle
/// (`issuance`, `runtime`) in messages.
pub fn load(which: &'static str, dir: &Path) -> Result<LoadedBundle, AuthorityError> {
    load_and_compile(dir).map_err(|source| AuthorityError::Policy {
        which,
        dir: dir.to_path_buf(),
        cause: source,
    })
}

/// "1 file" / "2 files", as the startup log prints it.
pub fn describe_count(n: usize) -> String {
    if n == 1 {
        "1 file".to_string()
    } else {
        format!("{n} files")
    }
}

/// Starts watching `dir`, publishing each new good bundle. Returns the receiver every
/// consumer clones; the current value is always the last bundle that compiled.
pub fn watch_dir(
    which: &'static str,
    dir: PathBuf,
    initial: LoadedBundle,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<LoadedBundle>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(poll(which, dir, tx, cancel));
    rx
}

async fn poll(
    which: &'static str,
    dir: PathBuf,
    tx: watch::Sender<Arc<LoadedBundle>>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    // Version (or error text) of the last rejected state, so a broken edit is reported once.
    let mut last_rejected: Option<String> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let d = dir.clone();
        let current = tx.borrow().bundle.version.clone();
        let Ok(read) = tokio::task::spawn_blocking(move || PolicyBundle::load_dir(&d)).await else {
            continue;
        };
        let bundle = match read {
            Ok(b) if b.version == current => {
                last_rejected = None;
                continue;
            }
            Ok(b) => b,
            Err(e) => {
                let key = e.to_string();
                if last_rejected.as_deref() != Some(key.as_str()) {
                    tracing::warn!(bundle = which, dir = %dir.display(), "cannot read {which} policy directory; keeping version {current}: {e}");
                    last_rejected = Some(key);
                }
                continue;
            }
        };
        if last_rejected.as_deref() == Some(bundle.version.as_str()) {
            continue;
        }
        let version = bundle.version.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let compiled = bundle.compile();
            (bundle, compiled)
        })
        .await;
        match compiled {
            Ok((bundle, Ok(compiled))) => {
                tracing::info!(
                    bundle = which,
                    version = %version,
                    "reloaded {which} bundle ({})",
                    describe_count(bundle.file_count())
                );
                last_rejected = None;
                tx.send_replace(Arc::new(LoadedBundle { bundle, compiled }));
            }
            Ok((_, Err(e))) => {
                tracing::warn!(
                    bundle = which,
                    dir = %dir.display(),
                    rejected = %version,
                    "invalid {which} bundle edit ignored; keeping version {current}:\n{e}"
                );
                last_rejected = Some(version);
            }
            Err(e) => tracing::warn!("{which} bundle compiler task failed: {e}"),
        }
    }
}
