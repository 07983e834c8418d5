//! MCP classification (`pipeline::mcp`): arbitrary bytes as a JSON-RPC POST body through the
//! strict parser and the classifier, with the shipped example's declared arguments.
#![no_main]

use firma_sidecar::pipeline::mcp::{ACTION_CLASSES, McpSpec, classify_body, parse_spec};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static SPEC: LazyLock<McpSpec> = LazyLock::new(|| {
    parse_spec(
        toml::from_str(r#"arguments = { path = "String", name = "String", limit = "Long" }"#)
            .expect("spec TOML"),
    )
    .expect("spec")
});

fuzz_target!(|data: &[u8]| {
    let Ok((messages, batch)) = classify_body(data, &SPEC) else {
        return;
    };
    assert!(!messages.is_empty());
    assert!(batch || messages.len() == 1);
    for m in &messages {
        assert!(ACTION_CLASSES.contains(&m.action_class), "{}", m.action_class);
        // A named call's name is in the strict set, so the resource id has no surprises.
        if let Some(n) = &m.name {
            assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()), "{n:?}");
        }
        // Only requests (with an id) are tools/call: a disguised notification never is.
        if m.action_class == "mcp.tools.call" {
            assert!(m.id.is_some());
            assert_eq!(m.method, "tools/call");
        }
        if m.action_class == "mcp.notification" {
            assert!(m.id.is_none());
        }
        let _ = m.resource("mcp.example.com", "/mcp");
        let _ = m.audit(false);
    }
});
