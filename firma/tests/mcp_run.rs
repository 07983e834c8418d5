//! MCP through `firma run` (transparent mode, real eBPF redirection), black-box: the real `mcp`
//! Python SDK on both ends, the FastMCP server (`firma/tests/mcp/server.py`) over TLS as `mcp.test`
//! at 10.77.0.2:443 inside the test's own network namespace, a hosts file in a private mount
//! namespace shared by `firma run` and its child (see `firma_testing::run`). Covers the
//! streamable HTTP transport and the legacy HTTP+SSE one with the shipped MCP rules and Cedar
//! example (`--rules`, `--policy`), a denied batch, and `--allow-mcp` / `--mcp-tools`. Each
//! check asserts what the client got, what the server executed and the audit event.
//! Needs root + BPF + python3 with `mcp`; prints SKIP otherwise.

use firma_testing::kernel::{DST_V4, in_fresh_netns};
use firma_testing::mcp::{python_has_mcp, script};
use firma_testing::process::Process;
use firma_testing::run::show;
use firma_testing::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const HOST: &str = "mcp.test";

/// The MCP server at 10.77.0.2:443 as `mcp.test`, a hosts file, a fresh state dir.
struct World {
    dir: tempfile::TempDir,
    hosts: PathBuf,
    state: PathBuf,
    server_ca: PathBuf,
    calls: PathBuf,
    _server: Process,
}

impl World {
    fn new() -> Option<Self> {
        if !python_has_mcp() {
            assert!(
                std::env::var("CI").is_err(),
                "python3 lacks the mcp SDK in CI (.ci/run installs it)"
            );
            eprintln!("SKIP mcp_run: python3 -m pip install mcp uvicorn");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path();
        let ca = pki::TestCa::new("firma test MCP CA");
        let leaf = ca.leaf(&[HOST]);
        let (cert, key) = (root.join("mcp.crt"), root.join("mcp.key"));
        std::fs::write(&cert, leaf.cert.pem()).unwrap();
        std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
        let server_ca = ca.write_pem(&root.join("mcp-ca.crt"));
        let calls = root.join("calls.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(script("server.py"))
            .arg(&cert)
            .arg(&key)
            .arg(&calls)
            .arg(format!("{DST_V4}:443"));
        let mut server = Process::spawn(cmd).expect("spawn server.py");
        server
            .wait_for("listening ", Duration::from_secs(30))
            .expect("MCP server up");
        let hosts = root.join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n::1 localhost\n{DST_V4} {HOST}\n"),
        )
        .unwrap();
        Some(Self {
            hosts,
            state: root.join("state"),
            server_ca,
            calls,
            dir,
            _server: server,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The shipped mapping rules plus the MCP example pointed at `mcp.test`; the MCP example
    /// policy plus a budget of 1 read_file per session, with the schema.
    fn rules_and_policy(&self) -> (PathBuf, PathBuf) {
        let shipped = std::fs::read_to_string(repo_root().join("policies/mapping-rules.toml"))
            .expect("shipped rules");
        let mcp = std::fs::read_to_string(repo_root().join("policies/mcp/mapping-rules.toml"))
            .expect("mcp rules")
            .replace("mcp.example.com", HOST);
        let rules = self.path("rules.toml");
        std::fs::write(&rules, format!("{shipped}\n{mcp}")).unwrap();
        let policy = self.path("policy");
        std::fs::create_dir_all(&policy).unwrap();
        std::fs::copy(
            repo_root().join("policies/firma.cedarschema"),
            policy.join("firma.cedarschema"),
        )
        .unwrap();
        std::fs::write(
            policy.join("mcp.cedar"),
            format!(
                "{}\nforbid (principal, action == Firma::Action::\"mcp.tools.call\", resource) when {{\n  context has mcp && context.mcp has name && context.mcp.name == \"read_file\" && context.action_count > 1\n}};\n",
                shipped_policy("runtime/mcp/mcp.cedar")
            ),
        )
        .unwrap();
        (rules, policy)
    }

    /// `firma run FIRMA_ARGS… -- sh -c SCRIPT` in the private mount namespace with the hosts file.
    fn run(&self, firma_args: &[&str], script: &str) -> Output {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind '{}' /etc/hosts && exec \"$@\"",
                self.hosts.display()
            ))
            .arg("sh")
            .arg(firma_bin())
            .arg("run")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--upstream-ca")
            .arg(&self.server_ca)
            // Debug builds on a loaded CI machine (tools/list filtering evaluates every tool).
            .arg("--enforcement-timeout-ms")
            .arg(
                firma_testing::config::TEST_CONSTRAINT_ENFORCEMENT
                    .1
                    .to_string(),
            )
            .args(firma_args)
            .args(["--", "sh", "-c", script])
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("SUDO_UID")
            .output()
            .expect("run firma")
    }

    /// The server's tool executions so far.
    fn executed(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("call log line"))
            .collect()
    }

    /// JSON lines a client wrote to `name`.
    fn lines(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn audit_events(file: &Path) -> Vec<serde_json::Value> {
    audit::lines(file).iter().map(|l| audit::json(l)).collect()
}

/// `python3 client.py URL - "$SSL_CERT_FILE" STEPS > OUT` (no proxy: transparent mode; the CA
/// of the run's MITM from the variable `firma run` sets).
fn client(url: &str, steps: &serde_json::Value, out: &Path) -> String {
    format!(
        "python3 '{}' '{url}' - \"$SSL_CERT_FILE\" '{steps}' > '{}'",
        script("client.py").display(),
        out.display()
    )
}

const STEPS: &str = r#"[["read_file", {"path": "/workspace/notes.md"}], ["read_file", {"path": "/etc/shadow"}], ["delete_repo", {"name": "org/app"}], ["read_file", {"path": "/workspace/second.md"}]]"#;

/// The checks of one SDK session (both transports): the tool list, each call's answer, what
/// the server ran (`before` executions were there already), and the audit.
fn session_checks(
    w: &World,
    lines: &[serde_json::Value],
    before: usize,
    audit: &[serde_json::Value],
    out: &Output,
) {
    assert_eq!(lines.len(), 5, "{lines:?}\n{}", show(out));
    assert_eq!(
        lines[0]["tools"],
        serde_json::json!(["read_file"]),
        "{lines:?}"
    );
    assert_eq!(lines[1]["ok"], true, "{lines:?}\n{}", show(out));
    assert_eq!(lines[1]["text"], "contents of /workspace/notes.md");
    for i in [2, 3, 4] {
        let e = lines[i]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            e.contains("Firma denied tools/call") && e.contains("PolicyDenied"),
            "{e}"
        );
        assert_eq!(lines[i]["code"], -32001, "{lines:?}");
    }
    assert!(lines[3]["error"].as_str().unwrap().contains("delete_repo"));
    let ran = w.executed();
    assert_eq!(ran.len(), before + 1, "only the allowed call ran: {ran:?}");
    assert_eq!(ran[before]["args"]["path"], "/workspace/notes.md");
    let calls: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|e| {
            e["event"] == "decision"
                && e["envelope"]["intent"]["request"]["mcp"]["method"] == "tools/call"
        })
        .collect();
    assert_eq!(calls.len(), 4, "{calls:?}");
    let expect = [
        ("read_file", "ALLOW", None),
        ("read_file", "DENY", Some("PolicyDenied")),
        ("delete_repo", "DENY", Some("PolicyDenied")),
        ("read_file", "DENY", Some("PolicyDenied")),
    ];
    for (e, (tool, outcome, reason)) in calls.iter().zip(expect) {
        let m = &e["envelope"]["intent"]["request"]["mcp"];
        assert_eq!(m["name"], tool, "{e}");
        assert_eq!(e["decision"]["outcome"], outcome, "{e}");
        if let Some(r) = reason {
            assert_eq!(e["decision"]["reason"], r, "{e}");
        }
        assert!(m["session_id"].is_string(), "{e}");
    }
    assert!(
        calls[3]["decision"]["detail"]
            .as_str()
            .unwrap()
            .contains("action_count = 2"),
        "the budget of 1: {}",
        calls[3]
    );
    let hidden: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|e| e["event"] == "outcome")
        .filter_map(|e| e["connector"]["mcp"]["tools_hidden"].as_array())
        .flatten()
        .collect();
    // (The SDK may list again before calling a tool it did not see.)
    assert!(
        !hidden.is_empty() && hidden.iter().all(|h| *h == "delete_repo"),
        "tools/list filtered: {hidden:?}"
    );
    // The summary names the MCP calls.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ALLOW MCP tools/call read_file"),
        "{}",
        show(out)
    );
    assert!(
        stderr.contains("DENY  MCP tools/call delete_repo PolicyDenied"),
        "{}",
        show(out)
    );
}

#[test]
fn streamable_http_legacy_sse_and_batches_through_firma_run() {
    if !in_fresh_netns("streamable_http_legacy_sse_and_batches_through_firma_run") {
        return;
    }
    let Some(w) = World::new() else { return };
    let (rules, policy) = w.rules_and_policy();
    let steps: serde_json::Value = serde_json::from_str(STEPS).unwrap();
    let mut args: Vec<String> = vec![
        "--rules".into(),
        rules.display().to_string(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    for a in [
        "mcp.session",
        "mcp.initialize",
        "mcp.notification",
        "mcp.tools.list",
        "mcp.tools.call",
        "mcp.other",
    ] {
        args.extend(["--action".to_string(), a.to_string()]);
    }

    // Streamable HTTP, then a batch with one denied member (curl, raw JSON-RPC).
    let audit1 = w.path("audit1.jsonl");
    let mut a1 = args.clone();
    a1.extend(["--audit".into(), audit1.display().to_string()]);
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo","arguments":{"name":"x"}}}]"#;
    let script = format!(
        "{} && curl -sS --max-time 10 -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' --data-binary '{batch}' https://{HOST}/mcp > '{}'",
        client(
            &format!("https://{HOST}/mcp"),
            &steps,
            &w.path("streamable.out")
        ),
        w.path("batch.out").display()
    );
    let refs: Vec<&str> = a1.iter().map(String::as_str).collect();
    let out = w.run(&refs, &script);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let events = audit_events(&audit1);
    session_checks(&w, &w.lines("streamable.out"), 0, &events, &out);
    // The batch: every id got Firma's error, nothing ran, each member audited.
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("batch.out")).unwrap())
            .unwrap_or_else(|e| panic!("batch answer: {e}\n{}", show(&out)));
    let members = b.as_array().unwrap_or_else(|| panic!("{b}"));
    assert_eq!(members.len(), 2, "{b}");
    assert!(members.iter().all(|m| m["error"]["code"] == -32001), "{b}");
    assert_eq!(w.executed().len(), 1, "the batch did not reach the server");
    let be = events
        .iter()
        .find(|e| e["envelope"]["intent"]["request"]["mcp"]["batch"].is_array())
        .expect("batch decision");
    assert_eq!(be["decision"]["outcome"], "DENY", "{be}");
    let bm = &be["envelope"]["intent"]["request"]["mcp"]["batch"];
    assert_eq!(bm[0]["decision"], "ALLOW", "{be}");
    assert_eq!(bm[1]["name"], "delete_repo", "{be}");
    assert_eq!(bm[1]["decision"], "DENY", "{be}");
    let (ok, report) = audit::verify(&audit1, &[&w.state.join("audit.pub")]);
    assert!(ok, "audit verify: {report}");

    // The legacy HTTP+SSE transport, in a second run (a fresh session and budget).
    let audit2 = w.path("audit2.jsonl");
    let mut a2 = args.clone();
    a2.extend(["--audit".into(), audit2.display().to_string()]);
    let refs: Vec<&str> = a2.iter().map(String::as_str).collect();
    let out = w.run(
        &refs,
        &client(
            &format!("https://{HOST}/sse"),
            &steps,
            &w.path("legacy.out"),
        ),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let events = audit_events(&audit2);
    session_checks(&w, &w.lines("legacy.out"), 1, &events, &out);
    let (ok, report) = audit::verify(&audit2, &[&w.state.join("audit.pub")]);
    assert!(ok, "audit verify: {report}");
}

#[test]
fn allow_mcp_and_mcp_tools_flags() {
    if !in_fresh_netns("allow_mcp_and_mcp_tools_flags") {
        return;
    }
    let Some(w) = World::new() else { return };
    let audit = w.path("audit.jsonl");
    let steps = serde_json::json!([
        ["read_file", {"path": "/workspace/a.md"}],
        ["delete_repo", {"name": "org/app"}],
    ]);
    let out = w.run(
        &[
            "--allow-mcp",
            &format!("https://{HOST}/mcp"),
            "--mcp-tools",
            "read_file,list_dir",
            "--audit",
            audit.to_str().unwrap(),
        ],
        &client(&format!("https://{HOST}/mcp"), &steps, &w.path("out")),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let lines = w.lines("out");
    assert_eq!(lines.len(), 3, "{lines:?}\n{}", show(&out));
    assert_eq!(
        lines[0]["tools"],
        serde_json::json!(["read_file"]),
        "{lines:?}"
    );
    assert_eq!(lines[1]["ok"], true, "{lines:?}");
    assert!(
        lines[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("PolicyDenied")),
        "{lines:?}"
    );
    let ran = w.executed();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0]["tool"], "read_file");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ALLOW MCP tools/call read_file"),
        "{}",
        show(&out)
    );
    assert!(
        stderr.contains("DENY  MCP tools/call delete_repo PolicyDenied"),
        "{}",
        show(&out)
    );
    let (ok, report) = audit::verify(&audit, &[&w.state.join("audit.pub")]);
    assert!(ok, "audit verify: {report}");

    // Malformed flags: exit 78 before anything is made.
    for bad in [
        vec!["--allow-mcp", "mcp.test/mcp"],
        vec!["--mcp-tools", "read_file"],
        vec![
            "--allow-mcp",
            "https://mcp.test/mcp",
            "--mcp-tools",
            "bad name",
        ],
    ] {
        let out = w.run(&bad, "true");
        assert_eq!(out.status.code(), Some(78), "{bad:?}: {}", show(&out));
    }
}
