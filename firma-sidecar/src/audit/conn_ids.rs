//! Where connection ids continue after a restart: a resumed audit chain must not see
//! `conn.id` start at 1 again, or two connections of one chain would share an id.

use crate::config::{AuditConfig, AuditSink};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the file's end is scanned. Connections that wrote last are in it; an id that
/// only appears earlier belongs to a connection that ended long before the restart.
const SCAN: u64 = 1024 * 1024;

/// The first connection id to use: one past the largest `conn.id` near the end of the audit
/// file (file sink), else 1.
pub fn next_conn_id(cfg: &AuditConfig) -> u64 {
    match (cfg.sink, &cfg.path) {
        (AuditSink::File, Some(path)) => largest_conn_id(path).map_or(1, |id| id + 1),
        _ => 1,
    }
}

fn largest_conn_id(path: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(SCAN);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.lines();
    if start > 0 {
        lines.next(); // begins mid-line
    }
    lines
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("conn")?.get("id")?.as_u64())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_after_the_largest_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            "{\"conn\":{\"id\":7}}\n{\"conn\":{\"id\":12}}\n{\"conn\":{\"id\":9}}\n{\"event\":\"recovery\"}\n",
        )
        .unwrap();
        let cfg = AuditConfig {
            sink: AuditSink::File,
            path: Some(path),
            ..AuditConfig::default()
        };
        assert_eq!(next_conn_id(&cfg), 13);
        let none = AuditConfig {
            sink: AuditSink::File,
            path: Some(dir.path().join("missing")),
            ..AuditConfig::default()
        };
        assert_eq!(next_conn_id(&none), 1);
    }
}
