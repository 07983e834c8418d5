//! `cargo test -p vm-tests`: runs the kernel tests on this host (they need root and BPF; without
//! them the binary prints why and this test passes after printing SKIP).

use std::process::Command;

#[test]
fn kernel_tests_pass_on_this_host() {
    let out = Command::new(env!("CARGO_BIN_EXE_vm-kernel-tests"))
        .output()
        .expect("run vm-kernel-tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    if let Some(why) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FIRMA-VM-TESTS-SKIP "))
    {
        firma_testing::skip("kernel_tests_pass_on_this_host", why);
        return;
    }
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("FIRMA-VM-TEST FAIL"))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let done = stdout
        .lines()
        .find(|l| l.starts_with("FIRMA-VM-TESTS-DONE "))
        .expect("no DONE marker");
    assert!(done.ends_with(" failed=0"), "{done}");
    assert!(!done.contains("passed=0 "), "no test ran: {done}");
    assert!(out.status.success());
}
