//! Transparent interception (eBPF cgroup redirection).
//!
//! STUB in this build: the transparent-interception work replaces this file. Contract for the
//! replacement: bind the transparent listeners, spawn accept loops through `shutdown`
//! ([`Drain::spawn`], so drain waits for them and they stop on [`Drain::cancelled`]), and
//! return `Ok(())` once listening. For each accepted connection look up the original
//! destination and workload, then call [`crate::interceptor::serve::serve_stream`] with
//! `conn.kind = Transparent`, `conn.original_dst = Some(orig)`, `conn.workload = Some(..)`,
//! `host_hint = None`, `port = orig.port()`.

use crate::drain::Drain;
use crate::state::SidecarState;
use firma_common::config::SidecarConfig;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("transparent mode not available in this build")]
    Unavailable,
}

pub async fn serve(
    _state: Arc<SidecarState>,
    _cfg: &SidecarConfig,
    _shutdown: Drain,
) -> Result<(), TransparentError> {
    Err(TransparentError::Unavailable)
}
