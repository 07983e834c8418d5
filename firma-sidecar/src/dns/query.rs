//! DNS wire format at the guard's edge: decoding what a workload sent (strictly: anything but one
//! plain question is refused before any decision) and encoding the guard's own answers. The
//! parsing itself is hickory-proto's; this module only decides what is acceptable.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

/// Largest query accepted (UDP or TCP). A real query is a header, one name (at most 255 bytes)
/// and an OPT record; anything bigger is carrying something else.
pub const MAX_QUERY_BYTES: usize = 1232;
/// EDNS payload size the guard advertises and asks upstreams for (the DNS flag day value).
pub const EDNS_PAYLOAD: u16 = 1232;
const HEADER: usize = 12;

/// One acceptable question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// As the client wrote it (case kept, so a 0x20-randomising client sees its own name back).
    pub name: Name,
    /// Lower-case, without the trailing dot: what the allow list is matched against.
    pub qname: String,
    pub qtype: RecordType,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The client's EDNS UDP payload size, when it sent an OPT record.
    pub edns_payload: Option<u16>,
}

/// What a received message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Query(Question),
    /// Answer with a header-only error (FORMERR, NOTIMP) carrying the client's id.
    Reject {
        id: u16,
        op_code: u8,
        rcode: ResponseCode,
        why: String,
    },
    /// Not answered at all: too short to have an id, or a response (answering responses is how
    /// reflection loops start).
    Drop {
        why: String,
    },
}

/// Decodes one query message. Never panics, whatever `bytes` holds.
pub fn decode(bytes: &[u8]) -> Decoded {
    if bytes.len() < HEADER {
        return Decoded::Drop {
            why: format!(
                "{} bytes: shorter than a DNS header (12 bytes)",
                bytes.len()
            ),
        };
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let op_code = (bytes[2] >> 3) & 0x0f;
    if bytes[2] & 0x80 != 0 {
        return Decoded::Drop {
            why: "a response (QR set), not a query".into(),
        };
    }
    let reject = |rcode, why: String| Decoded::Reject {
        id,
        op_code,
        rcode,
        why,
    };
    if bytes.len() > MAX_QUERY_BYTES {
        return reject(
            ResponseCode::FormErr,
            format!(
                "{} bytes: larger than any plain query ({MAX_QUERY_BYTES} bytes at most)",
                bytes.len()
            ),
        );
    }
    if op_code != u8::from(OpCode::Query) {
        return reject(
            ResponseCode::NotImp,
            format!("opcode {op_code}: only QUERY is answered"),
        );
    }
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => return reject(ResponseCode::FormErr, format!("undecodable: {e}")),
    };
    if msg.metadata.message_type != MessageType::Query {
        return Decoded::Drop {
            why: "a response (QR set), not a query".into(),
        };
    }
    if msg.queries.len() != 1 {
        return reject(
            ResponseCode::FormErr,
            format!("{} questions: exactly one is answered", msg.queries.len()),
        );
    }
    if !msg.answers.is_empty() || !msg.authorities.is_empty() || !msg.additionals.is_empty() {
        return reject(
            ResponseCode::FormErr,
            "records in the answer, authority or additional section of a query (only an OPT record is accepted)".into(),
        );
    }
    if msg.signature.is_some() {
        return reject(
            ResponseCode::FormErr,
            "signed (TSIG/SIG(0)) query: not accepted".into(),
        );
    }
    let edns_payload = match &msg.edns {
        Some(e) if e.version() != 0 => {
            return reject(
                ResponseCode::FormErr,
                format!("EDNS version {}: only version 0 is supported", e.version()),
            );
        }
        Some(e) => Some(e.max_payload().max(512)),
        None => None,
    };
    let q = &msg.queries[0];
    if q.query_class() != DNSClass::IN {
        return reject(
            ResponseCode::NotImp,
            format!("class {}: only IN is answered", q.query_class()),
        );
    }
    // Only host-name bytes: a label holding a dot, a space or binary (legal on the wire) would
    // make the printed name ambiguous in the allow-list match and in the audit.
    let host_byte = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    if !q.name().iter().all(|label| label.iter().all(host_byte)) {
        return reject(
            ResponseCode::FormErr,
            "a label with a byte other than a letter, digit, '-' or '_': not a host name".into(),
        );
    }
    let mut qname = q.name().to_ascii().to_ascii_lowercase();
    if qname.ends_with('.') {
        qname.pop();
    }
    Decoded::Query(Question {
        id,
        name: q.name().clone(),
        qname,
        qtype: q.query_type(),
        recursion_desired: msg.metadata.recursion_desired,
        checking_disabled: msg.metadata.checking_disabled,
        edns_payload,
    })
}

/// The guard's own answer to `q` (NXDOMAIN, REFUSED, SERVFAIL): the question echoed, no records,
/// an OPT record when the client sent one.
pub fn reply(q: &Question, rcode: ResponseCode) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_query(Query::query(q.name.clone(), q.qtype));
    if q.edns_payload.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
    }
    m.to_vec().unwrap_or_else(|_| header_only(q.id, 0, rcode))
}

/// A header-only answer (no question: the query may not have had a decodable one).
pub fn header_only(id: u16, op_code: u8, rcode: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[..2].copy_from_slice(&id.to_be_bytes());
    out[2] = 0x80 | ((op_code & 0x0f) << 3);
    out[3] = 0x80 | (rcode.low() & 0x0f);
    out
}

/// The query the guard sends upstream for `q`: a fresh id, recursion desired, the client's name
/// and type, and EDNS only if the client used it (payload capped, no options: nothing the
/// workload put in its OPT record leaves).
pub fn upstream_query(q: &Question, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = q.checking_disabled;
    m.add_query(Query::query(q.name.clone(), q.qtype));
    if let Some(p) = q.edns_payload {
        let mut e = Edns::new();
        e.set_max_payload(p.min(EDNS_PAYLOAD));
        m.set_edns(e);
    }
    m.to_vec().unwrap_or_default()
}

/// What an upstream answer says, for the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: usize,
    pub truncated: bool,
    /// CNAME targets in the answer section, in order.
    pub cname_chain: Vec<String>,
    /// The A and AAAA addresses in the answer section: where the workload may now connect for
    /// this name (the destination binding learns them).
    pub addresses: Vec<std::net::IpAddr>,
}

/// Checks that `bytes` answers the query with id `id` for `q` (same question, a response) and
/// summarises it; `None` for anything else (a stray or spoofed datagram).
pub fn check_answer(bytes: &[u8], id: u16, q: &Question) -> Option<Answer> {
    let m = Message::from_vec(bytes).ok()?;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response {
        return None;
    }
    let asked = m.queries.first()?;
    if m.queries.len() != 1
        || asked.query_type() != q.qtype
        || !asked.name().eq_ignore_root(&q.name)
    {
        return None;
    }
    let cname_chain = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::CNAME(c) => {
                let mut n = c.0.to_ascii().to_ascii_lowercase();
                if n.ends_with('.') {
                    n.pop();
                }
                Some(n)
            }
            _ => None,
        })
        .collect();
    let addresses = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
            hickory_proto::rr::RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Some(Answer {
        rcode: m.metadata.response_code,
        answers: m.answers.len(),
        truncated: m.metadata.truncation,
        cname_chain,
        addresses,
    })
}

/// `bytes` with its id replaced by `id` (the upstream answer goes back under the client's id).
pub fn with_id(mut bytes: Vec<u8>, id: u16) -> Vec<u8> {
    if bytes.len() >= 2 {
        bytes[..2].copy_from_slice(&id.to_be_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_that_is_not_a_host_name_is_refused() {
        // Found by the dns_query fuzz target: a label holding a literal '.' and binary bytes.
        let bytes = include_bytes!("../../../fuzz/corpus/dns_query/escaped-dot-label");
        assert!(
            matches!(decode(bytes), Decoded::Reject { .. } | Decoded::Drop { .. }),
            "accepted {bytes:?}"
        );
        let ok = query("under_score.api.openai.com", RecordType::A);
        assert!(matches!(decode(&ok), Decoded::Query(_)));
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn plain_query_decodes_lowercased() {
        let Decoded::Query(q) = decode(&query("Api.OpenAI.com.", RecordType::A)) else {
            panic!("not a query");
        };
        assert_eq!(q.qname, "api.openai.com");
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, RecordType::A);
        assert_eq!(q.edns_payload, None);
    }

    #[test]
    fn hostile_inputs_are_rejected_or_dropped() {
        assert!(matches!(decode(&[1, 2, 3]), Decoded::Drop { .. }));
        // A compression pointer pointing at itself (offset 12) as the question name.
        let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            decode(&looped),
            Decoded::Reject {
                rcode: ResponseCode::FormErr,
                ..
            }
        ));
        // Two questions.
        let mut two = query("a.example", RecordType::A);
        two[5] = 2;
        assert!(matches!(decode(&two), Decoded::Reject { .. }));
        // Oversized.
        let mut big = query("a.example", RecordType::A);
        big.resize(MAX_QUERY_BYTES + 1, 0);
        assert!(matches!(
            decode(&big),
            Decoded::Reject {
                rcode: ResponseCode::FormErr,
                ..
            }
        ));
        // A response.
        let mut resp = query("a.example", RecordType::A);
        resp[2] |= 0x80;
        assert!(matches!(decode(&resp), Decoded::Drop { .. }));
        // Opcode UPDATE.
        let mut upd = query("a.example", RecordType::A);
        upd[2] = (5 << 3) | 1;
        assert!(matches!(
            decode(&upd),
            Decoded::Reject {
                rcode: ResponseCode::NotImp,
                ..
            }
        ));
    }

    #[test]
    fn replies_echo_id_and_question() {
        let Decoded::Query(q) = decode(&query("x.paste.rs", RecordType::AAAA)) else {
            panic!();
        };
        let r = Message::from_vec(&reply(&q, ResponseCode::NXDomain)).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.queries[0].query_type(), RecordType::AAAA);
        let h = header_only(7, 0, ResponseCode::FormErr);
        let r = Message::from_vec(&h).unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (7, ResponseCode::FormErr)
        );
    }
}
