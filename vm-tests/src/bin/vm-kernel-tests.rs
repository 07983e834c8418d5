//! `vm-kernel-tests [--require] [FILTER]`: runs the kernel tests in a private network namespace
//! and prints marker lines; `vm-kernel-tests client …` is the workload child (see
//! `vm_tests::client`); `vm-kernel-tests --check-object` exits 0 when the eBPF object is embedded.
//!
//! Without root/BPF it prints `FIRMA-VM-TESTS-SKIP <why>` and exits 0, unless `--require`
//! (the VM's `/init` passes it) makes that exit 3.

use vm_tests::{client, env, harness, kernel};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "client") {
        std::process::exit(client::main(&args[1..]));
    }
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
    if let Some(why) = env::skip_reason() {
        println!("FIRMA-VM-TESTS-SKIP {why}");
        std::process::exit(if require { 3 } else { 0 });
    }
    // Before any thread exists (see enter_private_netns).
    if let Err(e) = env::enter_private_netns() {
        println!("FIRMA-VM-TEST FAIL setup: {e}");
        println!("FIRMA-VM-TESTS-DONE passed=0 failed=1");
        std::process::exit(1);
    }
    let summary = harness::run(kernel::TESTS, filter);
    std::process::exit(if summary.failed == 0 { 0 } else { 1 });
}
