//! bpffs: the pin directory must live on a BPF filesystem so pinned programs, maps and links
//! outlive the sidecar process (that is what keeps a crashed sidecar fail-closed).

use super::cgroup::find_mounts;
use std::path::{Path, PathBuf};

/// Where bpffs is conventionally mounted; mounted here when no bpffs covers the pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error(
        "pin_dir {0} is not on a bpffs and not under {DEFAULT_BPFFS}; mount bpffs there (`mount -t bpf bpf DIR`) or set pin_dir under {DEFAULT_BPFFS}"
    )]
    NotOnBpffs(PathBuf),
    #[error("cannot mount bpffs at {DEFAULT_BPFFS}: {0} (needs CAP_SYS_ADMIN)")]
    Mount(nix::Error),
    #[error("cannot create {path}: {cause}")]
    Create {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The bpffs mount that contains `path`, if any.
pub fn bpffs_covering(path: &Path) -> Result<Option<PathBuf>, BpffsError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(BpffsError::MountInfo)?;
    Ok(find_mounts(&text, "bpf")
        .into_iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len()))
}

/// Makes sure `pin_dir` exists on a bpffs, mounting one at `/sys/fs/bpf` if needed.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), BpffsError> {
    if bpffs_covering(pin_dir)?.is_none() {
        if !pin_dir.starts_with(DEFAULT_BPFFS) {
            return Err(BpffsError::NotOnBpffs(pin_dir.into()));
        }
        std::fs::create_dir_all(DEFAULT_BPFFS).map_err(|source| BpffsError::Create {
            path: DEFAULT_BPFFS.into(),
            cause: source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            DEFAULT_BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(BpffsError::Mount)?;
        tracing::info!(path = DEFAULT_BPFFS, "mounted bpffs");
    }
    for sub in ["", "maps", "progs", "links"] {
        let dir = pin_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(|source| BpffsError::Create {
            path: dir,
            cause: source,
        })?;
    }
    Ok(())
}
