//! What this kernel accepts of the object, hook by hook: `firma doctor`'s feature detection.
//!
//! Version numbers and config flags say little (distributions backport, verifiers differ), so
//! the probe does what the sidecar does, in a scratch space: load the embedded object (maps
//! pinned under a scratch directory on bpffs), then load each program, attach it with a pinned
//! link to an empty scratch cgroup, and finally detach the links with `BPF_LINK_DETACH`. No
//! process is ever in the scratch cgroup, so nothing is redirected. Everything is removed
//! afterwards, also when a step fails.

use super::{Cgroup2, EbpfError, programs};
use aya::EbpfLoader;
use std::path::{Path, PathBuf};

/// One hook's probe result.
#[derive(Debug)]
pub struct Hook {
    /// Program name in the object (`firma_connect4`).
    pub program: &'static str,
    /// The kernel attach point (`cgroup/connect4`, `cgroup_skb/egress`, `sock_ops`).
    pub hook: &'static str,
    /// `Err`: why the verifier or the attach refused it.
    pub result: Result<(), EbpfError>,
}

/// The whole probe's outcome.
#[derive(Debug)]
pub struct Probe {
    /// Loading the object itself (map creation, relocations): when this fails nothing else ran.
    pub object: Result<(), EbpfError>,
    pub hooks: Vec<Hook>,
    /// Detaching the probe's links with `BPF_LINK_DETACH` (Linux >= 5.9), as `firma workload
    /// detach` does: `Ok(links detached)`.
    pub link_detach: Option<Result<usize, EbpfError>>,
}

impl Probe {
    /// Every step succeeded.
    pub fn all_ok(&self) -> bool {
        self.object.is_ok()
            && self.hooks.iter().all(|h| h.result.is_ok())
            && matches!(self.link_detach, Some(Ok(_)))
    }
}

/// Scratch directories removed on drop, in reverse order of creation.
struct Scratch {
    pins: PathBuf,
    cgroup: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup
            && let Err(e) = std::fs::remove_dir(cg)
        {
            tracing::warn!(path = %cg.display(), error = %e, "cannot remove the probe cgroup");
        }
        // bpffs: unlinking a pin drops its reference; remove_dir_all unlinks and rmdirs.
        if let Err(e) = std::fs::remove_dir_all(&self.pins)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.pins.display(), error = %e, "cannot remove the probe pins");
        }
    }
}

/// Probes `object` on this kernel. `bpffs` must be a mounted BPF filesystem (the probe does
/// not mount one) and the caller root; `Err` only when the scratch space cannot be made.
pub fn probe(object: &[u8], cgroup2: &Cgroup2, bpffs: &Path) -> Result<Probe, EbpfError> {
    let tag = format!("firma-probe-{}", std::process::id());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| EbpfError::Io {
            path,
            detail: e.to_string(),
        }
    };
    let pins = bpffs.join(&tag);
    let maps = pins.join("maps");
    let mut scratch = Scratch {
        pins: pins.clone(),
        cgroup: None,
    };
    for d in [&maps, &pins.join("progs")] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let cgroup = cgroup2.mount().join(&tag);
    std::fs::create_dir(&cgroup).map_err(io(&cgroup))?;
    scratch.cgroup = Some(cgroup.clone());

    let mut ebpf = match EbpfLoader::new()
        .default_map_pin_directory(&maps)
        .load(object)
    {
        Ok(e) => e,
        Err(e) => {
            return Ok(Probe {
                object: Err(EbpfError::Load(e.to_string())),
                hooks: Vec::new(),
                link_detach: None,
            });
        }
    };
    let (probed, detached) =
        programs::probe_each(&mut ebpf, &pins.join("progs"), &cgroup, &pins.join("links"))?;
    drop(ebpf);
    drop(scratch);
    Ok(Probe {
        object: Ok(()),
        hooks: probed
            .into_iter()
            .map(|p| Hook {
                program: p.name,
                hook: p.hook,
                result: p.result,
            })
            .collect(),
        link_detach: Some(detached),
    })
}
