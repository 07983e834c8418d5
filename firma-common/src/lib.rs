//! Types shared by the Firma userspace components: the config reader and error, capability tokens
//! (PASETO v4.public), key files, Cedar bundle loading, audit events and the generated gRPC code.
//!
//! The eBPF map layouts live in the `no_std` crate `firma-maps` (which `firma-ebpf` depends on
//! directly) and are re-exported here as [`maps`], with its userspace `user` feature on.

pub use firma_maps as maps;

pub mod admin;
pub mod anchor;
pub mod audit;
pub mod audit_files;
pub mod audit_replicas;
pub mod capability;
pub mod config;
pub mod errors;
pub mod keys;
pub mod policy;
pub mod proto;
