//! `firma doctor [--json] [-c F]`: what this machine has and lacks for Firma, especially for
//! transparent mode (kernel BPF + cgroup features, cgroup2 and bpffs mounts, the embedded eBPF
//! object), plus the modes of the key files a config names.

use crate::config::FirmaConfig;
use firma_sidecar::ebpf::{Cgroup2, bpffs, embedded_object, pins};
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Also check the key files named by this config.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Skip the per-hook probe (loading and attaching each eBPF program in a scratch cgroup),
    /// e.g. when only the config is of interest.
    #[arg(long)]
    no_probe: bool,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut checks = kernel_checks(!args.no_probe);
    checks.push(pins_check(args.config.as_deref()));
    if let Some(path) = &args.config {
        checks.extend(key_checks(path));
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        println!("{}", serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("[{tag}] {:<22} {}", c.name, c.detail);
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn kernel_checks(probe_hooks: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let (major, minor) = parse_version(&release);
    out.push(if (major, minor) >= (5, 9) {
        check(
            "kernel",
            Status::Ok,
            format!("Linux {release} (>= 5.9: BPF links and their detach, boot-time clock of the refusal tallies)"),
        )
    } else {
        check(
            "kernel",
            Status::Fail,
            format!(
                "Linux {release}; transparent mode needs >= 5.9 (BPF links and BPF_LINK_DETACH, getpeername hooks, bpf_ktime_get_boot_ns for the refusal tallies)"
            ),
        )
    });
    out.push(if nix::unistd::geteuid().is_root() {
        check("privileges", Status::Ok, "root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    } else {
        check("privileges", Status::Fail, "not root: loading BPF programs, mounting bpffs and SO_MARK need CAP_BPF/CAP_SYS_ADMIN/CAP_NET_ADMIN")
    });
    out.push(match kernel_config_flag(&release, "CONFIG_CGROUP_BPF") {
        Some(true) => check("CONFIG_CGROUP_BPF", Status::Ok, "enabled"),
        Some(false) => check(
            "CONFIG_CGROUP_BPF",
            Status::Fail,
            "disabled: cgroup BPF programs cannot attach",
        ),
        None => check(
            "CONFIG_CGROUP_BPF",
            Status::Warn,
            "kernel config not readable (/proc/config.gz, /boot/config-*); cannot confirm",
        ),
    });
    out.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("BTF", Status::Ok, "/sys/kernel/btf/vmlinux")
    } else {
        check(
            "BTF",
            Status::Warn,
            "no /sys/kernel/btf/vmlinux (not required, but aids diagnostics)",
        )
    });
    out.push(match Cgroup2::discover() {
        Ok(cg) => check(
            "cgroup2",
            Status::Ok,
            format!("mounted at {}", cg.mount().display()),
        ),
        Err(e) => check("cgroup2", Status::Fail, e.to_string()),
    });
    out.push(
        match bpffs::bpffs_covering(Path::new(bpffs::DEFAULT_BPFFS)) {
            Ok(Some(m)) => check("bpffs", Status::Ok, format!("mounted at {}", m.display())),
            Ok(None) => check(
                "bpffs",
                Status::Warn,
                format!(
                    "not mounted at {}; the sidecar mounts it on start (or: mount -t bpf bpf {})",
                    bpffs::DEFAULT_BPFFS,
                    bpffs::DEFAULT_BPFFS
                ),
            ),
            Err(e) => check("bpffs", Status::Fail, e.to_string()),
        },
    );
    out.push(match embedded_object() {
        Ok(obj) => check(
            "eBPF object",
            Status::Ok,
            format!("{} bytes embedded", obj.len()),
        ),
        Err(e) => check("eBPF object", Status::Fail, e.to_string()),
    });
    if probe_hooks {
        out.extend(hook_checks());
    } else {
        out.push(check("eBPF hooks", Status::Warn, "not probed: --no-probe"));
    }
    out
}

/// The oldest mainline kernel with each hook (cgroup BPF links: 5.7), for the failure detail.
fn hook_since(hook: &str) -> &'static str {
    match hook {
        "cgroup_skb/egress" => "4.10",
        "sock_ops" => "4.13",
        "cgroup/connect4" | "cgroup/connect6" => "4.17",
        "cgroup/sendmsg4" | "cgroup/sendmsg6" => "4.18",
        "cgroup/recvmsg4" | "cgroup/recvmsg6" => "5.2",
        "cgroup/getpeername4" | "cgroup/getpeername6" => "5.8",
        _ => "5.9",
    }
}

/// Keeps the end of a long error (verifier logs run to thousands of lines; the verdict is last).
fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().rev().nth(max) {
        Some((i, _)) => format!("...{}", &s[i..]),
        None => s.to_string(),
    }
}

/// Loads and attaches each program of the embedded object in a scratch cgroup
/// (`firma_sidecar::ebpf::probe`): one check per kernel hook, plus `BPF_LINK_DETACH`. This is
/// what the sidecar needs from the kernel, asked of the kernel itself rather than inferred
/// from its version.
fn hook_checks() -> Vec<Check> {
    let skip = |why: String| {
        vec![check(
            "eBPF hooks",
            Status::Warn,
            format!("not probed: {why}"),
        )]
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("not root".into());
    }
    let Ok(object) = embedded_object() else {
        return skip("no eBPF object".into());
    };
    let cgroup2 = match Cgroup2::discover() {
        Ok(c) => c,
        Err(e) => return skip(e.to_string()),
    };
    let bpffs = Path::new(bpffs::DEFAULT_BPFFS);
    match bpffs::bpffs_covering(bpffs) {
        Ok(Some(_)) => {}
        _ => {
            return skip(format!(
                "no bpffs mounted at {} (mount -t bpf bpf {} and re-run)",
                bpffs.display(),
                bpffs.display()
            ));
        }
    }
    let probe = match firma_sidecar::ebpf::probe::probe(object, &cgroup2, bpffs) {
        Ok(p) => p,
        Err(e) => return skip(e.to_string()),
    };
    let mut out = Vec::new();
    if let Err(e) = &probe.object {
        out.push(check(
            "eBPF hooks",
            Status::Fail,
            format!(
                "the kernel refused the object's maps: {}",
                tail(&e.to_string(), 600)
            ),
        ));
        return out;
    }
    for h in &probe.hooks {
        out.push(match &h.result {
            Ok(()) => check(
                h.hook,
                Status::Ok,
                format!("{} loaded and attached", h.program),
            ),
            Err(e) => check(
                h.hook,
                Status::Fail,
                format!(
                    "{} refused: {} (hook in Linux >= {}; transparent mode needs it)",
                    h.program,
                    tail(&e.to_string(), 600),
                    hook_since(h.hook)
                ),
            ),
        });
    }
    out.push(match &probe.link_detach {
        Some(Ok(n)) => check(
            "BPF_LINK_DETACH",
            Status::Ok,
            format!("{n} probe links detached (workload detach)"),
        ),
        Some(Err(e)) => check(
            "BPF_LINK_DETACH",
            Status::Fail,
            format!(
                "{}; `firma workload detach` needs Linux >= 5.9",
                tail(&e.to_string(), 300)
            ),
        ),
        None => check("BPF_LINK_DETACH", Status::Warn, "not probed"),
    });
    out
}

/// Whether programs pinned under `pin_dir` would outlive the sidecar (see
/// `firma_sidecar::ebpf::pins`): a bpffs that only a private mount namespace holds vanishes
/// with the process, and tagged workloads then go direct.
fn pins_check(config: Option<&Path>) -> Check {
    let transparent = config
        .and_then(|p| FirmaConfig::load(p).ok())
        .and_then(|c| c.sidecar)
        .map(|s| s.interceptor.transparent)
        .unwrap_or_default();
    let pin_dir = &transparent.pin_dir;
    let allowed = transparent.allow_ephemeral_pins;
    let ephemeral = |detail: String| {
        if allowed {
            check(
                "pins",
                Status::Warn,
                format!(
                    "{detail} (accepted by allow_ephemeral_pins = true: fail-open after a crash)"
                ),
            )
        } else {
            check("pins", Status::Fail, detail)
        }
    };
    match bpffs::bpffs_covering(pin_dir) {
        Err(e) => check("pins", Status::Fail, e.to_string()),
        Ok(None) if !pin_dir.starts_with(bpffs::DEFAULT_BPFFS) => check(
            "pins",
            Status::Fail,
            format!(
                "pin_dir {} is not on a bpffs and not under {}: the sidecar would refuse it; mount bpffs there or move pin_dir",
                pin_dir.display(),
                bpffs::DEFAULT_BPFFS
            ),
        ),
        Ok(None) => {
            let own_ns = pins::shares_init_mount_ns() == Some(true);
            let container = pins::in_initial_pid_ns() == Some(false);
            if own_ns && !container {
                check(
                    "pins",
                    Status::Ok,
                    format!(
                        "pin_dir {} has no bpffs yet; the sidecar mounts one at {} in PID 1's mount namespace, so pins outlive it",
                        pin_dir.display(),
                        bpffs::DEFAULT_BPFFS
                    ),
                )
            } else {
                ephemeral(format!(
                    "pin_dir {} has no bpffs, and one the sidecar mounted here would live only in this {} (pins vanish with it); mount bpffs in the host's mount namespace or bind-mount the host's {}",
                    pin_dir.display(),
                    if container {
                        "container"
                    } else {
                        "private mount namespace"
                    },
                    bpffs::DEFAULT_BPFFS
                ))
            }
        }
        Ok(Some(_)) => match pins::durability(pin_dir) {
            Err(e) => check("pins", Status::Fail, format!("{}: {e}", pin_dir.display())),
            Ok(pins::Durability::Durable { mount }) => check(
                "pins",
                Status::Ok,
                format!(
                    "pin_dir {} is on the bpffs at {} that PID 1's mount namespace holds: pins outlive the sidecar",
                    pin_dir.display(),
                    mount.display()
                ),
            ),
            Ok(pins::Durability::ContainerScoped { mount }) => check(
                "pins",
                Status::Warn,
                format!(
                    "in a container's PID namespace: pins under {} outlive the sidecar, and the container only if {} is the host's bpffs bind-mounted in",
                    pin_dir.display(),
                    mount.display()
                ),
            ),
            Ok(pins::Durability::Ephemeral { detail }) => ephemeral(detail),
        },
    }
}

fn parse_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// `Some(enabled)` from /proc/config.gz (via gzip -dc) or /boot/config-<release>.
fn kernel_config_flag(release: &str, flag: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .or_else(|| {
            std::process::Command::new("gzip")
                .args(["-dc", "/proc/config.gz"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        })?;
    Some(text.lines().any(|l| l == format!("{flag}=y")))
}

fn key_checks(path: &Path) -> Vec<Check> {
    let cfg = match FirmaConfig::load(path) {
        Ok(c) => c,
        Err(e) => return vec![check("config", Status::Fail, e.to_string())],
    };
    let mut keys: Vec<PathBuf> = Vec::new();
    if let Some(a) = &cfg.authority {
        keys.push(a.key_file.clone());
    }
    if let Some(s) = &cfg.sidecar {
        keys.push(s.ca.dir.join("firma-ca.key"));
        keys.extend(s.audit.signing_key_path.clone());
    }
    keys.into_iter()
        .map(|k| match std::fs::metadata(&k) {
            Ok(m) if m.permissions().mode() & 0o077 == 0 => check(
                "key mode",
                Status::Ok,
                format!("{} is owner-only", k.display()),
            ),
            Ok(m) => check(
                "key mode",
                Status::Fail,
                format!(
                    "{} has mode {:o}; must be 0600 (chmod 600)",
                    k.display(),
                    m.permissions().mode() & 0o777
                ),
            ),
            Err(e) => check("key mode", Status::Warn, format!("{}: {e}", k.display())),
        })
        .collect()
}
