//! The Firma sidecar.
//!
//! A connection arrives through an **interceptor** (`http_proxy` or `transparent`), its requests
//! run through the one **pipeline** (classify -> identify -> Stage 1 -> Stage 2), allowed requests
//! go out through the **connector** (credentials, rate limits, upstream TLS), and every decision
//! is written by **audit**. Interceptors differ only in how a connection and its destination
//! arrive; everything after that is shared ([`interceptor::serve::serve_stream`]).

pub mod admin;
pub mod audit;
pub mod authority_client;
pub mod config;
pub mod conn;
pub mod connector;
pub mod control;
pub mod dns;
pub mod drain;
pub mod ebpf;
pub mod error_shape;
pub mod ext_authz;
pub mod gate;
pub mod http_body;
pub mod interceptor;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod response;
pub mod sequence;
pub mod server;
pub mod sockopt;
pub mod state;
pub mod tls;
pub mod workers;
