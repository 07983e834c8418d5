//! Request mapping (`pipeline::mapping`): arbitrary method / host / path (NUL-separated)
//! classified against the shipped `policies/mapping-rules.toml`, the host first normalised as
//! the interceptor does (`normalize_host`).
#![no_main]

use firma_fuzz::fields;
use firma_sidecar::interceptor::http::normalize_host;
use firma_sidecar::pipeline::mapping::MappingRules;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::LazyLock;

static RULES: LazyLock<MappingRules> = LazyLock::new(|| {
    let file = Path::new("policies/mapping-rules.toml");
    let text = include_str!("../../policies/mapping-rules.toml");
    let rules = MappingRules::parse_file(text, file).expect("shipped rules parse");
    MappingRules::from_rules(rules, vec![file.into()]).expect("shipped rules index")
});

fuzz_target!(|data: &[u8]| {
    let [method, host, path] = fields::<3>(data);
    let rules = &*RULES;
    if let Some(h) = normalize_host(&host) {
        // The interceptor only ever passes normalised hosts: lowercase, no port, no dot at the end.
        assert_eq!(h, h.to_ascii_lowercase());
        assert!(
            !h.is_empty() && h.len() <= 253 && !h.ends_with('.'),
            "{h:?}"
        );
        // Idempotent, so a host normalised once is never refused later (an IPv6 literal comes
        // back without brackets, as `Ipv6Addr` prints it, and needs them to be read again).
        let again = if h.contains(':') {
            format!("[{h}]")
        } else {
            h.clone()
        };
        assert_eq!(
            normalize_host(&again).as_deref(),
            Some(h.as_str()),
            "not idempotent"
        );
        let got = rules.classify(&method, &h, &path);
        // Methods match case-insensitively.
        assert_eq!(got, rules.classify(&method.to_ascii_uppercase(), &h, &path));
        if let Some(m) = &got {
            assert!(!m.action_class.is_empty());
        }
        let _ = rules.classify_destination(&h);
    }
    // Raw, unnormalised input must not panic either (the rules do not trust their caller).
    let _ = rules.classify(&method, &host, &path);
    let _ = rules.classify_destination(&host);
    // And the rules parser on arbitrary text.
    if let Ok(text) = std::str::from_utf8(data) {
        let file = Path::new("fuzz.toml");
        if let Ok(parsed) = MappingRules::parse_file(text, file)
            && let Ok(r) = MappingRules::from_rules(parsed, vec![file.into()])
        {
            let _ = r.classify(&method, &host, &path);
        }
    }
});
