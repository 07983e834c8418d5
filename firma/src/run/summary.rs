//! The per-decision summary printed after the run, read back from the signed audit log (so
//! it shows what was recorded, not what firma remembers).

use serde_json::Value;
use std::path::Path;

/// The run workload's `decision`, `deny_summary` (denials over the audit rate, counted rather
/// than written one by one) and `refused` (kernel refusals, aggregated) events, oldest first.
fn events(audit: &Path, cgroup_path: &str) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(audit) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            (e["event"] == "decision" || e["event"] == "deny_summary" || e["event"] == "refused")
                && e["workload"]["cgroup_path"] == cgroup_path
        })
        .collect()
}

/// One line per `decision` event of the run's workload (its cgroup), oldest first, and one per
/// `deny_summary`.
pub fn lines(audit: &Path, cgroup_path: &str) -> Vec<String> {
    events(audit, cgroup_path).iter().map(line).collect()
}

/// The run's decisions: `decision` events plus the denials `deny_summary` and `refused`
/// events counted.
pub fn decisions(audit: &Path, cgroup_path: &str) -> u64 {
    events(audit, cgroup_path)
        .iter()
        .map(|e| {
            e["aggregate"]["count"]
                .as_u64()
                .or_else(|| e["refused"]["count"].as_u64())
                .unwrap_or(1)
        })
        .sum()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// `ALLOW GET api.openai.com/v1/models [model.inference.chat] credential injected`
/// `DENY  POST paste.rs/ [communication.external.send] PolicyDenied`
pub fn line(e: &Value) -> String {
    let d = &e["decision"];
    if e["event"] == "deny_summary" {
        let host = match s(&e["envelope"]["intent"]["resource"]["host"]) {
            "" => s(&e["envelope"]["intent"]["method"]),
            h => h,
        };
        return format!(
            "DENY  {} more {host} {} (over the audit rate: counted in one summary event)",
            e["aggregate"]["count"].as_u64().unwrap_or(0),
            s(&d["reason"])
        );
    }
    let intent = &e["envelope"]["intent"];
    let outcome = s(&d["outcome"]);
    if let Some(r) = e["refused"].as_object() {
        // `DENY  UDP 10.0.0.9:5353 UdpRefused (x3)`: refused in the kernel, aggregated.
        let q = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?");
        let count = r.get("count").and_then(Value::as_u64).unwrap_or(0);
        let dst = r["sample"]["destination"].as_str().unwrap_or("?");
        return format!(
            "{outcome:<5} {} {dst} {} (x{count})",
            q("protocol").to_ascii_uppercase(),
            s(&d["reason"])
        );
    }
    if let Some(mcp) = intent["request"]["mcp"].as_object() {
        // One JSON-RPC message of an MCP endpoint: `ALLOW MCP tools/call read_file`,
        // `DENY  MCP tools/call delete_repo PolicyDenied`.
        let q = |k: &str| mcp.get(k).and_then(Value::as_str).unwrap_or("");
        let name = match q("name") {
            "" => String::new(),
            n => format!(" {n}"),
        };
        let tail = match outcome {
            "ALLOW" => String::new(),
            _ => format!(" {}", s(&d["reason"])),
        };
        return format!("{outcome:<5} MCP {}{name}{tail}", q("method"));
    }
    if let Some(dns) = intent["dns"].as_object() {
        // A query the DNS guard answered (allowed name) or refused.
        let q = |k: &str| dns.get(k).and_then(Value::as_str).unwrap_or("?");
        let tail = match outcome {
            "ALLOW" => String::new(),
            _ => format!(" {}", s(&d["reason"])),
        };
        return format!("{outcome:<5} DNS {} {}{tail}", q("qtype"), q("qname"));
    }
    let method = match s(&intent["method"]) {
        "" => "-",
        m => m,
    };
    let host = s(&intent["resource"]["host"]);
    let host = if host.is_empty() {
        s(&e["conn"]["original_dst"])
    } else {
        host
    };
    let target = format!("{host}{}", s(&intent["resource"]["path"]));
    let class = match s(&intent["action_class"]) {
        "" => String::new(),
        c => format!(" [{c}]"),
    };
    let tail = if outcome == "ALLOW" {
        if e["connector"]["credential_injected"] == true {
            " credential injected".to_string()
        } else {
            " no credential".to_string()
        }
    } else {
        format!(" {}", s(&d["reason"]))
    };
    format!("{outcome:<5} {method} {target}{class}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_line_per_decision_of_the_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.jsonl");
        let ev = |cg: &str, outcome: &str, reason: &str, injected: bool| {
            json!({"event": "decision", "workload": {"cgroup_path": cg},
                "envelope": {"intent": {"method": "GET", "action_class": "model.inference.chat",
                    "resource": {"host": "api.openai.com", "path": "/v1/models"}}},
                "decision": {"outcome": outcome, "reason": reason},
                "connector": {"credential_injected": injected}})
            .to_string()
        };
        let text = [
            ev("/firma-run-1-a", "ALLOW", "", true),
            ev("/other", "DENY", "PolicyDenied", false),
            r#"{"event":"outcome"}"#.to_string(),
            "torn".to_string(),
            ev("/firma-run-1-a", "DENY", "PolicyDenied", false),
            json!({"event": "decision", "workload": {"cgroup_path": "/firma-run-1-a"},
                "envelope": {"intent": {"dns": {"qname": "x.example.org", "qtype": "A"}}},
                "decision": {"outcome": "DENY", "reason": "DnsDenied"}})
            .to_string(),
            json!({"event": "deny_summary", "workload": {"cgroup_path": "/firma-run-1-a"},
                "envelope": {"intent": {"resource": {"host": "paste.rs"}}},
                "decision": {"outcome": "DENY", "reason": "PolicyDenied"},
                "aggregate": {"count": 40}})
            .to_string(),
            json!({"event": "decision", "workload": {"cgroup_path": "/firma-run-1-a"},
                "envelope": {"intent": {"method": "POST", "resource": {"host": "mcp.test", "path": "/mcp/tools/read_file"},
                    "request": {"mcp": {"method": "tools/call", "name": "read_file", "id": 3}}}},
                "decision": {"outcome": "ALLOW"}})
            .to_string(),
            json!({"event": "decision", "workload": {"cgroup_path": "/firma-run-1-a"},
                "envelope": {"intent": {"method": "POST", "resource": {"host": "mcp.test", "path": "/mcp/tools/delete_repo"},
                    "request": {"mcp": {"method": "tools/call", "name": "delete_repo", "id": 4}}}},
                "decision": {"outcome": "DENY", "reason": "PolicyDenied"}})
            .to_string(),
            json!({"event": "refused", "workload": {"cgroup_path": "/firma-run-1-a"},
                "decision": {"outcome": "DENY", "reason": "UdpRefused"},
                "refused": {"protocol": "udp", "count": 3, "sample": {"destination": "10.0.0.9:5353"}}})
            .to_string(),
        ]
        .join("\n");
        std::fs::write(&file, text).unwrap();
        assert_eq!(
            lines(&file, "/firma-run-1-a"),
            [
                "ALLOW GET api.openai.com/v1/models [model.inference.chat] credential injected",
                "DENY  GET api.openai.com/v1/models [model.inference.chat] PolicyDenied",
                "DENY  DNS A x.example.org DnsDenied",
                "DENY  40 more paste.rs PolicyDenied (over the audit rate: counted in one summary event)",
                "ALLOW MCP tools/call read_file",
                "DENY  MCP tools/call delete_repo PolicyDenied",
                "DENY  UDP 10.0.0.9:5353 UdpRefused (x3)",
            ]
        );
        assert_eq!(decisions(&file, "/firma-run-1-a"), 48);
    }
}
