//! The kernel matrix's results: per kernel and test pass/fail/skip with the reason, whether
//! `firma doctor` in the guest predicted what the suite then observed, a table on stdout and
//! `target/vm-test/results.json`.

use super::kernel::Kernel;
use super::qemu::Report;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// One test on one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail { reason: String },
    Skip { reason: String },
}

/// One kernel's row of the matrix.
#[derive(Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub package: Option<String>,
    pub version: Option<String>,
    pub release: Option<String>,
    pub vm_seconds: f64,
    /// Why the run as a whole failed (fetch error, timeout, crash, counts that disagree).
    pub problem: Option<String>,
    /// In run order.
    #[serde(serialize_with = "test_rows")]
    pub tests: Vec<(String, Outcome)>,
    /// `firma doctor --json` from the guest.
    pub doctor: Option<Value>,
    /// Where the doctor's prediction and the suite's observation differ.
    pub doctor_disagreements: Vec<String>,
    /// Why the first boot was discarded (a guest that never reached `/init`), if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried: Option<String>,
    /// The last console lines of a run with a problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub console_tail: Vec<String>,
}

/// `[{"test": name, "result": "fail", "reason": …}, …]`.
fn test_rows<S: serde::Serializer>(tests: &[(String, Outcome)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Row<'a> {
        test: &'a str,
        #[serde(flatten)]
        outcome: &'a Outcome,
    }
    s.collect_seq(tests.iter().map(|(t, o)| Row {
        test: t,
        outcome: o,
    }))
}

/// Doctor checks that do not describe the kernel (they depend on a config file).
const NOT_KERNEL: &[&str] = &["pins", "key mode", "config"];
/// Checked only by the tests that detach a workload.
const LINK_DETACH: &str = "BPF_LINK_DETACH";
const DETACHING_TESTS: &[&str] = &["detach_removes_links_and_binding", "pod_uid_resolution"];

impl KernelResult {
    /// A kernel that could not even be fetched or booted.
    pub fn unavailable(name: String, why: String) -> Self {
        Self {
            kernel: name,
            package: None,
            version: None,
            release: None,
            vm_seconds: 0.0,
            problem: Some(why),
            tests: Vec::new(),
            doctor: None,
            doctor_disagreements: Vec::new(),
            retried: None,
            console_tail: Vec::new(),
        }
    }

    pub fn from_report(kernel: &Kernel, report: &Report, vm_seconds: f64) -> Self {
        let mut tests: Vec<(String, Outcome)> = Vec::new();
        for name in &report.passed {
            tests.push((name.clone(), Outcome::Pass));
        }
        for line in &report.failed {
            let (name, why) = line.split_once(": ").unwrap_or((line, ""));
            tests.push((
                name.to_string(),
                Outcome::Fail {
                    reason: why.to_string(),
                },
            ));
        }
        for (name, why) in &report.skipped_tests {
            tests.push((
                name.clone(),
                Outcome::Skip {
                    reason: why.clone(),
                },
            ));
        }
        let doctor = report.doctor.as_deref().map(|d| {
            serde_json::from_str(d)
                .unwrap_or_else(|e| Value::String(format!("unparsable ({e}): {d}")))
        });
        let problem = report.problem();
        let console_tail = if problem.is_some() {
            report.tail.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let mut r = Self {
            kernel: kernel.name.clone(),
            package: kernel.package.clone(),
            version: kernel.version.clone(),
            release: kernel.release.clone(),
            vm_seconds,
            problem,
            tests,
            doctor,
            doctor_disagreements: Vec::new(),
            retried: None,
            console_tail,
        };
        r.doctor_disagreements = r.compare_doctor();
        r
    }

    /// Kernel checks the doctor failed, by name, with their detail.
    fn doctor_failures(&self) -> Result<Vec<(String, String)>, String> {
        let doc = self
            .doctor
            .as_ref()
            .ok_or("firma doctor reported nothing")?;
        let checks = doc
            .get("checks")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("firma doctor's output has no checks: {doc}"))?;
        let mut failed = Vec::new();
        let mut probed = false;
        for c in checks {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            let status = c.get("status").and_then(Value::as_str).unwrap_or("?");
            let detail = c.get("detail").and_then(Value::as_str).unwrap_or("");
            if name == LINK_DETACH {
                probed = true;
            }
            if name == "eBPF hooks" && status == "warn" {
                return Err(format!("firma doctor did not probe the hooks: {detail}"));
            }
            if status == "fail" && !NOT_KERNEL.contains(&name) {
                failed.push((name.to_string(), detail.to_string()));
            }
        }
        if !probed && failed.is_empty() {
            return Err("firma doctor reported no hook probe".into());
        }
        Ok(failed)
    }

    /// Each test that ran needs every hook (the `Redirector` loads all programs at start), and
    /// the detaching tests `BPF_LINK_DETACH` too: the doctor predicts a pass exactly when none
    /// of those failed. Returns where prediction and observation differ.
    fn compare_doctor(&self) -> Vec<String> {
        let ran: Vec<&(String, Outcome)> = self
            .tests
            .iter()
            .filter(|(_, o)| !matches!(o, Outcome::Skip { .. }))
            .collect();
        if ran.is_empty() {
            return Vec::new();
        }
        let failures = match self.doctor_failures() {
            Ok(f) => f,
            Err(why) => return vec![why],
        };
        let mut out = Vec::new();
        for (test, outcome) in ran {
            let blocking: Vec<&str> = failures
                .iter()
                .filter(|(n, _)| n != LINK_DETACH || DETACHING_TESTS.contains(&test.as_str()))
                .map(|(n, _)| n.as_str())
                .collect();
            match (blocking.is_empty(), outcome) {
                (true, Outcome::Fail { reason }) => out.push(format!(
                    "{test}: firma doctor reports every kernel feature it needs, yet it failed ({reason})"
                )),
                (false, Outcome::Pass) => out.push(format!(
                    "{test}: passed although firma doctor reports {} failing",
                    blocking.join(", ")
                )),
                _ => {}
            }
        }
        out
    }

    /// Whether this kernel's run is a success.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
            && self.doctor_disagreements.is_empty()
            && self
                .tests
                .iter()
                .all(|(_, o)| !matches!(o, Outcome::Fail { .. }))
    }
}

/// The results table: one row per test, one column per kernel, then the doctor's row, then the
/// reasons of every failure and skip.
pub fn table(results: &[KernelResult]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        for (t, _) in &r.tests {
            if !names.contains(&t.as_str()) {
                names.push(t);
            }
        }
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["test".to_string()];
    header.extend(results.iter().map(|r| r.kernel.clone()));
    rows.push(header);
    let mut notes: Vec<String> = Vec::new();
    let mut skip_notes: BTreeSet<String> = BTreeSet::new();
    for name in &names {
        let mut row = vec![(*name).to_string()];
        for r in results {
            let cell = match r.tests.iter().find(|(t, _)| t == name).map(|(_, o)| o) {
                Some(Outcome::Pass) => "pass".to_string(),
                Some(Outcome::Fail { reason }) => {
                    notes.push(format!("{} on {}: {reason}", name, r.kernel));
                    "FAIL".to_string()
                }
                Some(Outcome::Skip { reason }) => {
                    skip_notes.insert(format!("{name}: {reason}"));
                    "skip".to_string()
                }
                None => "-".to_string(),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    let mut doctor = vec!["(firma doctor agrees)".to_string()];
    let mut run = vec!["(run)".to_string()];
    for r in results {
        doctor.push(if r.tests.is_empty() {
            "-".into()
        } else if r.doctor_disagreements.is_empty() {
            "yes".into()
        } else {
            "NO".into()
        });
        for d in &r.doctor_disagreements {
            notes.push(format!("doctor on {}: {d}", r.kernel));
        }
        if let Some(why) = &r.retried {
            notes.push(format!(
                "retried on {}: first boot discarded: {why}",
                r.kernel
            ));
        }
        run.push(match &r.problem {
            None => format!("ok {:.0}s", r.vm_seconds),
            Some(p) => {
                notes.push(format!("run on {}: {p}", r.kernel));
                "FAIL".into()
            }
        });
    }
    rows.push(doctor);
    rows.push(run);
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
            out.push('\n');
        }
    }
    out.push_str("kernels:\n");
    for r in results {
        out.push_str(&format!(
            "  {}: {} {} (uname -r {})\n",
            r.kernel,
            r.package.as_deref().unwrap_or("-"),
            r.version.as_deref().unwrap_or("-"),
            r.release.as_deref().unwrap_or("?"),
        ));
    }
    for n in skip_notes {
        out.push_str(&format!("skip {n}\n"));
    }
    for n in notes {
        out.push_str(&format!("FAIL {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn kernel() -> Kernel {
        Kernel {
            name: "6.1".into(),
            package: Some("linux-image-6.1.0-57-amd64".into()),
            version: Some("6.1.192-3".into()),
            release: Some("6.1.0-57-amd64".into()),
            vmlinux: PathBuf::new(),
            config: None,
        }
    }

    fn report(doctor: &str, lines: &[&str]) -> Report {
        let mut r = Report::default();
        r.scan(&format!("FIRMA-VM-DOCTOR {doctor}"));
        for l in lines {
            r.scan(l);
        }
        r
    }

    const ALL_OK: &str = r#"{"ok":true,"checks":[{"name":"cgroup_skb/egress","status":"ok","detail":""},{"name":"BPF_LINK_DETACH","status":"ok","detail":""},{"name":"pins","status":"fail","detail":"config"}]}"#;
    const NO_EGRESS: &str = r#"{"ok":false,"checks":[{"name":"cgroup_skb/egress","status":"fail","detail":"refused"},{"name":"BPF_LINK_DETACH","status":"ok","detail":""}]}"#;

    #[test]
    fn doctor_and_suite_agree() {
        let r = report(
            ALL_OK,
            &[
                "FIRMA-VM-TEST skip many: host only",
                "FIRMA-VM-TEST ok a",
                "FIRMA-VM-TESTS-DONE passed=1 failed=0",
            ],
        );
        let k = KernelResult::from_report(&kernel(), &r, 1.0);
        assert!(k.ok(), "{k:?}");
        assert_eq!(
            k.tests,
            [
                ("a".to_string(), Outcome::Pass),
                (
                    "many".to_string(),
                    Outcome::Skip {
                        reason: "host only".into()
                    }
                )
            ]
        );
        let t = table(&[k]);
        assert!(
            t.lines()
                .any(|l| l.starts_with("a ") && l.ends_with(" pass")),
            "{t}"
        );
        assert!(t.contains("skip many: host only"), "{t}");
    }

    #[test]
    fn a_failure_the_doctor_did_not_predict_is_a_disagreement() {
        let r = report(
            ALL_OK,
            &[
                "FIRMA-VM-TEST FAIL a: boom",
                "FIRMA-VM-TESTS-DONE passed=0 failed=1",
            ],
        );
        let k = KernelResult::from_report(&kernel(), &r, 1.0);
        assert_eq!(k.doctor_disagreements.len(), 1, "{k:?}");
        assert!(table(&[k]).contains("FAIL doctor on 6.1: a: firma doctor reports"));
    }

    #[test]
    fn a_pass_despite_a_reported_missing_hook_is_a_disagreement() {
        let r = report(
            NO_EGRESS,
            &[
                "FIRMA-VM-TEST ok a",
                "FIRMA-VM-TESTS-DONE passed=1 failed=0",
            ],
        );
        let k = KernelResult::from_report(&kernel(), &r, 1.0);
        assert!(
            k.doctor_disagreements[0].contains("cgroup_skb/egress"),
            "{k:?}"
        );
        // Predicted and observed failure: the doctor agrees (the kernel is unsupported).
        let r = report(
            NO_EGRESS,
            &[
                "FIRMA-VM-TEST FAIL a: no egress",
                "FIRMA-VM-TESTS-DONE passed=0 failed=1",
            ],
        );
        let k = KernelResult::from_report(&kernel(), &r, 1.0);
        assert!(k.doctor_disagreements.is_empty(), "{k:?}");
        assert!(!k.ok());
    }

    #[test]
    fn a_missing_doctor_report_is_a_disagreement() {
        let mut r = Report::default();
        r.scan("FIRMA-VM-TEST ok a");
        r.scan("FIRMA-VM-TESTS-DONE passed=1 failed=0");
        let k = KernelResult::from_report(&kernel(), &r, 1.0);
        assert!(!k.ok());
    }
}
