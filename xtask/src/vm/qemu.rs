//! Boots the guest under QEMU with a hard timeout and reads the test markers from its serial
//! console (the only channel out: no virtio modules in the initramfs).

use anyhow::Context;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// KVM only when it can actually help: `/dev/kvm` usable, hardware virtualisation flags, and
/// not a paravirtualised nested host (`kvm_pvm`), where guests run ~100x slower than TCG.
pub fn kvm_usable() -> bool {
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let flags = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    rw && flags && !Path::new("/sys/module/kvm_pvm").exists()
}

/// What the guest reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// `(passed, failed)` from the DONE marker.
    pub done: Option<(usize, usize)>,
    pub skipped: Option<String>,
    /// `(test, why)` for tests the guest did not run (host-only ones).
    pub skipped_tests: Vec<(String, String)>,
    /// `firma doctor --json` as run in the guest before the suite.
    pub doctor: Option<String>,
    pub booted: bool,
    pub timed_out: bool,
    /// QEMU's exit status (a signal here means the host killed it, e.g. its OOM killer).
    pub exit: Option<String>,
    /// The last console lines, printed after the table when the run failed: CI logs keep only
    /// their tail, and a guest that dies early says why only here (panic text, OOM).
    pub tail: VecDeque<String>,
}

/// Console lines kept for a failure's diagnosis.
const TAIL_LINES: usize = 40;

impl Report {
    /// Reads one console line (without `\r\n`); markers may be glued to earlier output.
    pub fn scan(&mut self, line: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
        if let Some(i) = line.find("FIRMA-VM-TEST ok ") {
            self.passed.push(line[i + 17..].trim().to_string());
        } else if let Some(i) = line.find("FIRMA-VM-TEST FAIL ") {
            self.failed.push(line[i + 19..].trim().to_string());
        } else if let Some(i) = line.find("FIRMA-VM-TESTS-DONE ") {
            let mut passed = None;
            let mut failed = None;
            for kv in line[i + 20..].split_whitespace() {
                match kv.split_once('=') {
                    Some(("passed", n)) => passed = n.parse().ok(),
                    Some(("failed", n)) => failed = n.parse().ok(),
                    _ => {}
                }
            }
            self.done = passed.zip(failed);
        } else if let Some(i) = line.find("FIRMA-VM-TESTS-SKIP ") {
            self.skipped = Some(line[i + 20..].trim().to_string());
        } else if let Some(i) = line.find("FIRMA-VM-TEST skip ") {
            let rest = line[i + 19..].trim();
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            self.skipped_tests.push((name.to_string(), why.to_string()));
        } else if let Some(i) = line.find("FIRMA-VM-DOCTOR ") {
            self.doctor = Some(line[i + 16..].trim().to_string());
        } else if line.contains("FIRMA-VM-BOOTED") {
            self.booted = true;
        }
    }

    /// Why the run is not a success, if it is not.
    pub fn problem(&self) -> Option<String> {
        if self.timed_out {
            return Some("the VM hit the timeout".into());
        }
        if let Some(why) = &self.skipped {
            return Some(format!("the tests skipped inside the VM: {why}"));
        }
        if !self.failed.is_empty() {
            return Some(format!(
                "{} test(s) failed: {:?}",
                self.failed.len(),
                self.failed
            ));
        }
        match self.done {
            None => Some(format!(
                "no FIRMA-VM-TESTS-DONE marker ({}; qemu {})",
                if self.booted {
                    "guest booted, then crashed or the test binary died"
                } else {
                    "the guest never reached /init"
                },
                self.exit.as_deref().unwrap_or("exit status unknown")
            )),
            Some((_, f)) if f > 0 => Some(format!("DONE reports {f} failure(s)")),
            Some((0, _)) => Some("no test ran".into()),
            Some((p, _)) if p != self.passed.len() => Some(format!(
                "DONE reports {p} passed but {} ok markers were seen",
                self.passed.len()
            )),
            Some(_) => None,
        }
    }
}

/// Boots `kernel` with `initrd`, echoing the console, and kills QEMU at `timeout`.
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    prefix: &str,
) -> anyhow::Result<Report> {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm_usable() {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
    }
    cmd.args([
        "-m",
        "1G",
        "-smp",
        "2",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-append",
        "console=ttyS0 panic=-1 oops=panic quiet",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let deadline = Instant::now() + timeout;
    let mut report = Report::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{prefix}| {line}");
                report.scan(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                report.timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    eprintln!("qemu exited: {status}");
    report.exit = Some(status.to_string());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_anywhere_in_a_line() {
        let mut r = Report::default();
        for l in [
            "\u{1b}c\u{1b}[?7lSeaBIOS FIRMA-VM-TEST ok redirect_ipv4",
            "FIRMA-VM-TEST FAIL udp_443_refused: not refused",
            "FIRMA-VM-TESTS-DONE passed=1 failed=1",
        ] {
            r.scan(l);
        }
        assert_eq!(r.passed, ["redirect_ipv4"]);
        assert_eq!(r.failed, ["udp_443_refused: not refused"]);
        assert_eq!(r.done, Some((1, 1)));
        assert!(r.problem().is_some());
        r.scan("FIRMA-VM-TEST skip many_connections: host only");
        r.scan("FIRMA-VM-DOCTOR {\"ok\":true,\"checks\":[]}");
        assert_eq!(
            r.skipped_tests,
            [("many_connections".to_string(), "host only".to_string())]
        );
        assert_eq!(r.doctor.as_deref(), Some("{\"ok\":true,\"checks\":[]}"));
    }

    #[test]
    fn success_needs_the_done_marker_and_matching_counts() {
        let mut r = Report::default();
        r.scan("FIRMA-VM-TEST ok a");
        assert!(r.problem().unwrap().contains("no FIRMA-VM-TESTS-DONE"));
        r.scan("FIRMA-VM-TESTS-DONE passed=2 failed=0");
        assert!(r.problem().unwrap().contains("2 passed"));
        r.scan("FIRMA-VM-TEST ok b");
        assert_eq!(r.problem(), None);
        r.timed_out = true;
        assert!(r.problem().is_some());
    }

    #[test]
    fn a_crash_says_how_far_the_guest_got_and_keeps_the_console_tail() {
        let mut r = Report::default();
        for i in 0..100 {
            r.scan(&format!("line {i}"));
        }
        r.exit = Some("signal: 9 (SIGKILL)".into());
        let p = r.problem().unwrap();
        assert!(
            p.contains("never reached /init") && p.contains("SIGKILL"),
            "{p}"
        );
        assert_eq!(r.tail.len(), TAIL_LINES);
        assert_eq!(r.tail.back().map(String::as_str), Some("line 99"));
        r.scan("Booting from ROM..FIRMA-VM-BOOTED kernel 6.12, 2 cpus");
        r.scan("Kernel panic - not syncing: Attempted to kill init!");
        assert!(r.problem().unwrap().contains("guest booted, then crashed"));
        assert_eq!(
            r.tail.back().map(String::as_str),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
    }
}
