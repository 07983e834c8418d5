//! Placeholder credentials: the value a workload holds instead of the real key, so an SDK that
//! refuses to start without one starts, while the secret stays in the sidecar.
//!
//! A placeholder is any value containing [`MARKER`]. `firma run` gives the child one per
//! credential variable ([`generate`]); an operator gives workloads one the same way (any value
//! containing the marker). The sidecar needs no list of them: on a credential host the headers
//! and query parameters that carry a credential are removed before Firma's is set, and a
//! placeholder found anywhere else in a request (another host, or a header Firma does not
//! replace) is a leak: the request is denied `CredentialLeak`.

use http::{HeaderMap, HeaderName, Uri};

/// What makes a value a placeholder. Reserved: a header value, path or query parameter that
/// contains it never leaves the sidecar.
pub const MARKER: &str = "firma-placeholder";

/// A fresh placeholder: `sk-firma-placeholder-<32 hex>`. The `sk-` prefix and the length make
/// it pass the usual "looks like an API key" checks of SDKs and tools; the random part makes
/// each run's placeholders its own. Not a secret.
pub fn generate() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("sk-{MARKER}-{}", hex::encode(bytes))
}

/// Headers removed on a credential host unless the entry says otherwise.
pub const DEFAULT_STRIP_HEADERS: [&str; 4] =
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Query parameters removed on a credential host unless the entry says otherwise.
pub const DEFAULT_STRIP_QUERY: [&str; 5] = ["key", "api_key", "api-key", "apikey", "access_token"];

fn contains_marker(bytes: &[u8]) -> bool {
    bytes
        .windows(MARKER.len())
        .any(|w| w.eq_ignore_ascii_case(MARKER.as_bytes()))
}

/// `%XX`-decoded bytes (`+` left as is, invalid escapes kept): a placeholder escaped in a URL
/// is still found.
fn percent_decoded(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

/// The name of a `name=value` query pair, decoded and lowercased.
fn param_name(pair: &str) -> String {
    let name = pair.split_once('=').map_or(pair, |(n, _)| n);
    String::from_utf8_lossy(&percent_decoded(name)).to_ascii_lowercase()
}

/// Where a placeholder was found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Header(String),
    QueryParam(String),
    Path,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(h) => write!(f, "header `{h}`"),
            Self::QueryParam(q) => write!(f, "query parameter `{q}`"),
            Self::Path => f.write_str("URL path"),
        }
    }
}

/// The first placeholder that would leave with this request: in a header not in
/// `exempt_headers`, a query parameter not in `exempt_params` (lowercase names), or the path.
/// `x-firma-*` headers never leave, so they are not looked at.
pub fn find(
    uri: &Uri,
    headers: &HeaderMap,
    exempt_headers: &[HeaderName],
    exempt_params: &[String],
) -> Option<Found> {
    for (name, value) in headers {
        if name.as_str().starts_with("x-firma-") || exempt_headers.contains(name) {
            continue;
        }
        if contains_marker(value.as_bytes()) {
            return Some(Found::Header(name.as_str().to_string()));
        }
    }
    if contains_marker(&percent_decoded(uri.path())) {
        return Some(Found::Path);
    }
    for pair in uri.query().unwrap_or("").split('&') {
        let name = param_name(pair);
        if !exempt_params.contains(&name) && contains_marker(&percent_decoded(pair)) {
            return Some(Found::QueryParam(name));
        }
    }
    None
}

/// `path_and_query` without the parameters named in `params` (lowercase); the others keep
/// their order and encoding. `None`: nothing to remove.
pub fn strip_query(path_and_query: &str, params: &[String]) -> Option<String> {
    let (path, query) = path_and_query.split_once('?')?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !params.contains(&param_name(p)))
        .collect();
    if kept.len() == query.split('&').count() {
        return None;
    }
    let kept: Vec<&str> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    Some(if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn generated_placeholders_carry_the_marker_and_differ() {
        let (a, b) = (generate(), generate());
        assert!(
            a.starts_with("sk-firma-placeholder-") && a.len() == 53,
            "{a}"
        );
        assert_ne!(a, b);
        assert!(contains_marker(a.as_bytes()));
    }

    #[test]
    fn found_in_headers_path_and_query_unless_exempt() {
        let p = generate();
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {p}").parse().unwrap());
        let uri: Uri = "/v1/models".parse().unwrap();
        assert_eq!(
            find(&uri, &h, &[], &[]),
            Some(Found::Header("authorization".into()))
        );
        assert_eq!(
            find(&uri, &h, &[HeaderName::from_static("authorization")], &[]),
            None
        );
        h.insert("x-firma-session", p.parse().unwrap());
        assert_eq!(
            find(&uri, &h, &[HeaderName::from_static("authorization")], &[]),
            None
        );
        // Escaped, upper-cased, in the path or the query.
        let esc = p.replace('-', "%2D").to_uppercase();
        let uri: Uri = format!("/x?a=1&Key={esc}").parse().unwrap();
        assert_eq!(
            find(&uri, &HeaderMap::new(), &[], &[]),
            Some(Found::QueryParam("key".into()))
        );
        assert_eq!(find(&uri, &HeaderMap::new(), &[], &names(&["key"])), None);
        let uri: Uri = format!("/upload/{esc}").parse().unwrap();
        assert_eq!(find(&uri, &HeaderMap::new(), &[], &[]), Some(Found::Path));
        let uri: Uri = "/v1/models?q=firma".parse().unwrap();
        assert_eq!(find(&uri, &HeaderMap::new(), &[], &[]), None);
    }

    #[test]
    fn query_parameters_are_stripped_by_name() {
        let strip = names(&DEFAULT_STRIP_QUERY);
        assert_eq!(
            strip_query("/v1/m?key=abc&alt=sse", &strip).as_deref(),
            Some("/v1/m?alt=sse")
        );
        assert_eq!(
            strip_query("/v1/m?KEY=abc", &strip).as_deref(),
            Some("/v1/m")
        );
        assert_eq!(
            strip_query("/v1/m?a=1&api%5Fkey=x&b=%20", &strip).as_deref(),
            Some("/v1/m?a=1&b=%20")
        );
        assert_eq!(strip_query("/v1/m?keys=1", &strip), None);
        assert_eq!(strip_query("/v1/m", &strip), None);
        assert!(percent_decoded("%zz%4").iter().all(|b| b.is_ascii()));
    }
}
