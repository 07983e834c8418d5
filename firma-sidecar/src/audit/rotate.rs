//! Size-based rotation of the file sink, the chain continuing across files.
//!
//! Once a batch leaves the active file at or over `[sidecar.audit] max_file_bytes` (so a file
//! may exceed it by one batch, at most 256 events), the writer thread, before the next batch:
//! 1. seals a `rotation` event (`file_index`, `previous_file`, `max_files`) as a batch of one:
//!    signed, chained to the active file's last line;
//! 2. writes it to a fresh `.NAME.next` (0600) and syncs it, and syncs the active file;
//! 3. renames the active file to `NAME.NNNNNN` and `.NAME.next` to `NAME`, syncs the directory;
//! 4. with `max_files`, deletes the rotated files older than the newest `max_files`.
//!
//! If any step fails, nothing was renamed, the chain is rolled back (the rotation event never
//! existed), writing goes on in the active file, and the failure is logged (at most every
//! 10 s); the next batch tries again. Naming and verification: [`firma_common::audit_files`].

use super::chain::Sealer;
use super::event;
use super::health::Health;
use firma_common::audit_files::{rotated_files, rotated_path};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often a rotation that keeps failing is logged.
const FAILED_LOG_EVERY: Duration = Duration::from_secs(10);

/// The file sink's rotation settings and where it stands.
#[derive(Debug)]
pub struct Rotation {
    pub path: PathBuf,
    /// `None`: the file is never rotated (rotated files found at start still count).
    pub max_bytes: Option<u64>,
    pub max_files: Option<u32>,
    /// The index the active file gets when rotated.
    pub next_index: u64,
    last_failure_log: Option<Instant>,
}

impl Rotation {
    /// Settings for the active file `path`, numbering after the rotated files already there.
    pub fn new(
        path: &Path,
        max_bytes: Option<u64>,
        max_files: Option<u32>,
    ) -> std::io::Result<Self> {
        let last = rotated_files(path)?
            .last()
            .and_then(|f| f.index)
            .unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            max_files,
            next_index: last + 1,
            last_failure_log: None,
        })
    }

    /// The body of the `rotation` event that starts file `file_index`.
    pub fn event(&self, file_index: u64) -> String {
        let previous = rotated_path(&self.path, file_index - 1);
        event::rotation(
            file_index,
            &previous
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.max_files,
        )
    }

    fn next_tmp(&self) -> PathBuf {
        let mut name = std::ffi::OsString::from(".");
        name.push(self.path.file_name().unwrap_or_default());
        name.push(".next");
        self.path.with_file_name(name)
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
}

impl Rotation {
    /// Rotates the file sink (`file`, its length up to the last persisted line, whether it
    /// awaits a sync) if it reached its size; `true` when it did. Called by the writer after
    /// each successful batch.
    pub(super) fn rotate_if_full(
        &mut self,
        file: &mut File,
        good_len: &mut u64,
        dirty: &mut bool,
        sealer: &mut Sealer,
        health: &Health,
    ) -> bool {
        let rot = self;
        if rot.max_bytes.is_none_or(|max| *good_len < max) {
            return false;
        }
        let before = sealer.position();
        let index = rot.next_index;
        let result = (|| -> Result<(File, u64), String> {
            let mut line = sealer
                .seal(rot.event(index + 1))
                .map_err(|e| e.to_string())?;
            line.push('\n');
            let tmp = rot.next_tmp();
            let _ = std::fs::remove_file(&tmp);
            let step = |what: &str, e: std::io::Error| format!("{what}: {e}");
            let mut next = OpenOptions::new()
                .read(true)
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| step(&format!("create {}", tmp.display()), e))?;
            let undo = |e: String| {
                let _ = std::fs::remove_file(&tmp);
                e
            };
            next.write_all(line.as_bytes())
                .and_then(|()| next.sync_data())
                .map_err(|e| undo(step(&format!("write {}", tmp.display()), e)))?;
            file.sync_data()
                .map_err(|e| undo(step("sync the active file", e)))?;
            let target = rotated_path(&rot.path, index);
            std::fs::rename(&rot.path, &target)
                .map_err(|e| undo(step(&format!("rename to {}", target.display()), e)))?;
            if let Err(e) = std::fs::rename(&tmp, &rot.path) {
                let _ = std::fs::rename(&target, &rot.path);
                return Err(undo(step(&format!("rename {}", tmp.display()), e)));
            }
            sync_dir(&rot.path);
            Ok((next, line.len() as u64))
        })();
        match result {
            Ok((next, len)) => {
                *file = next;
                *good_len = len;
                *dirty = false;
                rot.next_index += 1;
                health.written.fetch_add(1, Ordering::Relaxed);
                health.rotated.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    target: "firma_sidecar::audit",
                    "audit file rotated: {} is now {} (file {}); the chain continues in a new {}",
                    rot.path.display(),
                    rotated_path(&rot.path, index).display(),
                    index,
                    rot.path.display()
                );
                if let Some(keep) = rot.max_files {
                    prune(&rot.path, keep);
                }
                true
            }
            Err(e) => {
                sealer.rollback(before);
                if rot
                    .last_failure_log
                    .is_none_or(|t| t.elapsed() >= FAILED_LOG_EVERY)
                {
                    rot.last_failure_log = Some(Instant::now());
                    tracing::error!(
                        target: "firma_sidecar::audit",
                        "audit file rotation failed ({e}); still writing to {}",
                        rot.path.display()
                    );
                }
                false
            }
        }
    }
}

/// Deletes rotated files of `path` beyond the newest `keep`.
fn prune(path: &Path, keep: u32) {
    let Ok(files) = rotated_files(path) else {
        return;
    };
    let excess = files.len().saturating_sub(keep as usize);
    for f in &files[..excess] {
        match std::fs::remove_file(&f.path) {
            Ok(()) => tracing::info!(
                target: "firma_sidecar::audit",
                "audit retention (max_files = {keep}): removed {}",
                f.path.display()
            ),
            Err(e) => tracing::warn!(
                target: "firma_sidecar::audit",
                "audit retention: cannot remove {}: {e}",
                f.path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::{Sink, Writer};
    use crate::config::FsyncPolicy;
    use firma_common::audit_files::{Head, set_of, verify_set};
    use firma_common::keys::SigningKey;
    use std::sync::Arc;

    fn writer(path: &Path, key: &SigningKey, max_files: Option<u32>) -> Writer {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        let rot = Rotation::new(path, Some(4096), max_files).unwrap();
        Writer::new(
            Sealer::new(key.clone()),
            Sink::file(file, FsyncPolicy::Never, 0).rotating(rot),
            Arc::new(Health::default()),
        )
    }

    fn batches(w: &mut Writer, n: usize) {
        for b in 0..n {
            let bodies = (0..10)
                .map(|i| format!("{{\"n\":{},\"pad\":\"{}\"}}", b * 10 + i, "x".repeat(100)))
                .collect();
            w.persist(bodies).unwrap();
        }
    }

    #[test]
    fn the_chain_continues_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut w = writer(&path, &k, None);
        batches(&mut w, 20);
        let files = set_of(&path).unwrap();
        assert!(files.len() >= 4, "{files:?}");
        assert_eq!(w.health.rotated(), files.len() as u64 - 1);
        let ok = verify_set(&files, &[k.verifying_key()], Head::Complete).unwrap();
        // 200 events and one rotation event per rotation.
        assert_eq!(ok.events, 200 + files.len() as u64 - 1);
        assert_eq!(ok.chains, 1);
        // Each file but the first starts with a signed rotation event naming its index.
        let second = std::fs::read_to_string(&files[1].path).unwrap();
        let head: serde_json::Value = serde_json::from_str(second.lines().next().unwrap()).unwrap();
        assert_eq!(head["event"], "rotation");
        assert_eq!(head["file_index"], 2);
        assert_eq!(head["previous_file"], "audit.jsonl.000001");
        assert!(firma_common::audit::is_signed(
            second.lines().next().unwrap()
        ));
        // A restart numbers on after the files there.
        drop(w);
        let rot = Rotation::new(&path, Some(4096), None).unwrap();
        assert_eq!(rot.next_index, files.len() as u64);
    }

    #[test]
    fn retention_keeps_max_files_and_the_rest_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut w = writer(&path, &k, Some(2));
        batches(&mut w, 30);
        let files = set_of(&path).unwrap();
        assert_eq!(files.len(), 3, "2 rotated + the active one: {files:?}");
        assert!(files[0].index.unwrap() > 1);
        let ok = verify_set(&files, &[k.verifying_key()], Head::Complete).unwrap();
        assert!(
            ok.notes[0].contains("removed by retention"),
            "{:?}",
            ok.notes
        );
        // One more removed by hand: retention no longer explains the gap.
        std::fs::remove_file(&files[0].path).unwrap();
        let files = set_of(&path).unwrap();
        let e = verify_set(&files, &[k.verifying_key()], Head::Complete).unwrap_err();
        assert!(e.reason.contains("retention does not explain it"), "{e}");
    }
}
