//! Request path normalisation: the one form of a path that mapping rules, resource scopes,
//! Cedar, the audit event *and the upstream* all see.
//!
//! Without it `GET /v1/models/../../v1/organization/api_keys` is classified (and scope-checked)
//! by its `/v1/models` prefix while the upstream resolves the dot segments and serves another
//! resource. [`normalize`] therefore resolves the path the way an origin server would, and the
//! interceptor forwards the result instead of the client's spelling, so nothing downstream can
//! interpret it differently.
//!
//! Steps, in order:
//! 1. **Percent-decoding of unreserved characters only** (`ALPHA DIGIT - . _ ~`, RFC 3986
//!    section 6.2.2.2): `%2e` is `.`, so `%2e%2e` is a dot segment like `..`. Every other
//!    escape is kept, with its hex digits in uppercase (`%c3%a9` -> `%C3%A9`, section 6.2.2.1).
//! 2. **Empty segments collapse**: `//` becomes `/`. A base URL with a trailing slash joined to
//!    `/chat/completions` produces `//`, and common front ends (nginx `merge_slashes`) merge
//!    it; keeping it would let `/v1//chat/x` match a `/v1/*` rule while such an upstream serves
//!    `/v1/chat/x`. Collapsing and forwarding the collapsed form makes both agree. The price:
//!    a resource whose name really contains an empty segment (an S3 key with `//`) cannot be
//!    reached through the sidecar.
//! 3. **Dot segments** are removed as in RFC 3986 section 5.2.4 (`/a/./b` -> `/a/b`,
//!    `/a/b/..` -> `/a/`).
//!
//! Rejected as ambiguous ([`PathError`], denied `MalformedRequest`), because origin servers
//! disagree on what they mean and the sidecar cannot forward a form they all read alike:
//! an encoded `/` (`%2F`) or `\` (`%5C`), a literal `\`, NUL and other control characters
//! (literal or encoded), an invalid escape (`%G1`, a trailing `%`), a double-encoded dot,
//! slash, backslash or control (`%252e`: a server that decodes twice sees `..`), a segment that
//! is a dot segment followed by `;` parameters (`..;x`, which servlet containers resolve as
//! `..`), and a path that climbs above the root (`/../x`). RFC 3986 clamps the last at the
//! root; no client that builds URLs with a library sends it (they resolve dot segments before
//! sending), so it is a probe, and refusing it keeps it visible in the audit log instead of
//! quietly turning it into a request for another resource.
//!
//! Nothing else changes: the query string is never touched, literal characters other than
//! those above pass through, and a trailing `/` is kept.

use http::Uri;
use http::uri::PathAndQuery;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("request path {0:?} does not start with '/'")]
    NotAbsolute(String),
    #[error("request path {0:?} has an invalid percent escape")]
    InvalidEscape(String),
    #[error("request path {0:?} contains an encoded '/' (%2F)")]
    EncodedSlash(String),
    #[error("request path {0:?} contains a backslash (literal or %5C)")]
    Backslash(String),
    #[error("request path {0:?} contains a control character (literal or encoded, e.g. %00)")]
    Control(String),
    #[error("request path {0:?} contains a double-encoded '.', '/', '\\' or control character")]
    DoubleEncoded(String),
    #[error("request path {0:?} has a dot segment with ';' parameters")]
    DotParams(String),
    #[error("request path {0:?} climbs above the root")]
    AboveRoot(String),
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// The byte two hex digits at `bytes[j..j + 2]` spell, if they do.
fn hex_pair(bytes: &[u8], j: usize) -> Option<u8> {
    let hi = hex(*bytes.get(j)?)?;
    let lo = hex(*bytes.get(j + 1)?)?;
    Some(hi << 4 | lo)
}

/// Step 1: decode unreserved escapes, uppercase the rest, refuse the ambiguous bytes.
fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let v = hex_pair(bytes, i + 1).ok_or_else(|| PathError::InvalidEscape(raw.into()))?;
            match v {
                b'/' => return Err(PathError::EncodedSlash(raw.into())),
                b'\\' => return Err(PathError::Backslash(raw.into())),
                v if is_control(v) => return Err(PathError::Control(raw.into())),
                b'%' => {
                    // `%25` followed by two hex digits decodes, a second time, to another byte.
                    if hex_pair(bytes, i + 3)
                        .is_some_and(|w| matches!(w, b'.' | b'/' | b'\\') || is_control(w))
                    {
                        return Err(PathError::DoubleEncoded(raw.into()));
                    }
                    out.push_str("%25");
                }
                v if is_unreserved(v) => out.push(char::from(v)),
                v => out.push_str(&format!("%{v:02X}")),
            }
            i += 3;
            continue;
        }
        if b == b'\\' {
            return Err(PathError::Backslash(raw.into()));
        }
        if is_control(b) {
            return Err(PathError::Control(raw.into()));
        }
        // Multi-byte UTF-8 is copied whole: `raw` is a `str`, so a non-ASCII char starts here.
        let ch = raw[i..]
            .chars()
            .next()
            .unwrap_or(char::REPLACEMENT_CHARACTER);
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    Ok(out)
}

/// Normalises an absolute request path (no query string). See the module doc for the rules.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.into()));
    }
    let decoded = decode_unreserved(raw)?;
    let mut out: Vec<&str> = Vec::new();
    // Whether the result ends with '/': a trailing empty segment, or a final dot segment
    // (RFC 3986: `/a/b/..` is `/a/`).
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        let bare = seg.split(';').next().unwrap_or(seg);
        if seg != bare && (bare == "." || bare == "..") {
            return Err(PathError::DotParams(raw.into()));
        }
        match seg {
            "" | "." => trailing = true,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot(raw.into()));
                }
                trailing = true;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// A request path in the one form [`normalize`] gives. Only [`NormalPath::new`] makes one, so
/// whatever takes a `NormalPath` (the decision's [`super::RequestContext`]) cannot be handed a
/// path that was not normalised, and nothing downstream normalises again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalPath(String);

impl NormalPath {
    /// Normalises `raw` (an absolute path without query string; see the module doc).
    pub fn new(raw: &str) -> Result<Self, PathError> {
        normalize(raw).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for NormalPath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NormalPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NormalPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for NormalPath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// `uri` with its path replaced by the [`normalize`]d form (scheme, authority and query kept as
/// they were), and that path. The URI is what gets forwarded, the path what is decided and
/// audited: one normalisation for both.
pub fn normalize_uri(uri: &Uri) -> Result<(Uri, NormalPath), PathError> {
    let path = NormalPath::new(uri.path())?;
    if path.as_str() == uri.path() {
        return Ok((uri.clone(), path));
    }
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    // The normalised path only holds bytes the parsed one held (or `%XX`), so this parses.
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|_| PathError::InvalidEscape(uri.path().into()))?);
    let uri = Uri::from_parts(parts).map_err(|_| PathError::InvalidEscape(uri.path().into()))?;
    Ok((uri, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        normalize(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/v1/chat/completions",
            "/v1/models/",
            "/a/b.c/d..e/...",
            "/a/.b/..c",
            "/a;b=c/d",
            "/caf%C3%A9",
            "/x/%25",
            "/x/%20y",
            "/%3F%23",
            "/~user/a-b_c",
            "/é",
        ] {
            assert_eq!(ok(p), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_resolve() {
        assert_eq!(
            ok("/v1/models/../../v1/organization/api_keys"),
            "/v1/organization/api_keys"
        );
        assert_eq!(ok("/v1/models/../../v1/files"), "/v1/files");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/./"), "/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/b/../"), "/a/");
        assert_eq!(ok("/a/b/../c/./d/"), "/a/c/d/");
        assert_eq!(ok("/a/b/c/../../d"), "/a/d");
    }

    #[test]
    fn encoded_dots_of_any_case_are_dot_segments() {
        for p in [
            "/v1/models/%2e%2e/%2e%2e/v1/files",
            "/v1/models/%2E%2E/%2E%2E/v1/files",
            "/v1/models/%2e%2E/.%2e/v1/files",
            "/v1/models/%2e./..//v1/files",
            "/v1/%2e/models/%2e%2e/../v1/files",
        ] {
            let got = ok(p);
            assert!(got == "/v1/files" || got == "/v1/files/", "{p} -> {got}");
        }
        assert_eq!(ok("/v1/%2e%2e"), "/");
        assert_eq!(ok("/v1/%2E"), "/v1/");
    }

    #[test]
    fn unreserved_escapes_decode_and_others_uppercase() {
        assert_eq!(ok("/%61%62%63/%7e%2D%5f"), "/abc/~-_");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/a%3ab"), "/a%3Ab");
        assert_eq!(ok("/a%20b"), "/a%20b");
        // '%25' stays encoded ('%' is not unreserved) and is not decoded twice.
        assert_eq!(ok("/100%25"), "/100%25");
        assert_eq!(ok("/100%25off"), "/100%25off");
    }

    #[test]
    fn empty_segments_collapse() {
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/v1//chat/completions"), "/v1/chat/completions");
        assert_eq!(ok("//v1///models//"), "/v1/models/");
        assert_eq!(ok("/a//../b"), "/b");
    }

    #[test]
    fn semicolon_params_stay_but_not_on_dot_segments() {
        assert_eq!(ok("/a;x=1/b;y"), "/a;x=1/b;y");
        assert_eq!(ok("/a/..x;y/b"), "/a/..x;y/b");
        assert_eq!(ok("/a/b/../c;v=1"), "/a/c;v=1");
        for p in ["/a/..;/b", "/a/..;x=1/b", "/a/.;/b", "/a/%2e%2e;/b", "/..;"] {
            assert!(
                matches!(normalize(p), Err(PathError::DotParams(_))),
                "{p}: {:?}",
                normalize(p)
            );
        }
    }

    #[test]
    fn climbing_above_root_is_refused() {
        for p in [
            "/..",
            "/../",
            "/../etc/passwd",
            "/a/../..",
            "/a/../../b",
            "/%2e%2e/x",
            "/v1/models/../../../x",
        ] {
            assert!(
                matches!(normalize(p), Err(PathError::AboveRoot(_))),
                "{p}: {:?}",
                normalize(p)
            );
        }
    }

    #[test]
    fn ambiguous_bytes_are_refused() {
        type Want = fn(&PathError) -> bool;
        let cases: &[(&str, Want)] = &[
            ("/a%2Fb", |e| matches!(e, PathError::EncodedSlash(_))),
            ("/a%2fb", |e| matches!(e, PathError::EncodedSlash(_))),
            ("/v1/models%2F..%2F..%2Fx", |e| {
                matches!(e, PathError::EncodedSlash(_))
            }),
            ("/a%5Cb", |e| matches!(e, PathError::Backslash(_))),
            ("/a%5cb", |e| matches!(e, PathError::Backslash(_))),
            ("/a\\..\\b", |e| matches!(e, PathError::Backslash(_))),
            ("/a%00b", |e| matches!(e, PathError::Control(_))),
            ("/a%0d%0aX: y", |e| matches!(e, PathError::Control(_))),
            ("/a%09", |e| matches!(e, PathError::Control(_))),
            ("/a%7F", |e| matches!(e, PathError::Control(_))),
            ("/a\tb", |e| matches!(e, PathError::Control(_))),
            ("/a%", |e| matches!(e, PathError::InvalidEscape(_))),
            ("/a%2", |e| matches!(e, PathError::InvalidEscape(_))),
            ("/a%G1", |e| matches!(e, PathError::InvalidEscape(_))),
            ("/a%%32e", |e| matches!(e, PathError::InvalidEscape(_))),
            ("/a/%252e%252e/b", |e| {
                matches!(e, PathError::DoubleEncoded(_))
            }),
            ("/a%252Fb", |e| matches!(e, PathError::DoubleEncoded(_))),
            ("/a%255cb", |e| matches!(e, PathError::DoubleEncoded(_))),
            ("/a%2500", |e| matches!(e, PathError::DoubleEncoded(_))),
            ("v1/models", |e| matches!(e, PathError::NotAbsolute(_))),
            ("", |e| matches!(e, PathError::NotAbsolute(_))),
        ];
        for (p, want) in cases {
            match normalize(p) {
                Err(e) => assert!(want(&e), "{p}: {e:?}"),
                Ok(n) => panic!("{p} normalised to {n}"),
            }
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in [
            "/v1/models/../../v1/organization/api_keys",
            "/a/%2e/b//c/",
            "/caf%c3%a9/%7e",
            "/a;x/b",
        ] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }

    #[test]
    fn uris_keep_scheme_authority_and_query() {
        let u: Uri = "https://api.openai.com/v1/models/%2e%2e/files?purpose=../x&a=%2e"
            .parse()
            .unwrap();
        let (n, path) = normalize_uri(&u).unwrap();
        assert_eq!(
            n.to_string(),
            "https://api.openai.com/v1/files?purpose=../x&a=%2e"
        );
        assert_eq!(path.as_str(), "/v1/files");
        let u: Uri = "/v1/./models".parse().unwrap();
        assert_eq!(normalize_uri(&u).unwrap().0.to_string(), "/v1/models");
        let u: Uri = "/v1/models?x".parse().unwrap();
        assert_eq!(normalize_uri(&u).unwrap().0, u);
        // A NormalPath is only made by normalising.
        assert_eq!(NormalPath::new("/a/../b//c").unwrap().as_str(), "/b/c");
        assert!(NormalPath::new("/../x").is_err());
        let u: Uri = "/a%2fb?q".parse().unwrap();
        assert!(matches!(normalize_uri(&u), Err(PathError::EncodedSlash(_))));
    }
}
