//! The Firma Authority: mints PASETO capability tokens under a Cedar issuance policy, and
//! streams the runtime Cedar bundle and revocations to sidecars over gRPC.
//!
//! Modules: [`validate`] (bounds on requests), [`issuance`] (evaluate, clamp, sign),
//! [`revocations`] (the file), [`revocation_hub`] (watch the file, fan out), [`etcd`] (the set shared through etcd), [`revoke`] (the admin `Revoke` RPC), [`bundles`] (load,
//! watch, publish), [`service`] (gRPC), [`server`] (TLS, listen, drain), [`error`].

pub mod admin;
pub mod bundles;
pub mod collector;
pub mod config;
pub mod error;
pub mod etcd;
pub mod issuance;
pub mod listen;
pub mod metrics;
pub mod revocation_hub;
pub mod revocations;
pub mod revoke;
pub mod server;
pub mod service;
pub mod validate;

pub use error::AuthorityError;
