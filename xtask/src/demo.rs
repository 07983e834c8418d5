//! `cargo xtask demo`: build `firma` with its eBPF object and run `scripts/demo.sh` (authority +
//! transparent sidecar + local HTTPS upstream posing as api.openai.com, an attached cgroup,
//! unmodified curl showing injection and a deny). Needs root; runs in its own network namespace.

use crate::exec;
use std::path::Path;
use std::process::Command;

pub fn run(root: &Path) -> anyhow::Result<()> {
    crate::build_ebpf(crate::Prebuilt::Leave)?;
    exec(
        Command::new("cargo")
            .args(["build", "-p", "firma"])
            .current_dir(root)
            .env("FIRMA_EBPF_REQUIRED", "1"),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    exec(
        Command::new("bash")
            .arg(root.join("scripts/demo.sh"))
            .env("FIRMA", target.join("debug/firma")),
    )
}
