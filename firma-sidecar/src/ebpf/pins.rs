//! Will the pins outlive the sidecar? Transparent mode is fail-closed only because the pinned
//! links keep redirecting tagged connects to a dead listener after a crash. A pin lives as long
//! as its bpffs instance is mounted somewhere; a bpffs mounted inside a private mount namespace
//! (`unshare --mount`, a systemd unit with `PrivateMounts=`, a container without the host's
//! `/sys/fs/bpf`) is unmounted when the last process in that namespace exits, the links are
//! released, and tagged traffic goes direct, unaudited.
//!
//! The check: the bpffs holding `pin_dir` (found by `st_dev`, which is the `major:minor` of its
//! mountinfo line) must also be mounted in PID 1's mount namespace (`/proc/1/mountinfo`), which
//! lives as long as the machine, or, inside a container's own PID namespace, as long as the
//! container (its PID 1 is the container's init and the host's mounts are invisible from here):
//! there the check proves the pins outlive this process only, so it passes with a warning, and
//! a bpffs the sidecar had to mount itself inside the container is refused as ephemeral.

use super::cgroup::find_mounts;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Inode of the initial PID namespace (`PROC_PID_INIT_INO` in the kernel).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Whether pins under a directory survive the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// On a bpffs that PID 1's mount namespace holds, in the initial PID namespace.
    Durable { mount: PathBuf },
    /// As `Durable`, but PID 1 is a container's init: the pins outlive this process, and the
    /// container only if this bpffs is the host's (bind-mounted in); that cannot be seen here.
    ContainerScoped { mount: PathBuf },
    /// Dies with this process's mount namespace; `detail` says why and what to do.
    Ephemeral { detail: String },
}

/// A bpffs line of a mountinfo file: `major:minor` and mount point.
fn bpf_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "bpf").then_some(())?;
            let dev = pre.split_whitespace().nth(2)?.to_string();
            let point = find_mounts(line, "bpf").into_iter().next()?;
            Some((dev, point))
        })
        .collect()
}

/// `major:minor` as mountinfo prints it.
fn dev_string(dev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// Classifies `dev` (the `st_dev` of `pin_dir`) from both mountinfo texts. `init_mountinfo`
/// is `Err` when `/proc/1/mountinfo` could not be read.
pub fn classify(
    pin_dir: &Path,
    dev: u64,
    self_mountinfo: &str,
    init_mountinfo: Result<&str, String>,
    initial_pid_ns: bool,
) -> Durability {
    let dev = dev_string(dev);
    let Some((_, mount)) = bpf_mounts(self_mountinfo)
        .into_iter()
        .find(|(d, _)| *d == dev)
    else {
        return Durability::Ephemeral {
            detail: format!(
                "pin_dir {} is not on a bpffs (device {dev}); pins there would not outlive the sidecar",
                pin_dir.display()
            ),
        };
    };
    let init = match init_mountinfo {
        Ok(text) => text,
        Err(e) => {
            return Durability::Ephemeral {
                detail: format!(
                    "cannot tell whether the bpffs at {} holding pin_dir {} outlives the sidecar: /proc/1/mountinfo: {e}",
                    mount.display(),
                    pin_dir.display()
                ),
            };
        }
    };
    if bpf_mounts(init).iter().any(|(d, _)| *d == dev) {
        return if initial_pid_ns {
            Durability::Durable { mount }
        } else {
            Durability::ContainerScoped { mount }
        };
    }
    Durability::Ephemeral {
        detail: format!(
            "pin_dir {} is on a bpffs mounted at {} (device {dev}) that only this process's mount namespace has (not PID 1's): it was mounted in a private mount namespace (unshare --mount, systemd PrivateMounts=, a container) and disappears with this process, and with it the pinned programs: after a crash tagged workloads would connect directly, unaudited. Run the sidecar in the host's mount namespace with bpffs mounted there (`mount -t bpf bpf /sys/fs/bpf`), or bind-mount the host's /sys/fs/bpf into its namespace",
            pin_dir.display(),
            mount.display()
        ),
    }
}

/// Whether this process is in the initial PID namespace (`None` if unknown).
pub fn in_initial_pid_ns() -> Option<bool> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let ino: u64 = link
        .to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?
        .parse()
        .ok()?;
    Some(ino == INIT_PID_NS_INO)
}

/// The nearest existing ancestor of `path` (itself included).
fn existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

/// Checks `pin_dir` (or, if it does not exist yet, its nearest existing ancestor) as it is now.
pub fn durability(pin_dir: &Path) -> Result<Durability, std::io::Error> {
    let probe = existing(pin_dir).unwrap_or(Path::new("/"));
    let dev = std::fs::metadata(probe)?.dev();
    let own = std::fs::read_to_string("/proc/self/mountinfo")?;
    let init = std::fs::read_to_string("/proc/1/mountinfo").map_err(|e| e.to_string());
    Ok(classify(
        pin_dir,
        dev,
        &own,
        init.as_deref().map_err(Clone::clone),
        in_initial_pid_ns().unwrap_or(true),
    ))
}

/// Whether this process shares PID 1's mount namespace (mount ids are unique system-wide, so
/// two namespaces never list the same ones). `None` if unknown.
pub fn shares_init_mount_ns() -> Option<bool> {
    let ids = |text: String| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let own = ids(std::fs::read_to_string("/proc/self/mountinfo").ok()?);
    let init = ids(std::fs::read_to_string("/proc/1/mountinfo").ok()?);
    Some(own.first() == init.first())
}

/// Why transparent mode refuses its pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error(transparent)]
    Bpffs(#[from] super::bpffs::BpffsError),
    #[error("cannot inspect pin_dir {path}: {cause}")]
    Inspect {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "refusing to start transparent mode: {0}. (To accept pins that vanish with the sidecar, which is fail-open, set allow_ephemeral_pins = true.)"
    )]
    Ephemeral(String),
}

/// Transparent-mode startup: puts `pin_dir` on a bpffs (mounting one at `/sys/fs/bpf` if
/// needed) and refuses it when its pins would not outlive the sidecar, unless
/// `allow_ephemeral` (then it says so loudly).
pub fn ensure_durable(pin_dir: &Path, allow_ephemeral: bool) -> Result<Durability, PinsError> {
    let mounted_by_us = super::bpffs::bpffs_covering(pin_dir)?.is_none();
    super::bpffs::ensure_pin_dir(pin_dir)?;
    let inspect = |source| PinsError::Inspect {
        path: pin_dir.into(),
        cause: source,
    };
    let mut verdict = durability(pin_dir).map_err(inspect)?;
    if let Durability::ContainerScoped { mount } = &verdict
        && mounted_by_us
    {
        verdict = Durability::Ephemeral {
            detail: format!(
                "pin_dir {} is on a bpffs the sidecar mounted itself at {} inside a container (its own PID namespace): it disappears with the container, and with it the pinned programs. Bind-mount the host's /sys/fs/bpf into the container",
                pin_dir.display(),
                mount.display()
            ),
        };
    }
    match &verdict {
        Durability::Durable { mount } => {
            tracing::info!(pin_dir = %pin_dir.display(), bpffs = %mount.display(), "pins outlive the sidecar (bpffs held by PID 1's mount namespace)");
        }
        Durability::ContainerScoped { mount } => {
            tracing::warn!(pin_dir = %pin_dir.display(), bpffs = %mount.display(), "running in a container's PID namespace: the pins outlive this process, but the container only if {} is the host's bpffs bind-mounted in", mount.display());
        }
        Durability::Ephemeral { detail } if allow_ephemeral => {
            tracing::warn!(pin_dir = %pin_dir.display(), "FAIL-OPEN CONFIGURATION: allow_ephemeral_pins = true and {detail}. If this sidecar dies, tagged workloads reach the network unenforced and unaudited.");
        }
        Durability::Ephemeral { detail } => return Err(PinsError::Ephemeral(detail.clone())),
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
        40 23 0:35 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw,mode=700\n";
    const PRIVATE: &str = "122 127 0:21 / /proc rw,relatime - proc proc rw\n\
        140 123 0:35 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700\n\
        141 123 0:77 / /tmp/pins rw,relatime - bpf bpf rw\n";

    fn dev(major: u64, minor: u64) -> u64 {
        nix::sys::stat::makedev(major, minor)
    }

    #[test]
    fn host_bpffs_is_durable() {
        let d = classify(
            Path::new("/sys/fs/bpf/firma"),
            dev(0, 35),
            HOST,
            Ok(HOST),
            true,
        );
        assert_eq!(
            d,
            Durability::Durable {
                mount: "/sys/fs/bpf".into()
            }
        );
    }

    #[test]
    fn bpffs_mounted_in_a_private_namespace_is_ephemeral() {
        let d = classify(Path::new("/tmp/pins"), dev(0, 77), PRIVATE, Ok(HOST), true);
        let Durability::Ephemeral { detail } = d else {
            panic!("{d:?}")
        };
        assert!(detail.contains("pin_dir /tmp/pins"), "{detail}");
        assert!(detail.contains("/tmp/pins (device 0:77)"), "{detail}");
        // The host's bpffs seen through a copied (private) namespace is still the host's.
        let d = classify(
            Path::new("/sys/fs/bpf/x"),
            dev(0, 35),
            PRIVATE,
            Ok(HOST),
            true,
        );
        assert!(matches!(d, Durability::Durable { .. }), "{d:?}");
    }

    #[test]
    fn container_pid_namespace_and_unreadable_init() {
        let d = classify(
            Path::new("/sys/fs/bpf/x"),
            dev(0, 35),
            HOST,
            Ok(HOST),
            false,
        );
        assert!(matches!(d, Durability::ContainerScoped { .. }), "{d:?}");
        let d = classify(
            Path::new("/sys/fs/bpf/x"),
            dev(0, 35),
            HOST,
            Err("denied".into()),
            true,
        );
        assert!(matches!(d, Durability::Ephemeral { .. }), "{d:?}");
        let d = classify(Path::new("/var/x"), dev(8, 1), HOST, Ok(HOST), true);
        assert!(matches!(d, Durability::Ephemeral { .. }), "{d:?}");
    }
}
