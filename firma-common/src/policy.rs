//! Cedar policy bundles, shared by the Authority (issuance, bundle streaming) and the sidecar
//! (Stage 2), so both sides load, hash, validate and evaluate policies identically.
//!
//! * [`PolicyBundle`]: the raw text of a policy directory (`*.cedar` files in name order plus
//!   a schema) and its content-hash `version`; converts to and from the gRPC message.
//! * [`PolicyBundle::compile`] -> [`CompiledPolicies`]: parsed and strictly validated against the
//!   schema. Every policy gets a stable id (`@id("…")` when annotated, else
//!   `<file stem>:<index>`) so a decision can name the policy that made it.
//! * [`CompiledPolicies::evaluate`] with an [`EvalRequest`] -> [`EvalResult`]: the one place
//!   where a Cedar request is built (principal `Firma::Agent`, action `Firma::Action`, resource
//!   `Firma::Resource` with optional `host`/`path`, context `action_count`, `session_id`,
//!   `method`).

mod bundle;
mod compile;
mod error;
mod eval;
mod partition;

pub use bundle::{PolicyBundle, PolicyFile, SHIPPED_SCHEMA};
pub use compile::CompiledPolicies;
pub use error::{PolicyDiagnostic, PolicyError};
pub use eval::{AttrValue, EvalRequest, EvalResult, McpContext, UsageTotals};

/// The Cedar namespace every Firma entity and action lives in.
pub const NAMESPACE: &str = "Firma";

#[cfg(test)]
mod partition_tests;
#[cfg(test)]
mod tests;
