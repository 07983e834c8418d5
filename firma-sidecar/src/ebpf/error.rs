//! The kernel side's errors.

use std::path::PathBuf;

/// Errors of the kernel side. Each names what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this build has no eBPF object (nightly + rust-src + bpf-linker were missing at build time; run scripts/install-bpf-linker.sh and rebuild)"
    )]
    NoObject,
    #[error("cannot load the eBPF object: {0}")]
    Load(String),
    #[error("eBPF object has no program or map named {0}")]
    MissingProgram(&'static str),
    #[error("cannot load program {name}: {detail}")]
    Program { name: &'static str, detail: String },
    #[error("cannot attach {name} to {cgroup}: {detail}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        detail: String,
    },
    #[error("cannot pin {what} at {path}: {detail}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error(transparent)]
    Bpffs(#[from] super::bpffs::BpffsError),
    #[error(transparent)]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error("invalid setting {key} = {value:?}: {expected}")]
    Setting {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("binding for {0}: {1}")]
    Binding(String, firma_common::maps::BindingError),
    #[error("{0} is not attached")]
    NotAttached(String),
}
