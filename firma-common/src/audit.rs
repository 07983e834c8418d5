//! The signed, hash-chained audit line format, shared by the sidecar (which writes it), the
//! audit collector (which checks it on receipt) and `firma audit verify`.
//!
//! A line is one JSON object. Its last member is `"signature"`: Ed25519 over the exact bytes of
//! the line with that member removed (`{…body…}`), base64 (standard alphabet). Signing the
//! bytes rather than a re-serialised value means verification never depends on how a JSON
//! library orders keys or escapes strings.
//!
//! Every line also carries `chain_id`, `seq` (0, 1, 2, … within a chain) and `prev_hash`: the
//! hex SHA-256 of the previous line of the same chain (exactly as written, without the newline),
//! or [`GENESIS_HASH`] for `seq = 0`. An edited line fails its signature; a removed or reordered
//! line breaks the chain at the next line of that chain. Several chains may share one file (a
//! collector receiving from many sidecars); each is checked on its own. Limitation shared by
//! every hash chain: dropping the *last* lines of a chain is not detectable from the file alone.

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
    if body.contains_key("signature") {
        return Err(AuditLineError::BodyHasSignature);
    }
    if body.is_empty() {
        return Err(AuditLineError::Malformed("empty event".into()));
    }
    let text = serde_json::to_string(body).map_err(|e| AuditLineError::Malformed(e.to_string()))?;
    let sig = key.sign(text.as_bytes());
    let open = text.strip_suffix('}').unwrap_or(&text);
    let mut line = String::with_capacity(text.len() + 110);
    line.push_str(open);
    line.push_str(SIGNATURE_MEMBER);
    line.push_str(&B64.encode(sig.to_bytes()));
    line.push_str("\"}");
    Ok(line)
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

/// Checks the signature of one line against any of `keys` and returns the parsed body.
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

/// Walks lines in file order, checking each signature and each chain link.
pub struct ChainVerifier {
    keys: Vec<VerifyingKey>,
    /// chain id -> (seq, hash) of the last line seen.
    last: HashMap<String, (u64, String)>,
}

impl ChainVerifier {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self {
            keys,
            last: HashMap::new(),
        }
    }

    /// Checks the next line of the file.
    pub fn push(&mut self, line: &str) -> Result<Map<String, Value>, AuditLineError> {
        let body = verify_line(line, &self.keys)?;
        let pos = ChainPos::of(&body)?;
        let (expected_seq, expected_hash) = match self.last.get(&pos.chain_id) {
            Some((seq, hash)) => (seq + 1, hash.as_str()),
            None => (0, GENESIS_HASH),
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
        self.last.insert(pos.chain_id, (pos.seq, line_hash(line)));
        Ok(body)
    }

    /// Number of distinct chains seen.
    pub fn chains(&self) -> usize {
        self.last.len()
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
        Ok(())
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
        edited[2] = edited[2].replace("e2", "e9");
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
