//! Puts the eBPF object in `OUT_DIR/firma-ebpf.o` for `include_bytes!`:
//!
//! - built from `firma-ebpf/` through `firma_ebpf_build::build` (the same code path as
//!   `cargo xtask build-ebpf`) when the toolchain is here (nightly + rust-src + bpf-linker);
//! - otherwise the committed, reproducible `firma-ebpf/prebuilt/firma-ebpf.bpf.o` (a cargo
//!   warning says so), so a machine with only stable Rust builds a working `firma`. CI checks
//!   that the committed object is what the sources build (`cargo xtask build-ebpf --check`).
//!
//! Variables:
//! - `FIRMA_EBPF_OBJECT=/path/to/obj` embeds that object instead.
//! - `FIRMA_EBPF_PREBUILT=1` embeds the committed object without trying to build.
//! - `FIRMA_EBPF_REQUIRED=1` requires a build from source (CI): a missing toolchain or a failed
//!   build fails the build instead of falling back.

use firma_ebpf_build as eb;
use std::env;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("firma-ebpf.o");
    let root = manifest.join("..");
    let committed = root.join(eb::PREBUILT);
    eb::rerun_if_changed(&root);
    println!("cargo:rerun-if-changed={}", committed.display());
    for v in [
        "FIRMA_EBPF_OBJECT",
        "FIRMA_EBPF_REQUIRED",
        "FIRMA_EBPF_PREBUILT",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let flag = |v: &str| env::var_os(v).is_some_and(|v| v == "1");
    let required = flag("FIRMA_EBPF_REQUIRED");

    if let Some(given) = env::var_os("FIRMA_EBPF_OBJECT") {
        copy(Path::new(&given), &out).unwrap_or_else(|e| panic!("FIRMA_EBPF_OBJECT: {e}"));
        return;
    }
    let why_not_built = if flag("FIRMA_EBPF_PREBUILT") && !required {
        "FIRMA_EBPF_PREBUILT=1".to_string()
    } else {
        let built = match eb::missing_toolchain() {
            Some(missing) => Err(format!("eBPF toolchain incomplete: {missing}")),
            None => eb::build(&root, eb::Output::Capture),
        };
        match built {
            Ok(obj) => {
                copy(&obj, &out).unwrap_or_else(|e| panic!("{e}"));
                if std::fs::read(&obj).ok() != std::fs::read(&committed).ok() {
                    println!(
                        "cargo:warning=the eBPF object built from source differs from the committed {} (run `{}` and commit it)",
                        eb::PREBUILT,
                        eb::UPDATE_COMMAND
                    );
                }
                return;
            }
            Err(why) if required => panic!("eBPF object required but not built: {why}"),
            Err(why) => why,
        }
    };
    if committed.is_file() {
        copy(&committed, &out).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "cargo:warning=embedding the committed eBPF object {} ({why_not_built}); `cargo xtask build-ebpf --check` verifies it against the sources",
            eb::PREBUILT
        );
    } else {
        println!(
            "cargo:warning=eBPF object not built ({why_not_built}) and no {} committed; transparent mode will be unavailable",
            eb::PREBUILT
        );
        std::fs::write(&out, b"").expect("OUT_DIR is writable");
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("cannot copy {}: {e}", from.display()))
}
