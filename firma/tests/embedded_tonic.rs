//! The embedded layer around a tonic `Channel` (TLS to a local gRPC server), with a real
//! `firma authority`: the capability travels as request metadata and is never forwarded, an
//! allowed call reaches the server with Firma's credential in `authorization`, a call under a
//! capability without the action, or a forged one, fails with the layer's typed error (found in the `Status`'s
//! source) and never reaches the server, a revocation issued through the CLI denies the next
//! call, and `firma audit verify` passes.

#[path = "embedded/world.rs"]
mod world;

use firma_common::proto::envoy_auth as pb;
use firma_embed::{DenyReason, Firma, Identity, Layer};
use firma_testing::pki::TestCa;
use pb::authorization_client::AuthorizationClient;
use pb::authorization_server::{Authorization, AuthorizationServer};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};
use world::{SECRET, World, decisions, issue};

/// A gRPC server that records the metadata of every call it gets.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<tonic::metadata::MetadataMap>>>,
}

#[tonic::async_trait]
impl Authorization for Recorder {
    async fn check(
        &self,
        req: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        self.calls.lock().unwrap().push(req.metadata().clone());
        Ok(tonic::Response::new(pb::CheckResponse::default()))
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// The layer's typed error in a `Status`'s source chain.
fn firma_error(s: &tonic::Status) -> Option<&firma_embed::Error> {
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(x) = e {
        if let Some(f) = x.downcast_ref::<firma_embed::Error>() {
            return Some(f);
        }
        e = x.source();
    }
    None
}

fn with_capability(token: &str) -> tonic::Request<pb::CheckRequest> {
    let mut r = tonic::Request::new(pb::CheckRequest::default());
    r.metadata_mut()
        .insert("x-firma-capability", token.parse().expect("metadata"));
    r
}

#[test]
fn tonic_channel_allows_injects_denies_and_follows_revocation() {
    World::set_credential_env();
    let world = World::new();
    let (writer, writer_id) = issue(&world.authority, "app-agent", "s-grpc-w", &["data.write"]);
    let (sender, _) = issue(
        &world.authority,
        "app-agent",
        "s-grpc-s",
        &["communication.external.send"],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // The gRPC upstream: TLS for grpc.embed.test with a CA of the test's own.
        let ca = TestCa::new("embed grpc CA");
        let leaf = ca.leaf(&["grpc.embed.test"]);
        let recorder = Recorder::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            leaf.cert.pem(),
            leaf.key.serialize_pem(),
        ));
        let server = Server::builder()
            .tls_config(tls)
            .expect("server tls")
            .add_service(AuthorizationServer::new(recorder.clone()))
            .serve_with_incoming(tokio_stream_incoming(listener));
        tokio::spawn(server);

        let firma = Firma::from_file(&world.config, Identity::FromRequest)
            .await
            .expect("embedded pipeline starts");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca.cert.pem()))
                    .domain_name("grpc.embed.test"),
            )
            .expect("client tls")
            .connect()
            .await
            .expect("connect");
        let origin = format!("https://grpc.embed.test:{port}")
            .parse()
            .expect("origin");
        let mut client = AuthorizationClient::new(firma.grpc_layer(origin).layer(channel));

        // Allowed: the server sees Firma's credential and no capability.
        let mut r = with_capability(&writer);
        r.metadata_mut()
            .insert("authorization", "Bearer app-own".parse().expect("metadata"));
        client.check(r).await.expect("allowed call");
        {
            let calls = recorder.calls.lock().unwrap();
            assert_eq!(calls.len(), 1);
            assert_eq!(
                calls[0].get("authorization").and_then(|v| v.to_str().ok()),
                Some(format!("Bearer {SECRET}").as_str())
            );
            assert!(calls[0].get("x-firma-capability").is_none());
        }

        // A capability without `data.write`: the typed error names the reason; not sent.
        let s = client
            .check(with_capability(&sender))
            .await
            .expect_err("denied call");
        let fe = firma_error(&s).unwrap_or_else(|| panic!("no Firma error in {s:?}"));
        assert_eq!(
            fe.deny_reason(),
            Some(DenyReason::CapabilityNotFound),
            "{fe}"
        );
        // A forged token (the writer's with its signature altered).
        let mut forged = writer.clone();
        let last = forged.pop().expect("token");
        forged.push(if last == 'A' { 'B' } else { 'A' });
        let s = client
            .check(with_capability(&forged))
            .await
            .expect_err("forged capability");
        assert_eq!(
            firma_error(&s).and_then(|f| f.deny_reason()),
            Some(DenyReason::CapabilityInvalid),
            "{s:?}"
        );
        assert_eq!(recorder.count(), 1, "a denied call reached the server");

        // Revoked through the CLI: the next call after it arrives is denied.
        world.revoke(&writer_id);
        let before =
            firma_testing::pipeline::eventually_async(Duration::from_secs(10), async || {
                let before = recorder.count();
                match client.check(with_capability(&writer)).await {
                    Err(s)
                        if firma_error(&s).and_then(|f| f.deny_reason())
                            == Some(DenyReason::CapabilityRevoked) =>
                    {
                        Some(before)
                    }
                    _ => None,
                }
            })
            .await
            .expect("revocation reached the embedded pipeline");
        assert_eq!(
            recorder.count(),
            before,
            "the revoked call reached the server"
        );
        firma.flush().await;
    });

    let events = world.events();
    let d = decisions(&events, "grpc.embed.test");
    assert_eq!(d.first().map(|x| x.0.as_str()), Some("ALLOW"), "{d:?}");
    for reason in [
        "CapabilityNotFound",
        "CapabilityInvalid",
        "CapabilityRevoked",
    ] {
        assert!(
            d.iter().any(|x| x.1.as_deref() == Some(reason)),
            "{reason}: {d:?}"
        );
    }
    world.verify();
}

/// The accepted connections of `l` as tonic's incoming stream.
fn tokio_stream_incoming(
    l: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(l)
}
