//! The revocation file: append-only, one revoked token per line.
//!
//! Line format: `TOKEN_ID [REVOKED_AT]`. A bare `TOKEN_ID` line (as the guide describes,
//! and as an operator might write by hand) is accepted; `firma authority revocations add`
//! also records when it revoked the token, in Unix milliseconds. A `REVOKED_AT` below
//! [`MILLIS_FROM`] is read as Unix seconds (lines written before milliseconds, or by hand). The
//! unit is told by magnitude, not by a new syntax, so an older authority still reads every line
//! written now as a valid revocation (it takes the milliseconds for a far-future second and never
//! compacts the line): a downgrade can keep lines longer, never drop a revocation.
//!
//! The timestamp makes compaction safe without knowing the token's expiry: a token revoked at
//! `T` was issued at or before `T` and lives at most `max_ttl_seconds`, so after
//! `T + max_ttl_seconds` it has expired everywhere and its line can go. It is also what the
//! revocation stream sends as `revoked_at_unix_ms`, so sidecars can measure revocation lag,
//! including for ids replayed to a sidecar that connects later. Bare lines have no timestamp:
//! they are never compacted away and their lag is unknown. Blank lines and `#` comments are
//! ignored.
//!
//! Writers (`add`, `compact`) serialise on an advisory lock on `<file>.lock`, so a CLI `add`
//! cannot be lost to a concurrent compaction's rename.

use crate::error::AuthorityError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `REVOKED_AT` values from here up are Unix milliseconds, below it Unix seconds
/// (10^11 s is the year 5138; 10^11 ms is March 1973).
pub const MILLIS_FROM: i64 = 100_000_000_000;

/// One revoked token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEntry {
    pub token_id: String,
    /// Unix milliseconds at which it was revoked, when recorded.
    pub revoked_at_ms: Option<i64>,
}

/// A file timestamp in Unix milliseconds (see [`MILLIS_FROM`]).
fn millis_of(t: i64) -> i64 {
    if t >= MILLIS_FROM {
        t
    } else {
        t.saturating_mul(1000)
    }
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
    let revoked_at_ms = match parts.next() {
        None => None,
        Some(t) => match t.parse::<i64>() {
            Ok(t) => Some(millis_of(t)),
            Err(_) => return Some(Err(())),
        },
    };
    if parts.next().is_some() || check_token_id(&token_id).is_err() {
        return Some(Err(()));
    }
    Some(Ok(RevocationEntry {
        token_id,
        revoked_at_ms,
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

    /// Appends `token_id` (with `now_ms`, Unix milliseconds, as its revocation time) and fsyncs.
    /// Idempotent: returns `false` without writing when the token is already listed. Creates the
    /// file if absent.
    pub fn add(&self, token_id: &str, now_ms: i64) -> Result<bool, AuthorityError> {
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
            "{}{token_id} {now_ms}\n",
            if needs_newline { "\n" } else { "" }
        );
        f.write_all(line.as_bytes()).map_err(self.io())?;
        f.sync_all().map_err(self.io())?;
        Ok(true)
    }

    /// Rewrites the file without entries revoked more than `max_ttl_seconds` before `now_ms`
    /// (Unix milliseconds; their tokens have expired). Bare entries are kept; kept timestamps are
    /// written in milliseconds. Atomic: temp file, fsync, rename.
    pub fn compact(
        &self,
        now_ms: i64,
        max_ttl_seconds: u64,
    ) -> Result<CompactReport, AuthorityError> {
        let _lock = self.lock()?;
        let list = self.read()?;
        let max_ms = i64::try_from(max_ttl_seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let (keep, drop): (Vec<_>, Vec<_>) =
            list.entries
                .into_iter()
                .partition(|e| match e.revoked_at_ms {
                    Some(t) => t.saturating_add(max_ms) >= now_ms,
                    None => true,
                });
        let mut text = String::new();
        for e in &keep {
            match e.revoked_at_ms {
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
                    revoked_at_ms: None
                },
                RevocationEntry {
                    token_id: "xyz".into(),
                    revoked_at_ms: Some(100_000)
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
        let t0 = 1_764_000_000_000; // ms
        assert!(f.add("t1", t0).unwrap());
        assert!(!f.add("t1", t0 + 1).unwrap());
        assert!(f.add("t2", t0 + 4_000_000).unwrap());
        assert!(f.add("has space", 1).is_err());
        let text = std::fs::read_to_string(f.path()).unwrap();
        assert_eq!(text, format!("bare\nt1 {t0}\nt2 {}\n", t0 + 4_000_000));
        let r = f.compact(t0 + 4_000_000, 3600).unwrap();
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
    fn seconds_and_milliseconds_are_told_apart_by_magnitude() {
        let l = parse(&format!(
            "s 1764000000\nms 1764000000123\nneg -5\nhuge {}\nlow {}\n",
            i64::MAX,
            i64::MIN
        ));
        let at: Vec<_> = l.entries.iter().map(|e| e.revoked_at_ms).collect();
        assert_eq!(
            at,
            [
                Some(1_764_000_000_000),
                Some(1_764_000_000_123),
                Some(-5000),
                Some(i64::MAX),
                Some(i64::MIN)
            ]
        );
        // Compaction compares in milliseconds whichever unit a line used, and never overflows.
        let dir = tempfile::tempdir().unwrap();
        let f = RevocationFile::new(dir.path().join("r.txt"));
        std::fs::write(
            f.path(),
            format!("old 1764000000\nnew 1764007000000\nfuture {}\n", i64::MAX),
        )
        .unwrap();
        let r = f.compact(1_764_007_000_000, 3600).unwrap();
        assert_eq!(r.dropped, 1);
        let ids: Vec<_> = f.read().unwrap().entries;
        assert_eq!(ids[0].token_id, "new");
        assert_eq!(ids[1].revoked_at_ms, Some(i64::MAX));
    }

    #[test]
    fn missing_file_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = RevocationFile::new(dir.path().join("nope.txt"));
        let e = f.read().unwrap_err();
        assert!(e.to_string().contains("touch"), "{e}");
    }
}
