//! Placeholder for the cgroup eBPF programs (built for bpfel-unknown-none by `cargo xtask build-ebpf`).
#![no_std]
#![no_main]
