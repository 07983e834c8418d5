//! Revocations shared by several Authorities through etcd (`[authority.etcd]`).
//!
//! Layout under `prefix` (default `/firma/`): `revocations/<token_id>` holds the Unix
//! milliseconds of the revocation. `add` is a create-if-absent transaction, so the first time
//! wins on every Authority, and it returns only once a quorum committed it. Every Authority
//! lists the prefix, then watches it from the listed revision ([`follow`]): a revocation
//! written through any of them reaches the [`RevocationHub`] of all of them within one watch
//! round trip, and from there every sidecar stream.
//!
//! Fail-closed rule: an Authority proves it is in sync with a linearizable read (it needs the
//! quorum) every `stale_after_ms / 3`. Without a successful one for `stale_after_ms`, the store
//! is *out of sync*: the Authority may be on the minority side and miss revocations, so it ends
//! its bundle and revocation streams with `UNAVAILABLE` and refuses new ones (sidecars fail over
//! to another Authority, or deny `PolicyBundleStale` once their bundle TTL runs out). It comes
//! back by itself when a read succeeds again.

use crate::error::AuthorityError;
use crate::revocation_hub::RevocationHub;
use crate::revocations::{CompactReport, RevocationEntry, check_token_id};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use etcd_client::{EventType, WatchOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Per-request deadline: a minority member never answers a linearizable request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-attempt deadline on one member: longer than a leader election on a healthy cluster,
/// short enough that a member that swallows requests (a vanished host, a half-open connection)
/// leaves time to ask the others within [`REQUEST_TIMEOUT`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Client options for the Authority's etcd connections: those of every Firma etcd client
/// (`firma_common::anchor::connect_options`: leader required, so a member that lost its leader
/// answers `UNAVAILABLE` at once and cancels watches instead of going silent; HTTP/2 pings only
/// while the watch is open and every 10 s, within etcd's keep-alive policy, whose
/// `GOAWAY too_many_pings` cut the watch) with the per-attempt deadline, which is what finds a
/// dead member for unary requests.
fn connect_options() -> etcd_client::ConnectOptions {
    firma_common::anchor::connect_options().with_timeout(ATTEMPT_TIMEOUT)
}

/// One client per member and the key layout. Requests go to the member that answered last and
/// move to the next one when it is unreachable: etcd-client's own balancer kept sending fresh
/// requests to a dead member, so each client here holds a single endpoint.
#[derive(Clone)]
pub struct EtcdStore {
    /// (endpoint, its client); a client that failed is replaced by a fresh one.
    clients: Arc<Vec<(String, std::sync::Mutex<Client>)>>,
    /// Index (always `< clients.len()`) of the member asked first.
    current: Arc<AtomicUsize>,
    prefix: String,
    endpoints: String,
}

impl EtcdStore {
    /// Prepares a client; connections are made (and remade, member by member) on demand.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, AuthorityError> {
        let joined = endpoints.join(",");
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let c = Self::client(e, &joined).await?;
            clients.push((e.clone(), std::sync::Mutex::new(c)));
        }
        Ok(Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            prefix: prefix.to_owned(),
            endpoints: joined,
        })
    }

    /// A client for one member. Lazy: nothing is dialled until the first request.
    async fn client(endpoint: &str, joined: &str) -> Result<Client, AuthorityError> {
        Client::connect([endpoint], Some(connect_options()))
            .await
            .map_err(|cause| AuthorityError::EtcdRequest {
                endpoints: joined.to_owned(),
                op: "connect",
                cause,
            })
    }

    /// Runs `f` on the current member's client until it succeeds or [`REQUEST_TIMEOUT`] passes
    /// (every operation here is idempotent, so a retry is safe). An unavailable answer or no
    /// answer within [`ATTEMPT_TIMEOUT`] moves to the next member and replaces the failed
    /// member's client by a fresh one, so no connection state outlives a failure (a restarted
    /// member is dialled anew).
    async fn call<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, AuthorityError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut last = None;
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.clients.len();
            let client = self.clients[i]
                .1
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let attempt = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
            let why = match tokio::time::timeout_at(attempt, f(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(cause)) if retryable(&cause) => {
                    let why = cause.to_string();
                    last = Some(cause);
                    why
                }
                Ok(Err(cause)) => {
                    return Err(AuthorityError::EtcdRequest {
                        endpoints: self.endpoints.clone(),
                        op,
                        cause,
                    });
                }
                Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            };
            tracing::debug!(target: "firma_authority::etcd", member = %self.clients[i].0, op, "{why}; trying the next member");
            self.next_member(i).await;
            if tokio::time::Instant::now() >= deadline
                || tokio::time::timeout_at(deadline, tokio::time::sleep(RETRY_PAUSE))
                    .await
                    .is_err()
            {
                break;
            }
        }
        Err(match last {
            Some(cause) => AuthorityError::EtcdRequest {
                endpoints: self.endpoints.clone(),
                op,
                cause,
            },
            None => AuthorityError::EtcdTimeout {
                endpoints: self.endpoints.clone(),
                op,
                timeout: REQUEST_TIMEOUT,
            },
        })
    }

    /// Member `failed` did not answer: replace its client and make the next member current
    /// (unless a concurrent call already moved on).
    async fn next_member(&self, failed: usize) {
        let (endpoint, slot) = &self.clients[failed];
        if let Ok(fresh) = Self::client(endpoint, &self.endpoints).await {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        }
        let next = (failed + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn revocations_prefix(&self) -> String {
        format!("{}revocations/", self.prefix)
    }

    /// Records `token_id` as revoked at `now_ms` unless it already is; `true` when new. Returns
    /// only once the quorum committed it.
    pub async fn add(&self, token_id: &str, now_ms: i64) -> Result<bool, AuthorityError> {
        check_token_id(token_id).map_err(AuthorityError::TokenId)?;
        let key = format!("{}{token_id}", self.revocations_prefix());
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), now_ms.to_string(), None)]);
        let r = self
            .call("add revocation", |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    /// Every revocation (linearizable: needs the quorum) and the revision it was read at.
    pub async fn list(&self) -> Result<(Vec<RevocationEntry>, i64), AuthorityError> {
        let prefix = self.revocations_prefix();
        let r = self
            .call("list revocations", |c| {
                let prefix = prefix.clone();
                async move {
                    c.kv_client()
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        let entries = r
            .kvs()
            .iter()
            .filter_map(|kv| entry(&prefix, kv.key(), kv.value()))
            .collect();
        Ok((entries, rev))
    }

    /// A linearizable read of one key: succeeds only while a quorum answers.
    pub async fn probe(&self) -> Result<(), AuthorityError> {
        let key = format!("{}health", self.prefix);
        self.call("quorum read", |c| {
            let key = key.clone();
            async move {
                c.kv_client()
                    .get(key, Some(GetOptions::new().with_count_only()))
                    .await
            }
        })
        .await
        .map(|_| ())
    }

    /// Deletes revocations older than `max_ttl_seconds` (their tokens have expired).
    pub async fn compact(
        &self,
        now_ms: i64,
        max_ttl_seconds: u64,
    ) -> Result<CompactReport, AuthorityError> {
        let (entries, _) = self.list().await?;
        let max_ms = i64::try_from(max_ttl_seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let mut dropped = 0;
        for e in &entries {
            if e.revoked_at_ms
                .is_some_and(|t| t.saturating_add(max_ms) < now_ms)
            {
                let key = format!("{}{}", self.revocations_prefix(), e.token_id);
                self.call("delete revocation", |c| {
                    let key = key.clone();
                    async move { c.kv_client().delete(key, None).await }
                })
                .await?;
                dropped += 1;
            }
        }
        Ok(CompactReport {
            kept: entries.len() - dropped,
            dropped,
        })
    }
}

/// Pause between retries of an unavailable answer.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Transport failures and `UNAVAILABLE`: another member may answer.
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

fn entry(prefix: &str, key: &[u8], value: &[u8]) -> Option<RevocationEntry> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    check_token_id(id).ok()?;
    let at = std::str::from_utf8(value).ok()?.trim().parse::<i64>().ok();
    Some(RevocationEntry {
        token_id: id.to_owned(),
        revoked_at_ms: at,
    })
}

/// Keeps `hub` equal to the etcd set and `in_sync` true while a quorum answers, until
/// `cancel`. Deletions (compaction) are ignored: there is no un-revoke.
pub async fn follow(
    store: EtcdStore,
    hub: Arc<RevocationHub>,
    in_sync: watch::Sender<bool>,
    stale_after: Duration,
    cancel: CancellationToken,
) {
    let probe_every = (stale_after / 3).max(Duration::from_millis(100));
    let mut last_ok: Option<Instant> = None;
    let mark = |last_ok: Option<Instant>| {
        let ok = last_ok.is_some_and(|t| t.elapsed() < stale_after);
        in_sync.send_if_modified(|v| {
            if *v != ok {
                if ok {
                    tracing::info!(target: "firma_authority::etcd", "revocation store in sync: serving streams");
                } else {
                    tracing::error!(target: "firma_authority::etcd", "revocation store out of sync (no quorum read for {stale_after:?}): refusing bundle and revocation streams");
                }
                *v = ok;
                true
            } else {
                false
            }
        });
    };
    let prefix = store.revocations_prefix();
    let mut backoff = Duration::from_millis(100);
    loop {
        // (Re)synchronise: list, then watch from the next revision.
        let rev = match store.list().await {
            Ok((entries, rev)) => {
                let added = hub.insert(entries);
                if added > 0 {
                    crate::revocation_hub::metrics::recorded(added);
                    tracing::info!(target: "firma_authority::etcd", added, total = hub.len(), "revocations loaded from etcd");
                }
                last_ok = Some(Instant::now());
                mark(last_ok);
                rev
            }
            Err(e) => {
                tracing::warn!(target: "firma_authority::etcd", "{e}; retrying in {} ms", backoff.as_millis());
                mark(last_ok);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = match store
            .call("watch", |c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.watch_client().watch(prefix, Some(opts)).await }
            })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "firma_authority::etcd", "{e}");
                continue;
            }
        };
        let mut probe = tokio::time::interval(probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = probe.tick() => {
                    match store.probe().await {
                        Ok(()) => last_ok = Some(Instant::now()),
                        Err(e) => tracing::warn!(target: "firma_authority::etcd", "{e}"),
                    }
                    mark(last_ok);
                }
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        if r.canceled() {
                            break format!("watch cancelled: {}", r.cancel_reason());
                        }
                        let new: Vec<_> = r
                            .events()
                            .iter()
                            .filter(|e| e.event_type() == EventType::Put)
                            .filter_map(|e| e.kv())
                            .filter_map(|kv| entry(&prefix, kv.key(), kv.value()))
                            .collect();
                        let added = hub.insert(new);
                        if added > 0 {
                            crate::revocation_hub::metrics::recorded(added);
                            tracing::info!(target: "firma_authority::etcd", added, total = hub.len(), "revocations updated from etcd");
                        }
                    }
                    Ok(None) => break "watch ended".to_owned(),
                    Err(e) => break format!("watch failed: {e}"),
                },
            }
        };
        tracing::warn!(target: "firma_authority::etcd", "{why}; resynchronising");
        mark(last_ok);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_to_entries() {
        let p = "/firma/revocations/";
        let e = entry(p, b"/firma/revocations/tok", b"1764000000000").unwrap();
        assert_eq!(e.token_id, "tok");
        assert_eq!(e.revoked_at_ms, Some(1_764_000_000_000));
        assert!(entry(p, b"/other/tok", b"1").is_none());
        assert!(entry(p, b"/firma/revocations/has space", b"1").is_none());
        assert_eq!(
            entry(p, b"/firma/revocations/t", b"junk")
                .unwrap()
                .revoked_at_ms,
            None
        );
    }
}
