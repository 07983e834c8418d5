//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! The sidecar's sniffers read from sockets, so the targets feed them through [`Chunked`]: the
//! same bytes arrive in pieces, and a verdict must not depend on how the network split them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// An [`AsyncRead`] that yields `data` at most `chunk` bytes per read, then end of file.
pub struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], chunk: usize) -> Self {
        Self {
            data,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// A chunk size derived from the input itself (1..=512), so the corpus stays raw protocol
/// bytes while every mutation also varies how they are split.
pub fn chunk_for(data: &[u8]) -> usize {
    let h = data.iter().fold(0usize, |a, b| {
        a.wrapping_mul(31).wrapping_add(usize::from(*b))
    });
    1 + h % 512
}

/// Runs `f` on a per-thread current-thread runtime with the timer enabled (the sniffers use
/// timeouts; [`Chunked`] ends in EOF, so they never actually wait).
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// Splits on NUL into exactly `N` fields (missing ones empty, extra NULs kept in the last).
pub fn fields<const N: usize>(data: &[u8]) -> [String; N] {
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    let mut parts = data.splitn(N, |b| *b == 0);
    for slot in out.iter_mut() {
        if let Some(p) = parts.next() {
            *slot = String::from_utf8_lossy(p).into_owned();
        }
    }
    out
}
