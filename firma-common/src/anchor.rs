//! Audit anchors in etcd, and the etcd client rules every Firma component shares.
//!
//! An anchor is a sidecar's audit chain head as it stood once persisted: `(chain_id, seq,
//! hash)` of the last written line (always the signed last line of a batch), signed with the
//! sidecar's audit key. Sidecars put it at `<prefix>anchors/<chain_id>` every
//! `[sidecar.audit.anchor] interval_ms`; `firma audit verify --anchors etcd://…` then fails a
//! file that lacks the anchored line or holds a different line at that `seq` (truncated or
//! rewritten after anchoring). What was written after the last anchor is not protected: that
//! window is the interval plus one etcd round trip (docs/scale-out.md).

use crate::config::ConfigError;
use crate::keys::{SigningKey, VerifyingKey};
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One anchored chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub chain_id: String,
    pub seq: u64,
    /// `line_hash` of the line at `seq`.
    pub hash: String,
    /// When it was published (Unix ms).
    pub at_ms: i64,
    pub key_id: String,
    /// Ed25519 over [`Anchor::signed_text`], base64.
    pub signature: String,
}

impl Anchor {
    fn signed_text(chain_id: &str, seq: u64, hash: &str, at_ms: i64) -> String {
        format!("firma-anchor-v1\n{chain_id}\n{seq}\n{hash}\n{at_ms}")
    }

    /// A signed anchor for the head `(chain_id, seq, hash)`.
    pub fn new(chain_id: &str, seq: u64, hash: &str, at_ms: i64, key: &SigningKey) -> Self {
        let sig = key.sign(Self::signed_text(chain_id, seq, hash, at_ms).as_bytes());
        Self {
            chain_id: chain_id.to_owned(),
            seq,
            hash: hash.to_owned(),
            at_ms,
            key_id: crate::audit::key_id(&key.verifying_key()),
            signature: B64.encode(sig.to_bytes()),
        }
    }

    /// Whether one of `keys` signed it.
    pub fn verify(&self, keys: &[VerifyingKey]) -> bool {
        let Ok(bytes) = B64.decode(&self.signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&bytes) else {
            return false;
        };
        let text = Self::signed_text(&self.chain_id, self.seq, &self.hash, self.at_ms);
        keys.iter()
            .any(|k| k.verify_strict(text.as_bytes(), &sig).is_ok())
    }
}

/// Where a chain's anchor lives.
pub fn anchor_key(prefix: &str, chain_id: &str) -> String {
    format!("{prefix}anchors/{chain_id}")
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Endpoint list rules shared by every etcd client in Firma: at least one, each
/// `http://HOST:PORT` on a loopback address (TLS to etcd is not supported yet, and nothing
/// security-relevant crosses a network in the clear).
pub fn check_endpoints(file: &Path, key: &str, endpoints: &[String]) -> Result<(), ConfigError> {
    if endpoints.is_empty() {
        return Err(ConfigError::invalid(
            file,
            key,
            "expected at least one etcd client URL, e.g. [\"http://127.0.0.1:2379\"]",
        ));
    }
    for e in endpoints {
        if let Err(why) = check_endpoint(e) {
            return Err(ConfigError::invalid(file, key, why));
        }
    }
    Ok(())
}

fn check_endpoint(e: &str) -> Result<(), String> {
    let uri: Result<http::Uri, _> = e.parse();
    let ok = uri.as_ref().is_ok_and(|u| {
        u.scheme_str() == Some("http")
            && u.port_u16().is_some()
            && u.host().is_some_and(is_loopback)
            && matches!(u.path(), "" | "/")
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected http://HOST:PORT on a loopback address (TLS to etcd is not supported), got {e:?}"
        ))
    }
}

/// HTTP/2 keep-alive ping interval of every Firma etcd client, and how long a ping may go
/// unanswered. etcd's keep-alive enforcement (`--grpc-keepalive-min-time`, default 5 s, and no
/// pings at all on a connection without an open stream) counts a ping sooner than that, or any
/// ping on an idle connection, as a strike and after three sends `GOAWAY ENHANCE_YOUR_CALM
/// "too_many_pings"` and closes the connection: a watch is cut and every request on it fails.
/// So pings go out only while a stream (a watch) is open, and at twice etcd's minimum. A member
/// that vanishes under a unary request is found by the request timeout, not by pings.
pub const ETCD_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`ETCD_KEEPALIVE_INTERVAL`].
pub const ETCD_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's default `--grpc-keepalive-min-time`: the shortest ping interval it tolerates.
pub const ETCD_SERVER_MIN_PING_INTERVAL: Duration = Duration::from_secs(5);
const _: () =
    assert!(ETCD_KEEPALIVE_INTERVAL.as_millis() >= 2 * ETCD_SERVER_MIN_PING_INTERVAL.as_millis());

/// Connection options every Firma etcd client uses: short timeouts (a minority member never
/// answers a linearizable request), leader-required requests, and HTTP/2 pings within etcd's
/// keep-alive policy ([`ETCD_KEEPALIVE_INTERVAL`]).
pub fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_require_leader(true)
        .with_keep_alive(ETCD_KEEPALIVE_INTERVAL, ETCD_KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false)
}

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("--anchors {0:?}: expected etcd://HOST:PORT[,HOST:PORT…][/PREFIX/] on loopback")]
    Url(String),
    #[error("etcd {endpoints}: {cause}")]
    Etcd {
        endpoints: String,
        cause: etcd_client::Error,
    },
    #[error("etcd {0}: no answer within 5 s")]
    Timeout(String),
}

/// Parses `etcd://h:p[,h:p…][/prefix/]` into endpoints and the key prefix (default `/firma/`).
pub fn parse_etcd_url(url: &str) -> Result<(Vec<String>, String), AnchorError> {
    let bad = || AnchorError::Url(url.to_owned());
    let rest = url.strip_prefix("etcd://").ok_or_else(bad)?;
    let (hosts, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/firma/".to_owned()),
    };
    let prefix = if prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    };
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if endpoints.is_empty() || endpoints.iter().any(|e| check_endpoint(e).is_err()) {
        return Err(bad());
    }
    Ok((endpoints, prefix))
}

/// Every anchor under `prefix` (linearizable read).
pub async fn fetch_all(endpoints: &[String], prefix: &str) -> Result<Vec<Anchor>, AnchorError> {
    let joined = endpoints.join(",");
    let err = |cause| AnchorError::Etcd {
        endpoints: joined.clone(),
        cause,
    };
    // Member by member: a dead one refuses connections, the next one answers.
    let work = async {
        let mut last = None;
        for e in endpoints {
            let r = async {
                let mut c =
                    etcd_client::Client::connect([e.as_str()], Some(connect_options())).await?;
                c.get(
                    format!("{prefix}anchors/"),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
            }
            .await;
            match r {
                Ok(r) => {
                    return Ok(r
                        .kvs()
                        .iter()
                        .filter_map(|kv| serde_json::from_slice::<Anchor>(kv.value()).ok())
                        .collect());
                }
                Err(cause) => last = Some(err(cause)),
            }
        }
        Err(last.unwrap_or_else(|| AnchorError::Timeout(joined.clone())))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| AnchorError::Timeout(endpoints.join(",")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_sign_and_verify() {
        let k = SigningKey::generate(&mut rand::rngs::OsRng);
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let a = Anchor::new("c", 7, "ab", 1, &k);
        assert!(a.verify(&[k.verifying_key()]));
        assert!(!a.verify(&[other.verifying_key()]));
        let mut forged = a.clone();
        forged.seq = 3;
        assert!(!forged.verify(&[k.verifying_key()]));
    }

    #[test]
    fn etcd_urls() {
        let (e, p) = parse_etcd_url("etcd://127.0.0.1:2379,127.0.0.1:2380").unwrap();
        assert_eq!(e, ["http://127.0.0.1:2379", "http://127.0.0.1:2380"]);
        assert_eq!(p, "/firma/");
        assert_eq!(parse_etcd_url("etcd://[::1]:1/x").unwrap().1, "/x/");
        assert!(parse_etcd_url("etcd://10.0.0.1:2379").is_err());
        assert!(parse_etcd_url("http://127.0.0.1:2379").is_err());
        assert!(parse_etcd_url("etcd://127.0.0.1").is_err());
        let e = check_endpoints(Path::new("f"), "k", &[]).unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
    }
}
