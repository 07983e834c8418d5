//! Stage 2 with session state in memory vs on Redis (`[sidecar.session_store]`), side by side:
//! the same policies and requests, a real `redis-server` started here on a loopback port.
//! `cargo bench -p firma-sidecar --bench session_store` (needs `redis-server` on PATH).
//!
//! Before criterion runs, it prints latency percentiles of 5,000 sequential decisions per
//! backend and the throughput of 64 concurrent callers (distinct sessions, then one session
//! shared by all), the figures docs/benchmarks.md reports.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use firma_common::capability::now_unix;
use firma_common::policy::{AttrValue, CompiledPolicies, PolicyBundle};
use firma_sidecar::pipeline::session_store::RedisStore;
use firma_sidecar::pipeline::session_store::config::{Backend, SessionStoreConfig};
use firma_sidecar::pipeline::sessions::ActionCounters;
use firma_sidecar::pipeline::stage2::{
    Stage2Request, evaluate, evaluate_reserving, evaluate_shared,
};
use firma_sidecar::pipeline::usage::{UsageLedger, Want};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A `redis-server` on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn policies(dir: &str) -> CompiledPolicies {
    PolicyBundle::load_dir(&repo().join(dir))
        .expect("bundle")
        .compile()
        .expect("compile")
}

fn attrs() -> BTreeMap<String, AttrValue> {
    BTreeMap::from([("model".to_string(), AttrValue::String("gpt-4o-mini".into()))])
}

fn request<'a>(session: &'a str, attrs: &'a BTreeMap<String, AttrValue>) -> Stage2Request<'a> {
    Stage2Request {
        agent_id: "tenant-acme",
        session_id: session,
        action_class: "model.inference.chat",
        host: "api.openai.com",
        path: "/v1/chat/completions",
        resource: "api.openai.com/v1/chat/completions",
        method: "POST",
        live_until: now_unix() + 3600,
        now: now_unix(),
        request: Some(attrs),
        usage: None,
        mcp: None,
    }
}

const WANT: Want = Want {
    input_tokens: 200,
    output_tokens: 512,
    cost_nano_usd: 340_000,
};

struct World {
    rt: tokio::runtime::Runtime,
    store: Arc<RedisStore>,
    counters: ActionCounters,
    ledger: Arc<UsageLedger>,
    genai: CompiledPolicies,
    llm: CompiledPolicies,
    _server: Server,
}

impl World {
    fn new() -> Self {
        let server = Server::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = SessionStoreConfig {
            backend: Backend::Redis,
            url: Some(format!("redis://127.0.0.1:{}", server.port)),
            ..SessionStoreConfig::default()
        };
        let store = rt.block_on(async {
            let s = RedisStore::connect(&cfg, None).expect("store");
            tokio::spawn(s.clone().maintain());
            s
        });
        Self {
            rt,
            store,
            counters: ActionCounters::new(),
            ledger: Arc::new(UsageLedger::open(None).expect("ledger")),
            genai: policies("policies/runtime/genai-app"),
            llm: policies("policies/runtime/llm"),
            _server: server,
        }
    }

    /// One counted decision (genai-app, no reservation).
    fn count_memory(&self, session: &str, a: &BTreeMap<String, AttrValue>) {
        let r = evaluate(&self.genai, &self.counters, &request(session, a));
        assert!(r.deny.is_none(), "{r:?}");
    }

    async fn count_redis(&self, session: &str, a: &BTreeMap<String, AttrValue>) {
        let (r, _) = evaluate_shared(&self.genai, &self.store, &request(session, a), None).await;
        assert!(r.deny.is_none(), "{r:?}");
    }

    /// One metered decision (llm bundle's budgets) taking a reservation, then released.
    fn reserve_memory(&self, session: &str, a: &BTreeMap<String, AttrValue>) {
        let (r, held) = evaluate_reserving(
            &self.llm,
            &self.counters,
            &request(session, a),
            &self.ledger,
            WANT,
        );
        assert!(r.deny.is_none(), "{r:?}");
        drop(black_box(held));
    }

    async fn reserve_redis(&self, session: &str, a: &BTreeMap<String, AttrValue>) {
        let (r, held) =
            evaluate_shared(&self.llm, &self.store, &request(session, a), Some(WANT)).await;
        assert!(r.deny.is_none(), "{r:?}");
        drop(black_box(held));
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let at = |p: f64| {
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    format!(
        "p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us",
        at(0.5),
        at(0.9),
        at(0.99)
    )
}

/// Percentiles of sequential decisions, and throughput of concurrent callers.
fn report(w: &Arc<World>) {
    const N: usize = 5_000;
    let a = attrs();
    let time = |f: &mut dyn FnMut()| {
        (0..N)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect::<Vec<_>>()
    };
    println!("session_store: {N} sequential decisions each");
    let m = time(&mut || w.count_memory("p-count", &a));
    println!("  count   memory  {}", percentiles(m));
    let r = time(&mut || w.rt.block_on(w.count_redis("p-count", &a)));
    println!("  count   redis   {}", percentiles(r));
    let m = time(&mut || w.reserve_memory("p-res", &a));
    println!("  reserve memory  {}", percentiles(m));
    let r = time(&mut || w.rt.block_on(w.reserve_redis("p-res", &a)));
    println!("  reserve redis   {}", percentiles(r));

    const CALLERS: usize = 64;
    const EACH: usize = 200;
    for shared in [false, true] {
        let t = Instant::now();
        w.rt.block_on(async {
            let tasks: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let w = w.clone();
                    tokio::spawn(async move {
                        let a = attrs();
                        let session = if shared {
                            "t-shared".to_string()
                        } else {
                            format!("t-{i}")
                        };
                        for _ in 0..EACH {
                            w.reserve_redis(&session, &a).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        let took = t.elapsed();
        println!(
            "  reserve redis, {CALLERS} concurrent callers on {}: {:.0} decisions/s",
            if shared {
                "one session"
            } else {
                "distinct sessions"
            },
            (CALLERS * EACH) as f64 / took.as_secs_f64()
        );
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..CALLERS {
            let w = &w;
            s.spawn(move || {
                let a = attrs();
                let session = format!("m-{i}");
                for _ in 0..EACH {
                    w.reserve_memory(&session, &a);
                }
            });
        }
    });
    println!(
        "  reserve memory, {CALLERS} concurrent threads on distinct sessions: {:.0} decisions/s",
        (CALLERS * EACH) as f64 / t.elapsed().as_secs_f64()
    );
}

fn session_store(c: &mut Criterion) {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP session_store bench: redis-server not installed (apt-get install redis-server)"
        );
        return;
    }
    let w = Arc::new(World::new());
    report(&w);
    let a = attrs();
    c.bench_function("session_store/count/memory", |b| {
        b.iter(|| w.count_memory("c-count", &a))
    });
    c.bench_function("session_store/count/redis", |b| {
        b.iter(|| w.rt.block_on(w.count_redis("c-count", &a)))
    });
    c.bench_function("session_store/reserve/memory", |b| {
        b.iter(|| w.reserve_memory("c-res", &a))
    });
    c.bench_function("session_store/reserve/redis", |b| {
        b.iter(|| w.rt.block_on(w.reserve_redis("c-res", &a)))
    });
}

criterion_group!(benches, session_store);
criterion_main!(benches);
