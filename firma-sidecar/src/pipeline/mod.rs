//! The decision pipeline shared by every interception mode.
//!
//! Contract between interceptors/connector and the decision stages. Interceptors build a
//! [`RequestContext`] per HTTP request (or a [`DestinationContext`] per opaque tunnel) and get a
//! [`Decision`]; they never decide anything themselves.

mod types;

pub use types::*;
