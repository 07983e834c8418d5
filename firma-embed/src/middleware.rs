//! reqwest through reqwest-middleware: the same decision as the layer, on `reqwest::Request`.

use crate::{Error, Firma};
use bytes::Bytes;

/// Add with `reqwest_middleware::ClientBuilder::new(client).with(firma.middleware())`. A
/// denial is a `reqwest_middleware::Error::Middleware` whose error downcasts to [`Error`].
/// A body a rule must read has to be in memory (not a stream): otherwise the call is denied
/// `MalformedRequest`.
#[derive(Clone)]
pub struct FirmaMiddleware {
    firma: Firma,
}

impl FirmaMiddleware {
    pub(crate) fn new(firma: Firma) -> Self {
        Self { firma }
    }
}

fn to_uri(url: &reqwest::Url) -> Result<http::Uri, Error> {
    url.as_str()
        .parse()
        .map_err(|e| Error::Request(format!("URL {url}: {e}")))
}

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for FirmaMiddleware {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut http::Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let uri = to_uri(req.url()).map_err(reqwest_middleware::Error::middleware)?;
        let body = if self.firma.reads_body(req.method(), &uri) {
            req.body()
                .and_then(|b| b.as_bytes())
                .map(Bytes::copy_from_slice)
        } else {
            None
        };
        let permit = self
            .firma
            .authorize(req.method(), &uri, req.headers(), body)
            .await
            .map_err(reqwest_middleware::Error::middleware)?;
        permit.apply_headers(req.headers_mut());
        let decided = permit.uri(&uri).to_string();
        if decided != uri.to_string() {
            *req.url_mut() = reqwest::Url::parse(&decided).map_err(|e| {
                reqwest_middleware::Error::middleware(Error::Request(e.to_string()))
            })?;
        }
        let resp = next.run(req, extensions).await;
        match &resp {
            Ok(r) => permit.finish(Ok(r.status())),
            Err(e) => permit.finish(Err(e.to_string())),
        }
        resp
    }
}
