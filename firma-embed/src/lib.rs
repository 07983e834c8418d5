//! Firma in the application's own process: the sidecar's decision pipeline as a
//! [`tower_layer::Layer`] around an HTTP client (hyper-util's `Client`, a tonic `Channel`) and as
//! a [`reqwest_middleware::Middleware`].
//!
//! Nothing here decides: [`Firma::authorize`] hands the request to
//! [`firma_sidecar::gate::Gate::check`], the pipeline every deployment shape shares (mapping,
//! Stage 1, Stage 2, credential, rate limit, signed audit). [`Firma::start`] builds it from the
//! same `[sidecar]` config the sidecar reads, with the same Authority client (bundle and
//! revocation streams) and the same audit sink, so `firma audit verify` checks what this writes.
//!
//! A denied call never reaches the inner client: it fails with [`Error::Denied`], whose
//! `reason` is the deny reason the audit event names. See the crate README for the trust model.

mod body;
mod layer;
#[cfg(feature = "reqwest")]
mod middleware;

pub use body::Rebuild;
pub use firma_sidecar::conn::DenyReason;
pub use layer::{FirmaLayer, FirmaService};
#[cfg(feature = "reqwest")]
pub use middleware::FirmaMiddleware;
/// Re-exported so `firma.layer().layer(client)` needs no tower import.
pub use tower_layer::Layer;

use bytes::Bytes;
use firma_sidecar::audit::AuditLog;
use firma_sidecar::config::SidecarConfig;
use firma_sidecar::conn::{ConnectionInfo, ConnectorOutcome, InterceptKind};
use firma_sidecar::connector::Connector;
use firma_sidecar::drain::Drain;
use firma_sidecar::gate::{Allowed, Call, Gate, Verdict};
use firma_sidecar::pipeline::{Pipeline, extract, path};
use firma_sidecar::state::SidecarState;
use http::{HeaderMap, HeaderValue};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Boxed error of an inner client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call did not complete. `Denied` and `Aborted` mean nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Firma denied the call; the audit's `decision` event names the same reason.
    #[error("denied by Firma: {reason}: {detail}")]
    Denied { reason: DenyReason, detail: String },
    /// Allowed, but not sendable now (`RateLimited`: no permit within the host's timeout).
    #[error("aborted by Firma ({status}): {reason}: {detail}")]
    Aborted {
        status: http::StatusCode,
        reason: &'static str,
        detail: String,
    },
    /// The request is not one Firma can decide (no host, a body that could not be read).
    #[error("request not decidable: {0}")]
    Request(String),
    /// The inner client failed after the allow (the audit's `outcome` says so).
    #[error("upstream: {0}")]
    Upstream(#[source] BoxError),
}

impl Error {
    /// The deny reason, for a denial.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Self::Denied { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Why the embedded pipeline could not start (each names the config key to fix).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] firma_common::config::ConfigError),
    #[error("[sidecar.credentials] / [sidecar.connector]: {0}")]
    Connector(#[from] firma_sidecar::connector::ConnectorError),
    #[error("{0}")]
    Audit(#[from] firma_sidecar::audit::AuditError),
    #[error("{0}")]
    Pipeline(#[from] firma_sidecar::pipeline::PipelineError),
}

/// Which capability the application's calls run under.
#[derive(Clone)]
pub enum Identity {
    /// A raw capability token (PASETO) the app holds, as `x-firma-capability`.
    Capability(String),
    /// A seeded session (`[sidecar.capability_seed]`), as `x-firma-session`.
    Session(String),
    /// Whatever each request's own `x-firma-*` headers say (or the one seeded session).
    FromRequest,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never the token itself.
            Self::Capability(_) => f.write_str("Capability(..)"),
            Self::Session(s) => write!(f, "Session({s:?})"),
            Self::FromRequest => f.write_str("FromRequest"),
        }
    }
}

struct Inner {
    gate: Gate,
    /// One caller for the handle's lifetime: tokens it presents are remembered for it only.
    conn: ConnectionInfo,
    identity: Identity,
}

/// The embedded pipeline. Cheap to clone; background tasks (Authority streams) stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Firma {
    inner: Arc<Inner>,
}

impl Firma {
    /// Reads the `[sidecar]` section of `path` (other sections ignored), validates it, starts.
    pub async fn from_file(path: &Path, identity: Identity) -> Result<Self, StartError> {
        let text = firma_common::config::read(path)?;
        let cfg: SidecarConfig = firma_common::config::parse_section(&text, path, "sidecar")?;
        cfg.validate(path)?;
        Self::start(&cfg, identity).await
    }

    /// Starts the pipeline from `cfg` on the current tokio runtime: credentials (a missing env
    /// credential stops here), audit sink, mapping rules, seeds, bundles (local dir or Authority
    /// stream), revocations. The interceptor and MITM settings are not used.
    pub async fn start(cfg: &SidecarConfig, identity: Identity) -> Result<Self, StartError> {
        firma_sidecar::tls::install_crypto_provider();
        let connector = Connector::new(cfg)?;
        let audit = AuditLog::start(&cfg.audit).await?;
        let first_conn_id = firma_sidecar::audit::next_conn_id(&cfg.audit);
        let pipeline = Pipeline::start(cfg).await?;
        let connector = connector.with_rules(pipeline.mapping_rules());
        let state = Arc::new(SidecarState::new(
            pipeline,
            audit,
            connector,
            firma_sidecar::error_shape::ErrorShapes::from_config(cfg),
            None,
            Drain::new(),
        ));
        state.resume_conn_ids(first_conn_id);
        let gate = Gate::new(state);
        let conn = gate.new_conn(
            InterceptKind::Embedded,
            std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            None,
        );
        tracing::info!(target: "firma_embed", identity = ?identity, "embedded pipeline ready");
        Ok(Self {
            inner: Arc::new(Inner {
                gate,
                conn,
                identity,
            }),
        })
    }

    /// A layer for clients whose requests carry absolute URIs (hyper-util, reqwest's tower use).
    pub fn layer(&self) -> FirmaLayer {
        FirmaLayer::new(self.clone(), None)
    }

    /// A layer for a tonic `Channel`, whose requests carry only the path: `origin` is the
    /// channel's endpoint (`https://api.example:443`).
    pub fn grpc_layer(&self, origin: http::Uri) -> FirmaLayer {
        FirmaLayer::new(self.clone(), Some(origin))
    }

    /// A middleware for reqwest-middleware's `ClientBuilder`.
    #[cfg(feature = "reqwest")]
    pub fn middleware(&self) -> FirmaMiddleware {
        FirmaMiddleware::new(self.clone())
    }

    /// The underlying pipeline (bundle version, revocation count, ...).
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.gate.state().pipeline
    }

    /// Writes every queued audit event (call before exiting).
    pub async fn flush(&self) {
        self.inner.gate.state().audit.flush().await;
    }

    /// Whether the rule matching this request reads its body (the caller must then pass it
    /// to [`Self::authorize`]).
    pub fn reads_body(&self, method: &http::Method, uri: &http::Uri) -> bool {
        let (Some(host), Ok(p)) = (uri.host(), path::normalize(uri.path())) else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        extract::reads_body(&self.pipeline().extraction(
            method.as_str(),
            &host.to_ascii_lowercase(),
            &p,
        ))
    }

    /// Decides one call to the absolute `uri`. On `Ok`, apply the [`Permit`] to the request,
    /// send it, and report what came back ([`Permit::finish`]).
    pub async fn authorize(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Permit, Error> {
        let host = uri
            .host()
            .ok_or_else(|| Error::Request(format!("request URI {uri} has no host")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => {
                return Err(Error::Request(format!(
                    "request URI scheme {other:?}: expected http or https"
                )));
            }
        };
        let mut headers = headers.clone();
        match &self.inner.identity {
            Identity::Capability(t) => {
                let v = HeaderValue::from_str(t)
                    .map_err(|_| Error::Request("capability token is not a header value".into()))?;
                headers.insert("x-firma-capability", v);
            }
            Identity::Session(s) => {
                let v = HeaderValue::from_str(s)
                    .map_err(|_| Error::Request("session id is not a header value".into()))?;
                headers.insert("x-firma-session", v);
            }
            Identity::FromRequest => {}
        }
        let call = Call {
            method: method.clone(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            headers,
            body,
            may_rewrite_path: true,
        };
        match self.inner.gate.check(&self.inner.conn, call).await {
            Verdict::Allow(allowed) => Ok(Permit {
                allowed,
                started: Instant::now(),
            }),
            Verdict::Deny(d) => Err(Error::Denied {
                reason: d
                    .reason
                    .unwrap_or(firma_sidecar::conn::DenyReason::MalformedRequest),
                detail: d.detail,
            }),
            Verdict::Abort {
                status,
                reason,
                detail,
            } => Err(Error::Aborted {
                status,
                reason,
                detail,
            }),
        }
    }
}

/// An allowed call, its decision already persisted in the audit. Dropped without
/// [`Self::finish`]: the `outcome` event says `ClientGone`.
pub struct Permit {
    allowed: Box<Allowed>,
    started: Instant,
}

impl Permit {
    /// Removes `x-firma-*` and the agent's own credential headers, sets Firma's credential.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        self.allowed.apply(headers);
    }

    /// The path and query to send (normalised as decided).
    pub fn path_and_query(&self) -> &str {
        &self.allowed.path_and_query
    }

    /// `uri` with the decided path and query.
    pub fn uri(&self, uri: &http::Uri) -> http::Uri {
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = self.allowed.path_and_query.parse().ok();
        http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }

    /// Records the upstream's answer (`Ok(status)`) or failure in the `outcome` event.
    pub fn finish(self, result: Result<http::StatusCode, String>) {
        let Permit { allowed, started } = self;
        let allowed = *allowed;
        let mut outcome: ConnectorOutcome = allowed.planned.clone();
        outcome.upstream_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(s) => outcome.upstream_status = Some(s.as_u16()),
            Err(e) => {
                tracing::warn!(target: "firma_embed", error = %e, "upstream failed after allow");
                outcome.aborted = Some("UpstreamUnavailable".into());
            }
        }
        allowed.audit.finish(outcome);
    }
}
