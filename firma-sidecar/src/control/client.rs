//! Client side, used by the `firma` CLI (blocking; one request per connection).

use super::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the sidecar's control socket {path}: {cause} (is `firma sidecar` running in transparent mode with this config?)"
    )]
    Connect {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {path} answered something that is not a response: {detail}")]
    BadResponse { path: PathBuf, detail: String },
}

/// Sends one request and waits (up to 30 s) for its response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.into(),
        cause: source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|cause| ClientError::Connect {
        path: socket.into(),
        cause,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::BadResponse {
        path: socket.into(),
        detail: e.to_string(),
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::BadResponse {
        path: socket.into(),
        detail: format!("{e}: {answer:?}"),
    })
}
