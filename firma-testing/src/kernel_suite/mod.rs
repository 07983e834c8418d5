//! The kernel suite: the kernel half of transparent mode (eBPF programs attached to cgroups,
//! pinned links, the original-destination maps) tested through `firma_sidecar::ebpf::
//! Redirector`, the loader `firma sidecar` and `firma workload attach` use. A thread of the
//! test process stands in for the sidecar's transparent listener ([`servers`]); the tagged
//! workload is the test executable itself re-run as a client ([`client`]), so nothing but
//! std/nix is needed (the VM only has busybox).
//!
//! The same test functions ([`TESTS`]) run
//! - on a root host: `firma/tests/transparent_kernel.rs`, one libtest test per suite test,
//!   each in a network namespace of its own;
//! - in QEMU: `vm-kernel-tests` (`cargo xtask vm-test`), all in one private network namespace,
//!   with marker lines on the serial console ([`runner`]). Tests marked `host_only` (10,000
//!   connections, latency figures: meaningless under TCG) are left out there.
//!
//! Every destination is an address inside the namespace ([`crate::kernel`]).

pub mod client;
pub mod runner;
pub mod servers;
mod tests;

pub use client::{client_entry, set_client_args};
pub use runner::{Summary, Test, TestResult, run};
pub use tests::TESTS;

/// Runs the suite test named `name`.
pub fn run_one(name: &str) -> TestResult {
    let t = TESTS
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("no kernel test named {name}"))?;
    (t.run)()
}
