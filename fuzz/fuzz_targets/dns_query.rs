//! The DNS guard's query decoder (`dns::query::decode`): arbitrary bytes as a UDP datagram or a
//! TCP message. It must never panic; an accepted question is one IN question with a normalised
//! name; every reply the guard would send decodes as a response carrying the client's id.
#![no_main]

use firma_sidecar::dns::query::{Decoded, MAX_QUERY_BYTES, decode, header_only, reply};
use hickory_proto::op::{Message, ResponseCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Decoded::Query(q) => {
            assert!(data.len() <= MAX_QUERY_BYTES);
            assert_eq!(q.qname, q.qname.to_ascii_lowercase());
            assert!(!q.qname.ends_with('.') || q.qname == ".", "{:?}", q.qname);
            for rcode in [ResponseCode::NXDomain, ResponseCode::Refused] {
                let r = Message::from_vec(&reply(&q, rcode)).expect("own reply decodes");
                assert_eq!(r.metadata.id, q.id);
                assert_eq!(r.metadata.response_code, rcode);
            }
        }
        Decoded::Reject {
            id, op_code, rcode, ..
        } => {
            let h = header_only(id, op_code, rcode);
            assert_eq!(&h[..2], &id.to_be_bytes());
            assert!(h[2] & 0x80 != 0, "not a response");
        }
        Decoded::Drop { .. } => {}
    }
});
