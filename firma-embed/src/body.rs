//! Request bodies the layer may have to read before the decision (a mapping rule that extracts
//! from the body) and must then hand on with the same bytes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// A body type that can be rebuilt from the bytes read from it.
pub trait Rebuild: Sized {
    fn rebuild(bytes: Bytes) -> Self;
}

impl Rebuild for Full<Bytes> {
    fn rebuild(bytes: Bytes) -> Self {
        Full::new(bytes)
    }
}

impl Rebuild for http_body_util::Empty<Bytes> {
    /// An empty body has nothing to rebuild (a rule reading it sees no bytes).
    fn rebuild(_: Bytes) -> Self {
        http_body_util::Empty::new()
    }
}

impl<E: Send + Sync + 'static> Rebuild for http_body_util::combinators::BoxBody<Bytes, E> {
    fn rebuild(bytes: Bytes) -> Self {
        Full::new(bytes).map_err(|never| match never {}).boxed()
    }
}

impl<E: Send + 'static> Rebuild for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn rebuild(bytes: Bytes) -> Self {
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

#[cfg(feature = "tonic")]
impl Rebuild for tonic::body::Body {
    fn rebuild(bytes: Bytes) -> Self {
        tonic::body::Body::new(Full::new(bytes))
    }
}
