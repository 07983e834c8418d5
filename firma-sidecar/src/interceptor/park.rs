//! Parking idle HTTP/1 keep-alive connections.
//!
//! hyper keeps a read buffer and a write buffer (8 KiB each) and its dispatcher for as long
//! as a connection is open, idle or not: at 10,000 idle agent connections that is most of the
//! sidecar's memory. A connection idle for [`PARK_AFTER`] is taken apart
//! (`UpgradeableConnection::into_parts`: the stream, the bytes read but not parsed, the
//! service) and only the [`FramingGuard`] waits for the client, holding no buffer; the next
//! complete head (or the client's EOF) gets a fresh hyper connection on the same stream.
//!
//! Parking never loses or reorders a byte: it happens only when [`can_park`] says hyper holds
//! nothing a fresh connection would not (every head the guard released was answered, every
//! byte read ended a message, every byte written was flushed, no shutdown started), and the
//! bytes hyper had read but not parsed go back into the guard first. Idle and drain timeouts
//! keep running while parked (the connection's `Activity` is the same).

use super::framing::{FramingGuard, Verdict};
use super::idle::Activity;
use crate::state::SidecarState;
use std::time::Duration;
use tokio::io::AsyncRead;

/// How long an HTTP/1 connection is idle before it is parked: long enough that back-to-back
/// keep-alive requests never pay for a new hyper connection, short against idle timeouts.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Whether hyper's connection can be taken apart now without losing state: no request in
/// flight, every released head answered, and the guard between messages with nothing
/// unflushed (see [`Verdict::quiescent`]). Called while hyper is not being polled.
pub fn can_park(verdict: &Verdict, activity: &Activity) -> bool {
    activity.idle_for().is_some() && verdict.quiescent() && verdict.heads() == activity.started()
}

/// What ended a parked wait.
pub enum Woken {
    /// A request, the client's EOF or a rejected head: hyper takes over (and answers, closes
    /// or reports it as on any connection).
    Request,
    /// Idle timeout or drain: close the stream.
    Close,
}

/// Waits on a parked connection for the next message, the idle timeout or a drain.
pub async fn wait<S: AsyncRead + Unpin>(
    io: &mut FramingGuard<S>,
    verdict: &Verdict,
    activity: &Activity,
    state: &SidecarState,
    idle: Duration,
) -> Woken {
    let _parked = super::metrics::parked();
    tokio::select! {
        r = std::future::poll_fn(|cx| io.poll_next_message(cx)) => match r {
            // A rejected head: hyper is not needed to refuse it; the guard writes the 400
            // when the stream is shut down and `serve_http` audits it.
            Ok(()) if verdict.rejected().is_some() => Woken::Close,
            Ok(()) => Woken::Request,
            Err(e) => {
                tracing::debug!(error = %e, "parked connection failed");
                Woken::Close
            }
        },
        _ = state.drain.cancelled() => Woken::Close,
        _ = activity.idle_timeout(idle) => Woken::Close,
    }
}
