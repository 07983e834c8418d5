//! A set of rotated audit files: how they are named, ordered and verified as one chain.
//!
//! The sidecar's file sink writes `PATH` (the active file). With `[sidecar.audit]
//! max_file_bytes`, a file that reached the size is renamed `PATH.NNNNNN` (6 digits, 1, 2, …:
//! the file's index; nothing is renamed twice) and a new `PATH` is started whose **first line
//! is a signed `rotation` event** chained to the previous file's last line: `file_index` (the
//! new file's index), `previous_file`, `max_files`. The chain, the seq numbers and the batch
//! signatures simply continue across files (a batch never spans two files, so each file ends
//! with a signed line).
//!
//! [`verify_set`] walks the files in order (rotated by index, then the active one) with one
//! [`ChainVerifier`]: a file removed, reordered, renamed or truncated breaks the index
//! sequence, the `file_index` of a rotation event, the chain link into the next file, or leaves
//! the end of a file uncovered by a signature. The oldest files may be missing only as
//! retention explains it: the newest rotation event's `max_files` equals the number of rotated
//! files present. A removal of the newest lines (down to a signed line) of the newest file is
//! not detectable from the files alone, as with any hash chain.

use crate::audit::ChainVerifier;
use crate::keys::VerifyingKey;
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// `event` of the first line of every file started by a rotation.
pub const ROTATION_EVENT: &str = "rotation";

/// `PATH.NNNNNN`, the name of the active file `active` once rotated as file `index`.
pub fn rotated_path(active: &Path, index: u64) -> PathBuf {
    let mut name = active.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{index:06}"));
    active.with_file_name(name)
}

/// The index of `name` as a rotated file of the active file named `active_name`.
pub fn rotated_index(active_name: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(active_name)?.strip_prefix('.')?;
    if digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// One file of a set: `index` is `Some` for a rotated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFile {
    pub path: PathBuf,
    pub index: Option<u64>,
}

/// The rotated files of the active file `active`, by index.
pub fn rotated_files(active: &Path) -> std::io::Result<Vec<AuditFile>> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = active
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(i) = rotated_index(&name, &e.file_name().to_string_lossy()) {
            out.push(AuditFile {
                path: e.path(),
                index: Some(i),
            });
        }
    }
    out.sort_by_key(|f| f.index);
    Ok(out)
}

/// The set of `active`: its rotated files by index, then `active` itself if it exists.
pub fn set_of(active: &Path) -> std::io::Result<Vec<AuditFile>> {
    let mut files = rotated_files(active)?;
    if active.is_file() {
        files.push(AuditFile {
            path: active.to_path_buf(),
            index: None,
        });
    }
    Ok(files)
}

/// The one audit set in `dir`: the active file named by the rotated files (`X.NNNNNN` names
/// `X`), or the one `*.jsonl` file when nothing was rotated.
pub fn set_in_dir(dir: &Path) -> Result<Vec<AuditFile>, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut bases: Vec<String> = names
        .iter()
        .filter_map(|n| {
            let (base, _) = n.rsplit_once('.')?;
            rotated_index(base, n).map(|_| base.to_owned())
        })
        .collect();
    bases.dedup();
    if bases.is_empty() {
        bases = names
            .iter()
            .filter(|n| n.ends_with(".jsonl"))
            .cloned()
            .collect();
    }
    match bases.as_slice() {
        [one] => set_of(&dir.join(one)).map_err(|e| format!("{}: {e}", dir.display())),
        [] => Err(format!(
            "{}: no audit file (no `*.jsonl` and no rotated `NAME.NNNNNN`)",
            dir.display()
        )),
        many => Err(format!(
            "{}: several audit files ({}): verify one with `firma audit verify FILE`, or keep one set per directory",
            dir.display(),
            many.join(", ")
        )),
    }
}

/// How the first file of a walk may begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// One file checked on its own: a leading signed rotation event continues a chain from a
    /// file not given (reported as a note).
    MayContinue,
    /// A whole set: the first file starts its chain, unless retention explains the missing
    /// older files (the newest rotation event's `max_files` = rotated files present).
    Complete,
}

/// A successful walk.
#[derive(Debug, Default)]
pub struct Verified {
    pub files: usize,
    pub events: u64,
    pub chains: usize,
    pub signatures: u64,
    pub notes: Vec<String>,
}

/// The first problem found: in `file`, at `line` (1-based) when it is a line's.
#[derive(Debug)]
pub struct Failure {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(n) => write!(f, "{}:{n}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

fn first_event(path: &Path) -> Option<serde_json::Map<String, Value>> {
    let f = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(f).read_line(&mut line).ok()?;
    match serde_json::from_str(&line) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn is_rotation(ev: &serde_json::Map<String, Value>) -> bool {
    ev.get("event").and_then(Value::as_str) == Some(ROTATION_EVENT)
}

/// Checks `files` in order as one sequence of chains (see the module doc).
pub fn verify_set(
    files: &[AuditFile],
    keys: &[VerifyingKey],
    head: Head,
) -> Result<Verified, Failure> {
    let fail = |file: &Path, line: Option<usize>, reason: String| {
        Err(Failure {
            file: file.to_path_buf(),
            line,
            reason,
        })
    };
    let show = |p: &Path| p.display().to_string();
    // Index sequence of the rotated files; the active file follows the last one.
    let rotated: Vec<u64> = files.iter().filter_map(|f| f.index).collect();
    for w in files.windows(2) {
        if let (Some(a), Some(b)) = (w[0].index, w[1].index)
            && b != a + 1
        {
            return fail(
                &w[1].path,
                None,
                format!(
                    "rotated file {} is missing (between {} and {}): removed or renamed",
                    a + 1,
                    show(&w[0].path),
                    show(&w[1].path)
                ),
            );
        }
    }
    let expected_index = |f: &AuditFile| match f.index {
        Some(i) => Some(i),
        None => rotated.last().map(|i| i + 1),
    };
    let firsts: Vec<Option<serde_json::Map<String, Value>>> =
        files.iter().map(|f| first_event(&f.path)).collect();
    let newest_max_files = firsts
        .iter()
        .rev()
        .flatten()
        .find(|e| is_rotation(e))
        .and_then(|e| e.get("max_files").and_then(Value::as_u64));
    let mut v = ChainVerifier::new(keys.to_vec());
    let mut out = Verified {
        files: files.len(),
        ..Verified::default()
    };
    for (fi, f) in files.iter().enumerate() {
        let file = std::fs::File::open(&f.path).map_err(|e| Failure {
            file: f.path.clone(),
            line: None,
            reason: e.to_string(),
        })?;
        let mut n = 0usize;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let at = Some(i + 1);
            let line = line.map_err(|e| Failure {
                file: f.path.clone(),
                line: at,
                reason: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            n += 1;
            let pushed = if n == 1 {
                let anchor = firsts[fi].as_ref().filter(|e| is_rotation(e));
                if let Some(ev) = anchor {
                    let said = ev.get("file_index").and_then(Value::as_u64);
                    if let Some(want) = expected_index(f)
                        && said != Some(want)
                    {
                        // The active file is numbered after the last rotated one present: a
                        // rotation event further on means the files in between are gone.
                        if f.index.is_none()
                            && let Some(said) = said
                            && said > want
                        {
                            return fail(
                                &f.path,
                                None,
                                format!(
                                    "rotated file {want} is missing (between {} and {}, whose rotation event says file index {said}): removed or renamed",
                                    files
                                        .get(fi.wrapping_sub(1))
                                        .map_or("the start".into(), |p| show(&p.path)),
                                    show(&f.path)
                                ),
                            );
                        }
                        return fail(
                            &f.path,
                            at,
                            format!(
                                "the rotation event says file index {}, but the file sits at index {want}: files renamed or reordered",
                                said.map_or("none".into(), |s| s.to_string())
                            ),
                        );
                    }
                }
                match (fi, anchor, head) {
                    (0, Some(ev), Head::MayContinue) => {
                        out.notes.push(format!(
                            "{} continues its chain from {} (not checked here: verify the directory to check across files)",
                            show(&f.path),
                            ev.get("previous_file").and_then(Value::as_str).unwrap_or("an earlier file")
                        ));
                        v.push_anchor(&line)
                    }
                    (0, Some(ev), Head::Complete) => {
                        let idx = ev.get("file_index").and_then(Value::as_u64).unwrap_or(0);
                        let present = rotated.len() as u64;
                        if newest_max_files != Some(present) {
                            return fail(
                                &f.path,
                                at,
                                format!(
                                    "the set starts at file index {idx}: files 1 to {} are missing, and retention does not explain it (max_files = {}, {present} rotated file(s) present)",
                                    idx.saturating_sub(1),
                                    newest_max_files
                                        .map_or("unset: keep all".into(), |m| m.to_string())
                                ),
                            );
                        }
                        out.notes.push(format!(
                            "files 1 to {} were removed by retention (max_files = {present}); the set is checked from {}",
                            idx.saturating_sub(1),
                            show(&f.path)
                        ));
                        v.push_anchor(&line)
                    }
                    (0, None, _) => v.push(&line),
                    (_, Some(_), _) => v.push(&line),
                    (_, None, _) => {
                        return fail(
                            &f.path,
                            at,
                            "a file after the first must start with a rotation event: replaced by another file, or its head was cut".into(),
                        );
                    }
                }
            } else {
                v.push(&line)
            };
            if let Err(e) = pushed {
                let hint = if n == 1 && fi > 0 {
                    format!(
                        " (the link from {} is broken: that file was truncated or replaced, or a file is missing)",
                        show(&files[fi - 1].path)
                    )
                } else {
                    String::new()
                };
                return fail(&f.path, at, format!("{e}{hint}"));
            }
            out.events += 1;
        }
        // Each batch ends with a signed line and never spans files.
        if let Err(e) = v.finish() {
            return fail(
                &f.path,
                None,
                format!("{e}; the file's end is not covered by a signature (truncated?)"),
            );
        }
    }
    out.chains = v.chains();
    out.signatures = v.signatures();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_round_trip() {
        let p = Path::new("/var/log/firma/audit.jsonl");
        let r = rotated_path(p, 7);
        assert_eq!(r, Path::new("/var/log/firma/audit.jsonl.000007"));
        assert_eq!(rotated_index("audit.jsonl", "audit.jsonl.000007"), Some(7));
        assert_eq!(
            rotated_index("audit.jsonl", "audit.jsonl.1234567"),
            Some(1234567)
        );
        assert_eq!(rotated_index("audit.jsonl", "audit.jsonl.07"), None);
        assert_eq!(rotated_index("audit.jsonl", "audit.jsonl"), None);
        assert_eq!(rotated_index("audit.jsonl", "other.jsonl.000001"), None);
    }
}
