//! The ten programs of the object: loading (or adopting pinned ones) and attaching them to one
//! cgroup with pinned links.

use super::error::EbpfError;
use aya::Ebpf;
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockAddrAttachType,
    Program, SockOps,
};
use std::fs::File;
use std::path::Path;

/// How a program attaches.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    SockOps,
    SockAddr(CgroupSockAddrAttachType),
    /// The DNS guard's egress hook.
    SkbEgress,
}

/// Program names in the object, in attach order: bookkeeping first, `connect*` last, so a
/// connection is never redirected before its entry can be re-keyed. Detach goes in reverse.
const PROGRAMS: [(&str, Kind); 10] = [
    ("firma_sock_ops", Kind::SockOps),
    // DNS guard bookkeeping: replies and the by-client-address record, before any rewrite.
    ("firma_egress", Kind::SkbEgress),
    (
        "firma_recvmsg4",
        Kind::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg4),
    ),
    (
        "firma_recvmsg6",
        Kind::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg6),
    ),
    (
        "firma_getpeername4",
        Kind::SockAddr(CgroupSockAddrAttachType::GetPeerName4),
    ),
    (
        "firma_getpeername6",
        Kind::SockAddr(CgroupSockAddrAttachType::GetPeerName6),
    ),
    (
        "firma_sendmsg4",
        Kind::SockAddr(CgroupSockAddrAttachType::UDPSendMsg4),
    ),
    (
        "firma_sendmsg6",
        Kind::SockAddr(CgroupSockAddrAttachType::UDPSendMsg6),
    ),
    (
        "firma_connect4",
        Kind::SockAddr(CgroupSockAddrAttachType::Connect4),
    ),
    (
        "firma_connect6",
        Kind::SockAddr(CgroupSockAddrAttachType::Connect6),
    ),
];

/// Number of links one attached cgroup has.
pub const LINKS_PER_CGROUP: usize = PROGRAMS.len();

enum Handle {
    SockOps(SockOps),
    SockAddr(CgroupSockAddr),
    Skb(CgroupSkb),
}

/// Loaded programs, each also pinned at `<pin_dir>/progs/<name>`.
pub struct Programs {
    handles: Vec<(&'static str, Handle)>,
    /// How many programs were found pinned (re-adopted) rather than loaded.
    pub adopted: usize,
}

impl Programs {
    /// Adopts pinned programs, loading and pinning any that are not pinned yet.
    pub fn load_or_adopt(ebpf: &mut Ebpf, progs_dir: &Path) -> Result<Self, EbpfError> {
        let mut handles = Vec::with_capacity(PROGRAMS.len());
        let mut adopted = 0;
        for (name, kind) in PROGRAMS {
            let pin = progs_dir.join(name);
            if pin.exists() {
                adopted += 1;
            }
            handles.push((name, load_one(ebpf, name, kind, &pin)?));
        }
        Ok(Self { handles, adopted })
    }

    /// Attaches every program not yet linked to `cgroup_dir`, pinning each link at
    /// `<links_dir>/<name>`. Returns how many links were created (0: already fully attached).
    pub fn attach(&mut self, cgroup_dir: &Path, links_dir: &Path) -> Result<usize, EbpfError> {
        let cgroup = File::open(cgroup_dir).map_err(|e| EbpfError::Io {
            path: cgroup_dir.into(),
            detail: e.to_string(),
        })?;
        std::fs::create_dir_all(links_dir).map_err(|e| EbpfError::Io {
            path: links_dir.into(),
            detail: e.to_string(),
        })?;
        let mut created = 0;
        for (name, handle) in &mut self.handles {
            let pin = links_dir.join(*name);
            if pin.exists() {
                continue;
            }
            attach_one(name, handle, &cgroup, cgroup_dir, &pin)?;
            created += 1;
        }
        Ok(created)
    }
}

/// Loads and pins program `name` at `pin` unless a program is pinned there already, and opens
/// it from the pin.
fn load_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: Kind,
    pin: &Path,
) -> Result<Handle, EbpfError> {
    if !pin.exists() {
        let prog = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?;
        load(prog, name)?;
        prog.pin(pin).map_err(|e| EbpfError::Pin {
            what: name,
            path: pin.into(),
            detail: e.to_string(),
        })?;
    }
    match kind {
        Kind::SockOps => SockOps::from_pin(pin).map(Handle::SockOps),
        Kind::SockAddr(t) => CgroupSockAddr::from_pin(pin, t).map(Handle::SockAddr),
        Kind::SkbEgress => CgroupSkb::from_pin(pin, CgroupSkbAttachType::Egress).map(Handle::Skb),
    }
    .map_err(|e| EbpfError::Program {
        name,
        detail: e.to_string(),
    })
}

/// Attaches one program to `cgroup` with a link pinned at `pin`.
fn attach_one(
    name: &'static str,
    handle: &mut Handle,
    cgroup: &File,
    cgroup_dir: &Path,
    pin: &Path,
) -> Result<(), EbpfError> {
    let link: FdLink = match handle {
        Handle::SockOps(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| attach_err(name, cgroup_dir, e))?;
            p.take_link(id)
                .map_err(|e| attach_err(name, cgroup_dir, e))?
                .try_into()
        }
        Handle::SockAddr(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| attach_err(name, cgroup_dir, e))?;
            p.take_link(id)
                .map_err(|e| attach_err(name, cgroup_dir, e))?
                .try_into()
        }
        Handle::Skb(p) => {
            let id = p
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(|e| attach_err(name, cgroup_dir, e))?;
            p.take_link(id)
                .map_err(|e| attach_err(name, cgroup_dir, e))?
                .try_into()
        }
    }
    .map_err(|e: LinkError| EbpfError::Attach {
        name,
        cgroup: cgroup_dir.into(),
        detail: format!("kernel has no BPF links ({e}); need Linux >= 5.7"),
    })?;
    // Dropping the returned PinnedLink closes our fd; the pin keeps the link alive.
    link.pin(pin).map_err(|e| EbpfError::Pin {
        what: name,
        path: pin.into(),
        detail: e.to_string(),
    })?;
    Ok(())
}

/// One program's fate in [`probe_each`]: loaded by the verifier, then attached with a link.
pub(super) struct Probed {
    pub name: &'static str,
    pub hook: &'static str,
    pub result: Result<(), EbpfError>,
}

/// Loads and pins each program under `progs_dir`, then attaches it to `cgroup_dir` with a link
/// pinned under `links_dir`: one program at a time, so one refusal does not hide the others.
/// Then detaches them all as [`detach`] does (`BPF_LINK_DETACH`), whose outcome is returned
/// too. What `firma doctor` reports per hook (see `super::probe`).
pub(super) fn probe_each(
    ebpf: &mut Ebpf,
    progs_dir: &Path,
    cgroup_dir: &Path,
    links_dir: &Path,
) -> Result<(Vec<Probed>, Result<usize, EbpfError>), EbpfError> {
    let cgroup = File::open(cgroup_dir).map_err(|e| EbpfError::Io {
        path: cgroup_dir.into(),
        detail: e.to_string(),
    })?;
    std::fs::create_dir_all(links_dir).map_err(|e| EbpfError::Io {
        path: links_dir.into(),
        detail: e.to_string(),
    })?;
    let probed = PROGRAMS
        .into_iter()
        .map(|(name, kind)| {
            let result = load_one(ebpf, name, kind, &progs_dir.join(name)).and_then(|mut h| {
                attach_one(name, &mut h, &cgroup, cgroup_dir, &links_dir.join(name))
            });
            Probed {
                name,
                hook: hook_name(kind),
                result,
            }
        })
        .collect();
    Ok((probed, detach(links_dir)))
}

/// The kernel hook a program attaches to, as `firma doctor` names it.
fn hook_name(kind: Kind) -> &'static str {
    match kind {
        Kind::SockOps => "sock_ops",
        Kind::SkbEgress => "cgroup_skb/egress",
        Kind::SockAddr(t) => match t {
            CgroupSockAddrAttachType::Connect4 => "cgroup/connect4",
            CgroupSockAddrAttachType::Connect6 => "cgroup/connect6",
            CgroupSockAddrAttachType::UDPSendMsg4 => "cgroup/sendmsg4",
            CgroupSockAddrAttachType::UDPSendMsg6 => "cgroup/sendmsg6",
            CgroupSockAddrAttachType::UDPRecvMsg4 => "cgroup/recvmsg4",
            CgroupSockAddrAttachType::UDPRecvMsg6 => "cgroup/recvmsg6",
            CgroupSockAddrAttachType::GetPeerName4 => "cgroup/getpeername4",
            CgroupSockAddrAttachType::GetPeerName6 => "cgroup/getpeername6",
            _ => "cgroup/sock_addr",
        },
    }
}

fn load(prog: &mut Program, name: &'static str) -> Result<(), EbpfError> {
    let res = match prog {
        Program::SockOps(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        _ => return Err(EbpfError::MissingProgram(name)),
    };
    res.map_err(|e| EbpfError::Program {
        name,
        detail: verifier_detail(&e),
    })
}

fn verifier_detail(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}; verifier: {verifier_log}")
        }
        other => other.to_string(),
    }
}

fn attach_err(name: &'static str, cgroup: &Path, e: aya::programs::ProgramError) -> EbpfError {
    EbpfError::Attach {
        name,
        cgroup: cgroup.into(),
        detail: e.to_string(),
    }
}

/// Removes the pinned links of one cgroup in reverse attach order (`connect*` first, so no new
/// connection is redirected once its bookkeeping is gone). Returns how many were removed.
pub fn detach(links_dir: &Path) -> Result<usize, EbpfError> {
    let mut removed = 0;
    for (name, _) in PROGRAMS.iter().rev() {
        let pin = links_dir.join(name);
        if pin.exists() {
            detach_link_now(&pin).map_err(|e| EbpfError::Io {
                path: pin.clone(),
                detail: format!("BPF_LINK_DETACH: {e}"),
            })?;
        }
        match std::fs::remove_file(&pin) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EbpfError::Io {
                    path: pin,
                    detail: e.to_string(),
                });
            }
        }
    }
    match std::fs::remove_dir(links_dir) {
        Ok(()) => Ok(removed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(removed),
        Err(e) => Err(EbpfError::Io {
            path: links_dir.into(),
            detail: e.to_string(),
        }),
    }
}

/// Detaches the pinned link at `pin` from its cgroup before this returns.
///
/// Removing the pin alone is not enough: bpffs drops its reference from an RCU callback and the
/// kernel frees the link from a workqueue, so the program would keep redirecting for a moment
/// after `detach` returned. `BPF_LINK_DETACH` (Linux 5.9+) detaches synchronously; aya 0.14 has
/// no wrapper for it, hence the two raw `bpf(2)` calls.
fn detach_link_now(pin: &Path) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `union bpf_attr` for BPF_OBJ_GET.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `union bpf_attr` for BPF_LINK_DETACH.
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid, initialised bpf_attr prefix of the size passed; `path` outlives
    // the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(raw) };
    let attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: as above, for BPF_LINK_DETACH's attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &attr as *const LinkDetach,
            std::mem::size_of::<LinkDetach>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How many of the links of one cgroup are pinned.
pub fn pinned_links(links_dir: &Path) -> usize {
    PROGRAMS
        .iter()
        .filter(|(name, _)| links_dir.join(name).exists())
        .count()
}
