//! A real WebSocket echo server and client (Python `websockets`, `tests/python/ws_echo/`).
//! Fails (never skips) when `websockets` is missing: CI installs it.

use crate::process::Process;
use crate::{repo_root, text};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn dir() -> PathBuf {
    repo_root().join("tests/python/ws_echo")
}

/// The running echo server (TLS, certificate for the given names from its own CA).
pub struct WsEcho {
    pub addr: SocketAddr,
    pub ca_path: PathBuf,
    sessions: PathBuf,
    pub process: Process,
}

impl WsEcho {
    pub fn start(tmp: &Path, names: &[&str], bind: SocketAddr) -> Self {
        let ca = crate::pki::TestCa::new("firma test WebSocket CA");
        let ca_path = ca.write_pem(&tmp.join("ws-ca.crt"));
        let leaf = ca.leaf(names);
        let (cert, key) = (tmp.join("ws.crt"), tmp.join("ws.key"));
        std::fs::write(&cert, leaf.cert.pem()).unwrap();
        std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
        let sessions = tmp.join("ws-sessions.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(dir().join("server.py"))
            .arg(bind.ip().to_string())
            .arg(&cert)
            .arg(&key)
            .arg(&sessions)
            .arg(bind.port().to_string());
        let mut process = Process::spawn(cmd).expect("spawn python3 WebSocket server");
        process
            .wait_for("LISTENING", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("WebSocket server (pip install websockets): {e}"));
        let port: u16 = process.logged("LISTENING ").expect("port");
        Self {
            addr: SocketAddr::new(bind.ip(), port),
            ca_path,
            sessions,
            process,
        }
    }

    /// Ended sessions: `{path, authorization, messages}` per line.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.sessions)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// `python3 client.py URL CA [PROXY]` arguments.
pub fn client_args(url: &str, ca: &Path, proxy: Option<&str>) -> Vec<String> {
    let mut a = vec![
        dir().join("client.py").display().to_string(),
        url.to_string(),
        ca.display().to_string(),
    ];
    a.extend(proxy.map(str::to_string));
    a
}

/// The client's JSON, or a panic with its output.
pub fn client_result(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "WebSocket client output is not JSON ({e}):\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}
