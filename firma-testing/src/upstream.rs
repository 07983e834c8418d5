//! The local HTTPS upstream (HTTP/1.1 + HTTP/2) with its own CA, recording every request.
//! It also plays an LLM provider on the shipped API paths ([`llm`]): JSON and SSE answers
//! carrying token usage.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercase names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// SNI the client sent.
    pub sni: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Which accepted connection (0, 1, …) carried it.
    pub conn: usize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the upstream's certificate (give to `extra_root_certs`).
    pub ca_path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Every raw byte the upstream received, decrypted (for canary checks).
    pub raw: Arc<Mutex<Vec<u8>>>,
    /// TLS connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Tokens (input + output) of every LLM answer served so far (see [`llm`]).
    pub served_tokens: Arc<std::sync::atomic::AtomicI64>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Serves HTTPS on 127.0.0.1 for `names` (certificate SANs). `GET /slow?ms=N` answers after
    /// N ms; everything else answers 200 `{"ok":true,"path":…}` (with `"data":[]` on
    /// `/v1/models`, the providers' list shape).
    pub fn start(dir: &Path, names: &[&str]) -> Self {
        Self::start_at(dir, names, "127.0.0.1:0".parse().unwrap())
    }

    /// As [`Upstream::start`], listening on `bind` (transparent-mode tests put it at an
    /// address inside their network namespace, which is what the client connects to).
    pub fn start_at(dir: &Path, names: &[&str], bind: SocketAddr) -> Self {
        Self::start_with_alpn(dir, names, bind, &[b"h2", b"http/1.1"])
    }

    /// As [`Upstream::start_at`], offering only `alpn` (e.g. `http/1.1` alone: an upstream
    /// without HTTP/2).
    pub fn start_with_alpn(dir: &Path, names: &[&str], bind: SocketAddr, alpn: &[&[u8]]) -> Self {
        let (tls, ca_path) = crate::pki::upstream_tls(dir, "firma test upstream CA", names, alpn);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let served_tokens = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (seen2, raw2, conns2) = (seen.clone(), raw.clone(), connections.clone());
        let served2 = served_tokens.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, raw) = (acceptor.clone(), seen2.clone(), raw2.clone());
                let conns = conns2.clone();
                let served = served2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, raw, sni) = (seen.clone(), raw.clone(), sni.clone());
                        let served = served.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut headers = BTreeMap::new();
                            for (k, v) in parts.headers.iter() {
                                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                                headers
                                    .entry(k.as_str().to_string())
                                    .and_modify(|e: &mut String| {
                                        e.push_str(", ");
                                        e.push_str(&v)
                                    })
                                    .or_insert(v);
                            }
                            // HTTP/2 names the host in :authority (RFC 9113 8.3.1), which is
                            // what Host is for HTTP/1.1: show it under the same name.
                            if let Some(a) = parts.uri.authority() {
                                headers
                                    .entry("host".to_string())
                                    .or_insert_with(|| a.as_str().to_string());
                            }
                            {
                                let mut r = raw.lock().unwrap();
                                // The request target in origin form, whatever the version.
                                let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                                r.extend_from_slice(
                                    format!("{} {target}\r\n", parts.method).as_bytes(),
                                );
                                for (k, v) in parts.headers.iter() {
                                    r.extend_from_slice(k.as_str().as_bytes());
                                    r.extend_from_slice(b": ");
                                    r.extend_from_slice(v.as_bytes());
                                    r.extend_from_slice(b"\r\n");
                                }
                                r.extend_from_slice(&body);
                            }
                            let path = parts.uri.path().to_string();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: path.clone(),
                                headers,
                                body: body.to_vec(),
                                sni,
                                version: format!("{:?}", parts.version),
                                conn,
                            });
                            if path == "/slow" {
                                let ms = parts
                                    .uri
                                    .query()
                                    .and_then(|q| q.strip_prefix("ms="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(2000);
                                // A slow upstream on request (`/slow?ms=`): the latency is the fixture.
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            if let Some((resp, tokens)) = llm::answer(&path, &parts.headers, &body)
                            {
                                served.fetch_add(tokens, std::sync::atomic::Ordering::SeqCst);
                                if let Some(ms) = parts
                                    .headers
                                    .get("x-test-delay-ms")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse().ok())
                                {
                                    // Latency on request (`x-test-delay-ms`): the fixture.
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            let mut out = serde_json::json!({"ok": true, "path": path});
                            if path == "/v1/models" {
                                // The providers' list shape, so SDK list calls parse it.
                                out["object"] = "list".into();
                                out["data"] = serde_json::json!([]);
                            }
                            let out = out.to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                Full::new(Bytes::from(out))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_path,
            seen,
            raw,
            connections,
            served_tokens,
            _rt: rt,
        }
    }

    /// Tokens (input + output) the LLM answers served so far.
    pub fn served_tokens(&self) -> i64 {
        self.served_tokens.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// TLS connections the upstream has accepted.
    pub fn connection_count(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn raw_contains(&self, needle: &str) -> bool {
        let raw = self.raw.lock().unwrap();
        raw.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

/// OpenAI- and Anthropic-shaped answers with usage, for the LLM policy tests.
///
/// `POST /v1/chat/completions`, `/v1/responses` (OpenAI) and `/v1/messages` (Anthropic): the
/// output token count is the request's `max_tokens` (or `max_completion_tokens` /
/// `max_output_tokens`, the largest when several are sent), 50 when absent; input tokens are
/// 100. With `"stream": true` the answer is SSE: a first event at once, then, after
/// `x-test-sse-gap-ms` (default 0) ms, the rest with the usage in the final events, as the
/// providers send it (OpenAI only with `stream_options.include_usage`; Anthropic's full event
/// sequence, which its SDK's stream helpers need). A hostile or broken provider:
/// `x-test-output-tokens: N` reports N output tokens (negative too) whatever was served;
/// `x-test-delay-ms` holds the answer that long. Everything else is not an LLM call (`None`).
/// The second value is the tokens served (input + output generated).
pub mod llm {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, combinators::BoxBody};
    use std::convert::Infallible;
    use std::time::Duration;

    pub type Body = BoxBody<Bytes, Infallible>;

    pub const INPUT_TOKENS: i64 = 100;

    pub fn answer(
        path: &str,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Option<(hyper::Response<Body>, i64)> {
        let anthropic = path == "/v1/messages";
        if !(anthropic || path == "/v1/chat/completions" || path == "/v1/responses") {
            return None;
        }
        let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let output = [
            "/max_tokens",
            "/max_completion_tokens",
            "/max_output_tokens",
        ]
        .iter()
        .filter_map(|p| req.pointer(p).and_then(|v| v.as_i64()))
        .max()
        .unwrap_or(50);
        let served = INPUT_TOKENS + output;
        let output = headers
            .get("x-test-output-tokens")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(output);
        let model = req["model"].as_str().unwrap_or("unknown").to_string();
        let stream = req["stream"].as_bool().unwrap_or(false);
        let gap = headers
            .get("x-test-sse-gap-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64);
        let mut resp = if !stream {
            let v = if anthropic {
                serde_json::json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": output}})
            } else if path == "/v1/responses" {
                serde_json::json!({"id": "resp_1", "object": "response", "model": model,
                    "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": output, "total_tokens": INPUT_TOKENS + output}})
            } else {
                serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": output, "total_tokens": INPUT_TOKENS + output}})
            };
            let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        } else {
            let include_usage = anthropic
                || req
                    .pointer("/stream_options/include_usage")
                    .and_then(|v| v.as_bool())
                    == Some(true);
            let (first, rest) = sse_events(anthropic, &model, output, include_usage);
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from(first)).await;
                if gap > 0 {
                    // The gap between SSE events the test asked for: the fixture.
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                }
                for e in rest {
                    if tx.send_data(Bytes::from(e)).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = hyper::Response::new(body.boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        };
        resp.headers_mut().insert(
            "x-test-model",
            model.parse().unwrap_or(http::HeaderValue::from_static("x")),
        );
        Some((resp, served))
    }

    /// The first SSE event, then the rest (usage in the last ones, split across writes the
    /// way a real server's chunks fall).
    fn sse_events(
        anthropic: bool,
        model: &str,
        output: i64,
        include_usage: bool,
    ) -> (String, Vec<String>) {
        if anthropic {
            let start = format!(
                "event: message_start\ndata: {}\n\n",
                serde_json::json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": null, "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}})
            );
            let delta = format!(
                "event: content_block_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\nevent: content_block_stop\ndata: {}\n\n",
                serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
                serde_json::json!({"type": "content_block_stop", "index": 0})
            );
            let end = format!(
                "event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
                serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output}})
            );
            let (a, b) = end.split_at(end.len() / 2);
            return (start, vec![delta, a.to_string(), b.to_string()]);
        }
        let chunk = |content: &str| {
            format!(
                "data: {}\n\n",
                serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"content": content}}]})
            )
        };
        let mut rest = vec![chunk(" there")];
        if include_usage {
            let usage = format!(
                "data: {}\n\n",
                serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": output, "total_tokens": INPUT_TOKENS + output}})
            );
            let (a, b) = usage.split_at(usage.len() / 3);
            rest.push(a.to_string());
            rest.push(b.to_string());
        }
        rest.push("data: [DONE]\n\n".to_string());
        (chunk("hi"), rest)
    }
}
