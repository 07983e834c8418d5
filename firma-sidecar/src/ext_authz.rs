//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`) served by
//! `firma sidecar` under `[sidecar.ext_authz]`: Envoy stays the proxy, Firma decides.
//!
//! A `CheckRequest` becomes a [`gate::Call`] (method, `:authority`, path, headers, the body
//! when Envoy's `with_request_body` sends one) and is decided by [`Gate::check`], the pipeline
//! every mode shares. Allow -> `OkHttpResponse` setting Firma's credential header (overwrite)
//! and removing the agent's own credential headers (`authorization`, ...) and every
//! `x-firma-*`; deny -> `DeniedHttpResponse` 403 (413 for `BodyTooLarge`) with Firma's JSON body;
//! no rate-limit permit -> 429 with the abort body.
//!
//! Identity: a source principal (Envoy's verified downstream mTLS identity) listed in
//! `principals` binds the request to that agent/session as a workload binding does in
//! transparent mode (the capability headers cannot name another agent); otherwise the request's
//! own `x-firma-capability` / `x-firma-session`, as in http_proxy mode, each Check being its own
//! caller (a session header never borrows a token presented in another Check).
//!
//! Audit: the `decision` event is written (ALLOW persisted) during Check. Firma never sees the
//! upstream's answer, so the ALLOW's `outcome` event says `aborted = "DecidedOnly"`: allowed
//! and handed back to Envoy, whose access log has the rest.

use crate::config::{ExtAuthzConfig, ExtAuthzPrincipal};
use crate::conn::{ConnectionInfo, ConnectorOutcome, DenyReason, InterceptKind, Workload};
use crate::gate::{Call, Gate, Verdict};
use bytes::Bytes;
use firma_common::proto::envoy_auth as pb;
use http::{HeaderMap, HeaderName, HeaderValue};
use pb::authorization_server::{Authorization, AuthorizationServer};
use sha2::Digest;
use std::net::SocketAddr;
use tonic::{Request, Response, Status};

/// `google.rpc.Code` values Envoy reads.
const RPC_OK: i32 = 0;
const RPC_PERMISSION_DENIED: i32 = 7;
const RPC_RESOURCE_EXHAUSTED: i32 = 8;

/// The Check service over the sidecar's [`Gate`].
pub struct ExtAuthz {
    gate: Gate,
    upstream_tls: bool,
    principals: Vec<ExtAuthzPrincipal>,
}

impl ExtAuthz {
    pub fn new(gate: Gate, cfg: &ExtAuthzConfig) -> Self {
        Self {
            gate,
            upstream_tls: cfg.upstream_tls,
            principals: cfg.principals.clone(),
        }
    }

    /// The tonic service to mount.
    pub fn into_service(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self)
    }

    /// The Check request as a [`Call`] and the caller's connection record.
    fn call(&self, req: pb::CheckRequest) -> Result<(ConnectionInfo, Call), String> {
        let attrs = req.attributes.unwrap_or_default();
        let source = attrs.source.unwrap_or_default();
        let peer = source
            .address
            .as_ref()
            .and_then(|a| a.socket_address.as_ref())
            .and_then(|s| {
                let ip: std::net::IpAddr = s.address.parse().ok()?;
                Some(SocketAddr::new(ip, u16::try_from(s.port_value).ok()?))
            })
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let conn = self.gate.new_conn(
            InterceptKind::ExtAuthz,
            peer,
            binding(&self.principals, &source.principal),
        );
        let http = attrs
            .request
            .and_then(|r| r.http)
            .ok_or("CheckRequest without attributes.request.http")?;
        let method = http::Method::from_bytes(http.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", http.method))?;
        let mut headers = HeaderMap::new();
        let mut put = |k: &str, v: &[u8]| -> Result<(), String> {
            if k.starts_with(':') {
                return Ok(());
            }
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value =
                HeaderValue::from_bytes(v).map_err(|_| format!("invalid value of header {k}"))?;
            headers.append(name, value);
            Ok(())
        };
        for (k, v) in &http.headers {
            put(k, v.as_bytes())?;
        }
        for h in http.header_map.iter().flat_map(|m| &m.headers) {
            let v = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            put(&h.key, v)?;
        }
        let (host, port) = split_authority(&http.host)?;
        let downstream_tls = http.scheme.eq_ignore_ascii_case("https");
        let port = port.unwrap_or(if downstream_tls || self.upstream_tls {
            443
        } else {
            80
        });
        let body = if !http.raw_body.is_empty() {
            Some(Bytes::from(http.raw_body))
        } else if !http.body.is_empty() {
            Some(Bytes::from(http.body))
        } else if http.size == 0 {
            // Envoy buffered the body and it is empty (or there is none): nothing to read.
            Some(Bytes::new())
        } else {
            None
        };
        Ok((
            conn,
            Call {
                method,
                host,
                port,
                tls: downstream_tls || self.upstream_tls,
                path_and_query: http.path,
                headers,
                body,
                may_rewrite_path: false,
            },
        ))
    }
}

/// The workload binding of a source principal listed in `principals` (an empty principal, which
/// Envoy reports without downstream mTLS, never matches). Its id is a stable hash of the
/// principal, so the requests of one principal share what they presented, and only they.
fn binding(principals: &[ExtAuthzPrincipal], principal: &str) -> Option<Workload> {
    let p = principals
        .iter()
        .find(|p| !principal.is_empty() && p.principal == principal)?;
    let digest = sha2::Sha256::digest(principal.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    Some(Workload {
        cgroup_id: u64::from_be_bytes(id),
        cgroup_path: format!("principal:{principal}"),
        pid: 0,
        agent_id: p.agent_id.clone(),
        session_id: p.session_id.clone(),
    })
}

/// `host[:port]` (`[v6]:port`) -> host and port.
fn split_authority(a: &str) -> Result<(String, Option<u16>), String> {
    let bad = || format!("invalid :authority {a:?}");
    if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad())?),
            None if tail.is_empty() => None,
            None => return Err(bad()),
        };
        return Ok((h.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), Some(p.parse().map_err(|_| bad())?))),
        None => Ok((a.to_string(), None)),
    }
}

fn header(k: &str, v: &[u8], overwrite: bool) -> pb::HeaderValueOption {
    let action = if overwrite {
        pb::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
    } else {
        pb::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd
    };
    pb::HeaderValueOption {
        // Envoy's ext_authz reads `value`; `raw_value` only for bytes that are not UTF-8.
        header: Some(match std::str::from_utf8(v) {
            Ok(s) => pb::HeaderValue {
                key: k.to_string(),
                value: s.to_string(),
                raw_value: Vec::new(),
            },
            Err(_) => pb::HeaderValue {
                key: k.to_string(),
                value: String::new(),
                raw_value: v.to_vec(),
            },
        }),
        append_action: action as i32,
    }
}

fn denied(status: u16, rpc: i32, message: String, body: String) -> pb::CheckResponse {
    pb::CheckResponse {
        status: Some(pb::RpcStatus { code: rpc, message }),
        http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
            pb::DeniedHttpResponse {
                status: Some(pb::HttpStatus {
                    code: i32::from(status),
                }),
                headers: vec![header("content-type", b"application/json", true)],
                body,
            },
        )),
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let (conn, call) = match self.call(request.into_inner()) {
            Ok(c) => c,
            Err(detail) => {
                // Not even a request to decide: audited as a malformed one, denied.
                let conn = self.gate.new_conn(
                    InterceptKind::ExtAuthz,
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    None,
                );
                let d = crate::conn::Decision::deny(DenyReason::MalformedRequest, detail);
                crate::audit::RequestAudit::new(&self.gate.state().audit, &conn).deny(&d);
                return Ok(Response::new(denied(
                    400,
                    RPC_PERMISSION_DENIED,
                    "MalformedRequest".into(),
                    d.deny_body(),
                )));
            }
        };
        let resp = match self.gate.check(&conn, call).await {
            Verdict::Allow(a) => {
                let mut headers = Vec::new();
                for (k, v) in &a.set {
                    headers.push(header(k.as_str(), v.as_bytes(), true));
                }
                // A header that is set is overwritten, not removed after.
                let remove = a
                    .remove
                    .iter()
                    .filter(|h| !a.set.iter().any(|(k, _)| k == *h))
                    .map(|h| h.as_str().to_string())
                    .collect();
                let mut outcome: ConnectorOutcome = a.planned.clone();
                outcome.aborted = Some("DecidedOnly".into());
                a.audit.finish(outcome);
                pb::CheckResponse {
                    status: Some(pb::RpcStatus {
                        code: RPC_OK,
                        message: String::new(),
                    }),
                    http_response: Some(pb::check_response::HttpResponse::OkResponse(
                        pb::OkHttpResponse {
                            headers,
                            headers_to_remove: remove,
                        },
                    )),
                }
            }
            Verdict::Deny(d) => {
                let status = match d.reason {
                    Some(DenyReason::BodyTooLarge) => 413,
                    _ => 403,
                };
                denied(
                    status,
                    RPC_PERMISSION_DENIED,
                    d.reason.map_or("Denied", DenyReason::as_str).to_string(),
                    d.deny_body(),
                )
            }
            Verdict::Abort {
                status,
                reason,
                detail,
            } => denied(
                status.as_u16(),
                RPC_RESOURCE_EXHAUSTED,
                reason.to_string(),
                serde_json::json!({"aborted": true, "reason": reason, "detail": detail})
                    .to_string(),
            ),
        };
        Ok(Response::new(resp))
    }
}

/// Binds `[sidecar.ext_authz] listen_addr` and serves Check until `drain` is cancelled.
pub async fn serve(
    gate: Gate,
    cfg: &ExtAuthzConfig,
    drain: crate::drain::Drain,
) -> Result<SocketAddr, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen_addr).await?;
    let local = listener.local_addr()?;
    let svc = ExtAuthz::new(gate, cfg).into_service();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = drain.clone();
    drain.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(target: "firma_sidecar::ext_authz", "ext_authz server ended: {e}");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::{binding, split_authority};
    use crate::config::ExtAuthzPrincipal;

    #[test]
    fn listed_principals_bind_like_workloads() {
        let p = vec![ExtAuthzPrincipal {
            principal: "spiffe://corp/agent-a".into(),
            agent_id: "agent-a".into(),
            session_id: Some("s-1".into()),
        }];
        let w = binding(&p, "spiffe://corp/agent-a").expect("bound");
        assert_eq!(w.agent_id, "agent-a");
        assert_eq!(w.session_id.as_deref(), Some("s-1"));
        assert_eq!(
            w.cgroup_id,
            binding(&p, "spiffe://corp/agent-a").unwrap().cgroup_id
        );
        assert!(binding(&p, "spiffe://corp/agent-b").is_none());
        // No downstream mTLS: Envoy reports an empty principal, which binds nothing.
        assert!(binding(&p, "").is_none());
    }

    #[test]
    fn authorities_split() {
        assert_eq!(
            split_authority("api.example:8443").unwrap(),
            ("api.example".to_string(), Some(8443))
        );
        assert_eq!(
            split_authority("api.example").unwrap(),
            ("api.example".to_string(), None)
        );
        assert_eq!(
            split_authority("[::1]:9").unwrap(),
            ("::1".to_string(), Some(9))
        );
        assert!(split_authority("a:b").is_err());
    }
}
