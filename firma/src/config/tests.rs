use super::*;
use std::path::Path;

const AUTH: &str = r#"
[authority]
listen_addr = "[::1]:50051"
policy_dir = "/tmp/p"
issuance_policy_dir = "/tmp/i"
revocation_file = "/tmp/r.txt"
key_file = "/tmp/k.key"
max_ttl_seconds = 3600
bundle_ttl_seconds = 30
log_level = "info"
"#;

#[test]
fn parses_seed_authority_section() {
    let c = FirmaConfig::parse(AUTH, Path::new("firma.toml")).unwrap();
    assert_eq!(c.authority().unwrap().max_ttl_seconds, 3600);
    assert!(c.sidecar().is_err());
}

#[test]
fn unknown_key_names_file_and_key() {
    let text = AUTH.replace("log_level", "log_levle");
    let e = FirmaConfig::parse(&text, Path::new("/etc/firma.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/etc/firma.toml"), "{e}");
    assert!(e.contains("log_levle"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let text = AUTH.replace("max_ttl_seconds = 3600", "max_ttl_seconds = \"an hour\"");
    let e = FirmaConfig::parse(&text, Path::new("f.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("authority.max_ttl_seconds"), "{e}");
}

#[test]
fn audit_aggregation_rotation_and_watermark_keys() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    let a = &c.sidecar().unwrap().audit;
    assert_eq!(a.aggregate_denials_after, 20);
    assert_eq!(a.aggregate_window_secs, 10);
    assert_eq!(a.max_file_bytes, Some(104_857_600));
    assert_eq!(a.max_files, None);
    assert_eq!(a.free_space_warn_bytes, 1 << 30);
    let audit_line = "fsync = \"interval\"";
    assert!(text.contains(audit_line));
    for (extra, key, why) in [
        (
            "aggregate_window_secs = 0",
            "sidecar.audit.aggregate_window_secs",
            "1 to 3600",
        ),
        (
            "max_file_bytes = 100",
            "sidecar.audit.max_file_bytes",
            "at least 4096",
        ),
        ("max_files = 0", "sidecar.audit.max_files", "at least 1"),
        (
            "max_file_bytes = 1",
            "sidecar.audit.max_file_bytes",
            "at least 4096",
        ),
        ("max_filez = 3", "max_filez", ""),
    ] {
        let name = extra.split(" =").next().unwrap();
        let t: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{name} =")))
            .map(|l| {
                if l == audit_line {
                    format!("{l}\n{extra}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains(why) && e.contains("/etc/firma.toml"),
            "{extra}: {e}"
        );
    }
    // Rotation keys belong to the file sink; max_files needs max_file_bytes.
    let t = text
        .replace("sink = \"file\"", "sink = \"stdout\"")
        .replace(
            "max_file_bytes = 104857600\n",
            "max_file_bytes = 104857600\nmax_files = 3\n",
        );
    let e = FirmaConfig::parse(&t, Path::new("f.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sidecar.audit.max_file_bytes") && e.contains("sink = \"file\""),
        "{e}"
    );
    let t = text.replace("max_file_bytes = 104857600\n", "max_files = 3\n");
    let e = FirmaConfig::parse(&t, Path::new("f.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sidecar.audit.max_files") && e.contains("max_file_bytes"),
        "{e}"
    );
}

#[test]
fn shipped_example_config_parses() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    let s = c.sidecar().unwrap();
    assert_eq!(s.credentials.len(), 2);
    assert!(s.vault().is_some());
    assert_eq!(s.interceptor.transparent.workloads.len(), 1);
    assert_eq!(c.authority().unwrap().bundle_ttl_seconds, 30);
}

#[test]
fn dns_guard_section_defaults_and_errors() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    let s = c.sidecar().unwrap();
    assert!(s.interceptor.transparent.redirect_dns);
    assert_eq!(s.dns.port, 15053);
    assert_eq!(s.dns.allow, ["pypi.org", "*.pythonhosted.org"]);
    for (bad, key) in [
        ("allow = [\"a.*.example\"]", "sidecar.dns.allow[0]"),
        (
            "upstream = [\"resolver.example\"]",
            "sidecar.dns.upstream[0]",
        ),
        ("port = 15001", "sidecar.dns.port"),
        ("queries_per_second = 0", "sidecar.dns.queries_per_second"),
    ] {
        // Replace the key's line in [sidecar.dns] (keys are unique there).
        let name = bad.split(" =").next().unwrap();
        let mut in_dns = false;
        let t: Vec<&str> = text
            .lines()
            .map(|l| {
                if l.starts_with('[') {
                    in_dns = l == "[sidecar.dns]";
                }
                if in_dns && l.starts_with(&format!("{name} =")) {
                    bad
                } else {
                    l
                }
            })
            .collect();
        let t = t.join("\n");
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("/etc/firma.toml"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn mitm_fallback_is_opt_in_and_validated() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    assert!(
        c.sidecar()
            .unwrap()
            .interceptor
            .https_mitm
            .fallback_hosts
            .is_empty(),
        "the shipped example keeps the fallback off"
    );
    for (line, needle) in [
        (
            "fallback_hosts = [\"api.acme-vendor.com\"]",
            "also in strict_hosts",
        ),
        ("fallback_hosts = [\"a.*.example\"]", "expected a host name"),
    ] {
        let t = text.replace("fallback_hosts = []", line);
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sidecar.interceptor.https_mitm.fallback_hosts[0]") && e.contains(needle),
            "{line}: {e}"
        );
    }
}

#[test]
fn credential_strip_lists_and_error_format_are_validated() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    let s = c.sidecar().unwrap();
    assert_eq!(
        s.credentials[0].strip_headers.as_deref(),
        Some(&["authorization", "x-api-key", "api-key", "x-goog-api-key"].map(String::from)[..])
    );
    assert_eq!(
        s.connector.hosts[0].error_format,
        Some(firma_sidecar::config::ErrorFormat::Openai)
    );
    for (from, to, key) in [
        (
            "strip_headers = [\"authorization\",",
            "strip_headers = [\"bad header\",",
            "sidecar.credentials[0].strip_headers[0]",
        ),
        (
            "strip_query_params = [\"key\",",
            "strip_query_params = [\"a=b\",",
            "sidecar.credentials[0].strip_query_params[0]",
        ),
        (
            "error_format = \"openai\"",
            "error_format = \"gemini\"",
            "error_format",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let t = text.replacen(from, to, 1);
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("/etc/firma.toml"),
            "{to}: {e}"
        );
    }
}

#[test]
fn llm_reserve_output_tokens_default_and_errors() {
    let text = include_str!("../../../policies/firma.toml");
    let c = FirmaConfig::parse(text, Path::new("policies/firma.toml")).unwrap();
    assert_eq!(c.sidecar().unwrap().llm.reserve_output_tokens(), 32768);
    let without = text.replace("reserve_output_tokens = 32768\n", "");
    let c = FirmaConfig::parse(&without, Path::new("f.toml")).unwrap();
    assert_eq!(c.sidecar().unwrap().llm.reserve_output_tokens(), 32768);
    for bad in ["0", "-5"] {
        let t = text.replace(
            "reserve_output_tokens = 32768",
            &format!("reserve_output_tokens = {bad}"),
        );
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sidecar.llm.reserve_output_tokens") && e.contains("/etc/firma.toml"),
            "{bad}: {e}"
        );
    }
}

/// The `firma.toml` embedded in a ConfigMap of `deploy/kubernetes/` (the block under
/// `  firma.toml: |`, 4-space indented).
fn manifest_config(yaml: &str) -> String {
    let start = yaml.find("  firma.toml: |\n").expect("firma.toml block") + 16;
    yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn kubernetes_manifest_configs_parse() {
    let node = manifest_config(include_str!(
        "../../../deploy/kubernetes/20-node-agent.yaml"
    ));
    let c = FirmaConfig::parse(&node, Path::new("20-node-agent.yaml")).unwrap();
    let s = c.sidecar().unwrap();
    let n = s.node.as_ref().expect("[sidecar.node]");
    assert_eq!(n.cri_socket, Path::new("/run/containerd/containerd.sock"));
    assert!(s.interceptor.transparent.redirect_address.is_some());
    let auth = manifest_config(include_str!("../../../deploy/kubernetes/10-authority.yaml"));
    let c = FirmaConfig::parse(&auth, Path::new("10-authority.yaml")).unwrap();
    assert!(c.authority().unwrap().tls_cert_path.is_some());
}

#[test]
fn node_agent_keys_are_validated() {
    let node = manifest_config(include_str!(
        "../../../deploy/kubernetes/20-node-agent.yaml"
    ));
    for (from, to, key) in [
        (
            "redirect_address = \"10.244.0.1\"",
            "redirect_address = \"127.0.0.1\"",
            "sidecar.interceptor.transparent.redirect_address",
        ),
        (
            "redirect_dns = false",
            "redirect_dns = true",
            "sidecar.interceptor.transparent.redirect_dns",
        ),
        (
            "mode = \"transparent\"",
            "mode = \"http_proxy\"\nlisten_addr = \"127.0.0.1:8080\"",
            "sidecar.node",
        ),
        (
            "resync_interval_ms = 1000",
            "resync_interval_ms = 0",
            "sidecar.node.resync_interval_ms",
        ),
        (
            "cri_socket = \"/run/containerd/containerd.sock\"",
            "cri_socket = \"containerd.sock\"",
            "sidecar.node.cri_socket",
        ),
        ("resync_interval_ms = 1000", "resync = 1000", "resync"),
    ] {
        assert!(node.contains(from), "{from}");
        let t = node.replace(from, to);
        let e = FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("/etc/firma.toml"),
            "{to}: {e}"
        );
    }
}

#[test]
fn ext_authz_section_parses_and_validates() {
    let shipped = include_str!("../../../policies/firma.toml");
    // The commented example in policies/firma.toml, uncommented, is valid.
    let example: String = shipped
        .lines()
        .skip_while(|l| !l.starts_with("# [sidecar.ext_authz]"))
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(example.contains("listen_addr"), "{example}");
    let c = FirmaConfig::parse(&format!("{shipped}\n{example}"), Path::new("f.toml")).unwrap();
    let x = c.sidecar().unwrap().ext_authz.as_ref().expect("ext_authz");
    assert_eq!(x.listen_addr, "127.0.0.1:9191");
    assert!(x.upstream_tls);
    assert_eq!(x.principals[0].agent_id, "research-agent");
    for (bad, key) in [
        (
            example.replace("127.0.0.1:9191", "localhost"),
            "sidecar.ext_authz.listen_addr",
        ),
        (
            example.replace("agent_id = \"research-agent\"", "agent_id = \"\""),
            "sidecar.ext_authz.principals",
        ),
        (
            example.replace("upstream_tls", "upstream_tsl"),
            "upstream_tsl",
        ),
    ] {
        let e = FirmaConfig::parse(&format!("{shipped}\n{bad}"), Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn audit_grpc_urls_list_collectors_in_failover_order_and_are_validated() {
    let text = include_str!("../../../policies/firma.toml");
    let with = |audit: &str| {
        let t = text
            .replace(
                "sink = \"file\"\npath = \"/var/log/firma/audit.jsonl\"\n",
                audit,
            )
            .replace("max_file_bytes = 104857600\n", "");
        assert_ne!(t, text, "the example's [sidecar.audit] moved");
        FirmaConfig::parse(&t, Path::new("/etc/firma.toml"))
    };
    let c = with(
        "sink = \"grpc\"\ngrpc_url = \"http://127.0.0.1:9090\"\ngrpc_urls = [\"http://127.0.0.1:9091\", \"https://c.example:9092\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.sidecar().unwrap().audit.collector_urls(),
        [
            "http://127.0.0.1:9090",
            "http://127.0.0.1:9091",
            "https://c.example:9092"
        ]
    );
    // grpc_urls alone is enough for sink = "grpc".
    let c = with("sink = \"grpc\"\ngrpc_urls = [\"http://127.0.0.1:9091\"]\n").unwrap();
    assert_eq!(c.sidecar().unwrap().audit.collector_urls().len(), 1);
    for (audit, why) in [
        (
            "sink = \"grpc\"\ngrpc_url = \"http://127.0.0.1:9090\"\ngrpc_urls = [\"http://127.0.0.1:9090\"]\n",
            "twice",
        ),
        (
            "sink = \"grpc\"\ngrpc_urls = [\"127.0.0.1:9091\"]\n",
            "http://HOST:PORT",
        ),
        (
            "sink = \"grpc\"\ngrpc_urls = [\"http://127.0.0.1\"]\n",
            "http://HOST:PORT",
        ),
        (
            "sink = \"file\"\npath = \"/var/log/firma/audit.jsonl\"\ngrpc_urls = [\"http://127.0.0.1:9091\"]\n",
            "only with sink = \"grpc\"",
        ),
    ] {
        let e = with(audit).unwrap_err().to_string();
        assert!(
            e.contains("sidecar.audit.grpc_urls")
                && e.contains(why)
                && e.contains("/etc/firma.toml"),
            "{audit}: {e}"
        );
    }
    let e = with("sink = \"grpc\"\ngrpc_urls = []\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sidecar.audit.grpc_url"), "{e}");
}
