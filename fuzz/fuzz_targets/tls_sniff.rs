//! The sidecar's first-bytes classifier (`tls::sniff::sniff`): TLS ClientHello (and its SNI),
//! HTTP/1, or unknown, on arbitrary bytes from a client.
#![no_main]

use firma_fuzz::{Chunked, block_on, chunk_for};
use firma_sidecar::tls::sniff::{Sniffed, sniff};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fn run(data: &[u8], chunk: usize) -> (Sniffed, Vec<u8>) {
    let mut buf = Vec::new();
    let v = block_on(sniff(
        &mut Chunked::new(data, chunk),
        &mut buf,
        Duration::from_secs(30),
    ));
    (v, buf)
}

/// The verdict without free-text details.
fn verdict(v: &Sniffed) -> String {
    match v {
        Sniffed::Unknown { .. } => "unknown".into(),
        other => format!("{other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (v, buf) = run(data, chunk_for(data));
    assert_eq!(&data[..buf.len()], &buf[..], "bytes kept for replay");
    match &v {
        Sniffed::Closed => assert!(data.is_empty()),
        Sniffed::Http => assert!(buf[0].is_ascii_uppercase()),
        Sniffed::Tls { sni } => {
            assert_eq!(buf[0], 0x16);
            if let Some(s) = sni {
                assert!(!s.is_empty());
                assert_eq!(s, &s.to_ascii_lowercase());
            }
        }
        Sniffed::Unknown { detail } => assert!(!detail.is_empty()),
    }
    // However the network split the bytes, the verdict is the same.
    let (whole, _) = run(data, data.len());
    assert_eq!(verdict(&v), verdict(&whole), "verdict depends on chunking");
});
