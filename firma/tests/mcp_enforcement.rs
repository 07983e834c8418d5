//! MCP-aware enforcement end to end (docs/mcp.md): the real `mcp` Python SDK on both ends (an
//! MCP server with `read_file(path)` and `delete_repo(name)` over TLS on `mcp.test`, and an SDK
//! client session), through the real `firma sidecar` in http_proxy mode (MITM), with the
//! shipped MCP mapping rule and Cedar example. Each check asserts what the client got, what the
//! server executed (its call log) and the audit event (method, tool, reason).

use firma_testing::client::*;
use firma_testing::mcp::{python_has_mcp, script};
use firma_testing::sidecar::*;
use firma_testing::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const HOST: &str = "mcp.test";

struct Env {
    d: Deployment,
    sc: Sidecar,
    _server: process::Process,
    calls: PathBuf,
    token: String,
}

impl Env {
    /// The server's executions so far: (tool, args).
    fn executed(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("call log line"))
            .collect()
    }

    /// Decision events for the MCP endpoint that carry a tools/call.
    fn tool_decisions(&self) -> Vec<serde_json::Value> {
        self.d
            .audit_for(HOST)
            .into_iter()
            .filter(|e| e["envelope"]["intent"]["request"]["mcp"]["method"] == "tools/call")
            .collect()
    }

    /// `outcome` events whose `connector.mcp` says what an answer contained.
    fn followed(&self) -> Vec<serde_json::Value> {
        self.d
            .audit()
            .into_iter()
            .filter(|e| e["event"] == "outcome" && e["connector"]["mcp"].is_object())
            .map(|e| e["connector"]["mcp"].clone())
            .collect()
    }

    /// Runs the SDK client with `steps` on one session at `path` (`/mcp`: streamable HTTP,
    /// `/sse`: the legacy HTTP+SSE transport); its JSON lines.
    fn client_at(&self, path: &str, steps: serde_json::Value) -> Vec<serde_json::Value> {
        let out = Command::new("python3")
            .arg(script("client.py"))
            .arg(format!("https://{HOST}{path}"))
            .arg(self.sc.proxy_url())
            .arg(self.d.ca_cert())
            .arg(steps.to_string())
            .env("FIRMA_CAPABILITY", &self.token)
            .output()
            .expect("run client.py");
        assert!(
            out.status.success(),
            "client failed: {}\n{}\nsidecar:\n{}\naudit:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.sc.log_text(),
            self.d.audit_text()
        );
        text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("client line"))
            .collect()
    }

    /// POST `body` to the MCP endpoint with curl through the proxy: (status, body).
    fn post(&self, body: &[u8], headers: &[&str]) -> CurlOut {
        let f = self.d.root().join("body.json");
        std::fs::write(&f, body).unwrap();
        let mut args: Vec<String> = vec![
            "-H".into(),
            "content-type: application/json".into(),
            "-H".into(),
            "accept: application/json, text/event-stream".into(),
            "-H".into(),
            format!("x-firma-capability: {}", self.token),
        ];
        for h in headers {
            args.extend(["-H".to_string(), (*h).to_string()]);
        }
        args.extend(["--data-binary".into(), format!("@{}", f.display())]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(
            &self.sc.proxy_url(),
            &self.d.ca_cert(),
            &format!("https://{HOST}/mcp"),
            &refs,
        )
    }
}

fn setup() -> Option<Env> {
    setup_with("server.py")
}

/// The deployment with `server` (a script in `tests/mcp/` taking CERT KEY CALLS_LOG and
/// printing `listening PORT`) as `mcp.test`.
fn setup_with(server: &str) -> Option<Env> {
    if !python_has_mcp() {
        assert!(
            std::env::var("CI").is_err(),
            "python3 lacks the mcp SDK in CI (.ci/run installs it)"
        );
        eprintln!("SKIP mcp_enforcement: python3 -m pip install mcp uvicorn");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    std::mem::forget(tmp);
    // The server's certificate for mcp.test, from a CA the sidecar is told to trust.
    let ca = pki::TestCa::new("firma test MCP CA");
    let leaf = ca.leaf(&[HOST]);
    let (cert, key) = (root.join("mcp.crt"), root.join("mcp.key"));
    std::fs::write(&cert, leaf.cert.pem()).unwrap();
    std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
    let ca_path = ca.write_pem(&root.join("mcp-ca.crt"));
    let calls = root.join("calls.jsonl");
    let mut cmd = Command::new("python3");
    cmd.arg(script(server)).arg(&cert).arg(&key).arg(&calls);
    let mut server = process::Process::spawn(cmd).expect("spawn the MCP server");
    server
        .wait_for("listening ", Duration::from_secs(30))
        .expect("MCP server up");
    let port: u16 = server.logged("listening ").expect("port");

    // The shipped MCP rule, pointed at the test host, after the shipped rules.
    let shipped = std::fs::read_to_string(repo_root().join("policies/mapping-rules.toml")).unwrap();
    let mcp_rules = std::fs::read_to_string(repo_root().join("policies/mcp/mapping-rules.toml"))
        .unwrap()
        .replace("mcp.example.com", HOST);
    let rules = root.join("rules.toml");
    std::fs::write(&rules, format!("{shipped}\n{mcp_rules}")).unwrap();

    // A per-tool budget of 1 read_file per session on top of the shipped example.
    let policy = format!(
        "{}\nforbid (principal, action == Firma::Action::\"mcp.tools.call\", resource) when {{\n  context has mcp && context.mcp has name && context.mcp.name == \"read_file\" && context.action_count > 1\n}};\n",
        shipped_policy("runtime/mcp/mcp.cedar")
    );
    let s = Settings {
        intercept_hosts: vec![HOST.into()],
        strict_hosts: Vec::new(),
        upstream_hosts: Vec::new(),
        runtime_policy: policy,
        extra: "[sidecar.mcp]\nmax_body_bytes = 65536\n".into(),
        ..Settings::default()
    };
    let d = Deployment::new(None, &s);
    let mut t = d.toml(None, &s);
    t.rules_path = rules;
    t.extra_root_certs = vec![ca_path];
    t.hosts = vec![firma_testing::config::HostRoute {
        host: HOST.into(),
        address: format!("127.0.0.1:{port}").parse().unwrap(),
        extra: String::new(),
    }];
    t.write(&d.config).unwrap();
    let actions = [
        "mcp.tools.call",
        "mcp.tools.list",
        "mcp.initialize",
        "mcp.notification",
        "mcp.other",
        "mcp.session",
    ];
    let out = d.root().join("mcp-seed.toml");
    issue_seed(
        &firma_bin(),
        &d.config,
        "agent-mcp",
        "mcp-s1",
        &actions,
        "*",
        600,
        &out,
    )
    .unwrap();
    let seed: toml::Value = toml::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let token = seed["raw_token"].as_str().unwrap().to_owned();
    let sc = d.start(&[]);
    Some(Env {
        d,
        sc,
        _server: server,
        calls,
        token,
    })
}

#[test]
fn sdk_session_tool_and_argument_rules_budget_and_audit() {
    let Some(env) = setup() else { return };
    sdk_session_checks(&env, "/mcp");
}

/// The legacy HTTP+SSE transport (GET /sse + POST /messages/?session_id=), through the proxy:
/// the answers, the tool list and the denials travel on the GET stream.
#[test]
fn legacy_sse_transport_through_the_proxy() {
    let Some(env) = setup() else { return };
    sdk_session_checks(&env, "/sse");
}

/// The checks of one SDK session on `path`: tools/list filtered, read_file under /workspace
/// allowed, /etc/shadow denied by the argument rule, delete_repo denied, the second read_file
/// over the budget of 1 denied; what the server ran; the audit.
fn sdk_session_checks(env: &Env, path: &str) {
    let lines = env.client_at(
        path,
        serde_json::json!([
            ["read_file", {"path": "/workspace/notes.md"}],
            ["read_file", {"path": "/etc/shadow"}],
            ["delete_repo", {"name": "org/app"}],
            ["read_file", {"path": "/workspace/second.md"}],
        ]),
    );
    // tools/list as the client sees it: delete_repo (forbidden whatever its arguments) is gone,
    // read_file (permitted for some paths) stays.
    assert_eq!(
        lines[0]["tools"],
        serde_json::json!(["read_file"]),
        "{lines:?}\noutcomes: {:?}",
        env.d
            .audit()
            .into_iter()
            .filter(|e| e["event"] == "outcome")
            .map(|e| e["connector"].clone())
            .collect::<Vec<_>>()
    );
    let hidden = assert_eventually(Duration::from_secs(10), "tools/list followed", || {
        env.followed()
            .into_iter()
            .find(|m| m["tools_hidden"].as_array().is_some_and(|h| !h.is_empty()))
    });
    assert_eq!(hidden["tools_hidden"], serde_json::json!(["delete_repo"]));
    let by = |i: usize| &lines[i + 1];
    // Allowed: the server ran it, the client got its result.
    assert_eq!(by(0)["ok"], true, "{lines:?}\n{}", env.sc.log_text());
    assert_eq!(by(0)["text"], "contents of /workspace/notes.md");
    // Argument rule: the SDK raises the JSON-RPC error naming Firma's reason, and the
    // session goes on (the next calls still get answers on it).
    for i in [1, 2, 3] {
        let e = by(i)["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            e.contains("Firma denied tools/call") && e.contains("PolicyDenied"),
            "{e}"
        );
        assert_eq!(by(i)["code"], -32001, "{lines:?}");
    }
    assert!(by(2)["error"].as_str().unwrap().contains("delete_repo"));
    // Only the allowed call reached the server.
    let ran = env.executed();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0]["args"]["path"], "/workspace/notes.md");

    let ev = assert_eventually(Duration::from_secs(10), "4 tools/call decisions", || {
        Some(env.tool_decisions()).filter(|v| v.len() >= 4)
    });
    let mcp = |i: usize| &ev[i]["envelope"]["intent"]["request"]["mcp"];
    let expect = [
        ("read_file", "ALLOW"),
        ("read_file", "DENY"),
        ("delete_repo", "DENY"),
        ("read_file", "DENY"),
    ];
    for (i, (tool, outcome)) in expect.iter().enumerate() {
        assert_eq!(mcp(i)["name"], *tool, "{}", ev[i]);
        assert_eq!(ev[i]["decision"]["outcome"], *outcome, "{}", ev[i]);
        assert!(mcp(i)["id"].is_i64(), "{}", ev[i]);
        assert!(
            mcp(i)["session_id"].is_string(),
            "Mcp-Session-Id: {}",
            ev[i]
        );
        assert_eq!(mcp(i)["argument_keys"].as_array().unwrap().len(), 1);
        assert!(mcp(i)["arguments_sha256"].is_string());
        assert!(
            mcp(i).get("arguments").is_none(),
            "values are off by default"
        );
        assert_eq!(
            ev[i]["envelope"]["intent"]["action_class"],
            "mcp.tools.call"
        );
    }
    assert!(
        !env.d.audit_text().contains("/etc/shadow"),
        "argument values not in the audit"
    );
    assert_eq!(ev[1]["decision"]["reason"], "PolicyDenied");
    assert_eq!(ev[2]["decision"]["reason"], "PolicyDenied");
    assert!(
        ev[3]["decision"]["detail"]
            .as_str()
            .unwrap()
            .contains("action_count = 2"),
        "the budget of 1 read_file: {}",
        ev[3]
    );
    // The allowed call's result was followed: not an error.
    let results = assert_eventually(Duration::from_secs(10), "results followed", || {
        let r: Vec<serde_json::Value> = env
            .followed()
            .into_iter()
            .flat_map(|m| m["results"].as_array().cloned().unwrap_or_default())
            .collect();
        Some(r).filter(|r| r.len() >= 3)
    });
    assert!(results.iter().all(|r| r["error"] == false), "{results:?}");
    let (ok, report) = audit::verify(&env.d.audit_path, &[&env.d.root().join("audit.pub")]);
    assert!(ok, "audit verify: {report}");
}

/// The documented rule for server-initiated messages Firma cannot classify (docs/mcp.md,
/// "Following responses"), on the GET event stream of the streamable HTTP transport from a
/// real HTTP server (`firma/tests/mcp/server_stream.py`): a request with duplicate `method` keys,
/// one with a method outside the character set and an event that is not JSON are dropped (the
/// client never receives them); a well-formed request (its lines ending in a bare `\r`) and a
/// notification pass byte for byte; the `outcome` event counts what passed and what was
/// dropped.
#[test]
fn unclassifiable_server_messages_on_the_get_stream_are_dropped() {
    let Some(env) = setup_with("server_stream.py") else {
        return;
    };
    let capability = format!("x-firma-capability: {}", env.token);
    let out = curl(
        &env.sc.proxy_url(),
        &env.d.ca_cert(),
        &format!("https://{HOST}/mcp"),
        &["-N", "-H", "accept: text/event-stream", "-H", &capability],
    );
    assert_eq!(out.status, 200, "{out:?}\n{}", env.sc.log_text());
    // What the client received: exactly the two readable events, unchanged.
    assert_eq!(
        out.body,
        concat!(
            "event: message\rdata: {\"jsonrpc\":\"2.0\",\"id\":\"s3\",\"method\":\"roots/list\"}\r\r",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",",
            "\"params\":{\"level\":\"info\",\"data\":\"stream done\"}}\r\n\r\n"
        ),
        "{out:?}"
    );
    // The server sent them all on the one GET it received.
    assert_eq!(
        env.executed(),
        vec![serde_json::json!({"method": "GET", "path": "/mcp"})]
    );
    // The audit: the GET was decided as the endpoint's other traffic and allowed; its
    // `outcome` says what the stream carried.
    let get = assert_eventually(Duration::from_secs(10), "the GET's decision", || {
        env.d.audit_for(HOST).into_iter().next()
    });
    assert_eq!(
        get["envelope"]["intent"]["action_class"], "mcp.session",
        "{get}"
    );
    assert_eq!(get["decision"]["outcome"], "ALLOW", "{get}");
    let followed = assert_eventually(Duration::from_secs(10), "the stream's outcome", || {
        env.followed().into_iter().next()
    });
    assert_eq!(followed["dropped"], 3, "{followed}");
    assert_eq!(
        followed["server_requests"],
        serde_json::json!(["roots/list"]),
        "{followed}"
    );
    assert_eq!(followed["notifications"], 1, "{followed}");
    assert_eq!(followed["result_count"], 0, "{followed}");
    assert!(followed.get("stopped").is_none(), "{followed}");
    let (ok, report) = audit::verify(&env.d.audit_path, &[&env.d.root().join("audit.pub")]);
    assert!(ok, "audit verify: {report}");
}

#[test]
fn hostile_bodies_are_refused_before_the_server() {
    let Some(env) = setup() else { return };
    let cases: [(&[u8], &str); 6] = [
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","name":"delete_repo","arguments":{"name":"x"}}}"#,
            "duplicate key",
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"delete_repo"}}"#,
            "case variant",
        ),
        (
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_repo","arguments":{"name":"x"}}}"#,
            "only notifications",
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"}}"#,
            "not valid JSON",
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":["/etc/shadow"]}}}"#,
            "must be a string",
        ),
        (b"not json at all", "not valid JSON"),
    ];
    for (body, why) in cases {
        let out = env.post(body, &[]);
        assert_eq!(out.status, 400, "{out:?}");
        assert!(out.body.contains(why), "{why}: {out:?}");
        assert!(
            out.body.contains("\"jsonrpc\":\"2.0\""),
            "a JSON-RPC error: {out:?}"
        );
    }
    // More of the same (duplicate method, a unicode-escaped case variant, deep nesting).
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read_file","arguments":{{"path":"/workspace/a","x":{}1{}}}}}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    for (body, why) in [
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"delete_repo"}}"#.to_vec(),
            "duplicate key",
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"\u0054ools/call","params":{"name":"delete_repo"}}"#.to_vec(),
            "case variant",
        ),
        (deep.into_bytes(), "levels deep"),
    ] {
        let out = env.post(&body, &[]);
        assert_eq!(out.status, 400, "{out:?}");
        assert!(out.body.contains(why), "{why}: {out:?}");
    }
    // A unicode-escaped method is the method the server reads: `tools\u002fcall` of delete_repo
    // is decided as tools/call delete_repo (denied by the policy, not passed as "other").
    let out = env.post(
        br#"{"jsonrpc":"2.0","id":5,"method":"tools\u002fcall","params":{"name":"delete\u005frepo","arguments":{"name":"x"}}}"#,
        &[],
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        out.body.contains("Firma denied tools/call delete_repo")
            && out.body.contains("PolicyDenied"),
        "{out:?}"
    );
    // gzip: the policy would decide on bytes the server decodes differently.
    let out = env.post(b"\x1f\x8b\x08\x00", &["content-encoding: gzip"]);
    assert_eq!(out.status, 400, "{out:?}");
    assert!(out.body.contains("Content-Encoding"), "{out:?}");
    // Over `[sidecar.mcp] max_body_bytes` (64 KiB here): 413 from the shared body reader.
    let giant = format!(
        r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"read_file","arguments":{{"path":"/workspace/{}"}}}}}}"#,
        "a".repeat(70_000)
    );
    let out = env.post(giant.as_bytes(), &[]);
    assert_eq!(out.status, 413, "{out:?}");
    assert!(out.body.contains("BodyTooLarge"), "{out:?}");
    assert!(out.body.contains("[sidecar.mcp] max_body_bytes"), "{out:?}");
    // A batch with one denied member is denied whole: every id gets an error.
    let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo","arguments":{"name":"x"}}}]"#;
    let out = env.post(batch, &[]);
    assert_eq!(out.status, 200, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|m| m["error"]["code"] == -32001),
        "{v}"
    );
    // HTTP/2 with the body split over DATA frames (a real h2 client): decided on the whole
    // body, as the server reads it.
    let pieces = serde_json::json!([
        r#"{"jsonrpc":"2.0","id":11,"me"#,
        r#"thod":"tools/call","params":{"name":"dele"#,
        r#"te_repo","arguments":{"name":"org/app"}}}"#
    ]);
    let out = Command::new("python3")
        .arg(script("h2_split.py"))
        .arg(format!("https://{HOST}/mcp"))
        .arg(env.sc.proxy_url())
        .arg(env.d.ca_cert())
        .arg(pieces.to_string())
        .env("FIRMA_CAPABILITY", &env.token)
        .output()
        .expect("run h2_split.py");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let h2: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(h2["http_version"], "HTTP/2", "{h2}");
    assert_eq!(h2["status"], 200, "{h2}");
    let body = h2["body"].as_str().unwrap();
    assert!(
        body.contains("Firma denied tools/call delete_repo") && body.contains("\"id\":11"),
        "{h2}"
    );
    assert!(
        env.executed().is_empty(),
        "nothing executed: {:?}",
        env.executed()
    );

    let n = 14;
    let ev = assert_eventually(Duration::from_secs(10), "every attempt audited", || {
        Some(env.d.audit_for(HOST)).filter(|v| v.len() >= n)
    });
    // 0..6 the first cases, 6..9 duplicate method / case variant / depth, 10 gzip.
    for e in ev[..9].iter().chain(&ev[10..11]) {
        assert_eq!(e["decision"]["reason"], "MalformedRequest", "{e}");
    }
    // The unicode-escaped tools/call: classified as the server reads it.
    assert_eq!(ev[9]["decision"]["reason"], "PolicyDenied", "{}", ev[9]);
    assert_eq!(
        ev[9]["envelope"]["intent"]["request"]["mcp"]["method"],
        "tools/call"
    );
    assert_eq!(
        ev[9]["envelope"]["intent"]["request"]["mcp"]["name"],
        "delete_repo"
    );
    assert_eq!(ev[11]["decision"]["reason"], "BodyTooLarge", "{}", ev[11]);
    let h2e = &ev[13];
    assert_eq!(h2e["decision"]["reason"], "PolicyDenied", "{h2e}");
    assert_eq!(
        h2e["envelope"]["intent"]["request"]["mcp"]["name"],
        "delete_repo"
    );
    assert_eq!(h2e["envelope"]["intent"]["request"]["mcp"]["id"], 11);
    let b = &ev[12];
    assert_eq!(b["decision"]["outcome"], "DENY");
    let members = &b["envelope"]["intent"]["request"]["mcp"]["batch"];
    assert_eq!(members[0]["decision"], "ALLOW", "{b}");
    assert_eq!(members[1]["decision"], "DENY", "{b}");
    assert_eq!(members[1]["name"], "delete_repo", "{b}");
    let (ok, report) = audit::verify(&env.d.audit_path, &[&env.d.root().join("audit.pub")]);
    assert!(ok, "audit verify: {report}");
}
