//! Builds the eBPF object (`firma-ebpf`): `rustup run nightly cargo build --release` inside
//! `firma-ebpf/`, whose `.cargo/config.toml` sets the `bpfel-unknown-none` target and
//! `-Z build-std=core`; bpf-linker links it.
//!
//! This is the only place that knows how: `firma-sidecar/build.rs` (which embeds the object) and
//! `cargo xtask build-ebpf` both call [`build`], so both clear the same variables of the outer
//! build, pass the same flags and leave the object at the same path ([`object_path`]), where each
//! reuses what the other built.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Variables of the outer cargo / rustup run removed from the nested build: they would select
/// the outer toolchain (stable) or its wrappers, flags and target directory instead of nightly,
/// `firma-ebpf/target` and the BPF target.
pub const CLEARED_ENV: [&str; 11] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "CARGO_MAKEFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
];

/// Files and directories, relative to the repository root, that the object is built from.
pub const INPUTS: [&str; 6] = [
    "firma-ebpf/src",
    "firma-ebpf/Cargo.toml",
    "firma-ebpf/Cargo.lock",
    "firma-ebpf/.cargo/config.toml",
    "firma-maps/src",
    "firma-maps/Cargo.toml",
];

/// Where the nested build leaves the object.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("firma-ebpf/target/bpfel-unknown-none/release/firma-ebpf")
}

/// Prints `cargo:rerun-if-changed` for every [`INPUTS`] entry (for a build script).
pub fn rerun_if_changed(root: &Path) {
    for input in INPUTS {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
}

/// The architecture the programs are built for (`bpf_target_arch`, which selects the register
/// layout aya-ebpf reads): the target of the build script running this, otherwise this host's.
pub fn target_arch() -> String {
    env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| env::consts::ARCH.to_owned())
}

/// What happens to the nested cargo's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Shown as it comes (xtask).
    Inherit,
    /// Captured; the last lines of stderr go into the error (build scripts, whose stdout cargo
    /// parses).
    Capture,
}

/// The nested build command, fully configured.
pub fn command(root: &Path, arch: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .current_dir(root.join("firma-ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        );
    for key in CLEARED_ENV {
        cmd.env_remove(key);
    }
    cmd
}

/// Builds the object for [`target_arch`] and returns its path ([`object_path`]).
pub fn build(root: &Path, output: Output) -> Result<PathBuf, String> {
    let mut cmd = command(root, &target_arch());
    let failed = match output {
        Output::Inherit => {
            let status = cmd
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run `rustup run nightly cargo build`: {e}"))?;
            (!status.success()).then(|| format!("eBPF build failed ({status})"))
        }
        Output::Capture => {
            let out = cmd
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run `rustup run nightly cargo build`: {e}"))?;
            (!out.status.success()).then(|| {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let mut tail: Vec<&str> = stderr.lines().rev().take(15).collect();
                tail.reverse();
                format!("eBPF build failed: {}", tail.join(" | "))
            })
        }
    };
    if let Some(why) = failed {
        return Err(why);
    }
    let obj = object_path(root);
    if obj.is_file() {
        Ok(obj)
    } else {
        Err(format!("{} missing after build", obj.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_clears_outer_toolchain_and_sets_bpf_flags() {
        let cmd = command(Path::new("/repo"), "x86_64");
        assert_eq!(cmd.get_program(), "rustup");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["run", "nightly", "cargo", "build", "--release"]);
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/repo/firma-ebpf")));
        let envs: Vec<_> = cmd.get_envs().collect();
        for key in CLEARED_ENV {
            assert!(envs.contains(&(key.as_ref(), None)), "{key} not removed");
        }
        assert!(envs.contains(&(
            "CARGO_ENCODED_RUSTFLAGS".as_ref(),
            Some("--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf".as_ref())
        )));
    }

    #[test]
    fn inputs_cover_the_program_and_the_shared_layouts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for input in INPUTS {
            assert!(root.join(input).exists(), "{input} does not exist");
        }
        assert!(INPUTS.iter().any(|i| i.starts_with("firma-maps/")));
    }
}
