//! The real binaries as child processes: `firma ARGS…` to completion, and long-running
//! processes whose stderr is captured line by line, with a readiness wait and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `firma` binary under test: `$FIRMA_BIN` when set, else `firma` in the cargo target
/// directory of the running executable (`target/<profile>/firma` next to `deps/`), which is the
/// one cargo has just built for `firma`'s integration tests.
pub fn firma_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FIRMA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("firma");
    assert!(
        bin.exists(),
        "no firma binary at {} (build it, or set FIRMA_BIN)",
        bin.display()
    );
    bin
}

/// `firma ARGS…` (the binary from [`firma_bin`]) as a command with a clean log environment.
pub fn firma_command(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

/// Runs `firma ARGS…` to completion.
pub fn firma(args: &[&str]) -> Output {
    firma_env(args, &[])
}

/// Runs `firma ARGS…` to completion with `envs`.
pub fn firma_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    firma_command(&firma_bin(), args)
        .envs(envs.iter().copied())
        .output()
        .expect("run firma")
}

/// A child process whose stderr is collected line by line; killed (by handle) on drop.
pub struct Process {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns `cmd` with stdout discarded and stderr captured.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        Ok(Self { child, log })
    }

    /// Waits until the log contains `marker`; an error (with the log) if the process exits or
    /// `timeout` passes first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(marker) {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early ({status}):\n{}", self.log_text()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {marker:?} within {timeout:?}:\n{}",
                    self.log_text()
                ));
            }
            // Poll interval of the wait for `marker`, bounded by `timeout`.
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The first word after `prefix` in the log, parsed (e.g. a listening address).
    pub fn logged<T: std::str::FromStr>(&self, prefix: &str) -> Option<T> {
        self.log_text()
            .split(prefix)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|w| w.parse().ok())
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM to our own child (by pid); waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            // Poll interval of the wait for the exit, bounded by `timeout`.
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills (by handle) and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
