//! The sidecar's owner-only control socket: `firma sidecar attach|detach|status` talk to a
//! running sidecar through it. JSON lines: one [`Request`] per line in, one [`Response`] out.
//!
//! The socket file is created mode 0600 (bound under a temporary name, chmod'ed, then renamed
//! into place, so it is never reachable with wider permissions), and every connection's peer
//! credentials are checked: only root and the sidecar's own user are served.

mod client;
mod protocol;
mod server;

pub use client::{ClientError, request};
pub use protocol::{Request, Response, StatusReport, WorkloadStatus};
pub use server::{ControlError, bind, serve, serve_bound};
