//! The guest kernel: Debian's current `linux-image-amd64` target, downloaded (never installed)
//! and cached under `target/vm/kernel/<package>/vmlinux`.
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
];

/// Returns the cached `vmlinux`, fetching and extracting it on first use.
/// `FIRMA_VM_KERNEL=/path` (a vmlinux or vmlinuz) skips the download.
pub fn vmlinux(cache: &Path) -> anyhow::Result<PathBuf> {
    if let Some(given) = std::env::var_os("FIRMA_VM_KERNEL") {
        let given = PathBuf::from(given);
        let data = std::fs::read(&given).with_context(|| format!("{}", given.display()))?;
        if data.starts_with(ELF_MAGIC) {
            return Ok(given);
        }
        let out = cache.join("kernel/custom-vmlinux");
        write_vmlinux(&data, &out)?;
        return Ok(out);
    }
    let package = current_package()?;
    let dir = cache.join("kernel").join(&package);
    let out = dir.join("vmlinux");
    if out.is_file() {
        eprintln!("kernel: cached {}", out.display());
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    super::exec(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&dir),
    )?;
    let deb = find_file(&dir, &format!("{package}_"), ".deb")?;
    // Only ./boot/vmlinuz-* is needed; the package is mostly modules.
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
        .args(["--wildcards", "./boot/vmlinuz-*"])
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
    let vmlinuz = find_file(&dir.join("boot"), "vmlinuz-", "")?;
    let data = std::fs::read(&vmlinuz)?;
    write_vmlinux(&data, &out)?;
    let _ = std::fs::remove_file(&deb);
    Ok(out)
}

/// The versioned package `linux-image-amd64` currently points at (names change with updates).
fn current_package() -> anyhow::Result<String> {
    let query = || -> anyhow::Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("cannot run apt-cache (a Debian host is needed to fetch the kernel; or set FIRMA_VM_KERNEL)")?;
        Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
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
        "apt-cache knows no linux-image-amd64 dependency (run `apt-get update` as root, or set FIRMA_VM_KERNEL=/path/to/vmlinuz)"
    )
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
    bail!("no compressed ELF kernel found in the bzImage (xz, zstd and gzip tried)")
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
