//! Kernel side of transparent mode on this host: the kernel suite
//! (`firma_testing::kernel_suite`, the same functions `cargo xtask vm-test` runs in QEMU),
//! one test per suite test, each in a network namespace of its own, with its own cgroup and
//! pins. Needs root + BPF (otherwise every test prints SKIP and passes).
//!
//! Proves: tagged TCP connects (IPv4, IPv6, v4-mapped) are redirected and the original
//! destination, pid and binding are found by peer address; getpeername shows the original
//! peer; untagged, excluded-CIDR, excluded-port and SO_MARK'ed connects are not redirected; UDP
//! is closed (443 refused, any other port, v4/v6/v4-mapped, connected or not, UDP-Lite, ping
//! sockets refused; `allow_udp` exceptions reached) and so is loopback (refused but for
//! `allow_loopback`, the sidecar's own port even when listed), refusals tallied per workload
//! and kept across a loader restart; entries are removed when connections close (bounded over 10,000
//! connections); a dead listener means refused connections, never direct access; a restart
//! re-adopts pinned state without double attaching; `--pod` resolution for both kubelet
//! cgroup drivers; detach removes everything; connect() overhead figures.

use firma_testing::kernel::in_fresh_netns;
use firma_testing::kernel_suite;

/// The suite's workload: this test binary re-run as `kernel_client_entry --exact` with the
/// client's arguments in the environment; does nothing in a normal run.
#[test]
fn kernel_client_entry() {
    kernel_suite::client_entry();
}

fn run(name: &str) {
    if !in_fresh_netns(name) {
        return;
    }
    kernel_suite::set_client_args(&[
        "kernel_client_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    if let Err(e) = kernel_suite::run_one(name) {
        panic!("{name}: {e}");
    }
}

macro_rules! kernel_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*
        /// Every suite test has a test here.
        #[test]
        fn every_suite_test_runs_here() {
            let here = [$(stringify!($name)),*];
            for t in kernel_suite::TESTS {
                assert!(here.contains(&t.name), "{} is not run on the host", t.name);
            }
        }
    };
}

kernel_tests!(
    redirect_ipv4,
    redirect_ipv6,
    redirect_v4_mapped,
    not_redirected_untagged_excluded_marked,
    udp_443_refused,
    udp_closed_except_exceptions,
    loopback_closed_except_allowances,
    refusals_tallied_across_restart,
    dns_redirected_to_the_guard,
    entries_removed_after_close,
    detach_removes_links_and_binding,
    fail_closed_without_redirector,
    restart_readopts_pinned_state,
    pod_uid_resolution,
    entries_stay_bounded_over_10000_connections,
    connect_overhead_with_and_without_redirect,
);
