//! A real `redis-server` (Debian package `redis-server`) on a free loopback port, for the shared
//! session store: started, killed (`kill -9`) and restarted on the same port and data directory
//! (append-only file with `fsync` on every write, so counts survive a kill), and read through
//! `redis-cli`.

use crate::{assert_eventually, free_port, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `Some(reason)` when `redis-server` or `redis-cli` is not installed.
pub fn skip_reason() -> Option<String> {
    for bin in ["redis-server", "redis-cli"] {
        if Command::new(bin).arg("--version").output().is_err() {
            return Some(format!(
                "`{bin}` not installed (apt-get install redis-server)"
            ));
        }
    }
    None
}

/// A running `redis-server`; killed on drop.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server on `127.0.0.1:<free port>` keeping its data in `dir`.
    pub fn start(dir: &Path) -> Self {
        let mut r = Self {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and data, and waits until it answers `PING`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        std::fs::create_dir_all(&self.dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        assert_eventually(Duration::from_secs(20), "redis-server answers PING", || {
            self.try_cli(&["PING"]).is_some_and(|o| o == "PONG")
        });
    }

    /// `kill -9` and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let s = text(&out.stdout).trim().to_string();
        (out.status.success() && !s.starts_with("Could not connect")).then_some(s)
    }

    /// `redis-cli ARGS…`'s output, trimmed; panics when the server cannot be reached.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// An integer field of a hash (0 when absent).
    pub fn hget_i64(&self, key: &str, field: &str) -> i64 {
        self.cli(&["HGET", key, field]).parse().unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
