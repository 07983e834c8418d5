//! How connections reach the sidecar and how they are served.
//!
//! - [`http_proxy`]: the `HTTP_PROXY` listener (absolute-form requests and `CONNECT`).
//! - [`transparent`]: eBPF-redirected connections.
//! - [`serve`]: the shared per-connection logic both use once the destination is known.
//! - [`http`]: per-request pipeline + connector, on plain or decrypted streams.
//! - [`limits`]: connection caps, idle timeouts, accept backoff.
//! - [`websocket`]: HTTP/1.1 WebSocket upgrades and their relay.
//! - [`mcp`]: MCP endpoints: JSON-RPC bodies decided per message, denials as JSON-RPC errors.

pub mod body;
pub mod framing;
pub mod head;
pub mod http;
pub mod http_proxy;
pub mod idle;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod park;
pub mod redirect_listener;
pub mod rewind;
pub mod serve;
pub mod transparent;
pub mod tunnel;
pub mod websocket;
