//! The guest's whole userland: an uncompressed newc cpio with static busybox, the static test
//! binary and `/init`. Everything lives in the initramfs because virtio and 9p are modules in
//! Debian kernels; written here directly, so no `cpio` tool is needed.

use std::io::Write;
use std::path::Path;

/// `/init`: mounts what the tests need (the kernel has no DEVTMPFS_MOUNT), runs them, powers
/// off. `panic=-1` plus `-no-reboot` also ends QEMU if init dies.
fn init_script(test_args: &str) -> String {
    // `firma doctor` first: what it reports is compared with what the suite then observes.
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
ip link set lo up
printf '127.0.0.1 localhost\n::1 localhost\n' > /etc/hosts
echo "FIRMA-VM-BOOTED kernel $(uname -r), $(nproc) cpus"
/firma doctor --json > /tmp/doctor.json 2>/tmp/doctor.err
echo "FIRMA-VM-DOCTOR-EXIT $?"
printf 'FIRMA-VM-DOCTOR %s\n' "$(cat /tmp/doctor.json)"
cat /tmp/doctor.err
/vm-kernel-tests --require {test_args}
echo "FIRMA-VM-EXIT $?"
poweroff -f
"#
    )
}

/// A newc ("070701") archive writer.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: usize,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let size = u32::try_from(data.len())
            .map_err(|_| std::io::Error::other(format!("{name} is over 4 GiB")))?;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.written += b.len();
        self.out.write_all(b)
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n])
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What goes into the guest besides busybox and `/init`.
pub struct Payload<'a> {
    pub busybox: &'a Path,
    pub tests: &'a Path,
    pub firma: &'a Path,
    /// `(release, config file)`: installed as `/boot/config-<release>` for `firma doctor`.
    pub config: Option<(&'a str, &'a Path)>,
}

/// Writes the initramfs to `out`.
pub fn build(out: &Path, p: &Payload<'_>, test_args: &str) -> anyhow::Result<()> {
    let busybox = std::fs::read(p.busybox)?;
    let tests = std::fs::read(p.tests)?;
    let firma = std::fs::read(p.firma)?;
    let file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut c = Cpio::new(file);
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "tmp", "run",
        "root", "boot",
    ] {
        c.dir(d)?;
    }
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    c.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[])?;
    c.file("bin/busybox", 0o755, &busybox)?;
    c.entry("bin/sh", S_IFLNK | 0o777, (0, 0), b"busybox")?;
    c.file("vm-kernel-tests", 0o755, &tests)?;
    c.file("firma", 0o755, &firma)?;
    if let Some((release, config)) = p.config {
        c.file(
            &format!("boot/config-{release}"),
            0o644,
            &std::fs::read(config)?,
        )?;
    }
    c.file("init", 0o755, init_script(test_args).as_bytes())?;
    c.finish()?;
    Ok(())
}

/// `true` when the ELF file has no program interpreter (statically linked): the initramfs has
/// no dynamic loader or libc.
pub fn is_static_elf(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF64 little endian only (x86_64).
    if !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let o = phoff + i * usize::from(phentsize);
        data.get(o..o + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new(Vec::new());
        c.dir("bin").unwrap();
        c.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let out = c.finish().unwrap();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // 110-byte header + "bin\0" = 114, padded to 116 where the next header starts.
        assert_eq!(&out[116..122], b"070701");
        let tail = String::from_utf8_lossy(&out[out.len() - 16..]);
        assert!(tail.contains("TRAILER!!!"), "{tail}");
    }

    #[test]
    fn detects_dynamic_and_static_elves() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary links glibc dynamically.
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(b"not an elf"));
    }
}
