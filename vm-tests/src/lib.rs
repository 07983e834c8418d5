//! Tests that need root and a BPF-capable kernel; run inside QEMU by `cargo xtask vm-test` or
//! directly on a root host (`cargo run -p vm-tests --bin vm-kernel-tests`).
//!
//! Everything is driven from one static binary, because the VM has nothing but busybox: the
//! tagged workload is the same binary re-executed as a client (`vm-kernel-tests client …`) that
//! first moves itself into the test cgroup, and the listener standing in for the sidecar is a
//! thread of the test process. Results are marker lines on stdout (see [`harness`]).

pub mod client;
pub mod env;
pub mod harness;
pub mod kernel;
pub mod servers;
