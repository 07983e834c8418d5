//! The hash-chained, batch-signed audit line format, shared by the sidecar (which writes it),
//! the audit collector (which checks it on receipt) and `firma audit verify`.
//!
//! A line is one JSON object carrying `chain_id`, `seq` (0, 1, 2, … within a chain) and
//! `prev_hash`: the hex SHA-256 of the previous line of the same chain (exactly as written,
//! without the newline), or [`GENESIS_HASH`] for `seq = 0`.
//!
//! Signatures are per batch, not per line: the writer signs the **last line of every batch it
//! writes** (one group commit), and that line's last member is `"signature"`: Ed25519 over the
//! exact bytes of the line with that member removed (`{…body…}`), base64 (standard alphabet).
//! The other lines carry no signature; each is covered by the next signed line of its chain,
//! whose signed body contains `prev_hash`, which fixes the previous line's bytes, whose
//! `prev_hash` fixes the one before, back to the previous signature. So one signature proves
//! every line since the last one, and verification proves what per-line signatures proved: an
//! edited line fails its own signature or breaks the link after it; a removed or reordered line
//! breaks the chain at the next line of that chain; a line appended without the key is not
//! covered by any signature ([`ChainVerifier::finish`] refuses it). Signing the bytes rather
//! than a re-serialised value means verification never depends on how a JSON library orders
//! keys or escapes strings. Several chains may share one file (a collector receiving from many
//! sidecars); each is checked on its own. Limitation shared by every hash chain: dropping the
//! *last* batches of a chain (down to a signed line) is not detectable from the file alone.

use crate::keys::{SigningKey, VerifyingKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, Verifier};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// `prev_hash` of the first event of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The member every signed line ends with.
const SIGNATURE_MEMBER: &str = ",\"signature\":\"";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditLineError {
    #[error("not a JSON object: {0}")]
    Malformed(String),
    #[error("no trailing \"signature\" member")]
    Unsigned,
    #[error("event body must not contain a \"signature\" member")]
    BodyHasSignature,
    #[error("signature is not valid base64 Ed25519: {0}")]
    BadSignatureEncoding(String),
    #[error("signature does not verify with any given public key")]
    BadSignature,
    #[error("missing or invalid chain field `{0}`")]
    MissingChainField(&'static str),
    #[error(
        "chain {chain_id} broken at seq {seq}: prev_hash {found} but the previous line hashes to {expected}"
    )]
    ChainBroken {
        chain_id: String,
        seq: u64,
        expected: String,
        found: String,
    },
    #[error(
        "chain {chain_id}: the last {count} line(s) (from seq {first_seq}) are not covered by a signature (a Firma writer ends every batch with a signed line: appended without the key, or the signed line was removed)"
    )]
    Uncovered {
        chain_id: String,
        count: u64,
        first_seq: u64,
    },
    #[error(
        "chain {chain_id}: seq {found} comes again after seq {last} (a line repeated or reordered; a collector writes each seq of a chain once)"
    )]
    SeqRepeated {
        chain_id: String,
        last: u64,
        found: u64,
    },
    #[error("chain {chain_id}: expected seq {expected}, found {found} (line removed or reordered)")]
    SeqGap {
        chain_id: String,
        expected: u64,
        found: u64,
    },
}

/// Hex SHA-256 of one line as written (no trailing newline).
pub fn line_hash(line: &str) -> String {
    hex::encode(Sha256::digest(
        line.trim_end_matches(['\n', '\r']).as_bytes(),
    ))
}

/// Short identifier of a public key (first 16 hex digits of its SHA-256), recorded in every
/// event so a verifier holding several keys knows which one signed it.
pub fn key_id(key: &VerifyingKey) -> String {
    let mut h = hex::encode(Sha256::digest(key.as_bytes()));
    h.truncate(16);
    h
}

/// Serialises `body` and appends the signature member. `body` must be non-empty and must not
/// contain `signature`.
pub fn seal(body: &Map<String, Value>, key: &SigningKey) -> Result<String, AuditLineError> {
    let text = unsigned_line(body)?;
    Ok(sign_line(text, key))
}

/// Serialises `body` as a line without a signature (covered by a later signed line of its
/// chain). Same preconditions as [`seal`].
pub fn unsigned_line(body: &Map<String, Value>) -> Result<String, AuditLineError> {
    if body.contains_key("signature") {
        return Err(AuditLineError::BodyHasSignature);
    }
    if body.is_empty() {
        return Err(AuditLineError::Malformed("empty event".into()));
    }
    serde_json::to_string(body).map_err(|e| AuditLineError::Malformed(e.to_string()))
}

/// Appends the signature member to an unsigned line made by [`unsigned_line`].
pub fn sign_line(text: String, key: &SigningKey) -> String {
    let sig = key.sign(text.as_bytes());
    let open = text.strip_suffix('}').unwrap_or(&text);
    let mut line = String::with_capacity(text.len() + 110);
    line.push_str(open);
    line.push_str(SIGNATURE_MEMBER);
    line.push_str(&B64.encode(sig.to_bytes()));
    line.push_str("\"}");
    line
}

/// Whether `line` ends with a top-level signature member (it may still fail to verify). A
/// member of that name inside a nested value is followed by more quoted text, so it is not one.
pub fn is_signed(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line.strip_suffix("\"}").is_some_and(|inner| {
        inner
            .rfind(SIGNATURE_MEMBER)
            .is_some_and(|at| !inner[at + SIGNATURE_MEMBER.len()..].contains('"'))
    })
}

/// Parses a line that carries no signature (its body is the whole line).
fn parse_unsigned(line: &str) -> Result<Map<String, Value>, AuditLineError> {
    match serde_json::from_str::<Value>(line.trim_end_matches(['\n', '\r'])) {
        Ok(Value::Object(m)) if m.contains_key("signature") => Err(AuditLineError::Unsigned),
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(AuditLineError::Malformed("not an object".into())),
        Err(e) => Err(AuditLineError::Malformed(e.to_string())),
    }
}

/// Splits a line into the signed body text and the signature.
fn split(line: &str) -> Result<(String, Signature), AuditLineError> {
    let line = line.trim_end_matches(['\n', '\r']);
    let inner = line.strip_suffix("\"}").ok_or(AuditLineError::Unsigned)?;
    let at = inner
        .rfind(SIGNATURE_MEMBER)
        .ok_or(AuditLineError::Unsigned)?;
    let sig_b64 = &inner[at + SIGNATURE_MEMBER.len()..];
    let bytes = B64
        .decode(sig_b64)
        .map_err(|e| AuditLineError::BadSignatureEncoding(e.to_string()))?;
    let sig = Signature::from_slice(&bytes)
        .map_err(|e| AuditLineError::BadSignatureEncoding(e.to_string()))?;
    let mut body = String::with_capacity(at + 1);
    body.push_str(&inner[..at]);
    body.push('}');
    Ok((body, sig))
}

/// Checks the signature of one signed line against any of `keys` and returns the parsed body
/// (an unsigned line is [`AuditLineError::Unsigned`]).
pub fn verify_line(
    line: &str,
    keys: &[VerifyingKey],
) -> Result<Map<String, Value>, AuditLineError> {
    let (body, sig) = split(line)?;
    if !keys.iter().any(|k| k.verify(body.as_bytes(), &sig).is_ok()) {
        return Err(AuditLineError::BadSignature);
    }
    match serde_json::from_str::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(AuditLineError::Malformed("not an object".into())),
        Err(e) => Err(AuditLineError::Malformed(e.to_string())),
    }
}

/// The chain position a line claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPos {
    pub chain_id: String,
    pub seq: u64,
    pub prev_hash: String,
}

impl ChainPos {
    /// Reads `chain_id`, `seq` and `prev_hash` from an event body.
    pub fn of(body: &Map<String, Value>) -> Result<Self, AuditLineError> {
        let s = |k: &'static str| {
            body.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(AuditLineError::MissingChainField(k))
        };
        Ok(Self {
            chain_id: s("chain_id")?,
            seq: body
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or(AuditLineError::MissingChainField("seq"))?,
            prev_hash: s("prev_hash")?,
        })
    }
}

/// Where a chain stands in a verification walk.
#[derive(Debug)]
struct ChainState {
    seq: u64,
    hash: String,
    /// Lines since the last signed one (not yet covered by a signature).
    uncovered: u64,
}

/// Walks lines in file order, checking each signature and each chain link; [`Self::finish`]
/// then checks that every line is covered by a signature.
pub struct ChainVerifier {
    keys: Vec<VerifyingKey>,
    last: HashMap<String, ChainState>,
    signatures: u64,
}

impl ChainVerifier {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self {
            keys,
            last: HashMap::new(),
            signatures: 0,
        }
    }

    /// Checks the next line of the file: its signature if it has one, its chain link always.
    pub fn push(&mut self, line: &str) -> Result<Map<String, Value>, AuditLineError> {
        let (signed, body, pos) = self.read(line)?;
        self.link(line, signed, pos)?;
        Ok(body)
    }

    /// Like [`Self::push`], but a *signed* line of a chain not seen yet may continue that chain
    /// from an earlier file instead of starting it (seq 0): the first line of a rotated-into
    /// file ([`crate::audit_files`]). Its signature proves where the chain stood; whether the
    /// earlier files are all there is for the caller to check.
    pub fn push_anchor(&mut self, line: &str) -> Result<Map<String, Value>, AuditLineError> {
        if !is_signed(line) {
            return self.push(line);
        }
        let (signed, body, pos) = self.read(line)?;
        if self.last.contains_key(&pos.chain_id) {
            self.link(line, signed, pos)?;
        } else {
            self.record(pos, line, true, 0);
        }
        Ok(body)
    }

    /// Like [`Self::push`], for a file that holds *stretches* of chains (an audit collector
    /// replica's file, docs/scale-out.md): a line may start a new stretch of its chain at a
    /// higher seq than the next one expected. A stretch's first line is taken with the
    /// `prev_hash` it states (seq 0 must state [`GENESIS_HASH`]); every later line must link to
    /// the one before; the stretch before must end with a signed line. A seq not above the
    /// chain's last one is [`AuditLineError::SeqRepeated`]. Returns the body and whether the
    /// line started a stretch.
    pub fn push_stretch(
        &mut self,
        line: &str,
    ) -> Result<(Map<String, Value>, bool), AuditLineError> {
        let (signed, body, pos) = self.read(line)?;
        match self.last.get(&pos.chain_id) {
            Some(c) if pos.seq <= c.seq => {
                return Err(AuditLineError::SeqRepeated {
                    last: c.seq,
                    found: pos.seq,
                    chain_id: pos.chain_id,
                });
            }
            Some(c) if pos.seq == c.seq + 1 => {
                self.link(line, signed, pos)?;
                return Ok((body, false));
            }
            Some(c) if c.uncovered > 0 => {
                return Err(AuditLineError::Uncovered {
                    count: c.uncovered,
                    first_seq: c.seq + 1 - c.uncovered,
                    chain_id: pos.chain_id,
                });
            }
            _ => {}
        }
        if pos.seq == 0 && pos.prev_hash != GENESIS_HASH {
            return Err(AuditLineError::ChainBroken {
                chain_id: pos.chain_id,
                seq: 0,
                expected: GENESIS_HASH.to_owned(),
                found: pos.prev_hash,
            });
        }
        self.record(pos, line, signed, u64::from(!signed));
        Ok((body, true))
    }

    /// Parses a line, checking its signature if it has one: whether it is signed, its body and
    /// the chain position it claims.
    fn read(&self, line: &str) -> Result<(bool, Map<String, Value>, ChainPos), AuditLineError> {
        let signed = is_signed(line);
        let body = if signed {
            verify_line(line, &self.keys)?
        } else {
            parse_unsigned(line)?
        };
        let pos = ChainPos::of(&body)?;
        Ok((signed, body, pos))
    }

    /// The one chain check: `pos` must be the next seq of its chain (0 for a chain not seen
    /// yet) and name the previous line's hash ([`GENESIS_HASH`] at seq 0); then it is recorded.
    fn link(&mut self, line: &str, signed: bool, pos: ChainPos) -> Result<(), AuditLineError> {
        let (expected_seq, expected_hash, uncovered) = match self.last.get(&pos.chain_id) {
            Some(c) => (c.seq + 1, c.hash.as_str(), c.uncovered),
            None => (0, GENESIS_HASH, 0),
        };
        if pos.seq != expected_seq {
            return Err(AuditLineError::SeqGap {
                chain_id: pos.chain_id,
                expected: expected_seq,
                found: pos.seq,
            });
        }
        if pos.prev_hash != expected_hash {
            return Err(AuditLineError::ChainBroken {
                chain_id: pos.chain_id,
                seq: pos.seq,
                expected: expected_hash.to_owned(),
                found: pos.prev_hash,
            });
        }
        let uncovered = if signed { 0 } else { uncovered + 1 };
        self.record(pos, line, signed, uncovered);
        Ok(())
    }

    /// Records `line` as where its chain now stands, `uncovered` lines not yet under a
    /// signature.
    fn record(&mut self, pos: ChainPos, line: &str, signed: bool, uncovered: u64) {
        if signed {
            self.signatures += 1;
        }
        self.last.insert(
            pos.chain_id,
            ChainState {
                seq: pos.seq,
                hash: line_hash(line),
                uncovered,
            },
        );
    }

    /// After the last line: every chain must end with a signed line, or its trailing lines are
    /// proven by nothing (a sidecar always ends a batch with a signed line; see
    /// docs/architecture.md, audit).
    pub fn finish(&self) -> Result<(), AuditLineError> {
        let mut open: Vec<_> = self.last.iter().filter(|(_, c)| c.uncovered > 0).collect();
        open.sort_by(|a, b| a.0.cmp(b.0));
        match open.first() {
            None => Ok(()),
            Some((chain_id, c)) => Err(AuditLineError::Uncovered {
                chain_id: (*chain_id).clone(),
                count: c.uncovered,
                first_seq: c.seq + 1 - c.uncovered,
            }),
        }
    }

    /// Number of distinct chains seen.
    pub fn chains(&self) -> usize {
        self.last.len()
    }

    /// Signed lines seen.
    pub fn signatures(&self) -> u64 {
        self.signatures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    fn body(chain: &str, seq: u64, prev: &str, text: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("chain_id".into(), chain.into());
        m.insert("seq".into(), seq.into());
        m.insert("prev_hash".into(), prev.into());
        m.insert("text".into(), text.into());
        m
    }

    fn chain(k: &SigningKey, n: u64) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (0..n)
            .map(|i| {
                let l = seal(&body("c", i, &prev, &format!("e{i}")), k).unwrap();
                prev = line_hash(&l);
                l
            })
            .collect()
    }

    fn check(k: &SigningKey, lines: &[String]) -> Result<(), (usize, AuditLineError)> {
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for (i, l) in lines.iter().enumerate() {
            v.push(l).map_err(|e| (i, e))?;
        }
        v.finish().map_err(|e| (lines.len(), e))
    }

    /// Lines in batches of `batch`: only the last line of each batch is signed.
    fn batched(k: &SigningKey, n: u64, batch: u64) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (0..n)
            .map(|i| {
                let b = body("c", i, &prev, &format!("e{i}"));
                let l = if (i + 1) % batch == 0 || i + 1 == n {
                    seal(&b, k).unwrap()
                } else {
                    unsigned_line(&b).unwrap()
                };
                prev = line_hash(&l);
                l
            })
            .collect()
    }

    #[test]
    fn one_signature_per_batch_covers_every_line() {
        let k = key();
        let lines = batched(&k, 7, 3);
        let signed: Vec<bool> = lines.iter().map(|l| is_signed(l)).collect();
        assert_eq!(signed, [false, false, true, false, false, true, true]);
        check(&k, &lines).unwrap();
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for l in &lines {
            v.push(l).unwrap();
        }
        assert_eq!(v.signatures(), 3);

        // An unsigned line edited: the link after it breaks.
        let mut edited = lines.clone();
        edited[3] = edited[3].replace("\"e3\"", "\"e9\""); // quoted: a hash may hold `e3`
        assert!(matches!(
            check(&k, &edited).unwrap_err(),
            (4, AuditLineError::ChainBroken { .. })
        ));
        // ...and re-linking the next unsigned line only moves the break to the signed one.
        let mut relinked = edited.clone();
        relinked[4] = relinked[4].replace(&line_hash(&lines[3]), &line_hash(&edited[3]));
        assert_eq!(check(&k, &relinked).unwrap_err().0, 5);
        // Removed and reordered unsigned lines.
        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(check(&k, &removed).unwrap_err().0, 1);
        let mut reordered = lines.clone();
        reordered.swap(0, 1);
        assert_eq!(check(&k, &reordered).unwrap_err().0, 0);
        // The signed line removed (or lines appended without the key): the tail is uncovered.
        let mut unsigned_tail = lines.clone();
        unsigned_tail.truncate(5);
        assert_eq!(
            check(&k, &unsigned_tail).unwrap_err(),
            (
                5,
                AuditLineError::Uncovered {
                    chain_id: "c".into(),
                    count: 2,
                    first_seq: 3
                }
            )
        );
        let mut appended = lines.clone();
        appended.push(unsigned_line(&body("c", 7, &line_hash(&lines[6]), "forged")).unwrap());
        assert!(matches!(
            check(&k, &appended).unwrap_err(),
            (8, AuditLineError::Uncovered { count: 1, .. })
        ));
    }

    #[test]
    fn good_chain_verifies_and_parses() {
        let k = key();
        let lines = chain(&k, 4);
        assert!(lines[0].ends_with("\"}"));
        assert!(serde_json::from_str::<Value>(&lines[0]).unwrap()["signature"].is_string());
        check(&k, &lines).unwrap();
    }

    #[test]
    fn edit_removal_reorder_and_other_key_detected() {
        let k = key();
        let lines = chain(&k, 4);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"e2\"", "\"e9\""); // quoted: a hash may hold `e2`
        assert_eq!(
            check(&k, &edited).unwrap_err(),
            (2, AuditLineError::BadSignature)
        );
        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(check(&k, &removed).unwrap_err().0, 1);
        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert_eq!(check(&k, &reordered).unwrap_err().0, 1);
        let mut first_removed = lines.clone();
        first_removed.remove(0);
        assert_eq!(check(&k, &first_removed).unwrap_err().0, 0);
        assert_eq!(
            check(&key(), &lines).unwrap_err(),
            (0, AuditLineError::BadSignature)
        );
    }

    #[test]
    fn body_with_signature_refused_and_unsigned_detected() {
        let k = key();
        let mut b = Map::new();
        b.insert("signature".into(), "x".into());
        assert_eq!(seal(&b, &k).unwrap_err(), AuditLineError::BodyHasSignature);
        assert_eq!(
            verify_line("{\"a\":1}", &[k.verifying_key()]).unwrap_err(),
            AuditLineError::Unsigned
        );
        assert!(seal(&Map::new(), &k).is_err());
    }
}
