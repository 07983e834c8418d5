//! Real agents, unchanged, under `firma run`: the official `openai` and `anthropic` Python
//! SDKs and the `openai` npm package, each constructed the way their README shows (no key
//! argument: `OpenAI()`, `Anthropic()`, `new OpenAI()`), in a fresh network namespace with the
//! local HTTPS upstream posing as api.openai.com, api.anthropic.com and api.acme-vendor.com
//! (`firma_testing::run::RunWorld`). The runtime policy is the shipped LLM policy
//! (`policies/runtime/llm`: model allow-list, max_tokens cap) plus `--allow-host
//! api.acme-vendor.com`.
//!
//! Per SDK: the client starts with the placeholder Firma gives it (docs/run.md, "Placeholder
//! credentials"); the call succeeds and the upstream saw Firma's credential only (no
//! placeholder, no header of the agent's own); streaming works through the SDK's streaming API;
//! a policy denial raises the SDK's permission error whose text names the Firma reason, once
//! (no retry); the placeholder sent to another allowed host is denied `CredentialLeak`,
//! audited, and never reaches it. Needs root + BPF (prints SKIP otherwise) and the SDKs
//! (`.ci/run` installs them; a missing SDK fails the test).

use firma_testing::kernel::in_fresh_netns;
use firma_testing::run::{RunWorld, show};
use firma_testing::{repo_root, text};
use std::path::PathBuf;
use std::process::Output;

const OPENAI_KEY: &str = "sk-real-openai-9c41d";
const ANTHROPIC_KEY: &str = "sk-ant-real-3be07";
const HOSTS: [&str; 3] = ["api.openai.com", "api.anthropic.com", "api.acme-vendor.com"];

struct Agent {
    w: RunWorld,
    audit: PathBuf,
    policy: PathBuf,
}

impl Agent {
    fn new() -> Self {
        let w = RunWorld::new(&HOSTS);
        let policy = w.path("policy");
        std::fs::create_dir(&policy).unwrap();
        let src = repo_root().join("policies");
        std::fs::copy(src.join("runtime/llm/llm.cedar"), policy.join("llm.cedar")).unwrap();
        std::fs::copy(
            src.join("firma.cedarschema"),
            policy.join("firma.cedarschema"),
        )
        .unwrap();
        let audit = w.path("audit.jsonl");
        Self { w, audit, policy }
    }

    /// `firma run` with both credentials, the LLM policy and the vendor host allowed.
    fn run(&self, cmd: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = self.w.command(
            &[
                "--credential",
                "api.openai.com=OPENAI_API_KEY",
                "--credential",
                "api.anthropic.com=ANTHROPIC_API_KEY:x-api-key",
                "--policy",
                self.policy.to_str().unwrap(),
                "--allow-host",
                "api.acme-vendor.com",
                "--audit",
                self.audit.to_str().unwrap(),
            ],
            cmd,
        );
        c.env("OPENAI_API_KEY", OPENAI_KEY)
            .env("ANTHROPIC_API_KEY", ANTHROPIC_KEY);
        // Nothing of the developer's own setup may steer the SDKs elsewhere.
        for v in [
            "OPENAI_BASE_URL",
            "OPENAI_ORG_ID",
            "OPENAI_PROJECT_ID",
            "ANTHROPIC_BASE_URL",
            "ANTHROPIC_AUTH_TOKEN",
        ] {
            c.env_remove(v);
        }
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().expect("run firma")
    }

    /// The one JSON line the agent script prints last.
    fn report(&self, out: &Output) -> serde_json::Value {
        let stdout = text(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("agent report is not JSON ({e}):\n{}", show(out)))
    }

    fn decisions(&self) -> Vec<serde_json::Value> {
        self.w.decisions(&self.audit)
    }

    /// Decisions for `host` `path`.
    fn decisions_for(&self, host: &str, path: &str) -> Vec<serde_json::Value> {
        self.decisions()
            .into_iter()
            .filter(|e| {
                e["envelope"]["intent"]["resource"]["host"] == host
                    && e["envelope"]["intent"]["resource"]["path"] == path
            })
            .collect()
    }

    /// Every request the upstream saw for `host` carried exactly Firma's credential in
    /// `header` (`value`), none of the other credential headers, and nothing anywhere held a
    /// placeholder or the agent's own key.
    fn upstream_saw_only_firmas_credential(&self, host: &str, header: &str, value: &str) -> usize {
        let seen: Vec<_> = self
            .w
            .up
            .seen()
            .into_iter()
            .filter(|s| s.sni.as_deref() == Some(host))
            .collect();
        for s in &seen {
            assert_eq!(
                s.headers.get(header).map(String::as_str),
                Some(value),
                "{host}{}: {:?}",
                s.path,
                s.headers
            );
            for other in ["authorization", "x-api-key", "api-key", "x-goog-api-key"] {
                assert!(
                    other == header || !s.headers.contains_key(other),
                    "{host}{}: the agent's {other} left: {:?}",
                    s.path,
                    s.headers
                );
            }
        }
        assert!(
            !self.w.up.raw_contains("firma-placeholder"),
            "a placeholder reached the upstream"
        );
        assert!(
            !self.w.up.raw_contains("agent-own-key"),
            "the agent's own key reached the upstream"
        );
        seen.len()
    }

    fn assert_leak_denied(&self, out: &Output, path: &str, how: &str) {
        let d = self.decisions_for("api.acme-vendor.com", path);
        assert_eq!(d.len(), 1, "{path}: {d:?}\n{}", show(out));
        assert_eq!(d[0]["decision"]["outcome"], "DENY");
        assert_eq!(d[0]["decision"]["reason"], "CredentialLeak");
        let detail = d[0]["decision"]["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains(how) && detail.contains("api.acme-vendor.com"),
            "{detail}"
        );
        assert_eq!(d[0]["workload"]["agent_id"], "local-agent");
        assert!(
            !self
                .w
                .up
                .seen()
                .iter()
                .any(|s| s.sni.as_deref() == Some("api.acme-vendor.com")),
            "the leaking request reached api.acme-vendor.com"
        );
        assert!(
            text(&out.stderr).contains(&format!(
                "DENY  GET api.acme-vendor.com{path} [communication.external.send] CredentialLeak"
            )),
            "{}",
            show(out)
        );
    }
}

/// Fails (never skips) when a client library is missing: CI installs them (`.ci/run`).
fn require_python(module: &str) {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python package `{module}` is missing: `python3 -m pip install openai anthropic requests` (.ci/run does)"
    );
}

fn node_modules() -> PathBuf {
    let dir = repo_root().join("tests/node/node_modules");
    assert!(
        dir.join("openai/package.json").exists(),
        "the `openai` npm package is missing: `npm ci --prefix tests/node` (.ci/run does)"
    );
    dir
}

fn write_script(a: &Agent, name: &str, body: &str) -> PathBuf {
    let p = a.w.path(name);
    std::fs::write(&p, body).unwrap();
    p
}

const OPENAI_PY: &str = r#"
import json, os, requests
import openai
from openai import OpenAI

out = {"key": os.environ.get("OPENAI_API_KEY")}
msgs = [{"role": "user", "content": "hi"}]
client = OpenAI()  # as the README shows: the key comes from OPENAI_API_KEY
r = client.chat.completions.create(model="gpt-4o-mini", max_tokens=100, messages=msgs)
out["content"] = r.choices[0].message.content
out["completion_tokens"] = r.usage.completion_tokens

stream = client.chat.completions.create(
    model="gpt-4o-mini", max_tokens=20, messages=msgs, stream=True,
    stream_options={"include_usage": True})
out["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

def denied(**kw):
    try:
        client.chat.completions.create(messages=msgs, **kw)
        return None
    except openai.PermissionDeniedError as e:
        return {"status": e.status_code, "text": str(e), "code": e.code, "type": e.type}

out["model_denied"] = denied(model="gpt-4o")
out["cap_denied"] = denied(model="gpt-4o-mini", max_tokens=8000)

# The agent adds credential headers of its own and puts its key in the query string: on the
# credential host none of it leaves, only Firma's credential.
own = OpenAI(default_headers={"x-api-key": "agent-own-key", "api-key": os.environ["OPENAI_API_KEY"]})
out["models"] = [m.id for m in own.models.list(extra_query={"key": os.environ["OPENAI_API_KEY"]})]

# The key sent to another (allowed) host: with the SDK (Authorization header) ...
try:
    OpenAI(base_url="https://api.acme-vendor.com/v1").models.list()
    out["leak_sdk"] = None
except openai.PermissionDeniedError as e:
    out["leak_sdk"] = {"status": e.status_code, "reason": e.response.json().get("reason")}
# ... and by hand in the query string.
r = requests.get("https://api.acme-vendor.com/v1/upload",
                 params={"token": os.environ["OPENAI_API_KEY"]}, timeout=10)
out["leak_query"] = {"status": r.status_code, "reason": r.json().get("reason")}
print(json.dumps(out))
"#;

#[test]
fn openai_python_sdk_under_firma_run() {
    if !in_fresh_netns("openai_python_sdk_under_firma_run") {
        return;
    }
    require_python("openai");
    require_python("requests");
    let a = Agent::new();
    let script = write_script(&a, "agent.py", OPENAI_PY);
    let out = a.run(&["python3", script.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r = a.report(&out);

    // The SDK started with a placeholder, never the key.
    let key = r["key"].as_str().unwrap_or("");
    assert!(key.starts_with("sk-firma-placeholder-"), "{r}");
    assert!(!text(&out.stdout).contains(OPENAI_KEY));
    // The call and the stream went through.
    assert_eq!(r["content"], "hi", "{r}");
    assert_eq!(r["completion_tokens"], 100, "{r}");
    assert_eq!(r["streamed"], "hi there", "{r}");
    assert_eq!(r["models"], serde_json::json!([]), "{r}");
    // Denials: the SDK's PermissionDeniedError, its text naming the Firma reason.
    for k in ["model_denied", "cap_denied"] {
        let d = &r[k];
        assert_eq!(d["status"], 403, "{k}: {r}");
        assert_eq!(d["code"], "PolicyDenied", "{k}: {r}");
        assert_eq!(d["type"], "permission_error", "{k}: {r}");
        let t = d["text"].as_str().unwrap_or("");
        assert!(
            t.contains("Firma denied this request (PolicyDenied)"),
            "{k}: {t}"
        );
    }
    // The upstream saw three calls (chat, stream, models), each with Firma's credential only;
    // the query-string key was removed.
    assert_eq!(
        a.upstream_saw_only_firmas_credential(
            "api.openai.com",
            "authorization",
            &format!("Bearer {OPENAI_KEY}")
        ),
        3
    );
    assert!(a.w.up.raw_contains("GET /v1/models\r\n"));
    // Each denial was one decision: the SDK did not retry it.
    let chat = a.decisions_for("api.openai.com", "/v1/chat/completions");
    let outcomes: Vec<_> = chat
        .iter()
        .map(|e| e["decision"]["outcome"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(outcomes, ["ALLOW", "ALLOW", "DENY", "DENY"], "{chat:?}");
    assert!(
        chat[2..]
            .iter()
            .all(|e| e["decision"]["reason"] == "PolicyDenied")
    );
    // The key sent elsewhere: denied CredentialLeak, audited, never delivered.
    assert_eq!(r["leak_sdk"]["status"], 403, "{r}");
    assert_eq!(r["leak_sdk"]["reason"], "CredentialLeak", "{r}");
    assert_eq!(r["leak_query"]["reason"], "CredentialLeak", "{r}");
    a.assert_leak_denied(&out, "/v1/models", "header `authorization`");
    a.assert_leak_denied(&out, "/v1/upload", "query parameter `token`");
}

const ANTHROPIC_PY: &str = r#"
import json, os
import anthropic
from anthropic import Anthropic

out = {"key": os.environ.get("ANTHROPIC_API_KEY")}
msgs = [{"role": "user", "content": "hi"}]
client = Anthropic()  # as the README shows: the key comes from ANTHROPIC_API_KEY
m = client.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=msgs)
out["content"] = m.content[0].text
out["output_tokens"] = m.usage.output_tokens

with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=msgs) as s:
    out["streamed"] = "".join(s.text_stream)
    out["stream_output_tokens"] = s.get_final_message().usage.output_tokens

try:
    client.messages.create(model="claude-sonnet-4-5", max_tokens=8000, messages=msgs)
    out["denied"] = None
except anthropic.PermissionDeniedError as e:
    out["denied"] = {"status": e.status_code, "text": str(e), "type": e.body["error"]["type"]}

# An Authorization header of the agent's own: it never leaves.
own = Anthropic(default_headers={"Authorization": "Bearer agent-own-key"})
out["own"] = own.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=msgs).content[0].text

try:
    Anthropic(base_url="https://api.acme-vendor.com").models.list()
    out["leak"] = None
except anthropic.PermissionDeniedError as e:
    out["leak"] = {"status": e.status_code, "reason": e.response.json().get("reason")}
print(json.dumps(out))
"#;

#[test]
fn anthropic_python_sdk_under_firma_run() {
    if !in_fresh_netns("anthropic_python_sdk_under_firma_run") {
        return;
    }
    require_python("anthropic");
    let a = Agent::new();
    let script = write_script(&a, "agent.py", ANTHROPIC_PY);
    let out = a.run(&["python3", script.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r = a.report(&out);

    assert!(
        r["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("sk-firma-placeholder-")),
        "{r}"
    );
    assert_eq!(r["content"], "hi", "{r}");
    assert_eq!(r["output_tokens"], 100, "{r}");
    assert_eq!(r["streamed"], "hi", "{r}");
    assert_eq!(r["stream_output_tokens"], 64, "{r}");
    assert_eq!(r["own"], "hi", "{r}");
    let d = &r["denied"];
    assert_eq!(d["status"], 403, "{r}");
    assert_eq!(d["type"], "permission_error", "{r}");
    let t = d["text"].as_str().unwrap_or("");
    assert!(
        t.contains("Firma denied this request (PolicyDenied)"),
        "{t}"
    );
    // Three calls upstream (create, stream, create with an extra Authorization), each with
    // Firma's x-api-key only (the SDK's own `Authorization: Bearer <placeholder>` removed).
    assert_eq!(
        a.upstream_saw_only_firmas_credential("api.anthropic.com", "x-api-key", ANTHROPIC_KEY),
        3
    );
    let msgs = a.decisions_for("api.anthropic.com", "/v1/messages");
    assert_eq!(msgs.len(), 4, "the denial was retried? {msgs:?}");
    assert_eq!(
        msgs.iter()
            .filter(|e| e["decision"]["reason"] == "PolicyDenied")
            .count(),
        1
    );
    assert_eq!(r["leak"]["status"], 403, "{r}");
    assert_eq!(r["leak"]["reason"], "CredentialLeak", "{r}");
    // This SDK sends its key as `Authorization: Bearer` (not `x-api-key`).
    a.assert_leak_denied(&out, "/v1/models", "header `authorization`");
}

const OPENAI_NODE: &str = r#"
const OpenAI = require('openai');
(async () => {
  const out = { key: process.env.OPENAI_API_KEY };
  const messages = [{ role: 'user', content: 'hi' }];
  const client = new OpenAI(); // as the README shows: the key comes from OPENAI_API_KEY
  const r = await client.chat.completions.create({ model: 'gpt-4o-mini', max_tokens: 100, messages });
  out.content = r.choices[0].message.content;
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', max_tokens: 20, messages, stream: true });
  out.streamed = '';
  for await (const c of stream) out.streamed += (c.choices[0] && c.choices[0].delta.content) || '';
  try {
    await client.chat.completions.create({ model: 'gpt-4o', messages });
    out.denied = null;
  } catch (e) {
    out.denied = { permission: e instanceof OpenAI.PermissionDeniedError, status: e.status, message: e.message, code: e.code, type: e.type };
  }
  try {
    await new OpenAI({ baseURL: 'https://api.acme-vendor.com/v1' }).models.list();
    out.leak = null;
  } catch (e) {
    out.leak = { status: e.status };
  }
  console.log(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(3); });
"#;

#[test]
fn openai_node_sdk_under_firma_run() {
    if !in_fresh_netns("openai_node_sdk_under_firma_run") {
        return;
    }
    let modules = node_modules();
    let a = Agent::new();
    let script = write_script(&a, "agent.js", OPENAI_NODE);
    let out = a.run(
        &["node", script.to_str().unwrap()],
        &[("NODE_PATH", modules.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r = a.report(&out);
    assert!(
        r["key"]
            .as_str()
            .is_some_and(|k| k.starts_with("sk-firma-placeholder-")),
        "{r}"
    );
    assert_eq!(r["content"], "hi", "{r}");
    assert_eq!(r["streamed"], "hi there", "{r}");
    let d = &r["denied"];
    assert_eq!(d["permission"], true, "{r}");
    assert_eq!(d["status"], 403, "{r}");
    assert_eq!(d["code"], "PolicyDenied", "{r}");
    let m = d["message"].as_str().unwrap_or("");
    assert!(
        m.starts_with("403 Firma denied this request (PolicyDenied)"),
        "{m}"
    );
    assert_eq!(
        a.upstream_saw_only_firmas_credential(
            "api.openai.com",
            "authorization",
            &format!("Bearer {OPENAI_KEY}")
        ),
        2
    );
    let chat = a.decisions_for("api.openai.com", "/v1/chat/completions");
    assert_eq!(chat.len(), 3, "the denial was retried? {chat:?}");
    assert_eq!(r["leak"]["status"], 403, "{r}");
    a.assert_leak_denied(&out, "/v1/models", "header `authorization`");
}
