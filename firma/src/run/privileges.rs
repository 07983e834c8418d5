//! What `firma run` needs from the kernel and the caller, checked before anything is created
//! so a refusal leaves nothing behind.

use firma_sidecar::ebpf::{Cgroup2, embedded_object};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (`CapEff` of `/proc/self/status`).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Highest capability this kernel knows (CAP_BPF exists from 5.8).
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// `Err(one line)` naming what is missing; the caller exits 78.
pub fn check() -> Result<Cgroup2, String> {
    let doctor = "see `firma doctor`";
    if !nix::unistd::geteuid().is_root() {
        return Err(format!(
            "firma run needs root: it loads eBPF programs, creates a cgroup and pins under /sys/fs/bpf (run it with sudo; {doctor})"
        ));
    }
    let caps = effective_caps().unwrap_or(u64::MAX);
    let mut needed = vec![
        ("CAP_SYS_ADMIN", CAP_SYS_ADMIN),
        ("CAP_NET_ADMIN", CAP_NET_ADMIN),
        ("CAP_DAC_OVERRIDE", CAP_DAC_OVERRIDE),
        ("CAP_SETUID", CAP_SETUID),
        ("CAP_SETGID", CAP_SETGID),
    ];
    if last_cap() >= CAP_BPF {
        needed.push(("CAP_BPF", CAP_BPF));
    }
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, bit)| caps & (1u64 << bit) == 0)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "firma run is missing the capabilities {} (it loads eBPF programs and creates a cgroup; {doctor})",
            missing.join(", ")
        ));
    }
    if let Err(e) = embedded_object() {
        return Err(format!("firma run cannot enforce: {e} ({doctor})"));
    }
    Cgroup2::discover().map_err(|e| format!("firma run needs cgroup v2: {e} ({doctor})"))
}
