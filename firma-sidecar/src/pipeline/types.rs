//! What the decision stages take as input.

use crate::conn::ConnectionInfo;

/// One HTTP request, normalized, as the decision stages see it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub conn: ConnectionInfo,
    pub method: http::Method,
    /// Lowercase host name without port (from the absolute URI, `Host`, or SNI).
    pub host: String,
    pub port: u16,
    /// Path without query string, normalised once by whoever built the request (see
    /// [`super::path::NormalPath`]); the stages never normalise again.
    pub path: super::path::NormalPath,
    /// Request headers as received, Firma headers (`x-firma-*`) included; the interceptor
    /// strips them before forwarding.
    pub headers: http::HeaderMap,
    /// Whether the client spoke TLS to us (MITM) for this request.
    pub tls: bool,
    /// Attributes from the JSON body, when the matched rule extracts (`context.request`).
    pub request: Option<super::extract::Attributes>,
}

/// A connection the sidecar will not (or cannot) parse as HTTP: blind tunnel, unknown protocol.
#[derive(Debug, Clone)]
pub struct DestinationContext {
    pub conn: ConnectionInfo,
    /// SNI or CONNECT host when known; `None` for an unknown protocol (decided on ip:port).
    pub host: Option<String>,
    pub port: u16,
}
