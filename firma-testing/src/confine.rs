//! The one way tests give a process names without DNS and a place in a tagged cgroup: a private
//! mount namespace with the test's hosts file (and, for the DNS tests, resolv.conf) bind-mounted
//! over /etc, joining the cgroup before the program starts. `unshare` and `sh` exec in place, so
//! the spawned child's pid is the program's own. Needs root; combine with
//! [`crate::kernel::in_fresh_netns`] so the names point only into the test's own namespace.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a hosts file at `path`: `localhost` plus one line per `(address, names)`.
pub fn hosts_file(path: &Path, entries: &[(IpAddr, &[&str])]) -> PathBuf {
    let mut text = String::from("127.0.0.1 localhost\n");
    for (addr, names) in entries {
        text.push_str(&format!("{addr} {}\n", names.join(" ")));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// What a confined command sees: its /etc/hosts, optionally its /etc/resolv.conf and cgroup.
#[derive(Clone, Debug)]
pub struct Confine {
    hosts: PathBuf,
    resolv: Option<PathBuf>,
    cgroup: Option<PathBuf>,
}

impl Confine {
    /// `hosts` becomes /etc/hosts.
    pub fn hosts(hosts: &Path) -> Self {
        Self {
            hosts: hosts.to_path_buf(),
            resolv: None,
            cgroup: None,
        }
    }

    /// `resolv` becomes /etc/resolv.conf.
    pub fn resolv(mut self, resolv: &Path) -> Self {
        self.resolv = Some(resolv.to_path_buf());
        self
    }

    /// The program joins the cgroup directory `dir` (its `cgroup.procs`) before it starts, so
    /// its very first connect is the tagged workload's.
    pub fn cgroup(mut self, dir: &Path) -> Self {
        self.cgroup = Some(dir.to_path_buf());
        self
    }

    /// As [`Confine::cgroup`] when `dir` is given.
    pub fn cgroup_opt(self, dir: Option<&Path>) -> Self {
        match dir {
            Some(d) => self.cgroup(d),
            None => self,
        }
    }

    /// The shell prefix that sets the mounts and joins the cgroup (for tests that compose their
    /// own `sh -c` script); end it with `&& exec …`.
    pub fn script_prefix(&self) -> String {
        let mut s = format!("mount --bind '{}' /etc/hosts", self.hosts.display());
        if let Some(r) = &self.resolv {
            s.push_str(&format!(
                " && mount --bind '{}' /etc/resolv.conf",
                r.display()
            ));
        }
        if let Some(cg) = &self.cgroup {
            s.push_str(&format!(" && echo $$ > '{}/cgroup.procs'", cg.display()));
        }
        s
    }

    /// `program` run confined; add its arguments, environment and stdio to the result.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{} && exec \"$@\"", self.script_prefix()))
            .arg("sh")
            .arg(program);
        c
    }
}
