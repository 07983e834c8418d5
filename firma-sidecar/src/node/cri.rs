//! CRI client (`runtime.v1.RuntimeService`) over the runtime's Unix socket.

use firma_common::proto::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint, Uri};

/// A connected CRI runtime client.
pub type Client = RuntimeServiceClient<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {path}: {detail}")]
    Connect { path: PathBuf, detail: String },
    #[error("CRI {call}: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

impl CriError {
    pub fn call(call: &'static str) -> impl Fn(tonic::Status) -> Self {
        move |status| Self::Call {
            call,
            status: Box::new(status),
        }
    }
}

/// Connects to the CRI runtime at `socket` and checks it answers `Version`.
pub async fn connect(socket: &Path) -> Result<Client, CriError> {
    let path = socket.to_path_buf();
    let err = |detail: String| CriError::Connect {
        path: socket.into(),
        detail,
    };
    // The URI is required by the API but unused: every connection is the Unix socket.
    let channel = Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| err(format!("{e:?}")))?;
    let mut client = RuntimeServiceClient::new(channel);
    client
        .version(firma_common::proto::cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .map_err(|s| err(format!("Version: {s}")))?;
    Ok(client)
}
