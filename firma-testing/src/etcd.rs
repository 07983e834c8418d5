//! A real etcd cluster (Debian `etcd-server`) on loopback ports, one process per member, each
//! with its own data dir; members can be killed (`kill -9`) and restarted on the same data.
//!
//! Members log at debug level (zap, JSON lines): etcd 3.4 logs its gRPC transport's errors
//! only then, among them `Got too many pings from the client`, the server side of the
//! `GOAWAY ENHANCE_YOUR_CALM "too_many_pings"` it sends a client that pings more often than
//! `--grpc-keepalive-min-time` (5 s) or at all on a connection without a stream. Every
//! member's log is kept, across kills and restarts, so a test can assert that no Firma etcd
//! client was ever cut off for it ([`EtcdCluster::assert_no_ping_abuse`]).

use crate::process::Process;
use crate::{eventually, free_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Process>,
}

/// A running cluster; every member is killed on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    /// Logs of member processes that were killed or replaced.
    past_logs: Vec<String>,
}

/// What etcd's gRPC transport logs when it closes a connection for pinging too often.
pub const TOO_MANY_PINGS: &str = "too many pings";

/// `etcd` on PATH, or why not (the caller skips with it).
pub fn available() -> Result<(), String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("`etcd` not found (apt-get install etcd-server)".into()),
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until a quorum answers.
    pub fn start(n: usize) -> Self {
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                process: None,
            })
            .collect();
        let mut c = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            token: crate::unique("firma-etcd"),
            members,
            past_logs: Vec::new(),
        };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    /// (Re)starts member `i` on its data dir.
    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Debug: the only level at which etcd 3.4 logs its gRPC transport's errors
            // (see the module doc). Quiet enough: about one line per request.
            .args(["--logger", "zap", "--log-level", "debug"])
            .env_remove("ETCDCTL_API");
        let p = Process::spawn(cmd).expect("spawn etcd (apt-get install etcd-server)");
        if let Some(old) = self.members[i].process.replace(p) {
            self.past_logs.push(old.log_text());
        }
    }

    /// `kill -9` member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
            self.past_logs.push(p.log_text());
        }
    }

    /// Every member's log so far, the killed and replaced processes' included.
    pub fn logs(&self) -> Vec<String> {
        let mut all = self.past_logs.clone();
        all.extend(
            self.members
                .iter()
                .filter_map(|m| m.process.as_ref().map(|p| p.log_text())),
        );
        all
    }

    /// Panics if any member ever closed a client's connection for pinging too often (etcd's
    /// `GOAWAY too_many_pings`): every Firma etcd client keeps its HTTP/2 pings within etcd's
    /// keep-alive policy (firma-common/src/anchor.rs, `connect_options`).
    pub fn assert_no_ping_abuse(&self) {
        let lines: Vec<String> = self
            .logs()
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains(TOO_MANY_PINGS))
            .map(str::to_owned)
            .collect();
        assert!(
            lines.is_empty(),
            "etcd closed client connections for pinging too often ({} times):\n{}",
            lines.len(),
            lines.join("\n")
        );
    }

    /// Client URLs of every member (dead or alive), for `endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The endpoints as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        format!("{:?}", self.endpoints())
    }

    /// `etcdctl` against the cluster.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(["--command-timeout=2s", "--dial-timeout=1s"])
            .args(args)
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }

    /// Waits until a linearizable read succeeds (a quorum is up).
    pub fn wait_healthy(&self, within: Duration) {
        let ok = eventually(within, "etcd quorum read", || {
            self.etcdctl(&["get", "--consistency=l", "/firma-health-probe"])
                .status
                .success()
        });
        if ok.is_err() {
            let logs: Vec<String> = self
                .members
                .iter()
                .filter_map(|m| m.process.as_ref().map(|p| p.log_text()))
                .collect();
            panic!(
                "etcd cluster not healthy within {within:?}:\n{}",
                logs.join("\n---\n")
            );
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
