//! gRPC over TLS (rustls): the Authority serves with a configured certificate, a tonic client
//! that trusts the CA issues a capability, a plaintext client is refused, and a TLS key that
//! others can read stops startup.

use firma_common::proto::authority as pb;
use firma_common::proto::authority::authority_client::AuthorityClient;
use firma_testing::authority::*;
use firma_testing::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn tls_deployment() -> (Deployment, std::path::PathBuf, std::path::PathBuf) {
    let d = Deployment::new(PERMIT_ALL, PERMIT_ALL);
    let (ca, cert, key) = write_tls_files(d.dir.path());
    d.write_config(
        "127.0.0.1:0",
        &format!(
            "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    (d, ca, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_issues_and_plaintext_is_refused() {
    let (d, ca, _) = tls_deployment();
    let server = d.start();
    assert!(
        server.log_text().contains("tls=true"),
        "{}",
        server.log_text()
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let resp = AuthorityClient::new(channel)
        .issue_capability(pb::IssuanceRequest {
            agent_id: "a".into(),
            session_id: "s".into(),
            requested_actions: vec!["data.read".into()],
            resource_scope: "*".into(),
            requested_ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(resp.result, Some(pb::issuance_response::Result::Allowed(_))),
        "{resp:?}"
    );

    let plaintext = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = AuthorityClient::connect(server.url()).await.ok()?;
        c.issue_capability(pb::IssuanceRequest::default())
            .await
            .ok()
    })
    .await;
    assert!(
        matches!(plaintext, Ok(None) | Err(_)),
        "plaintext request must not be answered"
    );
}

#[test]
fn tls_key_readable_by_others_is_refused() {
    let (d, _, key) = tls_deployment();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = firma(&["authority", "-c", d.config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("0600"),
        "{err}"
    );
}

#[test]
fn tls_allows_non_loopback_listen_address_check() {
    // With TLS the loopback rule does not apply; check the rule itself without binding a
    // non-loopback address in tests.
    let addr = "0.0.0.0:50051".parse().unwrap();
    assert!(firma_authority::server::check_listen(addr, true).is_ok());
    assert!(firma_authority::server::check_listen(addr, false).is_err());
    let v6 = "[::1]:50051".parse().unwrap();
    assert!(firma_authority::server::check_listen(v6, false).is_ok());
}
