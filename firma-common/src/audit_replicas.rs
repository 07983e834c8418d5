//! Audit files written by collector replicas: each checked on its own, then every sidecar's
//! chain rebuilt across all of them.
//!
//! A sidecar with several collectors ships to one at a time and fails over to the next, so a
//! replica's file holds *stretches* of each chain: runs of consecutive seq numbers, each ending
//! with a signed line (a submission always does). **A file verifies on its own**
//! ([`verify_part`]) when, per chain, its seq numbers only go up, every line links to the line
//! before it in its stretch, every signature verifies, every stretch ends with a signed line
//! that covers it, and a stretch starting at seq 0 starts from the genesis hash. A stretch
//! starting later is taken from the `prev_hash` its first line states: that it joins the chain
//! is what only the other files can show.
//!
//! [`verify_replicas`] then rebuilds each chain across the files, by seq, from 0: a seq held by
//! no file is a **gap**, the same seq with different lines in two files is a **fork**, a stretch
//! whose first line does not link to the line before it (in whichever file) is a **broken
//! join**. The same line in two files is an **overlap**, reported but not a failure: the
//! submission a collector had written but not yet acknowledged when it died is sent again to
//! the next one. As for any hash chain, lines missing after a chain's last held line cannot be
//! told from the files (anchors can: docs/scale-out.md).

use crate::audit::{ChainPos, ChainVerifier, line_hash};
use crate::audit_files::Failure;
use crate::keys::VerifyingKey;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Where a line sits: file (index into the given list) and 1-based line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    file: usize,
    line: usize,
}

/// One line of a chain as a file holds it.
#[derive(Debug, Clone)]
struct Held {
    hash: String,
    prev_hash: String,
    at: At,
}

/// One file checked on its own.
#[derive(Debug, Default)]
pub struct PartVerified {
    pub events: u64,
    pub chains: usize,
    pub stretches: u64,
    pub signatures: u64,
}

/// The chains of one file, by chain id then seq.
type Chains = HashMap<String, BTreeMap<u64, Held>>;

/// Checks one replica's file on its own (see the module doc).
pub fn verify_part(path: &Path, keys: &[VerifyingKey]) -> Result<PartVerified, Failure> {
    walk(path, 0, keys, |_, _, _| {}).map(|(v, _)| v)
}

fn walk(
    path: &Path,
    file: usize,
    keys: &[VerifyingKey],
    mut each: impl FnMut(ChainPos, String, At),
) -> Result<(PartVerified, ()), Failure> {
    let fail = |line: Option<usize>, reason: String| Failure {
        file: path.to_path_buf(),
        line,
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| fail(None, e.to_string()))?;
    let mut v = ChainVerifier::new(keys.to_vec());
    let mut out = PartVerified::default();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| fail(Some(n), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let (body, started) = v
            .push_stretch(&line)
            .map_err(|e| fail(Some(n), e.to_string()))?;
        let pos = ChainPos::of(&body).map_err(|e| fail(Some(n), e.to_string()))?;
        out.events += 1;
        out.stretches += u64::from(started);
        each(pos, line_hash(&line), At { file, line: n });
    }
    v.finish().map_err(|e| {
        fail(
            None,
            format!("{e}; the file's end is not covered by a signature (truncated?)"),
        )
    })?;
    out.chains = v.chains();
    out.signatures = v.signatures();
    Ok((out, ()))
}

/// The chains rebuilt across replica files.
#[derive(Debug, Default)]
pub struct Merged {
    /// Each file checked on its own, in the order given.
    pub parts: Vec<PartVerified>,
    /// Distinct events (an overlap counts once).
    pub events: u64,
    pub chains: usize,
    /// Events held, identical, by more than one file.
    pub overlaps: u64,
    /// One line per overlapping run: which files hold it.
    pub notes: Vec<String>,
}

/// Why the files do not rebuild every chain: each problem found, one line each.
#[derive(Debug)]
pub enum MergeFailure {
    /// A file does not verify on its own.
    Part(Failure),
    /// Gaps, forks and broken joins across the files.
    Chains(Vec<String>),
}

/// Checks each file on its own, then rebuilds every chain across all of them (module doc).
pub fn verify_replicas(files: &[PathBuf], keys: &[VerifyingKey]) -> Result<Merged, MergeFailure> {
    let show = |at: At| format!("{}:{}", files[at.file].display(), at.line);
    let mut merged = Merged::default();
    let mut problems = Vec::new();
    let mut chains: Chains = HashMap::new();
    // (chain, seq, files holding it) of identical copies, to report as runs.
    let mut overlaps: Vec<(String, u64, usize, usize)> = Vec::new();
    for (fi, path) in files.iter().enumerate() {
        if files[..fi].contains(path) {
            return Err(MergeFailure::Part(Failure {
                file: path.clone(),
                line: None,
                reason: "given twice".into(),
            }));
        }
        let (part, ()) = walk(path, fi, keys, |pos, hash, at| {
            let held = chains.entry(pos.chain_id.clone()).or_default();
            match held.get(&pos.seq) {
                None => {
                    held.insert(
                        pos.seq,
                        Held {
                            hash,
                            prev_hash: pos.prev_hash,
                            at,
                        },
                    );
                }
                Some(h) if h.hash == hash => {
                    overlaps.push((pos.chain_id, pos.seq, h.at.file, at.file));
                }
                Some(h) => problems.push(format!(
                    "FORK: chain {}: seq {} differs between {} and {}",
                    pos.chain_id,
                    pos.seq,
                    show(h.at),
                    show(at)
                )),
            }
        })
        .map_err(MergeFailure::Part)?;
        merged.parts.push(part);
    }
    let mut ids: Vec<&String> = chains.keys().collect();
    ids.sort();
    for id in ids {
        let held = &chains[id];
        let mut prev: Option<(u64, &Held)> = None;
        for (&seq, h) in held {
            let expected = prev.map_or(0, |(s, _)| s + 1);
            if seq > expected {
                let from = prev.map_or("the chain's start".into(), |(_, p)| {
                    format!("after {}", show(p.at))
                });
                problems.push(format!(
                    "GAP: chain {id}: seq {expected} to {} are in none of the files ({from}, before {})",
                    seq - 1,
                    show(h.at)
                ));
            } else if let Some((_, p)) = prev
                && h.prev_hash != p.hash
            {
                problems.push(format!(
                    "BROKEN JOIN: chain {id}: seq {seq} at {} does not link to seq {} at {}",
                    show(h.at),
                    seq - 1,
                    show(p.at)
                ));
            }
            prev = Some((seq, h));
        }
        merged.events += held.len() as u64;
    }
    merged.chains = chains.len();
    merged.overlaps = overlaps.len() as u64;
    overlaps.sort();
    let mut runs: Vec<(String, u64, u64, usize, usize)> = Vec::new();
    for (chain, seq, a, b) in overlaps {
        match runs.last_mut() {
            Some(r) if r.0 == chain && r.2 + 1 == seq && r.3 == a && r.4 == b => r.2 = seq,
            _ => runs.push((chain, seq, seq, a, b)),
        }
    }
    for (chain, from, to, a, b) in runs {
        merged.notes.push(format!(
            "chain {chain}: seq {from} to {to} are in both {} and {} (identical: re-sent after a collector failed before acknowledging them)",
            files[a].display(),
            files[b].display()
        ));
    }
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(MergeFailure::Chains(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{GENESIS_HASH, seal, unsigned_line};
    use crate::keys::SigningKey;
    use serde_json::{Map, Value};

    /// A chain of `n` lines in batches of 3 (last of each batch signed).
    fn chain(k: &SigningKey, id: &str, n: u64, text: &str) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (0..n)
            .map(|i| {
                let mut b = Map::new();
                b.insert("chain_id".into(), Value::from(id));
                b.insert("seq".into(), i.into());
                b.insert("prev_hash".into(), prev.clone().into());
                b.insert("text".into(), Value::from(text));
                let l = if (i + 1) % 3 == 0 || i + 1 == n {
                    seal(&b, k).unwrap()
                } else {
                    unsigned_line(&b).unwrap()
                };
                prev = line_hash(&l);
                l
            })
            .collect()
    }

    fn write(dir: &Path, name: &str, lines: &[&String]) -> PathBuf {
        let p = dir.join(name);
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn stretches_in_two_files_rebuild_the_chain_and_gaps_forks_repeats_fail() {
        let dir = tempfile::tempdir().unwrap();
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let keys = [k.verifying_key()];
        let c = chain(&k, "c", 12, "x");
        let d = chain(&k, "d", 3, "x");
        // A holds 0..6 and 9..12; B holds 3..9 (3..6 overlap) and chain d.
        // First an A with a stray unsigned line of d.
        let a = write(
            dir.path(),
            "a",
            &[
                &c[0], &c[1], &c[2], &d[0], &c[3], &c[4], &c[5], &c[9], &c[10], &c[11],
            ],
        );
        // A on its own: chain d holds only an unsigned line: not covered.
        let e = verify_part(&a, &keys).unwrap_err();
        assert!(e.reason.contains("not covered"), "{e}");
        let a = write(
            dir.path(),
            "a",
            &[
                &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[9], &c[10], &c[11],
            ],
        );
        let b = write(
            dir.path(),
            "b",
            &[
                &d[0], &c[3], &c[4], &c[5], &d[1], &c[6], &c[7], &c[8], &d[2],
            ],
        );
        let pa = verify_part(&a, &keys).unwrap();
        assert_eq!((pa.events, pa.stretches, pa.chains), (9, 2, 1));
        let m = verify_replicas(&[a.clone(), b.clone()], &keys).unwrap();
        assert_eq!((m.events, m.chains, m.overlaps), (15, 2, 3));
        assert!(m.notes[0].contains("seq 3 to 5"), "{:?}", m.notes);

        // Without B: a gap.
        let only_a = verify_replicas(std::slice::from_ref(&a), &keys).unwrap_err();
        let MergeFailure::Chains(p) = only_a else {
            panic!("expected a gap")
        };
        assert!(p[0].starts_with("GAP: chain c: seq 6 to 8"), "{p:?}");

        // A line repeated inside one file.
        let rep = write(
            dir.path(),
            "rep",
            &[&c[0], &c[1], &c[2], &c[0], &c[1], &c[2]],
        );
        let e = verify_part(&rep, &keys).unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.reason.contains("comes again"), "{e}");

        // Another signed line at the same seq (a fork): each file verifies on its own.
        let other = chain(&k, "c", 12, "rewritten");
        let f = write(dir.path(), "f", &[&other[6], &other[7], &other[8]]);
        verify_part(&f, &keys).unwrap();
        let MergeFailure::Chains(p) = verify_replicas(&[a, b, f], &keys).unwrap_err() else {
            panic!("expected a fork")
        };
        assert!(
            p.iter().any(|l| l.starts_with("FORK: chain c: seq 6")),
            "{p:?}"
        );

        // A stretch at seq 0 must start from genesis.
        let mut bad = Map::new();
        bad.insert("chain_id".into(), Value::from("e"));
        bad.insert("seq".into(), 0.into());
        bad.insert("prev_hash".into(), Value::from(line_hash("x")));
        let forged = seal(&bad, &k).unwrap();
        let g = write(dir.path(), "g", &[&forged]);
        assert!(verify_part(&g, &keys).is_err());
    }
}
