//! The embedded layer's cost per call, in-process: `Firma::authorize` (normalise, extract the
//! body, Stage 1, Stage 2, credential, rate limit, the ALLOW decision persisted to a signed,
//! hash-chained file audit) plus `Permit::finish` (the `outcome` event), and a denial. Wall
//! time includes waiting for the audit writer's thread (an ALLOW is persisted before the call
//! may leave); the `*_cpu` variants report the process's CPU time per call instead (every
//! thread: the caller's, the runtime's and the audit writer's), which a loaded machine inflates
//! far less. `cargo bench --profile profiling -p firma-embed`; figures in docs/benchmarks.md.

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use firma_embed::{Firma, Identity};
use firma_sidecar::config::FsyncPolicy;
use firma_testing::audit::{audit_key, file_config};
use firma_testing::pipeline::{CHAT, Env, Opts};

fn start(env: &Env, fsync: FsyncPolicy) -> (tokio::runtime::Runtime, Firma) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = env.seed(&env.claims("t-bench", "tenant-acme", "s-bench", &[CHAT], "*"));
    let mut cfg = env.config(&[seed], &Opts::default());
    let (key, _) = audit_key(env, &format!("audit-{fsync:?}.key"));
    cfg.audit = file_config(&env.path(&format!("audit-{fsync:?}.jsonl")), &key);
    cfg.audit.fsync = fsync;
    let firma = rt
        .block_on(Firma::start(&cfg, Identity::Session("s-bench".into())))
        .expect("embedded pipeline starts");
    (rt, firma)
}

fn per_call(c: &mut Criterion) {
    let env = Env::new();
    let chat: http::Uri = "https://api.openai.com/v1/chat/completions"
        .parse()
        .expect("uri");
    let paste: http::Uri = "https://paste.rs/upload".parse().expect("uri");
    let body = Bytes::from_static(br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[]}"#);
    let headers = http::HeaderMap::new();
    for fsync in [FsyncPolicy::Interval, FsyncPolicy::Always] {
        let (rt, firma) = start(&env, fsync);
        c.bench_function(&format!("embedded/allow_chat_fsync_{fsync:?}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let permit = firma
                        .authorize(&http::Method::POST, &chat, &headers, Some(body.clone()))
                        .await
                        .expect("allowed");
                    permit.finish(Ok(http::StatusCode::OK));
                })
            })
        });
        c.bench_function(&format!("embedded/deny_fsync_{fsync:?}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let e = firma
                        .authorize(&http::Method::POST, &paste, &headers, None)
                        .await
                        .err()
                        .expect("denied");
                    criterion::black_box(e);
                })
            })
        });
        if fsync == FsyncPolicy::Interval {
            c.bench_function("embedded/allow_chat_cpu", |b| {
                b.iter_custom(|iters| {
                    let t0 = process_cpu();
                    for _ in 0..iters {
                        rt.block_on(async {
                            let permit = firma
                                .authorize(&http::Method::POST, &chat, &headers, Some(body.clone()))
                                .await
                                .expect("allowed");
                            permit.finish(Ok(http::StatusCode::OK));
                        })
                    }
                    process_cpu().saturating_sub(t0)
                })
            });
            c.bench_function("embedded/deny_cpu", |b| {
                b.iter_custom(|iters| {
                    let t0 = process_cpu();
                    for _ in 0..iters {
                        rt.block_on(async {
                            let e = firma
                                .authorize(&http::Method::POST, &paste, &headers, None)
                                .await
                                .err()
                                .expect("denied");
                            criterion::black_box(e);
                        })
                    }
                    process_cpu().saturating_sub(t0)
                })
            });
        }
        rt.block_on(firma.flush());
    }
}

/// CPU time of the whole process so far (`CLOCK_PROCESS_CPUTIME_ID`: every thread).
fn process_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

criterion_group!(benches, per_call);
criterion_main!(benches);
