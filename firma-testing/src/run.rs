//! `firma run` worlds for black-box tests: the local HTTPS upstream at [`DST_V4`]:443 posing
//! as the given host names, a hosts file bind-mounted over /etc/hosts in a private mount
//! namespace that `firma run` and its child share, and a fresh state directory. Call inside
//! [`crate::kernel::in_fresh_netns`]: nothing reaches a real address.

use crate::kernel::DST_V4;
use crate::upstream::Upstream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct RunWorld {
    pub up: Upstream,
    pub hosts: PathBuf,
    pub state: PathBuf,
    pub dir: tempfile::TempDir,
}

impl RunWorld {
    /// The upstream serves `names` (certificate SANs) and the hosts file points them at it.
    pub fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Readable by an unprivileged child; the keys inside stay 0600.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let up = Upstream::start_at(dir.path(), names, format!("{DST_V4}:443").parse().unwrap());
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1 localhost\n::1 localhost\n{DST_V4} {}\n",
                names.join(" ")
            ),
        )
        .unwrap();
        let state = dir.path().join("state");
        Self {
            up,
            hosts,
            state,
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `firma run --state-dir S --upstream-ca U FIRMA_ARGS… -- CMD…` inside a private mount
    /// namespace with the hosts file (unshare and sh exec in place: the pid is firma's).
    /// `RUST_LOG` and `SUDO_UID` are removed from its environment.
    pub fn command(&self, firma_args: &[&str], cmd: &[&str]) -> Command {
        let mut c = crate::confine::Confine::hosts(&self.hosts).command(crate::firma_bin());
        c.arg("run")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--upstream-ca")
            .arg(&self.up.ca_path)
            // Debug builds on a loaded CI machine: see TEST_CONSTRAINT_ENFORCEMENT.
            .arg("--enforcement-timeout-ms")
            .arg(crate::config::TEST_CONSTRAINT_ENFORCEMENT.1.to_string())
            .args(firma_args)
            .arg("--")
            .args(cmd)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("SUDO_UID");
        c
    }

    /// The `decision` events of an audit file.
    pub fn decisions(&self, file: &Path) -> Vec<serde_json::Value> {
        crate::audit::lines(file)
            .iter()
            .map(|l| crate::audit::json(l))
            .filter(|e| e["event"] == "decision")
            .collect()
    }
}

/// Exit code, stdout and stderr of a run, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        crate::text(&out.stdout),
        crate::text(&out.stderr)
    )
}
