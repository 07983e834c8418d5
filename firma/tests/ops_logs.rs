//! Logs operators can live with: no line per request at INFO (the audit file is the record),
//! no ANSI codes when stderr is not a terminal, `--log-format json` gives one JSON object per
//! line, and connection ids keep growing across a restart that resumes the audit chain.

use firma_testing::assert_eventually;
use firma_testing::client::curl;
use firma_testing::process::{Process, firma_bin};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use std::time::Duration;

fn credential() -> String {
    "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n".into()
}

fn chat(sc: &Sidecar, d: &Deployment) -> u16 {
    curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://api.openai.com/v1/chat/completions",
        &["-X", "POST", "-d", "{}"],
    )
    .status
}

#[test]
fn text_logs_have_no_ansi_and_no_line_per_request_and_conn_ids_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com", "unmapped.example"]);
    let settings = Settings {
        extra: credential(),
        ..Settings::default()
    };
    let d = Deployment::new(Some(&up), &settings);
    let envs = [("FIRMA_TEST_OPENAI_KEY", "sk-canary-logs")];
    // Without NO_COLOR (which the launchers set): only "stderr is not a terminal" may turn
    // colours off.
    let start = || {
        let mut cmd = Sidecar::command(&firma_bin(), &d.config);
        cmd.env_remove("NO_COLOR").envs(envs);
        Sidecar::spawn(cmd).expect("sidecar")
    };
    let mut sc = start();
    let info_lines = |sc: &Sidecar| {
        sc.log_lines()
            .iter()
            .filter(|l| l.contains(" INFO "))
            .count()
    };
    let info_at_ready = info_lines(&sc);
    for _ in 0..3 {
        assert_eq!(chat(&sc, &d), 200);
    }
    let denied = curl(
        &sc.proxy_url(),
        &d.ca_cert(),
        "https://unmapped.example/x",
        &[],
    );
    assert_eq!(denied.status, 403);
    // The `allowed`/`denied` lines are DEBUG now: nothing per request at INFO. A log fence:
    // stop the sidecar and wait until its last line is read; stderr is one pipe, so every line
    // the requests logged (before the drain began) has been read by then.
    sc.terminate(Duration::from_secs(10));
    assert_eventually(
        Duration::from_secs(10),
        "the sidecar's last line read",
        || sc.log_text().contains("sidecar stopped"),
    );
    let log = sc.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in a piped log:\n{log}"
    );
    assert_eq!(
        log.lines()
            .take_while(|l| !l.contains(": draining"))
            .filter(|l| l.contains(" INFO "))
            .count(),
        info_at_ready,
        "INFO lines appeared for requests:\n{log}"
    );
    assert!(
        log.contains("listen=127.0.0.1:0"),
        "startup names the http_proxy listener: {log}"
    );
    let first: Vec<u64> = d
        .audit()
        .iter()
        .filter_map(|e| e["conn"]["id"].as_u64())
        .collect();
    let max_before = *first.iter().max().expect("conn ids");

    // Restart: the chain resumes, connection ids continue after the largest one.
    let sc = start();
    assert_eq!(chat(&sc, &d), 200);
    drop(sc);
    let events = d.audit();
    let chains: std::collections::HashSet<_> = events
        .iter()
        .filter_map(|e| e["chain_id"].as_str())
        .collect();
    assert_eq!(chains.len(), 1, "the restart resumed the chain");
    let last = events
        .iter()
        .rev()
        .find(|e| e["event"] == "decision")
        .expect("a decision after the restart");
    let id = last["conn"]["id"].as_u64().expect("conn.id");
    assert!(
        id > max_before,
        "conn.id {id} after the restart repeats an id of the chain (max before {max_before})"
    );
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(tmp.path(), &["api.openai.com"]);
    let d = Deployment::new(
        Some(&up),
        &Settings {
            extra: credential(),
            ..Settings::default()
        },
    );
    let mut cmd = Sidecar::command(&firma_bin(), &d.config);
    cmd.args(["--log-format", "json"])
        .env("FIRMA_TEST_OPENAI_KEY", "sk-canary-json");
    let mut p = Process::spawn(cmd).expect("spawn");
    p.wait_for("sidecar ready", Duration::from_secs(20))
        .expect("ready");
    let lines = p.log_lines();
    assert!(lines.len() >= 3, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("sidecar ready")),
        "{lines:?}"
    );
}
