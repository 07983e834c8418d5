//! `empty-authority`: the `firma.authority.v1.Authority` service with no work behind it, the
//! baseline of `firma-bench authority` (docs/benchmarks.md, "The Authority's issuance path").
//!
//! `IssueCapability` answers every request with one canned `Allowed` capability of a real
//! token's size: no validation, no Cedar, no signature, no log line. Everything else is the
//! Authority's own serving setup: tonic's `Server` on a multi-thread tokio runtime, accepted
//! sockets with `TCP_NODELAY`, the same message limit, mimalloc. So the CPU it spends per call
//! is what tonic, h2, the runtime and loopback TCP cost for this RPC, and the Authority's CPU
//! per call minus this is Firma's own.
//!
//! Prints `gRPC listening on ADDR` and `authority ready` on stderr like `firma authority`.
//! Usage: `empty-authority [ADDR]` (default `127.0.0.1:0`).

use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_server::{Authority, AuthorityServer};
use std::net::SocketAddr;
use tokio_stream::Empty;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Authority's `MAX_REQUEST_BYTES` (firma-authority/src/server.rs).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Length of a v4.public token for the bench's request (one action, 36-char token id).
const TOKEN_LEN: usize = 438;

struct Empty0 {
    answer: pb::IssuanceResponse,
}

#[tonic::async_trait]
impl Authority for Empty0 {
    async fn issue_capability(
        &self,
        _request: Request<pb::IssuanceRequest>,
    ) -> Result<Response<pb::IssuanceResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }

    async fn revoke(
        &self,
        _request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type StreamPolicyBundlesStream = Empty<Result<pb::PolicyBundle, Status>>;

    async fn stream_policy_bundles(
        &self,
        _request: Request<pb::BundleStreamRequest>,
    ) -> Result<Response<Self::StreamPolicyBundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type StreamRevocationsStream = Empty<Result<pb::Revocation, Status>>;

    async fn stream_revocations(
        &self,
        _request: Request<pb::RevocationStreamRequest>,
    ) -> Result<Response<Self::StreamRevocationsStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

fn canned() -> pb::IssuanceResponse {
    let mut raw_token = String::from("v4.public.");
    raw_token.extend(std::iter::repeat_n('A', TOKEN_LEN - raw_token.len()));
    pb::IssuanceResponse {
        result: Some(pb::issuance_response::Result::Allowed(pb::Capability {
            raw_token,
            token_id: "00000000-0000-4000-8000-000000000000".into(),
            agent_id: "tenant-acme".into(),
            session_id: "bench-session".into(),
            action_set: vec!["model.inference.chat".into()],
            resource_scope: "*".into(),
            issued_at: 1_800_000_000,
            expiry: 1_800_000_900,
            context_hash: "0".repeat(64),
        })),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("gRPC listening on {}", listener.local_addr()?);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = Empty0 { answer: canned() };
        let router = Server::builder().add_service(
            AuthorityServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
        );
        eprintln!("authority ready");
        router.serve_with_incoming(incoming).await?;
        Ok(())
    })
}
