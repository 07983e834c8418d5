//! cgroup v2: find the mount, turn user-given paths and Kubernetes pod UIDs into cgroups, and
//! map the cgroup ids the kernel reports back to paths.
//!
//! A cgroup v2 id is the inode number of its directory, so no extra kernel interface is needed.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Errors resolving cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo (mount one: `mount -t cgroup2 none /sys/fs/cgroup`)"
    )]
    NoCgroup2,
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cgroup path {0:?} must not contain `..`")]
    Traversal(String),
    #[error("{path} is not a cgroup directory under the cgroup2 mount {mount}")]
    NotACgroup { path: PathBuf, mount: PathBuf },
    #[error(
        "refusing to tag {target}: the sidecar itself runs in {own}, so its own connections would be redirected to itself; run the sidecar outside the workload's cgroup"
    )]
    ContainsSidecar { target: String, own: String },
    #[error("{0:?} is not a Kubernetes pod UID (expected hex digits and dashes)")]
    BadPodUid(String),
    #[error("no cgroup for pod {uid} under {mount}; looked for: {tried}")]
    PodNotFound {
        uid: String,
        mount: PathBuf,
        tried: String,
    },
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`), e.g. `/user.slice/x`.
pub fn own_cgroup_path() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Whether `target` (mount-relative, `/a/b`) is `own` or one of its ancestors, i.e. tagging it
/// would tag the process whose cgroup is `own` (cgroup programs apply to descendants too).
pub fn contains(target: &str, own: &str) -> bool {
    let t = target.trim_end_matches('/');
    t.is_empty()
        || own == t
        || own
            .strip_prefix(t)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// One cgroup: where it is and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRef {
    /// Absolute filesystem path of the directory.
    pub dir: PathBuf,
    /// Path relative to the cgroup2 mount, with a leading `/` (what audit events show).
    pub path: String,
    /// cgroup id (inode number).
    pub id: u64,
}

/// The cgroup2 hierarchy of this machine.
#[derive(Debug, Clone)]
pub struct Cgroup2 {
    mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup2 mount in `/proc/self/mountinfo` (hybrid hosts have it at
    /// `/sys/fs/cgroup/unified`, pure v2 hosts at `/sys/fs/cgroup`).
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
            path: path.into(),
            cause: source,
        })?;
        find_mount(&text, "cgroup2")
            .map(|mount| Self { mount })
            .ok_or(CgroupError::NoCgroup2)
    }

    /// A hierarchy rooted at `mount` (tests use synthetic trees).
    pub fn at(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolves a path given by a user: a filesystem path under the mount, or a path relative to
    /// the mount (with or without a leading `/`).
    pub fn resolve(&self, given: &str) -> Result<CgroupRef, CgroupError> {
        if Path::new(given)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(CgroupError::Traversal(given.into()));
        }
        let dir = if Path::new(given).starts_with(&self.mount) {
            PathBuf::from(given)
        } else {
            self.mount.join(given.trim_start_matches('/'))
        };
        self.cgroup_at(&dir)
    }

    /// The mount-relative form (`/a/b`) of a user-given path, whether or not it exists.
    pub fn relative(&self, given: &str) -> String {
        let rel = Path::new(given)
            .strip_prefix(&self.mount)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| given.to_string());
        format!("/{}", rel.trim_start_matches('/'))
    }

    fn cgroup_at(&self, dir: &Path) -> Result<CgroupRef, CgroupError> {
        let meta = std::fs::metadata(dir).map_err(|source| CgroupError::Io {
            path: dir.into(),
            cause: source,
        })?;
        let rel = dir.strip_prefix(&self.mount).ok();
        match rel {
            Some(rel) if meta.is_dir() => Ok(CgroupRef {
                dir: dir.to_path_buf(),
                path: format!("/{}", rel.display()),
                id: meta.ino(),
            }),
            _ => Err(CgroupError::NotACgroup {
                path: dir.into(),
                mount: self.mount.clone(),
            }),
        }
    }

    /// The cgroup of a Kubernetes pod: tries the systemd driver layout
    /// (`kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`, guaranteed pods
    /// directly under `kubepods.slice`) and the cgroupfs layout (`kubepods/<qos>/pod<uid>`), for
    /// every QoS class.
    pub fn resolve_pod(&self, uid: &str) -> Result<CgroupRef, CgroupError> {
        if uid.is_empty()
            || !uid
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
        {
            return Err(CgroupError::BadPodUid(uid.into()));
        }
        let candidates = pod_candidates(uid);
        for rel in &candidates {
            let dir = self.mount.join(rel);
            if dir.is_dir() {
                return self.cgroup_at(&dir);
            }
        }
        Err(CgroupError::PodNotFound {
            uid: uid.into(),
            mount: self.mount.clone(),
            tried: candidates.join(", "),
        })
    }

    /// Finds the cgroup with id `id` at or below `root` (a process may sit in a child of the
    /// cgroup that was attached, e.g. a container inside a pod). Bounded walk.
    pub fn find_below(&self, root: &Path, id: u64) -> Option<CgroupRef> {
        const MAX_DIRS: usize = 10_000;
        let mut stack = vec![root.to_path_buf()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                return None;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id {
                return self.cgroup_at(&dir).ok();
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        None
    }
}

/// Relative paths a pod's cgroup can have, most common first.
pub fn pod_candidates(uid: &str) -> Vec<String> {
    let dashed = uid.replace('_', "-");
    let underscored = uid.replace('-', "_");
    let mut out = vec![format!("kubepods.slice/kubepods-pod{underscored}.slice")];
    for qos in ["burstable", "besteffort"] {
        out.push(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice"
        ));
    }
    out.push(format!("kubepods/pod{dashed}"));
    for qos in ["burstable", "besteffort"] {
        out.push(format!("kubepods/{qos}/pod{dashed}"));
    }
    out
}

/// The pod UID (dashed) whose pod-level cgroup `path` is, for the layouts [`pod_candidates`]
/// knows (`…/pod<uid>` with cgroupfs, `…/kubepods[-<qos>]-pod<uid_>.slice` with systemd);
/// `None` for any other cgroup, including a container's cgroup inside a pod.
pub fn pod_uid_of(path: &str) -> Option<String> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    let uid = match last.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => last.strip_prefix("pod")?,
    };
    let ok = !uid.is_empty()
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
        && path.contains("kubepods");
    ok.then(|| uid.replace('_', "-"))
}

/// Mount point of the first filesystem of type `fstype` in mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let ty = post.split_whitespace().next()?;
        let mount = pre.split_whitespace().nth(4)?;
        (ty == fstype).then(|| PathBuf::from(unescape_mountinfo(mount)))
    })
}

/// All mount points of type `fstype`.
pub fn find_mounts(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let ty = post.split_whitespace().next()?;
            let mount = pre.split_whitespace().nth(4)?;
            (ty == fstype).then(|| PathBuf::from(unescape_mountinfo(mount)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\\ooo` (three octal digits).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                u8::try_from(v).ok()
            });
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uid_of_inverts_every_pod_candidate() {
        let uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        for c in pod_candidates(uid) {
            assert_eq!(pod_uid_of(&format!("/{c}")).as_deref(), Some(uid), "{c}");
        }
        for not_pod in [
            "/kubepods/besteffort/pod0a1b/c0ffee",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/system.slice/pod1234.service",
            "/pod1234",
            "/kubepods/besteffort/podxyz",
        ] {
            assert_eq!(pod_uid_of(not_pod), None, "{not_pod}");
        }
    }

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 25 0:44 / /sys/fs/bpf\\040x rw - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_and_unescapes() {
        assert_eq!(
            find_mount(MOUNTINFO, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_mount(MOUNTINFO, "bpf"),
            Some(PathBuf::from("/sys/fs/bpf x"))
        );
        assert_eq!(find_mount(MOUNTINFO, "nfs"), None);
    }

    #[test]
    fn pod_candidates_cover_both_drivers_and_all_qos() {
        let c = pod_candidates("ab-12");
        assert!(c.contains(&"kubepods.slice/kubepods-podab_12.slice".to_string()));
        assert!(
            c.contains(
                &"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab_12.slice"
                    .to_string()
            )
        );
        assert!(
            c.contains(
                &"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_12.slice"
                    .to_string()
            )
        );
        assert!(c.contains(&"kubepods/podab-12".to_string()));
        assert!(c.contains(&"kubepods/burstable/podab-12".to_string()));
        assert!(c.contains(&"kubepods/besteffort/podab-12".to_string()));
    }

    #[test]
    fn containment_is_by_path_component() {
        assert!(contains("/", "/a/b"));
        assert!(contains("/a", "/a/b"));
        assert!(contains("/a/b", "/a/b"));
        assert!(!contains("/a/b", "/a"));
        assert!(!contains("/a/bc", "/a/b"));
        assert!(!contains("/a/b", "/a/bc"));
    }

    #[test]
    fn resolves_paths_pods_and_ids_in_a_synthetic_tree() {
        let root = tempfile::tempdir().unwrap();
        let cg = Cgroup2::at(root.path());
        let pod = root
            .path()
            .join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f_2e.slice");
        std::fs::create_dir_all(pod.join("cri-containerd-abc.scope")).unwrap();
        let r = cg.resolve_pod("1f-2e").unwrap();
        assert_eq!(r.dir, pod);
        assert!(r.path.starts_with("/kubepods.slice/"));
        let child = cg
            .resolve(&format!("{}/cri-containerd-abc.scope", r.path))
            .unwrap();
        assert_eq!(cg.find_below(&r.dir, child.id), Some(child.clone()));
        assert_eq!(cg.resolve(child.dir.to_str().unwrap()).unwrap(), child);
        assert!(matches!(
            cg.resolve("/a/../b"),
            Err(CgroupError::Traversal(_))
        ));
        assert!(matches!(
            cg.resolve_pod("../x"),
            Err(CgroupError::BadPodUid(_))
        ));
        assert!(matches!(
            cg.resolve_pod("ffff"),
            Err(CgroupError::PodNotFound { .. })
        ));
    }
}
