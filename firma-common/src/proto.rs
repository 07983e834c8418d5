//! gRPC messages and services generated from `proto/` at build time.

/// `firma.authority.v1`: capability issuance, policy bundles, revocations.
pub mod authority {
    tonic::include_proto!("firma.authority.v1");
}

/// `firma.audit.v1`: the collector behind the `grpc` audit sink.
pub mod audit {
    tonic::include_proto!("firma.audit.v1");
}

/// `runtime.v1`: the part of the Kubernetes CRI the node agent uses (client only; see
/// `proto/cri/runtime_v1.proto`).
pub mod cri {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("runtime.v1");
}

/// `envoy.service.auth.v3`: Envoy's ext_authz `Authorization/Check`, trimmed to what the
/// sidecar's ext_authz server uses (`proto/envoy/README.md`).
pub mod envoy_auth {
    tonic::include_proto!("envoy.service.auth.v3");
}
