//! A real Prometheus server (Debian's `prometheus`, installed by `.ci/run`) scraping loopback
//! targets every second, with a generated `prometheus.yml` and a temp TSDB, queried through its
//! HTTP API with curl. Used by the operations tests (`firma/tests/ops_metrics.rs`,
//! `firma/tests/dns_guard.rs`).

use crate::process::Process;
use crate::{assert_eventually, free_port, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `prometheus` from PATH or Debian's path. `None` (the caller prints SKIP) when it is not
/// installed; panics under CI (`CI` set), where `.ci/run` installs it.
pub fn binary(test_name: &str) -> Option<PathBuf> {
    let ok = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let found = ["prometheus", "/usr/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| ok(p));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no prometheus binary; .ci/run installs the Debian package"
        );
        crate::skip(
            test_name,
            "no prometheus binary (apt-get install prometheus; .ci/run installs it)",
        );
    }
    found
}

/// A plain GET on loopback with curl: (status, body).
pub fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("curl");
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The value of `series` (`name` or `name{labels}`, as the exporter writes it) in a scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    pub url: String,
    _process: Process,
}

impl Prometheus {
    /// Starts `bin` under `dir` scraping each `(job, host:port)` every second, and waits until
    /// it is ready and every target is up.
    pub fn start(bin: &Path, dir: &Path, targets: &[(&str, String)]) -> Self {
        std::fs::create_dir_all(dir.join("data")).expect("mkdir prometheus data");
        let cfg = dir.join("prometheus.yml");
        let mut yml = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            yml.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(&cfg, yml).expect("prometheus.yml");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h");
        let process = Process::spawn(cmd).expect("spawn prometheus");
        let p = Self {
            url: format!("http://127.0.0.1:{port}"),
            _process: process,
        };
        assert_eventually(Duration::from_secs(30), "prometheus ready", || {
            get(&format!("{}/-/ready", p.url)).0 == 200
        });
        assert_eventually(Duration::from_secs(20), "every target up", || {
            let up = p.query("up");
            up.len() == targets.len() && up.iter().all(|(_, v)| *v == 1.0)
        });
        p
    }

    /// An instant query: (labels, value) per series.
    pub fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--noproxy", "*", "-G"])
            .arg(format!("{}/api/v1/query", self.url))
            .args(["--data-urlencode", &format!("query={q}")])
            .output()
            .expect("curl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            v["status"] == "success" || v.is_null(),
            "query {q}: {}",
            text(&out.stdout)
        );
        v["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .map(|s| {
                        let value = s["value"][1]
                            .as_str()
                            .and_then(|x| x.parse().ok())
                            .unwrap_or(f64::NAN);
                        (s["metric"].clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The single value of `q`, if Prometheus has exactly one series.
    pub fn scalar(&self, q: &str) -> Option<f64> {
        match self.query(q).as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Waits until `q`'s single value is `want` (Prometheus scrapes every second); panics with
    /// what it last saw.
    pub fn wait_for_value(&self, q: &str, want: f64, within: Duration) {
        let mut last = None;
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            last = self.scalar(q);
            if last == Some(want) {
                return;
            }
            // Poll interval of the wait for `q` to reach `want`, bounded by `within`.
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("prometheus: {q} = {last:?} after {within:?}, expected {want}");
    }
}
