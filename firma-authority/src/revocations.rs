//! The revocation file: append-only, one revoked token per line.
//!
//! Line format: `TOKEN_ID [REVOKED_AT_UNIX]`. A bare `TOKEN_ID` line (as the guide describes,
//! and as an operator might write by hand) is accepted; `firma authority revocations add`
//! also records when it revoked the token. That timestamp is what makes compaction safe
//! without knowing the token's expiry: a token revoked at `T` was issued at or before `T` and
//! lives at most `max_ttl_seconds`, so after `T + max_ttl_seconds` it has expired everywhere
//! and its line can go. Bare lines have no timestamp and are never compacted away.
//! Blank lines and `#` comments are ignored.
//!
//! Writers (`add`, `compact`) serialise on an advisory lock on `<file>.lock`, so a CLI `add`
//! cannot be lost to a concurrent compaction's rename.

use crate::error::AuthorityError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One revoked token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEntry {
    pub token_id: String,
    /// Unix seconds at which it was revoked, when recorded.
    pub revoked_at: Option<i64>,
}

/// The parsed file: entries in file order (first occurrence wins) and lines that were not
/// understood (1-based line number, text), which callers log and otherwise ignore.
#[derive(Debug, Default, Clone)]
pub struct RevocationList {
    pub entries: Vec<RevocationEntry>,
    pub malformed: Vec<(usize, String)>,
}

/// What `compact` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    pub kept: usize,
    pub dropped: usize,
}

/// Checks a token id is something a line can hold unambiguously.
pub fn check_token_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("token id is empty".into());
    }
    if id.starts_with('#') || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token id {id:?} must not start with `#` or contain whitespace or control characters"
        ));
    }
    Ok(())
}

fn parse_line(line: &str) -> Option<Result<RevocationEntry, ()>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut parts = line.split_whitespace();
    let token_id = parts.next()?.to_string();
    let revoked_at = match parts.next() {
        None => None,
        Some(t) => match t.parse::<i64>() {
            Ok(t) => Some(t),
            Err(_) => return Some(Err(())),
        },
    };
    if parts.next().is_some() || check_token_id(&token_id).is_err() {
        return Some(Err(()));
    }
    Some(Ok(RevocationEntry {
        token_id,
        revoked_at,
    }))
}

/// Parses file content; duplicates keep their first line.
pub fn parse(text: &str) -> RevocationList {
    let mut list = RevocationList::default();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            None => {}
            Some(Ok(e)) if seen.insert(e.token_id.clone()) => list.entries.push(e),
            Some(Ok(_)) => {}
            Some(Err(())) => list.malformed.push((i + 1, line.to_string())),
        }
    }
    list
}

/// The revocation file at `path`.
#[derive(Debug, Clone)]
pub struct RevocationFile {
    path: PathBuf,
}

impl RevocationFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
        move |source| AuthorityError::Revocations {
            path: self.path.clone(),
            cause: source,
        }
    }

    /// Reads and parses the file; a missing file is an error that says how to create it.
    pub fn read(&self) -> Result<RevocationList, AuthorityError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(AuthorityError::RevocationFileMissing {
                    path: self.path.clone(),
                })
            }
            Err(e) => Err(self.io()(e)),
        }
    }

    /// Takes the writers' lock (released on drop).
    fn lock(&self) -> Result<File, AuthorityError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(lock_path))
            .map_err(self.io())?;
        f.lock().map_err(self.io())?;
        Ok(f)
    }

    /// Appends `token_id` (with `now` as its revocation time) and fsyncs. Idempotent: returns
    /// `false` without writing when the token is already listed. Creates the file if absent.
    pub fn add(&self, token_id: &str, now: i64) -> Result<bool, AuthorityError> {
        check_token_id(token_id).map_err(|m| self.io()(std::io::Error::other(m)))?;
        let _lock = self.lock()?;
        let existing = match self.read() {
            Ok(list) => list,
            Err(AuthorityError::RevocationFileMissing { .. }) => RevocationList::default(),
            Err(e) => return Err(e),
        };
        if existing.entries.iter().any(|e| e.token_id == token_id) {
            return Ok(false);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(self.io())?;
        // A file whose last line lacks a newline (hand edit) must not glue onto our line.
        let needs_newline = std::fs::read(&self.path)
            .map(|b| b.last().is_some_and(|c| *c != b'\n'))
            .unwrap_or(false);
        let line = format!(
            "{}{token_id} {now}\n",
            if needs_newline { "\n" } else { "" }
        );
        f.write_all(line.as_bytes()).map_err(self.io())?;
        f.sync_all().map_err(self.io())?;
        Ok(true)
    }

    /// Rewrites the file without entries revoked more than `max_ttl_seconds` before `now`
    /// (their tokens have expired). Bare entries are kept. Atomic: temp file, fsync, rename.
    pub fn compact(&self, now: i64, max_ttl_seconds: u64) -> Result<CompactReport, AuthorityError> {
        let _lock = self.lock()?;
        let list = self.read()?;
        let max = i64::try_from(max_ttl_seconds).unwrap_or(i64::MAX);
        let (keep, drop): (Vec<_>, Vec<_>) =
            list.entries.into_iter().partition(|e| match e.revoked_at {
                Some(t) => t.saturating_add(max) >= now,
                None => true,
            });
        let mut text = String::new();
        for e in &keep {
            match e.revoked_at {
                Some(t) => text.push_str(&format!("{} {t}\n", e.token_id)),
                None => text.push_str(&format!("{}\n", e.token_id)),
            }
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".compact-tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(self.io())?;
        f.write_all(text.as_bytes()).map_err(self.io())?;
        f.sync_all().map_err(self.io())?;
        std::fs::rename(&tmp, &self.path).map_err(self.io())?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io())?;
        }
        Ok(CompactReport {
            kept: keep.len(),
            dropped: drop.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_bare_and_timestamped_lines() {
        let l = parse("# c\n\nabc\nxyz 100\nabc 5\nbad line here\nq notanumber\n");
        assert_eq!(
            l.entries,
            vec![
                RevocationEntry {
                    token_id: "abc".into(),
                    revoked_at: None
                },
                RevocationEntry {
                    token_id: "xyz".into(),
                    revoked_at: Some(100)
                },
            ]
        );
        assert_eq!(l.malformed.len(), 2);
        assert_eq!(l.malformed[0].0, 6);
    }

    #[test]
    fn add_is_idempotent_and_compact_drops_old() {
        let dir = tempfile::tempdir().unwrap();
        let f = RevocationFile::new(dir.path().join("r.txt"));
        std::fs::write(f.path(), "bare").unwrap();
        assert!(f.add("t1", 1000).unwrap());
        assert!(!f.add("t1", 2000).unwrap());
        assert!(f.add("t2", 5000).unwrap());
        assert!(f.add("has space", 1).is_err());
        let text = std::fs::read_to_string(f.path()).unwrap();
        assert_eq!(text, "bare\nt1 1000\nt2 5000\n");
        let r = f.compact(5000, 3600).unwrap();
        assert_eq!(
            r,
            CompactReport {
                kept: 2,
                dropped: 1
            }
        );
        let ids: Vec<_> = f
            .read()
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.token_id)
            .collect();
        assert_eq!(ids, ["bare", "t2"]);
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = RevocationFile::new(dir.path().join("nope.txt"));
        let e = f.read().unwrap_err();
        assert!(e.to_string().contains("touch"), "{e}");
    }
}
