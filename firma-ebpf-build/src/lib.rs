//! Builds the eBPF object (`firma-ebpf`): `rustup run nightly cargo build --release` inside
//! `firma-ebpf/`, whose `.cargo/config.toml` sets the `bpfel-unknown-none` target and
//! `-Z build-std=core`; bpf-linker links it.
//!
//! This is the only place that knows how: `firma-sidecar/build.rs` (which embeds the object) and
//! `cargo xtask build-ebpf` both call [`build`], so both clear the same variables of the outer
//! build, pass the same flags and leave the object at the same path ([`object_path`]), where each
//! reuses what the other built.
//!
//! **Reproducible**: the object is committed ([`PREBUILT`], the bpf2go convention) so that a
//! machine with only stable Rust builds a working `firma`; CI rebuilds it and compares byte for
//! byte (`cargo xtask build-ebpf --check`). Two things would make the bytes depend on the
//! machine, and both are removed: paths in the debug info (registry, sysroot, checkout), which
//! cargo's `trim-paths` (nightly, set in `firma-ebpf/.cargo/config.toml`) rewrites; and the
//! checkout's absolute path, which cargo hashes into the symbol names of `firma-maps` (a path
//! dependency outside firma-ebpf's own workspace), so the sources are built from a copy at the
//! fixed path [`STAGING`] (under a lock: one eBPF build at a time per machine). The result still
//! depends on the nightly and bpf-linker versions, recorded next to the object.

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

/// The committed object, relative to the repository root: embedded when the eBPF toolchain is
/// missing; `cargo xtask build-ebpf --check` keeps it equal to what the sources build.
pub const PREBUILT: &str = "firma-ebpf/prebuilt/firma-ebpf.bpf.o";

/// The toolchain versions the committed object was built with (next to [`PREBUILT`]).
pub const PREBUILT_TOOLCHAIN: &str = "firma-ebpf/prebuilt/toolchain.txt";

/// The fixed directory the sources are copied to before building (see the module doc).
pub const STAGING: &str = "/tmp/firma-ebpf-build";

/// The command that refreshes [`PREBUILT`] after a change to the eBPF sources.
pub const UPDATE_COMMAND: &str = "cargo xtask build-ebpf --update";

/// What is missing to build the object here (no nightly, no rust-src, no bpf-linker), checked
/// in a second instead of failing after a minute of compiling.
pub fn missing_toolchain() -> Option<String> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let sysroot = match sysroot {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => return Some("no nightly toolchain (`rustup toolchain install nightly`)".into()),
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some(
            "no rust-src for nightly (`rustup component add rust-src --toolchain nightly`)".into(),
        );
    }
    let on_path = env::var_os("PATH")
        .is_some_and(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()));
    if !on_path {
        return Some("no bpf-linker on PATH (`scripts/install-bpf-linker.sh`)".into());
    }
    None
}

/// `rustc -V` of nightly and `bpf-linker --version`, one per line (what the object depends on
/// besides the sources).
pub fn toolchain_versions() -> String {
    let run = |cmd: &mut Command| {
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or_else(
                || "unknown".to_string(),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
            )
    };
    format!(
        "{}\n{}\n",
        run(Command::new("rustup").args(["run", "nightly", "rustc", "-V"])),
        run(Command::new("bpf-linker").arg("--version"))
    )
}

/// Copies [`INPUTS`] (and the root `Cargo.toml`, which firma-maps inherits from) to `to`,
/// leaving files whose content is unchanged untouched (so cargo does not rebuild them) and
/// removing files the checkout no longer has.
fn stage(root: &Path, to: &Path) -> Result<(), String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let mut wanted = std::collections::BTreeSet::new();
    let mut files = vec![PathBuf::from("Cargo.toml")];
    for input in INPUTS {
        collect_files(&root.join(input), Path::new(input), &mut files)
            .map_err(|e| io("cannot read", &root.join(input), e))?;
    }
    for rel in &files {
        let (src, dst) = (root.join(rel), to.join(rel));
        let data = std::fs::read(&src).map_err(|e| io("cannot read", &src, e))?;
        if std::fs::read(&dst).ok().as_deref() != Some(&data[..]) {
            if let Some(dir) = dst.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
            }
            std::fs::write(&dst, &data).map_err(|e| io("cannot write", &dst, e))?;
        }
        wanted.insert(dst);
    }
    // Stale sources (a deleted module) must not linger in the copy.
    let mut present = Vec::new();
    for input in INPUTS {
        let _ = collect_files(&to.join(input), Path::new(input), &mut present);
    }
    for rel in present {
        let p = to.join(rel);
        if !wanted.contains(&p) {
            std::fs::remove_file(&p).map_err(|e| io("cannot remove", &p, e))?;
        }
    }
    Ok(())
}

/// Every file under `path` (or `path` itself), as paths relative to the root (`rel`).
fn collect_files(path: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            collect_files(&entry.path(), &rel.join(entry.file_name()), out)?;
        }
    } else if path.exists() {
        out.push(rel.to_path_buf());
    }
    Ok(())
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

/// The nested build command, fully configured: run in `staged` (the copy of the sources at
/// [`STAGING`]), with `root`'s `firma-ebpf/target` as its target directory.
pub fn command(root: &Path, staged: &Path, arch: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .current_dir(staged.join("firma-ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        );
    for key in CLEARED_ENV {
        cmd.env_remove(key);
    }
    cmd.env("CARGO_TARGET_DIR", root.join("firma-ebpf/target"));
    cmd
}

/// Builds the object for [`target_arch`] and returns its path ([`object_path`]).
pub fn build(root: &Path, output: Output) -> Result<PathBuf, String> {
    let root = &root
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let staged = Path::new(STAGING);
    std::fs::create_dir_all(staged)
        .map_err(|e| format!("cannot create {}: {e}", staged.display()))?;
    // One build at a time in the shared copy (several checkouts on one machine).
    let lock_path = staged.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    stage(root, staged)?;
    let mut cmd = command(root, staged, &target_arch());
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
        let cmd = command(Path::new("/repo"), Path::new(STAGING), "x86_64");
        assert_eq!(cmd.get_program(), "rustup");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            ["run", "nightly", "cargo", "build", "--release", "--locked"]
        );
        assert_eq!(
            cmd.get_current_dir(),
            Some(Path::new(STAGING).join("firma-ebpf").as_path())
        );
        let envs: Vec<_> = cmd.get_envs().collect();
        for key in CLEARED_ENV.iter().filter(|k| **k != "CARGO_TARGET_DIR") {
            assert!(envs.contains(&(key.as_ref(), None)), "{key} not removed");
        }
        assert!(envs.contains(&(
            "CARGO_TARGET_DIR".as_ref(),
            Some("/repo/firma-ebpf/target".as_ref())
        )));
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

    #[test]
    fn staging_copies_inputs_and_drops_stale_files() {
        let root = tempdir("root");
        let to = tempdir("to");
        for f in INPUTS {
            let p = root.join(f);
            if f.ends_with(".toml") || f.ends_with(".lock") {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, f).unwrap();
            } else {
                std::fs::create_dir_all(&p).unwrap();
                std::fs::write(p.join("lib.rs"), "x").unwrap();
            }
        }
        std::fs::write(root.join("Cargo.toml"), "[workspace]").unwrap();
        std::fs::create_dir_all(to.join("firma-ebpf/src")).unwrap();
        std::fs::write(to.join("firma-ebpf/src/old.rs"), "stale").unwrap();
        stage(&root, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("firma-ebpf/src/lib.rs")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("Cargo.toml")).unwrap(),
            "[workspace]"
        );
        assert!(!to.join("firma-ebpf/src/old.rs").exists());
        // Unchanged content is not rewritten (cargo would rebuild on a new mtime).
        let before = std::fs::metadata(to.join("firma-maps/src/lib.rs"))
            .unwrap()
            .modified()
            .unwrap();
        stage(&root, &to).unwrap();
        let after = std::fs::metadata(to.join("firma-maps/src/lib.rs"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&to);
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = env::temp_dir().join(format!(
            "firma-ebpf-build-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
