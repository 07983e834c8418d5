//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../proto/authority.proto",
        "../proto/audit.proto",
        // Envoy ext_authz, trimmed (proto/envoy/README.md).
        "../proto/envoy/ext_authz.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The Kubernetes CRI subset the node agent speaks to the container runtime: client only.
    let cri = ["../proto/cri/runtime_v1.proto"];
    println!("cargo:rerun-if-changed={}", cri[0]);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(protox::compile(cri, ["../proto/cri"])?)?;
    Ok(())
}
