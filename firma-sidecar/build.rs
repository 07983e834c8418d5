//! Builds the eBPF object (`firma-ebpf`, nightly + `-Z build-std=core` + bpf-linker) and puts it
//! in `OUT_DIR/firma-ebpf.o` for `include_bytes!`.
//!
//! - `FIRMA_EBPF_OBJECT=/path/to/obj` embeds a prebuilt object instead of building.
//! - If the toolchain is missing (no nightly, no rust-src, no bpf-linker) the build still
//!   succeeds with an empty object and a warning; transparent mode then refuses to start and says
//!   why, and the eBPF tests skip. `scripts/install-bpf-linker.sh` installs what is needed.
//! - `FIRMA_EBPF_REQUIRED=1` turns that warning into a build failure (CI).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it")).join("firma-ebpf.o");
    let ebpf_dir = manifest.join("../firma-ebpf");
    for p in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo:rerun-if-changed=../firma-maps");
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
        None => build(&ebpf_dir).and_then(|obj| {
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

/// `cargo +nightly build --release` inside firma-ebpf (its `.cargo/config.toml` sets the target
/// and build-std), with the outer build's toolchain variables removed so rustup picks nightly.
fn build(ebpf_dir: &Path) -> Result<PathBuf, String> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .current_dir(ebpf_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        );
    for key in [
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
    ] {
        cmd.env_remove(key);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `rustup run nightly cargo build`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("eBPF build failed: {}", tail.join(" | ")));
    }
    let obj = ebpf_dir.join("target/bpfel-unknown-none/release/firma-ebpf");
    if obj.is_file() {
        Ok(obj)
    } else {
        Err(format!("{} missing after build", obj.display()))
    }
}
