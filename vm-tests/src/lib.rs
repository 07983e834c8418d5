//! Tests that need root and a BPF-capable kernel; run by `cargo xtask vm-test` or on a root host.
