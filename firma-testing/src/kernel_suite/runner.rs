//! A minimal runner for the VM that prints one marker line per test, because the VM's only output
//! channel is the serial console and cargo's test harness would not run there.
//!
//! Markers (parsed by `cargo xtask vm-test`, anywhere in a line):
//! `FIRMA-VM-TEST ok <name>`, `FIRMA-VM-TEST FAIL <name>: <why>`,
//! `FIRMA-VM-TESTS-DONE passed=N failed=M`, or `FIRMA-VM-TESTS-SKIP <why>` when this machine
//! cannot run them.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// A test's result: `Err` carries a one-line explanation.
pub type TestResult = Result<(), String>;

/// A named test.
#[derive(Clone, Copy)]
pub struct Test {
    pub name: &'static str,
    pub run: fn() -> TestResult,
    /// Not run in the VM (too slow or meaningless under TCG); run on a root host.
    pub host_only: bool,
}

/// Fails the test with a formatted message unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Totals of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

/// Runs the tests whose name contains `filter` (all when `None`), one after another, printing a
/// marker for each and the final DONE marker (the VM's runner; libtest runs them on a host). A panicking test counts as failed; the rest run.
pub fn run(tests: &[Test], filter: Option<&str>) -> Summary {
    let mut summary = Summary {
        passed: 0,
        failed: 0,
    };
    for t in tests
        .iter()
        .filter(|t| filter.is_none_or(|f| t.name.contains(f)))
    {
        let start = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(t.run))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
        let ms = start.elapsed().as_millis();
        match result {
            Ok(()) => {
                summary.passed += 1;
                println!("FIRMA-VM-TEST ok {}", t.name);
                println!("  ({} took {ms} ms)", t.name);
            }
            Err(why) => {
                summary.failed += 1;
                // One line, so the marker carries the whole reason.
                let why = why.replace(['\n', '\r'], " | ");
                println!("FIRMA-VM-TEST FAIL {}: {why}", t.name);
            }
        }
    }
    println!(
        "FIRMA-VM-TESTS-DONE passed={} failed={}",
        summary.passed, summary.failed
    );
    summary
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
