//! Responses the sidecar itself produces: denials (403/400) and aborts (429/502/504).
//!
//! Bodies are JSON and name the reason exactly as the audit event does, so an operator can go
//! from a client error to the audit line. They never contain credentials. On the hosts of LLM
//! APIs they also carry the provider's error shape ([`crate::error_shape`]), so SDK exceptions
//! show the reason. Denials say `x-should-retry: false` (the header the OpenAI and Anthropic
//! SDKs obey before their status rules): retrying a policy decision gets the same answer. gRPC
//! requests get the same reason in gRPC terms instead ([`grpc`]): HTTP 200, `grpc-status`,
//! `grpc-message`.

use crate::config::ErrorFormat;
use crate::conn::Decision;
use crate::connector::RespBody;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

/// How Firma's own answers to one request look: gRPC status for gRPC (by its content type),
/// else JSON in the error shape of the host's API. Read from the request and the
/// configuration only, so it is known before the decision without visiting the connector.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub grpc: bool,
    pub format: ErrorFormat,
}

impl Answer {
    /// The answer for a request with `headers` to a host whose shape is `format`.
    pub fn of(headers: &http::HeaderMap, format: ErrorFormat) -> Self {
        Self {
            grpc: crate::connector::is_grpc(headers),
            format,
        }
    }

    pub fn deny(self, d: &Decision) -> Response<RespBody> {
        if self.grpc {
            grpc_deny(d)
        } else {
            deny_as(d, self.format)
        }
    }

    pub fn abort(self, status: StatusCode, reason: &str, detail: &str) -> Response<RespBody> {
        if self.grpc {
            grpc_abort(status, reason, detail)
        } else {
            abort_as(status, reason, detail, self.format)
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// 403 with `{"denied":true,"reason":…,"detail":…}`; 400 for `MalformedRequest`, 413 for
/// `BodyTooLarge`, 503 with `Retry-After: 1` for `BodyBudgetExhausted` and
/// `SessionStoreUnavailable`.
pub fn deny(decision: &Decision) -> Response<RespBody> {
    deny_as(decision, ErrorFormat::Firma)
}

/// [`deny`] with the error shape of `format` added to the body, and `x-should-retry: false`
/// (a policy denial is final) except on the retryable 503.
pub fn deny_as(decision: &Decision, format: ErrorFormat) -> Response<RespBody> {
    let status = deny_status(decision);
    let reason = decision
        .reason
        .map_or("Denied", crate::conn::DenyReason::as_str);
    let body = shaped(
        decision.deny_body(),
        format,
        status,
        reason,
        &format!("Firma denied this request ({reason}): {}", decision.detail),
    );
    let mut r = json(status, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // BodyBudgetExhausted, SessionStoreUnavailable: the sidecar cannot decide now, not the
        // request wrong; retry soon.
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    } else {
        r.headers_mut()
            .insert("x-should-retry", header::HeaderValue::from_static("false"));
    }
    r
}

/// `body` (a JSON object) with the error fields of `format` added.
fn shaped(
    body: String,
    format: ErrorFormat,
    status: StatusCode,
    reason: &str,
    message: &str,
) -> String {
    if format == ErrorFormat::Firma {
        return body;
    }
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(mut m)) => {
            crate::error_shape::add(&mut m, format, status, reason, message);
            serde_json::Value::Object(m).to_string()
        }
        _ => body,
    }
}

pub fn deny_status(decision: &Decision) -> StatusCode {
    use crate::conn::DenyReason;
    match decision.reason {
        Some(DenyReason::MalformedRequest) => StatusCode::BAD_REQUEST,
        Some(DenyReason::BodyTooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
        Some(DenyReason::BodyBudgetExhausted | DenyReason::SessionStoreUnavailable) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::FORBIDDEN,
    }
}

/// `{"aborted":true,"reason":…,"detail":…}` with 429, 502 or 504.
pub fn abort(status: StatusCode, reason: &str, detail: &str) -> Response<RespBody> {
    abort_as(status, reason, detail, ErrorFormat::Firma)
}

/// [`abort`] with the error shape of `format`. No `x-should-retry`: these are worth a retry
/// (the SDKs retry 429 and 5xx by themselves).
pub fn abort_as(
    status: StatusCode,
    reason: &str,
    detail: &str,
    format: ErrorFormat,
) -> Response<RespBody> {
    let body = shaped(
        abort_body(reason, detail),
        format,
        status,
        reason,
        &format!("Firma ({reason}): {detail}"),
    );
    json(status, body)
}

fn abort_body(reason: &str, detail: &str) -> String {
    serde_json::json!({"aborted": true, "reason": reason, "detail": detail}).to_string()
}

/// A complete HTTP/1.1 denial written straight to a socket (before or instead of hyper),
/// closing the connection.
pub fn raw_deny(decision: &Decision) -> Vec<u8> {
    raw_json(deny_status(decision), &decision.deny_body())
}

/// A complete HTTP/1.1 abort (`{"aborted":true,…}`) written straight to a socket, closing it.
pub fn raw_abort(status: StatusCode, reason: &str, detail: &str) -> Vec<u8> {
    raw_json(status, &abort_body(reason, detail))
}

fn raw_json(status: StatusCode, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        body
    )
    .into_bytes()
}

/// gRPC status codes Firma answers with.
pub mod grpc_code {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
}

/// A gRPC "trailers-only" response: HTTP 200, `content-type: application/grpc`, `grpc-status`
/// and `grpc-message` (percent-encoded as the gRPC spec requires) in the one HEADERS frame,
/// no body. gRPC clients show the code and message instead of an opaque HTTP error.
pub fn grpc(code: u32, reason: &str, detail: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", header::HeaderValue::from(code));
    if let Ok(v) =
        header::HeaderValue::from_str(&grpc_percent_encode(&format!("Firma {reason}: {detail}")))
    {
        h.insert("grpc-message", v);
    }
    if let Ok(v) = header::HeaderValue::from_str(reason) {
        h.insert("x-firma-reason", v);
    }
    r
}

/// A denial in gRPC terms: `MalformedRequest` is INVALID_ARGUMENT, every other denial
/// PERMISSION_DENIED.
pub fn grpc_deny(decision: &Decision) -> Response<RespBody> {
    let code = match decision.reason {
        Some(crate::conn::DenyReason::MalformedRequest) => grpc_code::INVALID_ARGUMENT,
        Some(crate::conn::DenyReason::BodyTooLarge) => grpc_code::RESOURCE_EXHAUSTED,
        Some(
            crate::conn::DenyReason::BodyBudgetExhausted
            | crate::conn::DenyReason::SessionStoreUnavailable,
        ) => grpc_code::UNAVAILABLE,
        _ => grpc_code::PERMISSION_DENIED,
    };
    let reason = decision
        .reason
        .map_or("Denied", crate::conn::DenyReason::as_str);
    grpc(code, reason, &decision.detail)
}

/// An abort in gRPC terms: 429 is RESOURCE_EXHAUSTED, upstream failures UNAVAILABLE.
pub fn grpc_abort(status: StatusCode, reason: &str, detail: &str) -> Response<RespBody> {
    let code = if status == StatusCode::TOO_MANY_REQUESTS {
        grpc_code::RESOURCE_EXHAUSTED
    } else {
        grpc_code::UNAVAILABLE
    };
    grpc(code, reason, detail)
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside 0x20..=0x7E, and `%`, as `%XX`.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_carry_the_provider_shape_and_say_do_not_retry() {
        use crate::conn::DenyReason;
        let d = Decision::deny(DenyReason::PolicyDenied, "model gpt-4o is not permitted");
        let r = deny_as(&d, ErrorFormat::Openai);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["x-should-retry"], "false");
        let body = futures_body(r);
        assert_eq!(body["denied"], true);
        assert_eq!(body["reason"], "PolicyDenied");
        assert_eq!(
            body["error"]["message"],
            "Firma denied this request (PolicyDenied): model gpt-4o is not permitted"
        );
        let d = Decision::deny(DenyReason::MalformedRequest, "not JSON");
        let body = futures_body(deny_as(&d, ErrorFormat::Anthropic));
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let r = abort_as(
            StatusCode::BAD_GATEWAY,
            "UpstreamUnavailable",
            "refused",
            ErrorFormat::Openai,
        );
        assert!(r.headers().get("x-should-retry").is_none());
        let body = futures_body(r);
        assert_eq!(body["aborted"], true);
        assert_eq!(body["error"]["type"], "api_error");
        assert_eq!(body["error"]["code"], "UpstreamUnavailable");
        let plain = futures_body(deny(&Decision::deny(DenyReason::PolicyDenied, "x")));
        assert!(plain.get("error").is_none());
    }

    fn futures_body(r: Response<RespBody>) -> serde_json::Value {
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(r.into_body().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a 100% é\n"), "a 100%25 %C3%A9%0A");
        let r = grpc_abort(StatusCode::TOO_MANY_REQUESTS, "RateLimited", "slow down");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "Firma RateLimited: slow down");
    }
}
