//! Responses the sidecar itself produces: denials (403/400) and aborts (429/502/504).
//!
//! Bodies are JSON and name the reason exactly as the audit event does, so an operator can go
//! from a client error to the audit line. They never contain credentials.

use crate::conn::Decision;
use crate::connector::RespBody;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

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

/// 403 with `{"denied":true,"reason":…,"detail":…}`; 400 for `MalformedRequest`.
pub fn deny(decision: &Decision) -> Response<RespBody> {
    json(deny_status(decision), decision.deny_body())
}

pub fn deny_status(decision: &Decision) -> StatusCode {
    match decision.reason {
        Some(crate::conn::DenyReason::MalformedRequest) => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    }
}

/// `{"aborted":true,"reason":…,"detail":…}` with 429, 502 or 504.
pub fn abort(status: StatusCode, reason: &str, detail: &str) -> Response<RespBody> {
    json(status, abort_body(reason, detail))
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
