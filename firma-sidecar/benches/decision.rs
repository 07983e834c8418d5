//! Hot-path costs: mapping lookup, Stage 1 lookup, Stage 2 Cedar evaluation, the whole decision
//! (also with 10,000 tenant policies, and compiling that bundle), audit signing, and the
//! per-request metric hooks (off, then on).
//! `cargo bench -p firma-sidecar`. The seeds' budgets: Stage 1 < 1 ms, Stage 2 < 200 µs.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use firma_common::capability::{CapabilityClaims, CapabilitySeed, now_unix};
use firma_common::keys::SigningKey;
use firma_common::policy::{PolicyBundle, UsageTotals};
use firma_sidecar::audit::{
    AuditInput, AuditLog, ConnectorOutcome, RequestAudit, Sealer, event_body,
};
use firma_sidecar::pipeline::mapping::MappingRules;
use firma_sidecar::pipeline::revocations::RevocationSet;
use firma_sidecar::pipeline::sessions::ActionCounters;
use firma_sidecar::pipeline::stage1::{Caller, CapabilityStore, Stage1Request};
use firma_sidecar::pipeline::stage2::{Stage2Request, evaluate, evaluate_reserving};
use firma_sidecar::pipeline::usage::{UsageLedger, Want};
use firma_sidecar::pipeline::{ConnectionInfo, Decision, InterceptKind, Outcome};
use std::path::Path;
use std::sync::Arc;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn mapping(c: &mut Criterion) {
    let rules = MappingRules::load(&[repo().join("policies/mapping-rules.toml")]).expect("rules");
    c.bench_function("mapping/exact_host_exact_path", |b| {
        b.iter(|| {
            rules.classify(
                black_box("POST"),
                black_box("api.openai.com"),
                black_box("/v1/chat/completions"),
            )
        })
    });
    c.bench_function("mapping/unmapped", |b| {
        b.iter(|| {
            rules.classify(
                black_box("GET"),
                black_box("unknown.example.org"),
                black_box("/a/b/c"),
            )
        })
    });
}

fn stage1(c: &mut Criterion) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let dir = tempfile::tempdir().expect("tempdir");
    let now = now_unix();
    // 1000 sessions, as in the seed's capacity example.
    let paths: Vec<_> = (0..1000)
        .map(|i| {
            let claims = CapabilityClaims {
                token_id: format!("t-{i}"),
                agent_id: format!("tenant-{}", i % 10),
                session_id: format!("s-{i}"),
                action_set: vec![
                    "model.inference.chat".into(),
                    "communication.external.send".into(),
                ],
                resource_scope: "*".into(),
                iat: now - 5,
                exp: now + 3600,
                context_hash: "00".into(),
            };
            let p = dir.path().join(format!("{i}.toml"));
            let seed = CapabilitySeed::new(claims.sign(&key).expect("sign"), &claims);
            std::fs::write(&p, toml::to_string(&seed).expect("toml")).expect("write");
            p
        })
        .collect();
    let mut store = CapabilityStore::new(key.verifying_key(), 5, Arc::new(RevocationSet::new()));
    store.load_seeds(&paths, now).expect("seeds");
    let mut by_session = http::HeaderMap::new();
    by_session.insert("x-firma-session", "s-500".parse().expect("hv"));
    c.bench_function("stage1/session_header_1000_sessions", |b| {
        b.iter(|| {
            store.check(&Stage1Request {
                caller: Caller::Connection(1),
                headers: &by_session,
                workload: None,
                action_class: "model.inference.chat",
                resource: "api.openai.com/v1/chat/completions",
                now,
            })
        })
    });
    let mut by_token = http::HeaderMap::new();
    let claims = CapabilityClaims {
        token_id: "hdr".into(),
        agent_id: "tenant-x".into(),
        session_id: "hdr-s".into(),
        action_set: vec!["model.inference.chat".into()],
        resource_scope: "api.openai.com".into(),
        iat: now - 5,
        exp: now + 3600,
        context_hash: "00".into(),
    };
    by_token.insert(
        "x-firma-capability",
        claims.sign(&key).expect("sign").parse().expect("hv"),
    );
    c.bench_function("stage1/header_token_cached", |b| {
        b.iter(|| {
            store.check(&Stage1Request {
                caller: Caller::Connection(1),
                headers: &by_token,
                workload: None,
                action_class: "model.inference.chat",
                resource: "api.openai.com/v1/chat/completions",
                now,
            })
        })
    });
}

fn stage2(c: &mut Criterion) {
    let bundle =
        PolicyBundle::load_dir(&repo().join("policies/runtime/genai-app")).expect("bundle");
    let policies = bundle.compile().expect("compile");
    let counters = ActionCounters::new();
    c.bench_function("stage2/cedar_genai_app_allow", |b| {
        b.iter(|| {
            evaluate(
                &policies,
                &counters,
                &Stage2Request {
                    agent_id: "tenant-acme",
                    session_id: "s-1",
                    action_class: "model.inference.chat",
                    host: "api.openai.com",
                    path: "/v1/chat/completions",
                    resource: "api.openai.com/v1/chat/completions",
                    method: "POST",
                    live_until: i64::MAX,
                    now: now_unix(),
                    request: None,
                    usage: None,
                    mcp: None,
                },
            )
        })
    });
    c.bench_function("stage2/cedar_genai_app_forbid", |b| {
        b.iter(|| {
            evaluate(
                &policies,
                &counters,
                &Stage2Request {
                    agent_id: "tenant-acme",
                    session_id: "s-1",
                    action_class: "communication.external.send",
                    host: "paste.rs",
                    path: "/",
                    resource: "paste.rs/",
                    method: "POST",
                    live_until: i64::MAX,
                    now: now_unix(),
                    request: None,
                    usage: None,
                    mcp: None,
                },
            )
        })
    });
}

/// Usage totals as the pipeline passes them on every request (`context.session`/`agent`).
fn spent() -> Option<(UsageTotals, UsageTotals)> {
    let t = UsageTotals {
        input_tokens: 1200,
        output_tokens: 800,
        cost_nano_usd: 3_500_000,
        ..UsageTotals::default()
    };
    Some((t, t))
}

/// Stage 2 as the pipeline runs it: usage totals always passed. `genai-app` never reads
/// them (the records are not built); the `llm` bundle's budget forbids do (two `decimal`s).
fn stage2_with_usage(c: &mut Criterion) {
    let counters = ActionCounters::new();
    for (name, dir) in [
        (
            "stage2/genai_app_allow_usage_passed",
            "policies/runtime/genai-app",
        ),
        ("stage2/llm_budget_reads_usage", "policies/runtime/llm"),
    ] {
        let policies = PolicyBundle::load_dir(&repo().join(dir))
            .expect("bundle")
            .compile()
            .expect("compile");
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert(
            "model".to_string(),
            firma_common::policy::AttrValue::String("gpt-4o-mini".into()),
        );
        c.bench_function(name, |b| {
            b.iter(|| {
                evaluate(
                    &policies,
                    &counters,
                    &Stage2Request {
                        agent_id: "tenant-acme",
                        session_id: "s-1",
                        action_class: "model.inference.chat",
                        host: "api.openai.com",
                        path: "/v1/chat/completions",
                        resource: "api.openai.com/v1/chat/completions",
                        method: "POST",
                        live_until: i64::MAX,
                        now: now_unix(),
                        request: Some(&attrs),
                        usage: spent(),
                        mcp: None,
                    },
                )
            })
        });
    }
}

/// A metered chat call as the pipeline decides it now: the `llm` bundle reads the ledger's
/// totals, and the allow takes a reservation in the same step (then released, as a response
/// would settle it). Compare with `stage2/llm_budget_reads_usage` for the reservation's cost.
fn stage2_reserving(c: &mut Criterion) {
    let counters = ActionCounters::new();
    let ledger = Arc::new(UsageLedger::open(None).expect("ledger"));
    let policies = PolicyBundle::load_dir(&repo().join("policies/runtime/llm"))
        .expect("bundle")
        .compile()
        .expect("compile");
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert(
        "model".to_string(),
        firma_common::policy::AttrValue::String("gpt-4o-mini".into()),
    );
    let want = Want {
        input_tokens: 200,
        output_tokens: 512,
        cost_nano_usd: 340_000,
    };
    c.bench_function("stage2/llm_budget_reserve", |b| {
        b.iter(|| {
            let (r, held) = evaluate_reserving(
                &policies,
                &counters,
                &Stage2Request {
                    agent_id: "tenant-acme",
                    session_id: "s-1",
                    action_class: "model.inference.chat",
                    host: "api.openai.com",
                    path: "/v1/chat/completions",
                    resource: "api.openai.com/v1/chat/completions",
                    method: "POST",
                    live_until: i64::MAX,
                    now: now_unix(),
                    request: Some(&attrs),
                    usage: None,
                    mcp: None,
                },
                &ledger,
                want,
            );
            assert!(r.deny.is_none());
            drop(black_box(held));
        })
    });
}

/// The whole decision of an allowed chat call: mapping + Stage 1 (session header, 1 of 1000
/// capabilities) + Stage 2 (genai-app, usage passed).
fn whole_decision(c: &mut Criterion) {
    let policies = PolicyBundle::load_dir(&repo().join("policies/runtime/genai-app"))
        .expect("bundle")
        .compile()
        .expect("compile");
    decision_with(c, "decision/mapping_stage1_stage2_allow", &policies);
}

/// The shipped genai-app bundle plus `n` tenants onboarded as the seed guide does it, one
/// `permit (principal == Firma::Agent::"tenant-N", …)` each on `model.inference.chat`; the
/// last tenant is `tenant-acme`, the agent of the benchmarks' capability.
fn tenants_bundle(n: usize) -> PolicyBundle {
    let mut bundle =
        PolicyBundle::load_dir(&repo().join("policies/runtime/genai-app")).expect("bundle");
    let mut text = String::with_capacity(n * 200);
    for i in 0..n {
        let agent = if i + 1 == n {
            "tenant-acme".to_string()
        } else {
            format!("tenant-{i}")
        };
        text.push_str(&format!(
            "permit (principal == Firma::Agent::\"{agent}\", action == Firma::Action::\"model.inference.chat\", resource)\n  when {{ resource has \"host\" && resource.host == \"api.openai.com\" }};\n"
        ));
    }
    bundle.files.push(firma_common::policy::PolicyFile {
        name: "tenants.cedar".into(),
        content: text,
    });
    PolicyBundle::new(bundle.files, bundle.schema)
}

/// Many tenants (docs/policy-partitions.md): the whole decision of `tenant-acme`'s allowed
/// chat call with 10,000 tenant policies installed (target <= 10 us), and compiling that bundle,
/// what a reload costs (target <= 1 s).
fn many_tenants(c: &mut Criterion) {
    let bundle = tenants_bundle(10_000);
    let policies = bundle.compile().expect("compile");
    decision_with(
        c,
        "decision/mapping_stage1_stage2_allow_10k_tenants",
        &policies,
    );
    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("compile_genai_app_10k_tenants", |b| {
        b.iter(|| bundle.compile().expect("compile"))
    });
    g.finish();
}

fn decision_with(c: &mut Criterion, name: &str, policies: &firma_common::policy::CompiledPolicies) {
    let rules = MappingRules::load(&[repo().join("policies/mapping-rules.toml")]).expect("rules");
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let dir = tempfile::tempdir().expect("tempdir");
    let now = now_unix();
    let claims = CapabilityClaims {
        token_id: "t-1".into(),
        agent_id: "tenant-acme".into(),
        session_id: "s-1".into(),
        action_set: vec!["model.inference.chat".into()],
        resource_scope: "*".into(),
        iat: now - 5,
        exp: now + 3600,
        context_hash: "00".into(),
    };
    let p = dir.path().join("seed.toml");
    let seed = CapabilitySeed::new(claims.sign(&key).expect("sign"), &claims);
    std::fs::write(&p, toml::to_string(&seed).expect("toml")).expect("write");
    let mut store = CapabilityStore::new(key.verifying_key(), 5, Arc::new(RevocationSet::new()));
    store.load_seeds(&[p], now).expect("seeds");
    let counters = ActionCounters::new();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-firma-session", "s-1".parse().expect("hv"));
    let decide = || {
        let class = rules
            .classify(
                black_box("POST"),
                black_box("api.openai.com"),
                black_box("/v1/chat/completions"),
            )
            .map(|m| m.action_class.to_owned())
            .expect("mapped");
        let cleared = store
            .check(&Stage1Request {
                caller: Caller::Connection(1),
                headers: &headers,
                workload: None,
                action_class: &class,
                resource: "api.openai.com/v1/chat/completions",
                now,
            })
            .map_err(|d| d.detail)
            .expect("stage 1");
        evaluate(
            policies,
            &counters,
            &Stage2Request {
                agent_id: &cleared.cap.claims.agent_id,
                session_id: &cleared.cap.claims.session_id,
                action_class: &class,
                host: "api.openai.com",
                path: "/v1/chat/completions",
                resource: "api.openai.com/v1/chat/completions",
                method: "POST",
                live_until: cleared.live_until,
                now,
                request: None,
                usage: spent(),
                mcp: None,
            },
        )
    };
    let allowed = decide();
    assert!(allowed.deny.is_none(), "{name}: {allowed:?}");
    c.bench_function(name, |b| b.iter(decide));
}

fn audit(c: &mut Criterion) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut sealer = Sealer::new(key);
    let conn = ConnectionInfo {
        conn_id: 1,
        kind: InterceptKind::HttpProxy,
        peer: "127.0.0.1:5000".parse().expect("addr"),
        original_dst: None,
        workload: None,
    };
    let decision = Decision {
        outcome: Outcome::Allow,
        reason: None,
        detail: "allowed by genai-app:0".into(),
        action_class: Some("model.inference.chat".into()),
        passthrough: false,
        capability: None,
        matched_policies: vec!["genai-app:0".into()],
        timings_us: vec![("stage1_us", 3), ("stage2_us", 20)],
    };
    let input = AuditInput {
        conn: &conn,
        method: Some("POST"),
        host: Some("api.openai.com"),
        port: 443,
        path: Some("/v1/chat/completions"),
        decision: &decision,
        connector: Some(ConnectorOutcome::default()),
    };
    c.bench_function("audit/build_chain_sign_event", |b| {
        b.iter(|| sealer.seal(event_body(&input)).expect("seal"))
    });
    // What the writer does per group commit under load: 16 events chained, the last one signed
    // (divide by 16 for the amortised cost per event).
    c.bench_function("audit/build_chain_batch16_one_signature", |b| {
        b.iter(|| {
            for i in 0..16 {
                black_box(sealer.chain(event_body(&input), i == 15).expect("chain"));
            }
        })
    });

    // What an allowed request waits for before it may leave: its decision written to the
    // file sink (fsync = interval) by the writer thread, alone and with 16 requests at once
    // (group commit).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("audit.key");
    firma_common::keys::generate(&key_path, false).expect("key");
    let cfg = firma_sidecar::config::AuditConfig {
        sink: firma_sidecar::config::AuditSink::File,
        path: Some(dir.path().join("audit.jsonl")),
        signing_key_path: Some(key_path),
        ..Default::default()
    };
    let log = rt.block_on(AuditLog::start(&cfg)).expect("audit log");
    let commit = |log: AuditLog, conn: ConnectionInfo, decision: Decision| async move {
        let committed = RequestAudit::new(&log, &conn)
            .target(Some("api.openai.com"), 443, Some("/v1/chat/completions"))
            .commit(&decision, ConnectorOutcome::default())
            .await
            .map_err(|(_, e)| e)
            .expect("persisted");
        committed.finish(ConnectorOutcome::default());
    };
    c.bench_function("audit/commit_decision_file", |b| {
        b.iter(|| rt.block_on(commit(log.clone(), conn.clone(), decision.clone())))
    });
    // 16 requests at once: their lines go out in one batch under one signature.
    let x16 = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let tasks: Vec<_> = (0..16)
                .map(|_| tokio::spawn(commit(log.clone(), conn.clone(), decision.clone())))
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        })
    };
    c.bench_function("audit/commit_decision_file_x16_concurrent", |b| {
        b.iter(|| x16(&rt))
    });
    // The same 16 on one single-threaded runtime, as on a connection worker: the lines are
    // queued during one `yield`, then one of the requests writes them as one batch on its own
    // thread (inline group commit, writer.rs `Shared`), with no writer-thread wake-up.
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("audit/commit_decision_file_x16_one_worker", |b| {
        b.iter(|| x16(&worker))
    });
}

/// Every metric hook one allowed request passes through, with metrics off (no admin listener:
/// each hook is one atomic load) and on. Must be last: enabling is process-wide and one-way.
fn metrics(c: &mut Criterion) {
    use firma_sidecar::pipeline::metrics::Stage;
    use firma_sidecar::{audit, connector, interceptor, metrics, pipeline};
    use std::time::{Duration, Instant};
    let mut decision = Decision::deny(firma_sidecar::pipeline::DenyReason::PolicyDenied, "");
    decision.outcome = Outcome::Allow;
    decision.reason = None;
    decision.action_class = Some("model.inference.chat".into());
    decision.timings_us = vec![("classify_us", 1), ("stage1_us", 2), ("stage2_us", 9)];
    let outcome = ConnectorOutcome {
        credential_injected: true,
        credential_source: Some("basic"),
        upstream_status: Some(200),
        ..Default::default()
    };
    let per_request = |decision: &Decision, outcome: &ConnectorOutcome| {
        let start = Instant::now();
        let conn = interceptor::metrics::connection(InterceptKind::HttpProxy);
        pipeline::metrics::decision(black_box(decision));
        connector::metrics::credential_fetch("basic", true);
        pipeline::metrics::stage(Stage::Connector, Duration::from_micros(30));
        pipeline::metrics::outcome(black_box(outcome));
        audit::metrics::write(Duration::from_micros(20));
        interceptor::metrics::overhead(start);
        drop(conn);
    };
    let mut g = c.benchmark_group("metrics");
    g.bench_function("per_request_hooks_off", |b| {
        b.iter(|| per_request(&decision, &outcome))
    });
    metrics::enable();
    g.bench_function("per_request_hooks_on", |b| {
        b.iter(|| per_request(&decision, &outcome))
    });
    g.finish();
}

/// MCP: strict parse + classification of a 2 KB `tools/call`, and that plus the Stage 2
/// decision with the shipped MCP example policy (docs/mcp.md; target < 10 us).
fn mcp(c: &mut Criterion) {
    use firma_sidecar::pipeline::mcp::{McpSpec, classify_body, parse_spec};
    let spec: McpSpec = parse_spec(
        toml::from_str("arguments = { path = \"String\", name = \"String\", limit = \"Long\" }")
            .expect("spec"),
    )
    .expect("spec");
    let filler = "x".repeat(1900);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{{"name":"read_file","arguments":{{"path":"/workspace/src/main.rs","limit":100,"note":"{filler}"}},"_meta":{{"progressToken":7}}}}}}"#
    );
    assert!((2000..2200).contains(&body.len()), "{}", body.len());
    c.bench_function("mcp/classify_2kb_tools_call", |b| {
        b.iter(|| classify_body(black_box(body.as_bytes()), &spec).expect("classify"))
    });
    let bundle = PolicyBundle::load_dir(&repo().join("policies/runtime/mcp")).expect("bundle");
    let policies = bundle.compile().expect("compile");
    let counters = ActionCounters::new();
    // Every iteration is the session's first read_file (the policy allows 100): reset the
    // counter, else after 100 iterations every decision would be a deny.
    let (first, _) = classify_body(body.as_bytes(), &spec).expect("classify");
    let count = counters
        .counter("s-1", &first[0].counter_key(), i64::MAX, now_unix())
        .expect("counter");
    // `usage: None` as before; the sidecar passes the session's and agent's usage totals on
    // every unmetered decision (`_with_usage`), which costs two Cedar records when a policy
    // of the action may read them.
    for (name, usage) in [
        ("mcp/classify_and_decide_2kb_tools_call", None),
        (
            "mcp/classify_and_decide_2kb_tools_call_with_usage",
            Some((UsageTotals::default(), UsageTotals::default())),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                count.store(0, std::sync::atomic::Ordering::Relaxed);
                let (msgs, _) = classify_body(black_box(body.as_bytes()), &spec).expect("classify");
                let m = &msgs[0];
                let resource = m.resource("mcp.example.com", "/mcp");
                let r = evaluate(
                    &policies,
                    &counters,
                    &Stage2Request {
                        agent_id: "agent-mcp",
                        session_id: "s-1",
                        action_class: m.action_class,
                        host: "mcp.example.com",
                        path: "/mcp",
                        resource: &resource,
                        method: "POST",
                        live_until: i64::MAX,
                        now: now_unix(),
                        request: None,
                        usage,
                        mcp: Some(m),
                    },
                );
                assert!(r.deny.is_none(), "{:?}", r.deny);
                black_box(r)
            })
        });
    }
}

criterion_group!(
    benches,
    mcp,
    mapping,
    stage1,
    stage2,
    stage2_with_usage,
    stage2_reserving,
    whole_decision,
    many_tenants,
    audit,
    metrics
);
criterion_main!(benches);
