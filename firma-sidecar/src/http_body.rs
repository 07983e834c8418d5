//! The one boxed HTTP body type every hop carries: requests on their way upstream and
//! responses on their way to the client (what the interceptor, the connector and the pool
//! share).

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// A boxed body whose frames are `Bytes` and whose errors are hyper's.
pub type BoxedBody = BoxBody<Bytes, hyper::Error>;
/// A request body on its way upstream.
pub type ReqBody = BoxedBody;
/// A response body on its way to the client.
pub type RespBody = BoxedBody;
