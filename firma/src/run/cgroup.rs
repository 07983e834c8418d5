//! The run's transient cgroup: created empty under the cgroup2 mount, the child joins it
//! before `exec`, and everything left in it is killed and the directory removed at the end.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct TransientCgroup {
    pub dir: PathBuf,
}

impl TransientCgroup {
    /// Creates `<cgroup2 mount>/<name>`; refuses an existing one (names are unique per run).
    pub fn create(mount: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = mount.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// `cgroup.procs`, opened for the child to write itself into (permission is checked with
    /// the opener's credentials, so the child may drop privileges after opening).
    pub fn procs_file(&self) -> anyhow::Result<std::fs::File> {
        let p = self.dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    fn populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(t) => t.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => !self.pids().is_empty(),
        }
    }

    /// Kills every process left in the cgroup (what the child left running) and waits until
    /// it is empty: `cgroup.kill` where the kernel has it (5.14+), else SIGKILL per pid.
    pub fn kill_all(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.populated() && Instant::now() < deadline {
            if std::fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
                for pid in self.pids() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills what is left and removes the directory (the kernel drops its BPF links with it).
    pub fn remove(&self) -> Result<(), String> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.kill_all(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot remove cgroup {}: {e}", self.dir.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
