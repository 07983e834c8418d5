use super::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn shipped(sub: &str) -> CompiledPolicies {
    let dir = policies_dir().join(sub);
    PolicyBundle::load_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .compile()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn bundle(files: &[(&str, &str)]) -> PolicyBundle {
    PolicyBundle::new(
        files
            .iter()
            .map(|(n, c)| PolicyFile {
                name: n.to_string(),
                content: c.to_string(),
            })
            .collect(),
        SHIPPED_SCHEMA.to_string(),
    )
}

pub(super) fn runtime<'a>(
    agent: &'a str,
    action: &'a str,
    host: &'a str,
    count: i64,
) -> EvalRequest<'a> {
    EvalRequest {
        agent_id: agent,
        action,
        resource_id: host,
        host: Some(host),
        path: Some("/v1/chat/completions"),
        action_count: count,
        session_id: "s-1",
        method: "POST",
        request: None,
        usage: None,
        mcp: None,
    }
}

fn issuance<'a>(agent: &'a str, action: &'a str) -> EvalRequest<'a> {
    EvalRequest {
        agent_id: agent,
        action,
        resource_id: "*",
        host: None,
        path: None,
        action_count: 0,
        session_id: "s-1",
        method: "ISSUE",
        request: None,
        usage: None,
        mcp: None,
    }
}

/// Every shipped example validates strictly against the shipped schema (the schema file in
/// `policies/` is the one embedded as `SHIPPED_SCHEMA`).
#[test]
fn every_shipped_example_validates() {
    let root = policies_dir();
    let schema = std::fs::read_to_string(root.join("firma.cedarschema")).unwrap();
    assert_eq!(schema, SHIPPED_SCHEMA);
    let mut seen = 0;
    for kind in ["issuance", "runtime"] {
        for entry in std::fs::read_dir(root.join(kind)).unwrap() {
            let dir = entry.unwrap().path();
            let b = PolicyBundle::load_dir(&dir).unwrap();
            assert!(b.file_count() >= 1, "{}", dir.display());
            b.compile()
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            seen += 1;
        }
    }
    assert!(seen >= 5, "expected the shipped examples, found {seen}");
}

#[test]
fn schema_declares_the_seed_action_classes() {
    let c = shipped("runtime/genai-app");
    for class in [
        "model.inference.chat",
        "communication.external.send",
        "payment.transfer",
        "model.inference.embed",
        "data.read",
        "data.write",
        "communication.internal.send",
        "code.execute",
    ] {
        assert!(c.is_action_class(class), "{class}");
    }
    assert!(!c.is_action_class("payment.steal"));
}

#[test]
fn genai_app_runtime_decisions_name_policies() {
    let c = shipped("runtime/genai-app");
    let r = c.evaluate(&runtime(
        "tenant-acme",
        "model.inference.chat",
        "api.openai.com",
        0,
    ));
    assert!(r.allowed, "{r:?}");
    assert_eq!(r.determining_policies, vec!["genai-app:0"]);

    let r = c.evaluate(&runtime(
        "tenant-acme",
        "communication.external.send",
        "api.acme-vendor.com",
        100,
    ));
    assert!(r.allowed, "{r:?}");
    let r = c.evaluate(&runtime(
        "tenant-acme",
        "communication.external.send",
        "api.acme-vendor.com",
        101,
    ));
    assert!(!r.allowed);
    assert!(r.determining_policies.is_empty(), "{r:?}");

    let r = c.evaluate(&runtime(
        "tenant-acme",
        "communication.external.send",
        "paste.rs",
        0,
    ));
    assert!(!r.allowed);
    assert_eq!(r.determining_policies, vec!["genai-app:2"]);

    // Chat to anywhere else: default deny.
    let r = c.evaluate(&runtime(
        "tenant-acme",
        "model.inference.chat",
        "evil.example",
        0,
    ));
    assert!(!r.allowed && r.determining_policies.is_empty());
}

#[test]
fn annotated_ids_win_and_context_is_used() {
    let c = shipped("runtime/first-policy");
    let mut req = runtime("a", "model.inference.chat", "api.openai.com", 3);
    let r = c.evaluate(&req);
    assert_eq!(r.determining_policies, vec!["allow-openai-chat"], "{r:?}");
    assert!(r.allowed);
    req.method = "GET";
    assert!(!c.evaluate(&req).allowed);
    req.method = "POST";
    req.action_count = 1000;
    let r = c.evaluate(&req);
    assert!(!r.allowed);
    assert_eq!(r.determining_policies, vec!["cap-chat-calls-per-session"]);
}

#[test]
fn production_issuance_policy() {
    let c = shipped("issuance/production");
    let r = c.evaluate(&issuance("support-agent", "model.inference.chat"));
    assert!(r.allowed, "{r:?}");
    let r = c.evaluate(&issuance("support-agent", "payment.transfer"));
    assert!(!r.allowed);
    assert_eq!(r.determining_policies, vec!["issuance:1"]);
    let r = c.evaluate(&issuance("billing-agent", "payment.transfer"));
    assert!(r.allowed);
    let r = c.evaluate(&issuance("stranger", "model.inference.chat"));
    assert!(!r.allowed && r.determining_policies.is_empty());
}

#[test]
fn unknown_action_is_denied_with_error() {
    let c = shipped("issuance/dev");
    let r = c.evaluate(&issuance("a", "payment.steal"));
    assert!(!r.allowed);
    assert!(r.errors[0].contains("unknown action class"), "{r:?}");
}

#[test]
fn parse_error_names_file_and_line() {
    let b = bundle(&[
        ("a.cedar", "permit (principal, action, resource);\n"),
        (
            "b.cedar",
            "// ok\npermit (principal, action, resource)\nforbid (",
        ),
    ]);
    let e = b.compile().unwrap_err();
    let d = &e.diagnostics()[0];
    assert_eq!(d.file, "b.cedar");
    assert!(matches!(d.line, Some(2 | 3)), "{d}");
    assert!(e.to_string().starts_with("b.cedar:"), "{e}");
}

#[test]
fn validation_error_names_file_line_and_policy() {
    let b = bundle(&[(
        "bad.cedar",
        "permit (principal, action, resource);\n\npermit (principal, action == Firma::Action::\"model.inference.chat\", resource)\nwhen { resource.colour == \"red\" };\n",
    )]);
    let e = b.compile().unwrap_err();
    let d = &e.diagnostics()[0];
    assert_eq!(d.file, "bad.cedar");
    assert_eq!(d.line, Some(4), "{d}");
    assert!(d.message.contains("bad:1"), "{d}");

    let e = bundle(&[(
        "x.cedar",
        "permit (principal, action == Firma::Action::\"payment.steal\", resource);",
    )])
    .compile()
    .unwrap_err();
    assert!(e.to_string().contains("payment.steal"), "{e}");
}

#[test]
fn duplicate_annotated_id_is_rejected() {
    let p = "@id(\"same\")\npermit (principal, action, resource);\n";
    let e = bundle(&[("a.cedar", p), ("b.cedar", p)])
        .compile()
        .unwrap_err();
    assert!(e.to_string().contains("already used in a.cedar"), "{e}");
}

#[test]
fn templates_are_rejected() {
    let e = bundle(&[(
        "t.cedar",
        "permit (principal == ?principal, action, resource);",
    )])
    .compile()
    .unwrap_err();
    assert!(e.to_string().contains("templates"), "{e}");
}

#[test]
fn version_is_a_content_hash_and_proto_roundtrips() {
    let a = bundle(&[("a.cedar", "permit (principal, action, resource);")]);
    let same = bundle(&[("a.cedar", "permit (principal, action, resource);")]);
    assert_eq!(a.version, same.version);
    assert_eq!(a.version.len(), 64);
    let renamed = bundle(&[("b.cedar", "permit (principal, action, resource);")]);
    assert_ne!(a.version, renamed.version);
    // Moving bytes between name and content must change the hash.
    let x = bundle(&[("ab", "c")]);
    let y = bundle(&[("a", "bc")]);
    assert_ne!(x.version, y.version);

    let wire = a.to_proto(42);
    assert_eq!(wire.sent_at, 42);
    assert_eq!(PolicyBundle::from_proto(wire.clone()).unwrap(), a);
    let mut tampered = wire;
    tampered.policies[0].content = "forbid (principal, action, resource);".into();
    assert!(matches!(
        PolicyBundle::from_proto(tampered),
        Err(PolicyError::VersionMismatch { .. })
    ));
}

#[test]
fn load_dir_reads_cedar_files_in_order_and_local_schema() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.cedar"),
        "forbid (principal, action, resource);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    std::fs::write(dir.path().join(".hidden.cedar"), "garbage").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "garbage").unwrap();
    let b = PolicyBundle::load_dir(dir.path()).unwrap();
    let names: Vec<_> = b.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a.cedar", "b.cedar"]);
    assert_eq!(b.schema, SHIPPED_SCHEMA);
    let c = b.compile().unwrap();
    assert_eq!(c.policy_ids(), ["a:0", "b:0"]);

    let custom = "namespace Firma { entity Agent; entity Resource; \
        action \"x.y\" appliesTo { principal: [Agent], resource: [Resource], \
        context: { action_count: Long, session_id: String, method: String } }; }";
    std::fs::write(dir.path().join("custom.cedarschema"), custom).unwrap();
    let c = PolicyBundle::load_dir(dir.path())
        .unwrap()
        .compile()
        .unwrap();
    assert_eq!(c.action_classes().iter().collect::<Vec<_>>(), ["x.y"]);

    std::fs::write(dir.path().join("other.cedarschema"), custom).unwrap();
    assert!(matches!(
        PolicyBundle::load_dir(dir.path()),
        Err(PolicyError::MultipleSchemas { .. })
    ));
    assert!(matches!(
        PolicyBundle::load_dir(&dir.path().join("missing")),
        Err(PolicyError::NotADirectory { .. })
    ));
}

#[test]
fn broken_schema_is_reported() {
    let mut b = bundle(&[]);
    b.schema = "namespace Firma { entity Agent;\n entity }".into();
    let e = b.compile().unwrap_err();
    assert_eq!(e.diagnostics()[0].file, "schema");
    assert_eq!(e.diagnostics()[0].line, Some(2), "{e}");
}

/// Stage 2 budget is 200 µs per decision in release builds; debug builds are several times
/// slower, so this asserts a loose bound and prints the figure.
#[test]
fn evaluation_is_fast() {
    let c = shipped("runtime/genai-app");
    let req = runtime(
        "tenant-acme",
        "communication.external.send",
        "api.acme-vendor.com",
        5,
    );
    let n = 2000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        assert!(c.evaluate(&req).allowed);
    }
    let per = start.elapsed() / n;
    println!("cedar evaluate: {per:?} per decision");
    assert!(
        per < std::time::Duration::from_millis(2),
        "{per:?} per decision"
    );
}

/// Policies are partitioned by action class once per bundle: `==`, `in [..]` and unconstrained
/// action scopes each reach exactly the classes they can match, and the decisions are the ones
/// the whole set gives (a forbid without an action scope still applies to every class).
#[test]
fn policies_partitioned_by_action_decide_as_the_whole_set() {
    let p = bundle(&[(
        "p.cedar",
        r#"
        permit (principal, action == Firma::Action::"model.inference.chat", resource);
        permit (principal, action in [Firma::Action::"data.read", Firma::Action::"data.write"], resource);
        forbid (principal, action, resource) when { context.session_id == "banned" };
        "#,
    )])
    .compile()
    .unwrap();
    let count = |class: &str| {
        let a = &p.by_action[class];
        a.shared.len + a.by_principal.values().map(|p| p.len).sum::<usize>()
    };
    assert_eq!(count("model.inference.chat"), 2);
    assert_eq!(count("data.read"), 2);
    assert_eq!(count("data.write"), 2);
    assert_eq!(count("payment.transfer"), 1);
    for (action, allowed) in [
        ("model.inference.chat", true),
        ("data.read", true),
        ("data.write", true),
        ("payment.transfer", false),
        ("code.execute", false),
    ] {
        let r = p.evaluate(&runtime("a", action, "h.example", 1));
        assert_eq!(r.allowed, allowed, "{action}: {r:?}");
        let mut banned = runtime("a", action, "h.example", 1);
        banned.session_id = "banned";
        let r = p.evaluate(&banned);
        assert!(!r.allowed, "{action}");
        if allowed {
            assert_eq!(r.determining_policies, ["p:2"], "{action}");
        }
    }
    assert!(!p.evaluate(&runtime("a", "no.such.class", "h", 1)).allowed);
}

/// The usage records are skipped only for action classes no policy of which can read them.
#[test]
fn reads_usage_errs_towards_yes() {
    use super::compile::reads_usage;
    for no in [
        "permit(principal, action, resource) when { context.action_count <= 100 };",
        "permit(principal, action, resource) when { context has request && context.request.model == \"x\" };",
        "forbid(principal, action, resource) when { context.session_id == \"s\" && context.method == \"GET\" };",
        "permit(principal, action, resource) when { resource.host == \"contextual.example\" };",
        "permit(principal, action, resource) when { context has \"request\" };",
        "permit(principal, action, resource) when { context has mcp && context.mcp.arguments has path };",
    ] {
        assert!(!reads_usage(no), "{no}");
    }
    for yes in [
        "forbid(principal, action, resource) when { context has session && context.session.tokens_used >= 1 };",
        "forbid(principal, action, resource) when { context.agent.cost_usd.greaterThanOrEqual(decimal(\"1.0\")) };",
        "permit(principal, action, resource) when { context == {} };",
        "permit(principal, action, resource) when { context[\"session\"] == 1 };",
        "permit(principal, action, resource) when { context has \"agent\" };",
        "permit(principal, action, resource) when { context . session . tokens_used > 0 };",
        "permit(principal, action, resource) when { resource.path == \"/context\" };",
    ] {
        assert!(reads_usage(yes), "{yes}");
    }
}

/// A budget forbid still sees the usage records (the skip must not open it), and a class
/// whose policies never read them decides the same with or without them.
#[test]
fn usage_records_reach_the_policies_that_read_them() {
    let b = bundle(&[(
        "u.cedar",
        r#"
        @id("chat") permit(principal, action == Firma::Action::"model.inference.chat", resource);
        @id("budget") forbid(principal, action == Firma::Action::"model.inference.chat", resource)
            when { context has session && context.session.tokens_used >= 10 };
        @id("send") permit(principal, action == Firma::Action::"communication.external.send", resource);
        "#,
    )]);
    let c = b.compile().unwrap();
    let spent = UsageTotals {
        input_tokens: 6,
        output_tokens: 6,
        cost_nano_usd: 1_000_000,
        ..Default::default()
    };
    let mut req = runtime("a", "model.inference.chat", "api.openai.com", 1);
    assert!(c.evaluate(&req).allowed);
    req.usage = Some((spent, UsageTotals::default()));
    let r = c.evaluate(&req);
    assert!(!r.allowed);
    assert_eq!(r.determining_policies, vec!["budget"]);
    // Reservations of requests in flight count in `tokens_used`: 4 settled + 6 reserved.
    let in_flight = UsageTotals {
        input_tokens: 2,
        output_tokens: 2,
        reserved_tokens: 6,
        ..Default::default()
    };
    req.usage = Some((in_flight, UsageTotals::default()));
    assert!(!c.evaluate(&req).allowed);
    req.usage = Some((
        UsageTotals {
            reserved_tokens: 9,
            ..Default::default()
        },
        UsageTotals::default(),
    ));
    assert!(c.evaluate(&req).allowed);
    let mut send = runtime("a", "communication.external.send", "paste.rs", 1);
    send.usage = Some((spent, spent));
    assert!(c.evaluate(&send).allowed);
}

/// Cached resource entities never leak one resource's attributes into another's decision,
/// also once the cache has filled and started over.
#[test]
fn entity_cache_keeps_resources_apart() {
    let c = shipped("runtime/genai-app");
    let allowed = runtime("a", "model.inference.chat", "api.openai.com", 1);
    let other = runtime("a", "model.inference.chat", "evil.example", 1);
    for _ in 0..2 {
        assert!(c.evaluate(&allowed).allowed);
        assert!(!c.evaluate(&other).allowed);
    }
    let hosts: Vec<String> = (0..5000).map(|i| format!("h{i}.example")).collect();
    for h in &hosts {
        assert!(
            !c.evaluate(&runtime("a", "model.inference.chat", h, 1))
                .allowed
        );
    }
    assert!(c.evaluate(&allowed).allowed);
    assert!(!c.evaluate(&other).allowed);
}

/// List-time decisions (`could_allow`): with the shipped MCP example, a tool permitted for
/// some arguments is listed, one forbidden whatever its arguments or never permitted is not;
/// a budget spent hides the tool; a permit for another agent does not list it.
#[test]
fn mcp_could_allow_for_some_arguments() {
    let p = shipped("runtime/mcp");
    let ctx = |tool: &str| McpContext {
        method: "tools/call".into(),
        name: Some(tool.into()),
        // Ignored: the arguments are unknown at list time.
        arguments: [("path".to_string(), AttrValue::String("/etc/shadow".into()))].into(),
    };
    fn req(m: &McpContext, count: i64) -> EvalRequest<'_> {
        EvalRequest {
            agent_id: "agent-mcp",
            action: "mcp.tools.call",
            resource_id: "mcp.test/mcp/tools/x",
            host: Some("mcp.test"),
            path: Some("/mcp"),
            action_count: count,
            session_id: "s-1",
            method: "POST",
            request: None,
            usage: None,
            mcp: Some(m),
        }
    }
    // The read_file permit and the delete_repo forbid are indexed under their tool; the `..`
    // forbid applies to every tool.
    assert_eq!(p.by_action["mcp.tools.call"].named_sets(), 2);
    let (read, delete, other) = (ctx("read_file"), ctx("delete_repo"), ctx("list_dir"));
    assert!(
        p.could_allow(&req(&read, 1)),
        "read_file is permitted for /workspace/*"
    );
    assert!(
        !p.evaluate(&req(&read, 1)).allowed,
        "but not for /etc/shadow"
    );
    assert!(!p.could_allow(&req(&delete, 1)), "delete_repo is forbidden");
    assert!(!p.could_allow(&req(&other, 1)), "no permit names list_dir");
    // With the budget written as a forbid, the spent budget hides the tool; written inside
    // the permit after an argument condition, the permit stays "may hold" (over-approximation).
    assert!(
        p.could_allow(&req(&read, 101)),
        "residual permit: still listed"
    );
    let text = format!(
        "{}\nforbid (principal, action == Firma::Action::\"mcp.tools.call\", resource) when {{ context has mcp && context.mcp has name && context.mcp.name == \"read_file\" && context.action_count > 1 }};",
        std::fs::read_to_string(policies_dir().join("runtime/mcp/mcp.cedar")).unwrap()
    );
    let budget = bundle(&[("mcp.cedar", &text)]).compile().unwrap();
    assert!(budget.could_allow(&req(&read, 1)));
    assert!(!budget.could_allow(&req(&read, 2)), "budget of 1 spent");
    assert!(
        !budget.could_allow(&req(&delete, 1)),
        "delete_repo with the budget forbid"
    );
    let mut with_usage = req(&delete, 1);
    with_usage.usage = Some(Default::default());
    assert!(
        !budget.could_allow(&with_usage),
        "usage totals do not hide the name"
    );
    let mut r = req(&read, 1);
    r.mcp = None;
    assert!(!p.could_allow(&r), "not an MCP call");
    let only_alice = bundle(&[(
        "a.cedar",
        r#"permit (principal == Firma::Agent::"alice", action == Firma::Action::"mcp.tools.call", resource)
           when { context has mcp && context.mcp.arguments has path };"#,
    )])
    .compile()
    .unwrap();
    assert!(!only_alice.could_allow(&req(&read, 1)));
    let mut alice = req(&read, 1);
    alice.agent_id = "alice";
    assert!(only_alice.could_allow(&alice));
}

/// The context built as values is exactly the one Cedar's evaluator makes of the restricted
/// expressions (the reference), for every shape of request: with and without body
/// attributes, MCP messages with and without a name and with every argument type, usage
/// records (extension `decimal`s), strings Cedar must keep as they are.
#[test]
fn context_values_equal_cedars_evaluation() {
    let c = shipped("runtime/mcp");
    let attrs: BTreeMap<String, AttrValue> = [
        ("model".to_string(), AttrValue::String("gpt-4o".into())),
        ("max_tokens".to_string(), AttrValue::Long(-7)),
        ("stream".to_string(), AttrValue::Bool(true)),
    ]
    .into();
    let long = "ü\"\\\u{0}x".repeat(40);
    let mcps = [
        McpContext {
            method: "tools/call".into(),
            name: Some("read_file".into()),
            arguments: [
                ("path".to_string(), AttrValue::String(long.clone())),
                ("limit".to_string(), AttrValue::Long(i64::MIN)),
                ("recursive".to_string(), AttrValue::Bool(false)),
            ]
            .into(),
        },
        McpContext {
            method: "initialize".into(),
            name: None,
            arguments: BTreeMap::new(),
        },
    ];
    let spent = UsageTotals {
        input_tokens: 5,
        output_tokens: i64::MAX,
        cost_nano_usd: -1_234_567_891,
        reserved_tokens: 3,
        reserved_cost_nano_usd: 999_999_999_999,
    };
    let mut n = 0;
    for request in [None, Some(&attrs)] {
        for mcp in [None, Some(&mcps[0]), Some(&mcps[1])] {
            for usage in [None, Some((spent, UsageTotals::default()))] {
                for with_usage in [false, true] {
                    let req = EvalRequest {
                        agent_id: "a",
                        action: "mcp.tools.call",
                        resource_id: "mcp.test/mcp",
                        host: Some("mcp.test"),
                        path: Some("/mcp"),
                        action_count: i64::MAX,
                        session_id: &long,
                        method: "POST",
                        request,
                        usage,
                        mcp,
                    };
                    let values = c.context_values(&req, with_usage).unwrap();
                    let reference = c.context_pairs(&req, with_usage, false).unwrap();
                    assert_eq!(
                        values, reference,
                        "{request:?} {mcp:?} {usage:?} {with_usage}"
                    );
                    assert_eq!(values.to_string(), reference.to_string());
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 24);
}
