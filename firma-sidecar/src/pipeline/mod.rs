//! The decision pipeline shared by every interception mode.
//!
//! Contract between interceptors/connector and the decision stages. Interceptors build a
//! [`RequestContext`] per HTTP request (or a [`DestinationContext`] per opaque tunnel) and get a
//! [`Decision`]; they never decide anything themselves.

mod types;

pub use types::*;

use firma_common::config::SidecarConfig;
use std::sync::Arc;

/// Errors that stop the sidecar from starting (bad seed, bad mapping rules, ...).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Startup(String),
}

/// classify -> identify -> Stage 1 -> Stage 2. Cheap to clone (`Arc` inside).
///
/// CONTRACT STUB: the decision-stages work replaces the body; until then it denies everything.
#[derive(Clone)]
pub struct Pipeline {
    _inner: Arc<()>,
}

impl Pipeline {
    /// Builds the pipeline from config: mapping rules, seeds, bundle source, revocations.
    /// Spawns background tasks (authority streams) on the current tokio runtime.
    pub async fn start(_cfg: &SidecarConfig) -> Result<Self, PipelineError> {
        Ok(Self {
            _inner: Arc::new(()),
        })
    }

    /// Decides one HTTP request.
    pub async fn decide(&self, _req: &RequestContext) -> Decision {
        Decision::deny(DenyReason::PolicyBundleNotReady, "pipeline not built")
    }

    /// Decides a connection that will be tunnelled without HTTP parsing.
    pub async fn decide_destination(&self, _dst: &DestinationContext) -> Decision {
        Decision::deny(DenyReason::PolicyBundleNotReady, "pipeline not built")
    }
}
