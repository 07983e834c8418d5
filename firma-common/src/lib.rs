//! Types shared by every Firma component.
//!
//! Without the `user` feature this crate is `no_std` and holds only the `#[repr(C)]` map layouts
//! that the eBPF programs and the userspace loader both read. With `user` it also carries the
//! configuration schema, capability tokens (PASETO v4.public), key files, Cedar bundle loading,
//! audit events and the generated gRPC code.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod maps;

#[cfg(feature = "user")]
pub mod audit;
#[cfg(feature = "user")]
pub mod capability;
#[cfg(feature = "user")]
pub mod config;
#[cfg(feature = "user")]
pub mod errors;
#[cfg(feature = "user")]
pub mod keys;
#[cfg(feature = "user")]
pub mod policy;
#[cfg(feature = "user")]
pub mod proto;
