//! Map layouts shared by the eBPF programs and the userspace loader.
//!
//! Placeholder until the transparent-interception work lands; kept `no_std` and `#[repr(C)]`.
