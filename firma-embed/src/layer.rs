//! The tower layer: each request is decided before the inner service sees it.

use crate::{BoxError, Error, Firma, Rebuild};
use bytes::Bytes;
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Wraps a client service with the embedded pipeline ([`Firma::layer`], [`Firma::grpc_layer`]).
#[derive(Clone)]
pub struct FirmaLayer {
    firma: Firma,
    origin: Option<http::Uri>,
}

impl FirmaLayer {
    pub(crate) fn new(firma: Firma, origin: Option<http::Uri>) -> Self {
        Self { firma, origin }
    }
}

impl<S> tower_layer::Layer<S> for FirmaLayer {
    type Service = FirmaService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FirmaService {
            inner,
            firma: self.firma.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// The wrapped service: denials fail with [`Error::Denied`] and never reach `inner`.
#[derive(Clone)]
pub struct FirmaService<S> {
    inner: S,
    firma: Firma,
    origin: Option<http::Uri>,
}

/// `uri` made absolute with `origin` when it has no authority (tonic's channel requests).
fn absolute(uri: &http::Uri, origin: Option<&http::Uri>) -> Result<http::Uri, Error> {
    if uri.authority().is_some() {
        return Ok(uri.clone());
    }
    let origin = origin.ok_or_else(|| {
        Error::Request(format!(
            "request URI {uri} has no host; use Firma::grpc_layer(origin) for a channel"
        ))
    })?;
    let mut parts = origin.clone().into_parts();
    parts.path_and_query = uri.path_and_query().cloned();
    http::Uri::from_parts(parts).map_err(|e| Error::Request(e.to_string()))
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for FirmaService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Rebuild + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<RB>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Error::Upstream(e.into()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was polled ready is the one that sends.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let firma = self.firma.clone();
        let origin = self.origin.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let target = absolute(&parts.uri, origin.as_ref())?;
            let (body, bytes) = if firma.reads_body(&parts.method, &target) {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| Error::Request(format!("reading the request body: {}", e.into())))?
                    .to_bytes();
                (B::rebuild(bytes.clone()), Some(bytes))
            } else {
                (body, None)
            };
            let permit = firma
                .authorize(&parts.method, &target, &parts.headers, bytes)
                .await?;
            permit.apply_headers(&mut parts.headers);
            parts.uri = permit.uri(&parts.uri);
            match inner.call(http::Request::from_parts(parts, body)).await {
                Ok(resp) => {
                    permit.finish(Ok(resp.status()));
                    Ok(resp)
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    permit.finish(Err(e.to_string()));
                    Err(Error::Upstream(e))
                }
            }
        })
    }
}
