//! A real grpcio TLS server (`tests/python/grpc_echo/server.py`) and client (`client.py`),
//! with Python stubs generated from `echo.proto` at test time by `grpc_tools.protoc`.
//! Fails (never skips) when grpcio/grpcio-tools are missing: CI installs them.

use crate::process::Process;
use crate::{repo_root, text};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn echo_dir() -> PathBuf {
    repo_root().join("tests/python/grpc_echo")
}

/// Generates `firma_test/echo_pb2{,_grpc}.py` under `out`; returns `out`.
pub fn generate_stubs(out: &Path) -> PathBuf {
    let pkg = out.join("firma_test");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("__init__.py"), "").unwrap();
    let dir = echo_dir();
    let o = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&dir)
        .arg(format!("--python_out={}", pkg.display()))
        .arg(format!("--grpc_python_out={}", pkg.display()))
        .arg(dir.join("echo.proto"))
        .output()
        .expect("python3 is required (pip install grpcio grpcio-tools)");
    assert!(
        o.status.success(),
        "cannot generate Python stubs ({}); run `pip install grpcio grpcio-tools`",
        text(&o.stderr).trim()
    );
    // grpc_tools writes `import echo_pb2`; make it a package import.
    let grpc_py = pkg.join("echo_pb2_grpc.py");
    let src = std::fs::read_to_string(&grpc_py).unwrap();
    std::fs::write(
        &grpc_py,
        src.replace("import echo_pb2 as", "from firma_test import echo_pb2 as"),
    )
    .unwrap();
    out.to_path_buf()
}

/// The running echo server.
pub struct GrpcEcho {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate.
    pub ca_path: PathBuf,
    pub stubs: PathBuf,
    calls: PathBuf,
    pub process: Process,
}

impl GrpcEcho {
    /// Serves TLS (certificate for `names`, from a fresh CA under `dir`) on `bind`.
    pub fn start(dir: &Path, names: &[&str], bind: SocketAddr) -> Self {
        let stubs = generate_stubs(&dir.join("stubs"));
        let ca = crate::pki::TestCa::new("firma test gRPC CA");
        let ca_path = ca.write_pem(&dir.join("grpc-ca.crt"));
        let leaf = ca.leaf(names);
        let (cert, key) = (dir.join("grpc.crt"), dir.join("grpc.key"));
        std::fs::write(&cert, leaf.cert.pem()).unwrap();
        std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
        let calls = dir.join("grpc-calls.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(echo_dir().join("server.py"))
            .arg(&stubs)
            .arg(bind.to_string())
            .arg(&cert)
            .arg(&key)
            .arg(&calls);
        for v in crate::client::PROXY_VARS {
            cmd.env_remove(v);
        }
        let mut process = Process::spawn(cmd).expect("spawn python3 gRPC server");
        process
            .wait_for("LISTENING", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("gRPC server: {e}"));
        let port: u16 = process.logged("LISTENING ").expect("port");
        Self {
            addr: SocketAddr::new(bind.ip(), port),
            ca_path,
            stubs,
            calls,
            process,
        }
    }

    /// Calls the server received: `{method, authorization, message}` per line.
    pub fn calls(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// `client.py` against `target` trusting `ca`: a command to complete (envs, cgroup) and run
/// with [`client_result`].
pub fn client_command(stubs: &Path, target: &str, ca: &Path) -> (PathBuf, Vec<String>) {
    (
        PathBuf::from("python3"),
        vec![
            echo_dir().join("client.py").display().to_string(),
            stubs.display().to_string(),
            target.to_string(),
            ca.display().to_string(),
        ],
    )
}

/// The client's JSON, or a panic with its stderr.
pub fn client_result(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "gRPC client failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}):\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}
