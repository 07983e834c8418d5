//! The `firma.authority.v1.Authority` gRPC service.

pub mod metrics;

use crate::bundles::LoadedBundle;
use crate::issuance::{DenialCode, IssueRequest, Issuer};
use crate::revocation_hub::RevocationHub;
use crate::revocations::RevocationEntry;
use firma_common::capability::now_unix;
use firma_common::keys::SigningKey;
use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_server::Authority;
use metrics::Stream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Shared state behind every RPC.
#[derive(Clone)]
pub struct AuthorityService {
    pub key: Arc<SigningKey>,
    pub issuance: watch::Receiver<Arc<LoadedBundle>>,
    pub runtime: watch::Receiver<Arc<LoadedBundle>>,
    pub revocations: Arc<RevocationHub>,
    pub max_ttl_seconds: u64,
    /// Re-send period for bundle streams.
    pub bundle_ttl: Duration,
    /// Cancelled at shutdown so long-lived streams end and connections can drain.
    pub shutdown: CancellationToken,
    /// Whether the revocation set is known complete (always with the file; with etcd, while a
    /// quorum answers). Out of sync, bundle and revocation streams are refused and ended, so
    /// sidecars fail over or go stale instead of missing a revocation (crate::etcd).
    pub in_sync: watch::Receiver<bool>,
    /// Where `Revoke` writes (the store the CLI writes to).
    pub revoker: crate::revoke::Revoker,
    /// The admin token `Revoke` requires; `None` refuses the RPC.
    pub admin_token: Option<Arc<crate::revoke::AdminToken>>,
}

/// Refusal for streams while the revocation store is out of sync.
fn unsynced() -> Status {
    Status::unavailable(
        "revocation store (etcd) out of sync on this authority: no quorum; try another authority",
    )
}

/// Resolves once `in_sync` turns false (never for the file store, whose sender is gone).
async fn out_of_sync(mut in_sync: watch::Receiver<bool>) {
    if in_sync.wait_for(|ok| !ok).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl AuthorityService {
    fn check_in_sync(&self) -> Result<(), Status> {
        if *self.in_sync.borrow() {
            Ok(())
        } else {
            Err(unsynced())
        }
    }
}

/// The caller's address for log lines, formatted only if a line is written (issuance logs
/// one per call: no `String` per request).
struct Peer(Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

fn peer(req: &Request<impl Sized>) -> Peer {
    Peer(req.remote_addr())
}

/// An action set for a log line: `a,b` (no `Vec` `Debug` quoting).
struct Actions<'a>(&'a [String]);

impl std::fmt::Display for Actions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(a)?;
        }
        Ok(())
    }
}

type Tx<T> = mpsc::Sender<Result<T, Status>>;

#[tonic::async_trait]
impl Authority for AuthorityService {
    async fn issue_capability(
        &self,
        request: Request<pb::IssuanceRequest>,
    ) -> Result<Response<pb::IssuanceResponse>, Status> {
        let peer = peer(&request);
        let req = IssueRequest::from(request.into_inner());
        let bundle = self.issuance.borrow().clone();
        let issuer = Issuer {
            key: &self.key,
            policies: &bundle.compiled,
            max_ttl_seconds: self.max_ttl_seconds,
        };
        let result = match issuer.issue(&req) {
            Ok(issued) => {
                metrics::issuance(Ok(()));
                // The Authority's record of what it minted (INFO, one line per token; the
                // token itself is never logged). `clamped_from` only when the TTL was clamped.
                tracing::info!(
                    %peer,
                    token_id = %issued.claims.token_id,
                    agent = %issued.claims.agent_id,
                    session = %issued.claims.session_id,
                    actions = %Actions(&issued.claims.action_set),
                    clamped_from = issued.clamped_from,
                    "issued capability"
                );
                pb::issuance_response::Result::Allowed(issued.to_proto())
            }
            // A malformed request is the caller's bug, not a policy answer: INVALID_ARGUMENT.
            // Its fields are not logged (they are what was malformed); the reason names them.
            Err(denial) if denial.code == DenialCode::InvalidRequest => {
                metrics::issuance(Err(denial.code));
                tracing::warn!(%peer, "refused capability request: {}", denial.reason);
                return Err(Status::invalid_argument(denial.reason));
            }
            Err(denial) => {
                metrics::issuance(Err(denial.code));
                tracing::warn!(
                    %peer,
                    agent = %req.agent_id,
                    code = denial.code.as_str(),
                    policies = ?denial.policies,
                    "refused capability: {}",
                    denial.reason
                );
                pb::issuance_response::Result::Denied(denial.to_proto())
            }
        };
        Ok(Response::new(pb::IssuanceResponse {
            result: Some(result),
        }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let peer = peer(&request);
        let Some(admin) = &self.admin_token else {
            tracing::warn!(%peer, "refused Revoke: no admin_token_env configured");
            return Err(Status::permission_denied(
                "Revoke is disabled on this authority (no [authority] admin_token_env)",
            ));
        };
        if let Err(status) = admin.check(request.metadata()) {
            tracing::warn!(%peer, "refused Revoke: {}", status.message());
            return Err(status);
        }
        let token_id = request.into_inner().token_id;
        crate::revoke::check_request_id(&token_id)?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match self.revoker.add(&token_id, now_ms).await {
            Ok(added) => {
                tracing::info!(%peer, %token_id, added, "revoked capability (admin Revoke)");
                Ok(Response::new(pb::RevokeResponse { added }))
            }
            Err(e) => {
                tracing::error!(%peer, %token_id, "Revoke failed, not recorded: {e}");
                Err(match e {
                    crate::AuthorityError::TokenId(m) => Status::invalid_argument(m),
                    crate::AuthorityError::EtcdRequest { .. }
                    | crate::AuthorityError::EtcdTimeout { .. } => {
                        Status::unavailable(format!("not recorded: {e}"))
                    }
                    other => Status::internal(format!("not recorded: {other}")),
                })
            }
        }
    }

    type StreamPolicyBundlesStream = ReceiverStream<Result<pb::PolicyBundle, Status>>;

    async fn stream_policy_bundles(
        &self,
        request: Request<pb::BundleStreamRequest>,
    ) -> Result<Response<Self::StreamPolicyBundlesStream>, Status> {
        let peer = peer(&request);
        let sidecar = request.into_inner().sidecar_id;
        self.check_in_sync()?;
        tracing::info!(%peer, %sidecar, "bundle stream opened");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(push_bundles(
            tx,
            self.runtime.clone(),
            self.bundle_ttl,
            self.shutdown.clone(),
            self.in_sync.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type StreamRevocationsStream = ReceiverStream<Result<pb::Revocation, Status>>;

    async fn stream_revocations(
        &self,
        request: Request<pb::RevocationStreamRequest>,
    ) -> Result<Response<Self::StreamRevocationsStream>, Status> {
        let peer = peer(&request);
        let sidecar = request.into_inner().sidecar_id;
        self.check_in_sync()?;
        tracing::info!(%peer, %sidecar, "revocation stream opened");
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(push_revocations(
            tx,
            self.revocations.clone(),
            self.shutdown.clone(),
            self.in_sync.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Current bundle on connect, every new version, and a re-send every `period` (the sidecar's
/// freshness signal).
async fn push_bundles(
    tx: Tx<pb::PolicyBundle>,
    mut bundles: watch::Receiver<Arc<LoadedBundle>>,
    period: Duration,
    shutdown: CancellationToken,
    in_sync: watch::Receiver<bool>,
) {
    let _open = metrics::stream_open(Stream::Bundles);
    let lost_sync = out_of_sync(in_sync);
    tokio::pin!(lost_sync);
    let mut current = bundles.borrow_and_update().clone();
    let mut resend = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // First pass: the push on connect; then after each change or period.
        if tx
            .send(Ok(current.bundle.to_proto(now_unix())))
            .await
            .is_err()
        {
            return;
        }
        metrics::stream_send(Stream::Bundles);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = &mut lost_sync => {
                let _ = tx.send(Err(unsynced())).await;
                return;
            }
            changed = bundles.changed() => {
                if changed.is_err() {
                    return;
                }
                current = bundles.borrow_and_update().clone();
                resend.reset();
            }
            _ = resend.tick() => {}
        }
    }
}

/// Replay then live. A client too slow to keep up with the broadcast gets the full set again
/// (marked `replay`) rather than silently missing ids.
async fn push_revocations(
    tx: Tx<pb::Revocation>,
    hub: Arc<RevocationHub>,
    shutdown: CancellationToken,
    in_sync: watch::Receiver<bool>,
) {
    let _open = metrics::stream_open(Stream::Revocations);
    let lost_sync = out_of_sync(in_sync);
    tokio::pin!(lost_sync);
    let (snapshot, mut rx) = hub.subscribe();
    if replay(&tx, snapshot).await.is_err() {
        return;
    }
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = &mut lost_sync => {
                let _ = tx.send(Err(unsynced())).await;
                return;
            }
            next = rx.recv() => next,
        };
        let sent = match next {
            Ok(entry) => tx.send(Ok(revocation(entry, false))).await,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let (snapshot, fresh) = hub.subscribe();
                rx = fresh;
                replay(&tx, snapshot).await
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if sent.is_err() {
            return;
        }
        metrics::stream_send(Stream::Revocations);
    }
}

/// The wire form of one revocation; an unrecorded or non-positive time is sent as 0 (unknown).
fn revocation(e: RevocationEntry, replay: bool) -> pb::Revocation {
    pb::Revocation {
        token_id: e.token_id,
        replay,
        revoked_at_unix_ms: e.revoked_at_ms.filter(|t| *t > 0).unwrap_or(0),
    }
}

async fn replay(
    tx: &Tx<pb::Revocation>,
    entries: Vec<RevocationEntry>,
) -> Result<(), mpsc::error::SendError<Result<pb::Revocation, Status>>> {
    for e in entries {
        tx.send(Ok(revocation(e, true))).await?;
        metrics::stream_send(Stream::Revocations);
    }
    Ok(())
}
