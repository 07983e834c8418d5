//! `vm-kernel-tests [--require] [FILTER]`: runs the kernel suite (`firma_testing::kernel_suite`,
//! the same tests `firma/tests/transparent_kernel.rs` runs on a root host) in a private network
//! namespace and prints marker lines; the suite's workload children are this binary re-run with
//! `FIRMA_KERNEL_CLIENT` set; `vm-kernel-tests --check-object` exits 0 when the eBPF object is
//! embedded. Host-only tests (10,000 connections, latency figures) are not run here.
//!
//! Without root/BPF it prints `FIRMA-VM-TESTS-SKIP <why>` and exits 0, unless `--require`
//! (the VM's `/init` passes it) makes that exit 3.

use firma_testing::{kernel, kernel_suite};

fn main() {
    kernel_suite::client_entry();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--check-object") {
        match firma_sidecar::ebpf::embedded_object() {
            Ok(o) => {
                println!("eBPF object embedded ({} bytes)", o.len());
                return;
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let require = args.iter().any(|a| a == "--require");
    let filter = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str);
    if let Some(why) = kernel::skip_reason() {
        println!("FIRMA-VM-TESTS-SKIP {why}");
        std::process::exit(if require { 3 } else { 0 });
    }
    // Before any thread exists (see enter_private_netns).
    if let Err(e) = kernel::enter_private_netns() {
        println!("FIRMA-VM-TEST FAIL setup: {e}");
        println!("FIRMA-VM-TESTS-DONE passed=0 failed=1");
        std::process::exit(1);
    }
    // Named, so the matrix table lists them for every kernel.
    for t in kernel_suite::TESTS
        .iter()
        .filter(|t| t.host_only && filter.is_none_or(|f| t.name.contains(f)))
    {
        println!(
            "FIRMA-VM-TEST skip {}: host only (slow and meaningless under TCG; run by firma/tests/transparent_kernel.rs)",
            t.name
        );
    }
    let tests: Vec<kernel_suite::Test> = kernel_suite::TESTS
        .iter()
        .filter(|t| !t.host_only)
        .copied()
        .collect();
    let summary = kernel_suite::run(&tests, filter);
    std::process::exit(if summary.failed == 0 { 0 } else { 1 });
}
