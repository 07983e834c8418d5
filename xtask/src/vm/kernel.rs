//! Guest kernels: Debian packages fetched by version (downloaded, never installed) and cached
//! under `~/.cache/firma/kernels/<package>_<version>/` (vmlinux, config, release), or a file.
//!
//! QEMU boots an uncompressed `vmlinux` much faster than a bzImage under TCG (about 2 s instead
//! of 5 s here), so the compressed payload is cut out of `vmlinuz` and decompressed once, as
//! the kernel's own `scripts/extract-vmlinux` does.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Compressed payload formats a bzImage may carry, with the tool that decompresses each.
const FORMATS: &[(&str, &[u8], &str)] = &[
    ("xz", b"\xfd7zXZ\x00", "xz"),
    ("zstd", b"\x28\xb5\x2f\xfd", "zstd"),
    ("gzip", b"\x1f\x8b\x08", "gzip"),
    // The kernel's LZ4 is the legacy frame format (Debian's 6.1 cloud kernel uses it).
    ("lz4", b"\x02\x21\x4c\x18", "lz4"),
];

/// A kernel of the matrix: what `--kernel` names and how it is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A Debian package: a meta-package (`linux-image-cloud-amd64`) resolved to the versioned
    /// package it depends on, or a versioned package itself.
    Debian { name: String, package: String },
    /// A vmlinux or vmlinuz on disk (`--kernel ./path`, `FIRMA_VM_KERNEL`).
    File(PathBuf),
}

/// The short names `--kernel` accepts, with the Debian (meta-)package each follows.
pub const NAMED: &[(&str, &str)] = &[
    ("6.1", "linux-image-amd64"),
    ("6.1-cloud", "linux-image-cloud-amd64"),
    ("6.1-rt", "linux-image-rt-amd64"),
    ("6.12", "linux-image-6.12-amd64"),
    ("6.12-cloud", "linux-image-6.12-cloud-amd64"),
    ("6.12-rt", "linux-image-6.12-rt-amd64"),
];

/// What `cargo xtask vm-test` runs without `--kernel`: both LTS lines Debian bookworm carries,
/// the generic and the cloud flavour, and the PREEMPT_RT flavour of 6.1.
pub const DEFAULT_MATRIX: &[&str] = &["6.1", "6.1-cloud", "6.1-rt", "6.12-cloud"];

impl Spec {
    /// `6.1-cloud`, a package name (`linux-image-…`), or a path (contains `/`).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if s.contains('/') {
            return Ok(Self::File(PathBuf::from(s)));
        }
        if let Some((name, package)) = NAMED.iter().find(|(n, _)| *n == s) {
            return Ok(Self::Debian {
                name: (*name).into(),
                package: (*package).into(),
            });
        }
        if s.starts_with("linux-image-")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '+' | '~'))
        {
            return Ok(Self::Debian {
                name: s.into(),
                package: s.into(),
            });
        }
        bail!(
            "unknown kernel {s:?}: use one of {}, a Debian package name (linux-image-…), or a path to a vmlinux/vmlinuz",
            NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        )
    }

    /// The name in the results table.
    pub fn name(&self) -> String {
        match self {
            Self::Debian { name, .. } => name.clone(),
            Self::File(p) => p.display().to_string(),
        }
    }
}

/// A kernel ready to boot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Kernel {
    pub name: String,
    /// The versioned Debian package and its version, when it came from one.
    pub package: Option<String>,
    pub version: Option<String>,
    /// `uname -r` of the kernel (from the package's /boot/config-<release>).
    pub release: Option<String>,
    #[serde(skip)]
    pub vmlinux: PathBuf,
    /// The package's kernel config, copied to /boot/config-<release> in the guest so
    /// `firma doctor` reads it as it would on an installed system.
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Where fetched kernels are kept, one directory per package and version:
/// `$FIRMA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/firma/kernels`, else `~/.cache/firma/kernels`.
pub fn cache_root() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("FIRMA_KERNEL_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("firma/kernels"));
    }
    let home = std::env::var_os("HOME").context("neither FIRMA_KERNEL_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/firma/kernels"))
}

/// Returns the kernel for `spec`, fetching and extracting it on first use.
pub fn fetch(spec: &Spec, scratch: &Path) -> anyhow::Result<Kernel> {
    match spec {
        Spec::File(given) => {
            let data = std::fs::read(given).with_context(|| format!("{}", given.display()))?;
            let vmlinux = if data.starts_with(ELF_MAGIC) {
                given.clone()
            } else {
                let out = scratch.join("kernel/custom-vmlinux");
                write_vmlinux(&data, &out)?;
                out
            };
            Ok(Kernel {
                name: spec.name(),
                package: None,
                version: None,
                release: None,
                vmlinux,
                config: None,
            })
        }
        Spec::Debian { name, package } => {
            let package = versioned_package(package)?;
            let version = package_version(&package)?;
            fetch_package(name, &package, &version)
        }
    }
}

/// Downloads `package` at `version` (never installs it) and extracts vmlinux and config into
/// `<cache>/<package>_<version>/`, unless they are there already.
fn fetch_package(name: &str, package: &str, version: &str) -> anyhow::Result<Kernel> {
    let dir = cache_root()?.join(format!("{package}_{version}"));
    let out = dir.join("vmlinux");
    let kernel = |release: Option<String>| Kernel {
        name: name.into(),
        package: Some(package.into()),
        version: Some(version.into()),
        release,
        vmlinux: out.clone(),
        config: Some(dir.join("config")).filter(|c| c.is_file()),
    };
    let release_file = dir.join("release");
    if out.is_file() && release_file.is_file() {
        eprintln!("kernel {name}: cached {}", out.display());
        let release = std::fs::read_to_string(&release_file)?.trim().to_string();
        return Ok(kernel(Some(release)));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    super::exec(
        Command::new("apt-get")
            .args(["download", &format!("{package}={version}")])
            .current_dir(&dir),
    )?;
    let deb = find_file(&dir, &format!("{package}_"), ".deb")?;
    // Only ./boot is needed; the package is mostly modules (everything the guest needs is
    // built in: see docs/kernels.md).
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run dpkg-deb")?;
    let tar_in = dpkg.stdout.take().context("dpkg-deb stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&dir)
        .args(["--wildcards", "./boot/vmlinuz-*", "./boot/config-*"])
        .stdin(tar_in)
        .status()
        .context("cannot run tar")?;
    let dpkg = dpkg.wait()?;
    if !tar.success() || !dpkg.success() {
        bail!(
            "cannot unpack {} (dpkg-deb {dpkg}, tar {tar})",
            deb.display()
        );
    }
    let boot = dir.join("boot");
    let vmlinuz = find_file(&boot, "vmlinuz-", "")?;
    let config = find_file(&boot, "config-", "")?;
    let release = config
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("config-"))
        .context("config file name")?
        .to_string();
    write_vmlinux(&std::fs::read(&vmlinuz)?, &out)?;
    std::fs::rename(&config, dir.join("config"))?;
    std::fs::write(&release_file, &release)?;
    let _ = std::fs::remove_dir_all(&boot);
    let _ = std::fs::remove_file(&deb);
    Ok(kernel(Some(release)))
}

/// Runs `apt-cache ARGS`, once more after `apt-get update` (when root) if the answer is empty.
fn apt_cache(args: &[&str], parse: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let query = || -> anyhow::Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(args)
            .output()
            .context("cannot run apt-cache (a Debian host is needed to fetch kernels; or pass --kernel /path/to/vmlinuz)")?;
        Ok(parse(&String::from_utf8_lossy(&out.stdout)))
    };
    if let Some(p) = query()? {
        return Ok(p);
    }
    if is_root() {
        super::exec(Command::new("apt-get").arg("update"))?;
        if let Some(p) = query()? {
            return Ok(p);
        }
    }
    bail!(
        "apt-cache {} gave no answer (run `apt-get update` as root, or pass --kernel /path/to/vmlinuz)",
        args.join(" ")
    )
}

/// The versioned package a meta-package currently points at (names change with updates:
/// 6.1.0-56 becomes -57); a versioned package is returned as is.
fn versioned_package(package: &str) -> anyhow::Result<String> {
    let depends = apt_cache(&["depends", package], |t| {
        t.contains("Depends:").then(|| t.to_string())
    })?;
    Ok(parse_depends(&depends).unwrap_or_else(|| package.to_string()))
}

/// The candidate version apt would fetch.
fn package_version(package: &str) -> anyhow::Result<String> {
    apt_cache(&["policy", package], parse_candidate)
}

fn parse_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let name = l
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        name.starts_with("linux-image-").then(|| name.to_string())
    })
}

fn parse_candidate(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

pub(super) fn is_root() -> bool {
    // Effective uid is the second field of the `Uid:` line (no libc dependency for one check).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn find_file(dir: &Path, prefix: &str, suffix: &str) -> anyhow::Result<PathBuf> {
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            return Ok(e.path());
        }
    }
    bail!("no {prefix}*{suffix} in {}", dir.display())
}

fn write_vmlinux(bzimage: &[u8], out: &Path) -> anyhow::Result<()> {
    let elf = extract_vmlinux(bzimage)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf)?;
    std::fs::rename(&tmp, out)?;
    eprintln!(
        "kernel: extracted {} ({} MB)",
        out.display(),
        elf.len() >> 20
    );
    Ok(())
}

/// The uncompressed ELF kernel inside a bzImage. Tries the payload the boot protocol header
/// points at first, then every compression magic found in the file (extract-vmlinux style).
pub fn extract_vmlinux(bz: &[u8]) -> anyhow::Result<Vec<u8>> {
    if bz.starts_with(ELF_MAGIC) {
        return Ok(bz.to_vec());
    }
    let mut candidates: Vec<&[u8]> = Vec::new();
    if let Some(p) = header_payload(bz) {
        candidates.push(p);
    }
    for (_, magic, _) in FORMATS {
        candidates.extend(
            bz.windows(magic.len())
                .enumerate()
                .filter(|(_, w)| w == magic)
                .map(|(i, _)| &bz[i..])
                .take(8),
        );
    }
    for payload in candidates {
        let Some((name, _, tool)) = FORMATS.iter().find(|(_, m, _)| payload.starts_with(m)) else {
            continue;
        };
        match decompress(tool, payload) {
            Ok(out) if out.starts_with(ELF_MAGIC) => return Ok(out),
            Ok(_) => {}
            Err(e) => eprintln!("kernel: {name} payload: {e}"),
        }
    }
    bail!("no compressed ELF kernel found in the bzImage (xz, zstd, gzip and lz4 tried)")
}

/// x86 boot protocol >= 2.08: `payload_offset`/`payload_length` (0x248/0x24c) are relative to
/// the end of the real-mode setup, `(setup_sects + 1) * 512` bytes (`setup_sects` 0 means 4).
fn header_payload(bz: &[u8]) -> Option<&[u8]> {
    if bz.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let sects = match *bz.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let u32_at = |o: usize| -> Option<usize> {
        let b: [u8; 4] = bz.get(o..o + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let start = (sects + 1) * 512 + u32_at(0x248)?;
    let len = u32_at(0x24c)?;
    bz.get(start..start.checked_add(len)?)
}

/// Pipes `data` through `tool -dc`. The exit status is ignored: trailing bytes after the
/// stream make the tools complain after they wrote everything; the ELF check decides.
fn decompress(tool: &str, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool} (install it to extract the kernel)"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_end(&mut out)?;
    let _ = writer.join();
    let _ = child.wait();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-48-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-48-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn parses_the_candidate_version() {
        let out =
            "linux-image-6.12-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.12.118-1~deb12u1\n";
        assert_eq!(parse_candidate(out).as_deref(), Some("6.12.118-1~deb12u1"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
    }

    #[test]
    fn kernel_specs() {
        assert_eq!(
            Spec::parse("6.12-cloud").unwrap(),
            Spec::Debian {
                name: "6.12-cloud".into(),
                package: "linux-image-6.12-cloud-amd64".into()
            }
        );
        assert!(matches!(
            Spec::parse("linux-image-6.1.0-57-cloud-amd64").unwrap(),
            Spec::Debian { .. }
        ));
        assert_eq!(
            Spec::parse("./vmlinuz").unwrap(),
            Spec::File("./vmlinuz".into())
        );
        assert!(Spec::parse("linux-image-6.1;reboot").is_err());
        assert!(Spec::parse("5.4").is_err());
    }

    #[test]
    fn finds_header_payload() {
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1; // setup is 2 * 512 bytes
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        bz[1040..1046].copy_from_slice(b"\xfd7zXZ\x00");
        assert_eq!(header_payload(&bz), Some(&b"\xfd7zXZ\x00"[..]));
    }
}
