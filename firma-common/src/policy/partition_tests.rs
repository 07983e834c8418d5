//! The partitioned evaluation against Cedar over the whole set: random bundles (many tenants,
//! permits and forbids, `principal ==` / `in` / `is` / unconstrained, action and resource
//! scopes, `when`/`unless` conditions, some that error at run time, some that read the usage
//! records) and random requests; the decision, the determining policies and the errors must be
//! the ones `Authorizer::is_authorized` gives over every policy of the bundle at once.

use super::*;
use cedar_policy::{Authorizer, Decision, EntityId, EntityUid};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const TENANTS: usize = 30;
/// MCP tool names policies test (`tool-0` …) and requests carry (one more than policies name).
const TOOLS: usize = 4;
const TEAMS: usize = 3;
const ACTIONS: [&str; 8] = [
    "model.inference.chat",
    "model.inference.embed",
    "communication.external.send",
    "communication.internal.send",
    "data.read",
    "data.write",
    "code.execute",
    "payment.transfer",
];
/// (host, path) of the resources requests go to.
const RESOURCES: [(&str, &str); 4] = [
    ("api.openai.com", "/v1/chat/completions"),
    ("api.openai.com", "/v1/embeddings"),
    ("paste.rs", "/"),
    ("api.acme-vendor.com", "/v2/send"),
];

/// The shipped schema, or one where agents may be members of teams (`principal in Team`).
fn schema(teams: bool) -> String {
    if teams {
        SHIPPED_SCHEMA.replace("entity Agent;", "entity Team;\n  entity Agent in [Team];")
    } else {
        SHIPPED_SCHEMA.to_string()
    }
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn tenant(rng: &mut StdRng) -> String {
    format!("Firma::Agent::\"tenant-{}\"", rng.gen_range(0..TENANTS))
}

fn principal_scope(rng: &mut StdRng, teams: bool) -> String {
    let team = |rng: &mut StdRng| format!("Firma::Team::\"team-{}\"", rng.gen_range(0..TEAMS));
    match rng.gen_range(0..if teams { 9 } else { 7 }) {
        0 | 1 => "principal".into(),
        2..=4 => format!("principal == {}", tenant(rng)),
        5 => format!("principal in {}", tenant(rng)),
        6 => match rng.gen_range(0..2) {
            0 => "principal is Firma::Agent".into(),
            _ => format!("principal is Firma::Agent in {}", tenant(rng)),
        },
        7 => format!("principal in {}", team(rng)),
        _ => format!("principal is Firma::Agent in {}", team(rng)),
    }
}

fn action_scope(rng: &mut StdRng) -> String {
    let action = |rng: &mut StdRng| format!("Firma::Action::\"{}\"", pick(rng, &ACTIONS));
    match rng.gen_range(0..5) {
        0 => "action".into(),
        1 => format!("action in [{}, {}]", action(rng), action(rng)),
        _ => format!("action == {}", action(rng)),
    }
}

fn resource_scope(rng: &mut StdRng) -> String {
    match rng.gen_range(0..6) {
        0 => {
            let (h, p) = pick(rng, &RESOURCES);
            format!("resource == Firma::Resource::\"{h}{p}\"")
        }
        1 => "resource is Firma::Resource".into(),
        _ => "resource".into(),
    }
}

/// One boolean condition over the request.
fn condition(rng: &mut StdRng) -> String {
    match rng.gen_range(0..10) {
        0 => format!("context.action_count <= {}", rng.gen_range(0..10)),
        1 => {
            let (h, _) = pick(rng, &RESOURCES);
            format!("resource has \"host\" && resource.host == \"{h}\"")
        }
        2 => format!("context.session_id == \"s-{}\"", rng.gen_range(0..3)),
        3 => format!("context.method == \"{}\"", pick(rng, &["GET", "POST"])),
        // Overflows, so errors, once action_count >= 8.
        4 => "context.action_count + 9223372036854775800 > 0".into(),
        5 => format!(
            "context has session && context.session.tokens_used >= {}",
            rng.gen_range(0..2000)
        ),
        6 => format!("principal == {}", tenant(rng)),
        7 => "context has request && context.request has model && context.request.model == \"gpt-4o\""
            .into(),
        8 => format!(
            "context has agent && context.agent.cost_usd.greaterThan(decimal(\"0.00{}\"))",
            rng.gen_range(1..10)
        ),
        _ => "context has mcp && context.mcp.arguments has limit && context.mcp.arguments.limit + 9223372036854775800 > 0"
            .into(),
    }
}

fn policy(rng: &mut StdRng, teams: bool, n: usize) -> String {
    let mut text = String::new();
    if rng.gen_bool(0.5) {
        text.push_str(&format!("@id(\"p{n}\")\n"));
    }
    let effect = if rng.gen_bool(0.3) {
        "forbid"
    } else {
        "permit"
    };
    text.push_str(&format!(
        "{effect} ({}, {}, {})",
        principal_scope(rng, teams),
        action_scope(rng),
        resource_scope(rng)
    ));
    // MCP name tests: the indexed idiom first (either side of `==`, sometimes followed by
    // more), and look-alikes that must not be indexed (an `unless`, a name test that is not
    // guarded first).
    let tool = format!("tool-{}", rng.gen_range(0..TOOLS));
    let guard = "context has mcp && context.mcp has name";
    match rng.gen_range(0..8) {
        0 => text.push_str(&format!(
            " when {{ {guard} && context.mcp.name == \"{tool}\" }}"
        )),
        1 => text.push_str(&format!(
            " when {{ {guard} && \"{tool}\" == context.mcp.name && {} }}",
            condition(rng)
        )),
        2 => text.push_str(&format!(
            " unless {{ {guard} && context.mcp.name == \"{tool}\" }}"
        )),
        3 => text.push_str(&format!(
            " when {{ {} && {guard} && context.mcp.name == \"{tool}\" }}",
            condition(rng)
        )),
        _ => {}
    }
    for _ in 0..rng.gen_range(0..3) {
        let kind = if rng.gen_bool(0.7) { "when" } else { "unless" };
        text.push_str(&format!(" {kind} {{ {} }}", condition(rng)));
    }
    text.push_str(";\n");
    text
}

fn random_bundle(rng: &mut StdRng, teams: bool) -> PolicyBundle {
    let files = rng.gen_range(1..4);
    let mut texts = vec![String::new(); files];
    for n in 0..rng.gen_range(1..80) {
        let f = rng.gen_range(0..files);
        texts[f].push_str(&policy(rng, teams, n));
    }
    let files = texts
        .into_iter()
        .enumerate()
        .map(|(i, content)| PolicyFile {
            name: format!("f{i}.cedar"),
            content,
        })
        .collect();
    PolicyBundle::new(files, schema(teams))
}

struct Owned {
    agent: String,
    action: &'static str,
    resource: String,
    host: &'static str,
    path: &'static str,
    count: i64,
    session: String,
    method: &'static str,
    request: Option<BTreeMap<String, AttrValue>>,
    usage: Option<(UsageTotals, UsageTotals)>,
    mcp: Option<McpContext>,
}

fn random_request(rng: &mut StdRng) -> Owned {
    let (host, path) = pick(rng, &RESOURCES);
    let usage = |rng: &mut StdRng| UsageTotals {
        input_tokens: rng.gen_range(0..1000),
        output_tokens: rng.gen_range(0..1000),
        cost_nano_usd: rng.gen_range(0..20_000_000),
        reserved_tokens: rng.gen_range(0..1000),
        reserved_cost_nano_usd: rng.gen_range(0..20_000_000),
    };
    Owned {
        // A few agents no policy names.
        agent: format!("tenant-{}", rng.gen_range(0..TENANTS + 3)),
        action: pick(rng, &ACTIONS),
        resource: format!("{host}{path}"),
        host,
        path,
        count: rng.gen_range(0..12),
        session: format!("s-{}", rng.gen_range(0..3)),
        method: pick(rng, &["GET", "POST"]),
        request: rng.gen_bool(0.5).then(|| {
            let model = pick(rng, &["gpt-4o", "gpt-4o-mini"]).to_string();
            BTreeMap::from([("model".to_string(), AttrValue::String(model))])
        }),
        usage: rng.gen_bool(0.7).then(|| (usage(rng), usage(rng))),
        mcp: rng.gen_bool(0.6).then(|| McpContext {
            method: "tools/call".into(),
            name: rng
                .gen_bool(0.85)
                .then(|| format!("tool-{}", rng.gen_range(0..=TOOLS))),
            // `limit` near the top overflows in the condition above, so errors.
            arguments: BTreeMap::from([(
                "limit".to_string(),
                AttrValue::Long(pick(rng, &[1, 100])),
            )]),
        }),
    }
}

impl Owned {
    fn eval(&self) -> EvalRequest<'_> {
        EvalRequest {
            agent_id: &self.agent,
            action: self.action,
            resource_id: &self.resource,
            host: Some(self.host),
            path: Some(self.path),
            action_count: self.count,
            session_id: &self.session,
            method: self.method,
            request: self.request.as_ref(),
            usage: self.usage,
            mcp: self.mcp.as_ref(),
        }
    }
}

/// Cedar over every policy of the bundle in one set, usage records always built.
fn whole_set(c: &CompiledPolicies, req: &EvalRequest<'_>) -> EvalResult {
    let action = &c.by_action[req.action];
    let principal =
        EntityUid::from_type_name_and_id(c.agent_type.clone(), EntityId::new(req.agent_id));
    let (request, entities) = c
        .build(req, principal, &action.uid, true)
        .expect("request builds");
    let resp = Authorizer::new().is_authorized(&request, &c.all, &entities);
    let mut determining: Vec<String> = resp.diagnostics().reason().map(|p| p.to_string()).collect();
    determining.sort();
    let mut errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
    errors.sort();
    EvalResult {
        allowed: resp.decision() == Decision::Allow,
        determining_policies: determining,
        errors,
    }
}

#[test]
fn partitioned_evaluation_is_cedars_answer_over_the_whole_set() {
    let (mut allowed, mut forbidden, mut errored, mut indexed) = (0, 0, 0, 0);
    let mut named = 0;
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let teams = seed % 2 == 1;
        let b = random_bundle(&mut rng, teams);
        let c = b.compile().unwrap_or_else(|e| {
            let text: Vec<_> = b.files.iter().map(|f| f.content.as_str()).collect();
            panic!(
                "seed {seed}: generated bundle does not compile: {e}\n{}",
                text.join("\n")
            )
        });
        indexed += c
            .by_action
            .values()
            .map(|a| a.principal_partitions())
            .sum::<usize>();
        named += c.by_action.values().map(|a| a.named_sets()).sum::<usize>();
        for i in 0..100 {
            let owned = random_request(&mut rng);
            let req = owned.eval();
            let got = c.evaluate(&req);
            let want = whole_set(&c, &req);
            assert_eq!(
                got,
                want,
                "seed {seed}, request {i}: {:?} {} on {} (count {}, usage {:?}, request {:?}, mcp {:?})",
                owned.agent,
                owned.action,
                owned.resource,
                owned.count,
                owned.usage,
                owned.request,
                owned.mcp
            );
            allowed += usize::from(want.allowed);
            forbidden += usize::from(!want.allowed && !want.determining_policies.is_empty());
            errored += usize::from(!want.errors.is_empty());
        }
    }
    // The generator reaches every kind of answer, and the index is used.
    println!(
        "allowed {allowed}, forbidden {forbidden}, with errors {errored}, partitions {indexed}, MCP-name sets {named}"
    );
    assert!(
        allowed > 1000 && forbidden > 1000 && errored > 500,
        "{allowed} {forbidden} {errored}"
    );
    assert!(indexed > 300, "{indexed}");
    assert!(named > 300, "{named}");
}

/// 2,000 tenants with a policy each on one class: a tenant's request sees the shared
/// policies and its own, a stranger's only the shared ones, and a tenant-specific forbid
/// overrides a shared permit for that tenant only.
#[test]
fn many_tenants_are_indexed_by_principal() {
    let mut text = String::from(
        "@id(\"shared\") permit (principal, action == Firma::Action::\"model.inference.chat\", resource);\n\
         @id(\"floor\") forbid (principal, action, resource) when { context.session_id == \"banned\" };\n",
    );
    for n in 0..2_000 {
        text.push_str(&format!(
            "permit (principal == Firma::Agent::\"tenant-{n}\", action == Firma::Action::\"model.inference.chat\", resource) when {{ context.action_count <= {n} }};\n"
        ));
    }
    text.push_str(
        "@id(\"cut\") forbid (principal == Firma::Agent::\"tenant-7\", action == Firma::Action::\"model.inference.chat\", resource);\n",
    );
    let c = PolicyBundle::new(
        vec![PolicyFile {
            name: "t.cedar".into(),
            content: text,
        }],
        SHIPPED_SCHEMA.into(),
    )
    .compile()
    .expect("compiles");
    let chat = &c.by_action["model.inference.chat"];
    assert_eq!(chat.shared.len, 2);
    assert_eq!(chat.principal_partitions(), 2_000);
    assert_eq!(c.by_action["data.read"].principal_partitions(), 0);
    let mut req = super::tests::runtime("tenant-42", "model.inference.chat", "h.example", 3);
    let r = c.evaluate(&req);
    assert!(r.allowed);
    assert_eq!(r.determining_policies, ["shared", "t:44"]);
    assert_eq!(r, whole_set(&c, &req));
    req.agent_id = "tenant-7";
    let r = c.evaluate(&req);
    assert!(!r.allowed);
    assert_eq!(r.determining_policies, ["cut"]);
    req.agent_id = "stranger";
    assert_eq!(c.evaluate(&req).determining_policies, ["shared"]);
    req.session_id = "banned";
    assert_eq!(c.evaluate(&req).determining_policies, ["floor"]);
}
