//! The enforced program: who it runs as, what environment it gets, and how it starts inside
//! the cgroup (it writes itself into `cgroup.procs` between `fork` and `exec`, before it can
//! open a single socket, then drops privileges).

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The variables common clients read a CA bundle from: OpenSSL and everything built on it
/// (`SSL_CERT_FILE`: curl, Python `ssl`, Ruby, PHP, Go on Linux), Python `requests`, curl,
/// Node (added to its built-in roots), git, Deno, the AWS SDKs and CLI.
pub const CA_VARS: [&str; 7] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "DENO_CERT",
    "AWS_CA_BUNDLE",
];

/// Who the child runs as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<std::path::PathBuf>,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// `--user NAME|UID`, else the user who ran sudo (`SUDO_UID`), else root (firma's own).
    pub fn resolve(user: Option<&str>) -> anyhow::Result<Self> {
        use nix::unistd::{Gid, Uid, User};
        let spec = user
            .map(str::to_string)
            .or_else(|| std::env::var("SUDO_UID").ok().filter(|s| !s.is_empty()));
        let Some(spec) = spec else {
            return Ok(Self {
                uid: 0,
                gid: 0,
                groups: Vec::new(),
                name: Some("root".into()),
                home: None,
            });
        };
        let found = match spec.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid))
                .with_context(|| format!("looking up uid {uid}"))?
                .map(Ok)
                .unwrap_or(Err(uid)),
            Err(_) => {
                match User::from_name(&spec).with_context(|| format!("looking up user {spec:?}"))? {
                    Some(u) => Ok(u),
                    None => bail!("--user {spec:?}: no such user"),
                }
            }
        };
        Ok(match found {
            Ok(u) => {
                let cname = std::ffi::CString::new(u.name.clone())?;
                let groups = nix::unistd::getgrouplist(&cname, u.gid)
                    .map(|g| g.into_iter().map(Gid::as_raw).collect())
                    .unwrap_or_else(|_| vec![u.gid.as_raw()]);
                Self {
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                    groups,
                    name: Some(u.name),
                    home: Some(u.dir),
                }
            }
            // A numeric id with no passwd entry: run as it, its group from SUDO_GID or the same.
            Err(uid) => {
                let gid = std::env::var("SUDO_GID")
                    .ok()
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(uid);
                Self {
                    uid,
                    gid,
                    groups: vec![gid],
                    name: None,
                    home: None,
                }
            }
        })
    }
}

/// The child's environment: firma's, minus every proxy variable, with each credential
/// variable holding its placeholder instead of the secret the sidecar injects, plus the CA
/// bundle in [`CA_VARS`] (and the user's HOME/USER/LOGNAME after a drop).
pub fn environment(
    placeholders: &BTreeMap<String, String>,
    ca_bundle: &Path,
    who: &Identity,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let name = k.to_string_lossy();
            !name.to_ascii_lowercase().ends_with("_proxy")
                && !placeholders.contains_key(name.as_ref())
        })
        .filter(|(k, _)| !CA_VARS.iter().any(|v| k == v))
        .collect();
    for (var, value) in placeholders {
        env.push((var.into(), value.into()));
    }
    for v in CA_VARS {
        env.push((v.into(), ca_bundle.into()));
    }
    if !who.is_root() {
        let set = |env: &mut Vec<(OsString, OsString)>, k: &str, v: OsString| {
            env.retain(|(x, _)| x != k);
            env.push((k.into(), v));
        };
        if let Some(home) = &who.home {
            set(&mut env, "HOME", home.into());
        }
        if let Some(name) = &who.name {
            set(&mut env, "USER", name.into());
            set(&mut env, "LOGNAME", name.into());
        }
    }
    env
}

/// Spawns `argv` in the cgroup whose `cgroup.procs` is `procs`, as `who`, with `env`.
pub fn spawn(
    argv: &[OsString],
    env: Vec<(OsString, OsString)>,
    procs: &std::fs::File,
    who: &Identity,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .kill_on_drop(false);
    let fd = procs.as_raw_fd();
    let drop_to = (!who.is_root()).then(|| (who.uid, who.gid, who.groups.clone()));
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (write, setgroups, setgid, setuid) on values prepared before the fork; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process: this child, before it can open a socket.
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &drop_to
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}
