//! The sidecar's strict HTTP/1 request-head reader (`interceptor::head::read_head`) and the
//! request-smuggling checks (`check_framing`) on arbitrary bytes from a client.
#![no_main]

use firma_fuzz::{Chunked, block_on, chunk_for};
use firma_sidecar::interceptor::head::{
    H2_PREFACE, Head, HeadError, MAX_HEAD, check_framing, read_head,
};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fn read(data: &[u8], chunk: usize) -> (Result<Head, HeadError>, Vec<u8>) {
    let mut buf = Vec::new();
    let r = block_on(read_head(
        &mut Chunked::new(data, chunk),
        &mut buf,
        Duration::from_secs(30),
    ));
    (r, buf)
}

/// The verdict without free-text details (which may say how far reading got).
fn verdict(r: &Result<Head, HeadError>) -> String {
    match r {
        Ok(h) => format!("ok {} {} {:?} {}", h.method, h.target, h.host_header, h.len),
        Err(HeadError::Closed) => "closed".into(),
        Err(HeadError::H2Preface) => "h2".into(),
        Err(HeadError::Malformed(_)) => "malformed".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (r, buf) = read(data, chunk_for(data));
    // Every byte read is kept, in order, for replay to hyper or a tunnel.
    assert_eq!(&data[..buf.len()], &buf[..]);
    match &r {
        Ok(h) => {
            assert!(
                h.len <= buf.len() && h.len <= MAX_HEAD,
                "head length {}",
                h.len
            );
            assert!(buf[..h.len].ends_with(b"\r\n\r\n"));
            assert!(
                !buf[..h.len - 1].windows(4).any(|w| w == b"\r\n\r\n"),
                "head must end at the first blank line"
            );
            assert!(!h.method.is_empty());
        }
        Err(HeadError::Closed) => assert!(data.is_empty()),
        Err(HeadError::H2Preface) => assert!(buf.starts_with(H2_PREFACE)),
        Err(HeadError::Malformed(detail)) => assert!(!detail.is_empty()),
    }
    // However the network split the bytes, the verdict is the same.
    let (whole, _) = read(data, data.len());
    assert_eq!(verdict(&r), verdict(&whole), "verdict depends on chunking");

    // check_framing on header lines taken from the input, whatever read_head thought.
    let mut map = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(i) = line.iter().position(|b| *b == b':') {
            let value = line[i + 1..].trim_ascii();
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(&line[..i]),
                http::HeaderValue::from_bytes(value),
            ) {
                map.append(n, v);
            }
        }
    }
    if check_framing(&map).is_ok() {
        let cl: Vec<_> = map.get_all(CONTENT_LENGTH).iter().collect();
        let te: Vec<_> = map.get_all(TRANSFER_ENCODING).iter().collect();
        assert!(cl.len() + te.len() <= 1, "ambiguous framing accepted");
        if let Some(v) = cl.first() {
            let s = v.to_str().unwrap();
            assert!(
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
                "{v:?}"
            );
        }
        if let Some(v) = te.first() {
            assert!(v.to_str().unwrap().trim().eq_ignore_ascii_case("chunked"));
        }
    }
});
