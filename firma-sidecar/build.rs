//! Builds the eBPF object (`firma-ebpf`, nightly + `-Z build-std=core` + bpf-linker) through
//! `firma_ebpf_build::build` (the same code path as `cargo xtask build-ebpf`) and puts it in
//! `OUT_DIR/firma-ebpf.o` for `include_bytes!`.
//!
//! - `FIRMA_EBPF_OBJECT=/path/to/obj` embeds a prebuilt object instead of building.
//! - If the toolchain is missing (no nightly, no rust-src, no bpf-linker) the build still
//!   succeeds with an empty object and a warning; transparent mode then refuses to start and says
//!   why, and the eBPF tests skip. `scripts/install-bpf-linker.sh` installs what is needed.
//! - `FIRMA_EBPF_REQUIRED=1` turns that warning into a build failure (CI).

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("firma-ebpf.o");
    let root = manifest.join("..");
    firma_ebpf_build::rerun_if_changed(&root);
    for v in ["FIRMA_EBPF_OBJECT", "FIRMA_EBPF_REQUIRED"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let result = match env::var_os("FIRMA_EBPF_OBJECT") {
        Some(prebuilt) => std::fs::copy(&prebuilt, &out).map(|_| ()).map_err(|e| {
            format!(
                "cannot copy FIRMA_EBPF_OBJECT={}: {e}",
                Path::new(&prebuilt).display()
            )
        }),
        None => firma_ebpf_build::build(&root, firma_ebpf_build::Output::Capture).and_then(|obj| {
            std::fs::copy(&obj, &out)
                .map(|_| ())
                .map_err(|e| format!("cannot copy {}: {e}", obj.display()))
        }),
    };
    if let Err(why) = result {
        if env::var_os("FIRMA_EBPF_REQUIRED").is_some_and(|v| v == "1") {
            panic!("eBPF object required but not built: {why}");
        }
        println!(
            "cargo:warning=eBPF object not built ({why}); transparent mode will be unavailable"
        );
        std::fs::write(&out, b"").expect("OUT_DIR is writable");
    }
}
