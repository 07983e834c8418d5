//! The Authority's issuance work per call, in-process (no gRPC, no socket): `Issuer::issue`
//! (validate, the issuance policy for the action, lifetime, context hash, a fresh token id,
//! PASETO v4.public signature) under the shipped genai-app issuance policy, a denial, and its
//! parts alone (Cedar's issuance evaluation, the signature); `issue_allowed_cpu` is the thread's
//! CPU time per call rather than wall time. What the `IssueCapability` RPC adds
//! on top (tonic/h2 framing, loopback, the INFO line) is the harness's issuance step minus this.
//! `cargo bench --profile profiling -p firma-authority --bench issuance`; figures in
//! docs/benchmarks.md ("The Authority's issuance path").

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use firma_authority::issuance::{IssueRequest, Issuer};
use firma_common::capability::{CapabilityClaims, now_unix};
use firma_common::policy::{
    CompiledPolicies, EvalRequest, PolicyBundle, PolicyFile, SHIPPED_SCHEMA,
};

const ISSUANCE: &str = include_str!("../../policies/issuance/genai-app/issuance.cedar");

fn policies() -> CompiledPolicies {
    PolicyBundle::new(
        vec![PolicyFile {
            name: "issuance.cedar".into(),
            content: ISSUANCE.into(),
        }],
        SHIPPED_SCHEMA.into(),
    )
    .compile()
    .expect("shipped issuance policy compiles")
}

fn request(agent: &str) -> IssueRequest {
    IssueRequest {
        agent_id: agent.into(),
        session_id: "bench-session".into(),
        actions: vec!["model.inference.chat".into()],
        resource_scope: "*".into(),
        ttl_seconds: 900,
    }
}

fn issuance(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("authority.key");
    firma_common::keys::generate(&path, false).expect("generate key");
    let key = firma_common::keys::load_signing_key(&path).expect("load key");
    let compiled = policies();
    let issuer = Issuer {
        key: &key,
        policies: &compiled,
        max_ttl_seconds: 3600,
    };
    let allowed = request("tenant-acme");
    let denied = request("tenant-unknown");
    assert!(
        issuer.issue(&allowed).is_ok(),
        "the bench request is allowed"
    );
    assert!(issuer.issue(&denied).is_err(), "the bench denial is denied");
    c.bench_function("issuance/issue_allowed", |b| {
        b.iter(|| black_box(issuer.issue(black_box(&allowed)).expect("allowed")))
    });
    // CPU time of this thread per call: what a loaded machine's preemption does not inflate.
    c.bench_function("issuance/issue_allowed_cpu", |b| {
        b.iter_custom(|iters| {
            let t0 = thread_cpu();
            for _ in 0..iters {
                black_box(issuer.issue(black_box(&allowed)).expect("allowed"));
            }
            thread_cpu().saturating_sub(t0)
        })
    });
    c.bench_function("issuance/issue_denied", |b| {
        b.iter(|| black_box(issuer.issue(black_box(&denied)).err()))
    });
    c.bench_function("issuance/cedar_issuance_policy", |b| {
        b.iter(|| {
            black_box(compiled.evaluate(&EvalRequest {
                agent_id: "tenant-acme",
                action: "model.inference.chat",
                resource_id: "*",
                host: None,
                path: None,
                action_count: 0,
                session_id: "bench-session",
                method: "ISSUE",
                request: None,
                usage: None,
                mcp: None,
            }))
        })
    });
    let iat = now_unix();
    let claims = CapabilityClaims {
        token_id: "3f2c6a55-8d6e-4c1e-9a53-2a1f7c0b9e11".into(),
        agent_id: "tenant-acme".into(),
        session_id: "bench-session".into(),
        context_hash: "0".repeat(64),
        action_set: vec!["model.inference.chat".into()],
        resource_scope: "*".into(),
        iat,
        exp: iat + 900,
    };
    c.bench_function("issuance/sign_token", |b| {
        b.iter(|| black_box(claims.sign(&key).expect("sign")))
    });
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

criterion_group!(benches, issuance);
criterion_main!(benches);
