//! Chaining and signing: turns event bodies into chained lines, the last of each batch signed
//! (format in [`firma_common::audit`]), and resumes a file's chain after a restart.

use firma_common::audit::{AuditLineError, ChainPos, GENESIS_HASH, key_id, line_hash, sign_line};
use firma_common::keys::SigningKey;
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Appends chain members to bodies and signs them, one chain per writer.
pub struct Sealer {
    key: SigningKey,
    key_id: String,
    chain_id: String,
    next_seq: u64,
    prev_hash: String,
    /// `,"chain_id":"…","key_id":"…","seq":` (the members that do not change per line).
    members: String,
}

impl Sealer {
    /// A new chain (`seq` 0, genesis `prev_hash`).
    pub fn new(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        let mut s = Self {
            key,
            key_id,
            chain_id: uuid::Uuid::new_v4().to_string(),
            next_seq: 0,
            prev_hash: GENESIS_HASH.to_owned(),
            members: String::new(),
        };
        s.set_members();
        s
    }

    fn set_members(&mut self) {
        self.members = format!(
            ",\"chain_id\":{},\"key_id\":{},\"seq\":",
            Value::from(self.chain_id.as_str()),
            Value::from(self.key_id.as_str())
        );
    }

    /// Continues the chain whose last line is `last_line`.
    pub fn resume(key: SigningKey, last_line: &str) -> Result<Self, AuditLineError> {
        let body: Map<String, Value> = match serde_json::from_str(last_line) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(AuditLineError::Malformed("not an object".into())),
            Err(e) => return Err(AuditLineError::Malformed(e.to_string())),
        };
        let pos = ChainPos::of(&body)?;
        let mut s = Self::new(key);
        s.chain_id = pos.chain_id;
        s.next_seq = pos.seq + 1;
        s.prev_hash = line_hash(last_line);
        s.set_members();
        Ok(s)
    }

    /// Chains and signs `body` (one JSON object's text), returning the line (no newline).
    pub fn seal(&mut self, body: String) -> Result<String, AuditLineError> {
        self.chain(body, true)
    }

    /// Chains `body` (one JSON object's text without chain members or signature); signs it
    /// only when `sign` (the last line of a batch: its signature covers every line since the
    /// previous signature through the hash chain). The members are appended to the text as
    /// it is: the hash and signature cover the exact bytes written, and readers parse the
    /// line, so member order does not matter.
    pub fn chain(&mut self, body: String, sign: bool) -> Result<String, AuditLineError> {
        let inner = body
            .trim_end()
            .strip_prefix('{')
            .and_then(|b| b.strip_suffix('}'))
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| {
                AuditLineError::Malformed("an event body must be a non-empty JSON object".into())
            })?;
        let mut line = String::with_capacity(body.len() + self.members.len() + 100);
        line.push('{');
        line.push_str(inner);
        line.push_str(&self.members);
        let _ = write!(line, "{}", self.next_seq);
        line.push_str(",\"prev_hash\":\"");
        line.push_str(&self.prev_hash);
        line.push_str("\"}");
        if sign {
            line = sign_line(line, &self.key);
        }
        self.prev_hash = line_hash(&line);
        self.next_seq += 1;
        Ok(line)
    }

    /// Where the chain stands, to return to with [`Self::rollback`] when sealed lines could not
    /// be persisted: the next line then takes their place, so the chain has no gap.
    pub fn position(&self) -> (u64, String) {
        (self.next_seq, self.prev_hash.clone())
    }

    pub fn rollback(&mut self, (next_seq, prev_hash): (u64, String)) {
        self.next_seq = next_seq;
        self.prev_hash = prev_hash;
    }

    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// The tail of a file: its last complete line, and whether the file ends mid-line (a torn
/// write; the writer then starts on a fresh line).
pub struct Tail {
    pub last_line: Option<String>,
    pub torn: bool,
}

/// Reads backwards from the end of `path` until a complete line is found.
pub fn read_tail(path: &Path) -> std::io::Result<Tail> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Tail {
                last_line: None,
                torn: false,
            });
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.by_ref().take(len - start).read_to_end(&mut buf)?;
        let torn = buf.last().is_some_and(|b| *b != b'\n');
        let complete = match buf.iter().rposition(|b| *b == b'\n') {
            Some(end) => &buf[..end],
            None if start == 0 => {
                return Ok(Tail {
                    last_line: None,
                    torn,
                });
            }
            None => {
                window = window.saturating_mul(4);
                continue;
            }
        };
        match complete.iter().rposition(|b| *b == b'\n') {
            Some(nl) => {
                return Ok(Tail {
                    last_line: Some(String::from_utf8_lossy(&complete[nl + 1..]).into_owned()),
                    torn,
                });
            }
            None if start == 0 => {
                return Ok(Tail {
                    last_line: Some(String::from_utf8_lossy(complete).into_owned()),
                    torn,
                });
            }
            None => window = window.saturating_mul(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firma_common::audit::ChainVerifier;

    fn body(n: u64) -> String {
        format!("{{\"n\":{n}}}")
    }

    #[test]
    fn resume_continues_the_chain() {
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut s = Sealer::new(k.clone());
        let a = s.seal(body(0)).unwrap();
        let b = s.seal(body(1)).unwrap();
        let mut s2 = Sealer::resume(k.clone(), &b).unwrap();
        let c = s2.seal(body(2)).unwrap();
        let mut v = ChainVerifier::new(vec![k.verifying_key()]);
        for l in [&a, &b, &c] {
            v.push(l).unwrap();
        }
        assert_eq!(s2.next_seq(), 3);
    }

    #[test]
    fn tail_finds_last_complete_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        assert!(read_tail(&p).unwrap().last_line.is_none());
        let long = "x".repeat(200_000);
        std::fs::write(&p, format!("first\n{long}\n")).unwrap();
        let t = read_tail(&p).unwrap();
        assert_eq!(t.last_line.as_deref(), Some(long.as_str()));
        assert!(!t.torn);
        std::fs::write(&p, "first\nsecond\nthi").unwrap();
        let t = read_tail(&p).unwrap();
        assert_eq!(t.last_line.as_deref(), Some("second"));
        assert!(t.torn);
        std::fs::write(&p, "only\n").unwrap();
        assert_eq!(read_tail(&p).unwrap().last_line.as_deref(), Some("only"));
    }
}
