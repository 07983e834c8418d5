//! The destination binding's cost per request (`connector::binding`): the port check against the
//! mapping rules, the cached name lookup and the address comparison, as a transparent-mode
//! keep-alive request pays them (cache hit). `cargo bench -p firma-sidecar --bench binding`.
//! Compare with a keep-alive request through the sidecar (docs/benchmarks.md).

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use firma_sidecar::connector::binding::{BindRequest, Binder};
use firma_sidecar::pipeline::mapping::MappingRules;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

fn binding(c: &mut Criterion) {
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let rules = MappingRules::load(&[repo.join("policies/mapping-rules.toml")]).expect("rules");
    let binder = Binder::new(Arc::new(rules));
    let ips: Arc<[IpAddr]> = vec![
        "162.159.140.245".parse().unwrap(),
        "172.66.0.243".parse().unwrap(),
    ]
    .into();
    binder.resolver().insert("api.openai.com", ips);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let claimed: SocketAddr = "172.66.0.243:443".parse().unwrap();
    let req = BindRequest {
        name: Some("api.openai.com"),
        port: 443,
        claimed: Some(claimed),
        configured: None,
    };
    // Sanity: the bench measures the allowed path.
    assert_eq!(rt.block_on(binder.bind(req)).expect("bound"), claimed);
    c.bench_function("binding/transparent_cached_allow", |b| {
        b.iter(|| rt.block_on(binder.bind(black_box(req))))
    });
    // A mismatch refreshes the name at most once a second; `localhost` resolves from
    // /etc/hosts, so the bench never sends a DNS query.
    let local: Arc<[IpAddr]> = vec!["127.0.0.1".parse().unwrap()].into();
    binder.resolver().insert("localhost", local);
    let bad = BindRequest {
        name: Some("localhost"),
        claimed: Some("127.0.0.66:443".parse().unwrap()),
        ..req
    };
    assert!(rt.block_on(binder.bind(bad)).is_err());
    c.bench_function("binding/transparent_cached_mismatch", |b| {
        b.iter(|| rt.block_on(binder.bind(black_box(bad))))
    });
}

/// Short runs: the cached answer must stay fresh (30 s) for the whole allow measurement.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = binding
}
criterion_main!(benches);
