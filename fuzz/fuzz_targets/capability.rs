//! Capability tokens and seed files (`firma_common::capability`):
//! * arbitrary text as a PASETO token and as a seed TOML, verified with a fixed key;
//! * claims built from the input (NUL-separated fields), signed, then verified directly and
//!   through the seed TOML the Authority writes and the sidecar reads: anything the Authority
//!   can sign must verify to the same claims;
//! * resource-scope matching.
#![no_main]

use firma_common::capability::{CapabilityClaims, CapabilitySeed, scope_matches};
use firma_common::keys::{SigningKey, VerifyingKey};
use firma_fuzz::fields;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static KEY: LazyLock<(SigningKey, VerifyingKey)> = LazyLock::new(|| {
    let sk = SigningKey::from_bytes(&[0x42; 32]);
    let vk = sk.verifying_key();
    (sk, vk)
});

/// An i64 from the field's text, or from its bytes when it is not a number.
fn int(s: &str) -> i64 {
    s.trim().parse().unwrap_or_else(|_| {
        let mut b = [0u8; 8];
        for (d, x) in b.iter_mut().zip(s.bytes()) {
            *d = x;
        }
        i64::from_le_bytes(b)
    })
}

fuzz_target!(|data: &[u8]| {
    let (sk, vk) = &*KEY;
    let text = String::from_utf8_lossy(data);

    // Untrusted token and seed text.
    let _ = CapabilityClaims::verify(&text, vk);
    if let Ok(seed) = toml::from_str::<CapabilitySeed>(&text) {
        let _ = seed.verify(vk);
    }

    // Sign / verify round trip.
    let [token_id, agent, session, actions, scope, iat, exp, hash] = fields::<8>(data);
    let claims = CapabilityClaims {
        token_id,
        agent_id: agent,
        session_id: session,
        action_set: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        resource_scope: scope.clone(),
        iat: int(&iat),
        exp: int(&exp),
        context_hash: hash,
    };
    if let Ok(token) = claims.sign(sk) {
        let back = CapabilityClaims::verify(&token, vk).expect("a signed token verifies");
        assert_eq!(back, claims);
        let seed = CapabilitySeed::new(token, &claims);
        let written = toml::to_string(&seed).expect("seed serialises");
        let read: CapabilitySeed = toml::from_str(&written).expect("seed parses back");
        assert_eq!(read.verify(vk).expect("seed verifies"), claims);
        // A hand-edited mirror is caught.
        let mut edited = read.clone();
        edited.resource_scope.push('x');
        assert!(edited.verify(vk).is_err(), "edited mirror accepted");
    }

    // Scope rule: `*` matches all, `S*` is a prefix, `S` matches `S` and `S/…`.
    let resource = claims.agent_id.as_str();
    let m = scope_matches(&scope, resource);
    if scope == "*" {
        assert!(m);
    } else if let Some(prefix) = scope.strip_suffix('*') {
        assert_eq!(m, resource.starts_with(prefix));
    } else if m {
        assert!(resource == scope || resource.starts_with(&format!("{scope}/")));
    }
});
