//! A RustyVault (`rvault`) server on a free loopback port, initialised and unsealed.

use crate::{assert_eventually, free_port, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A RustyVault server on a free loopback port, initialised, unsealed, with the root token.
pub struct Vault {
    pub child: Child,
    pub addr: String,
    pub token: String,
    pub dir: PathBuf,
    port: u16,
}

/// `rvault` from PATH or ~/.cargo/bin; `None` when absent.
pub fn rvault_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").ok()?;
    let candidates = [PathBuf::from(home).join(".cargo/bin/rvault")];
    candidates.into_iter().find(|p| p.exists()).or_else(|| {
        let out = Command::new("which").arg("rvault").output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(text(&out.stdout).trim()))
    })
}

fn vault_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "5",
        "--noproxy",
        "*",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("X-Vault-Token: {t}")]);
    }
    if !body.is_empty() {
        c.args(["-d", body]);
    }
    let out = c.arg(format!("{addr}/v1/{path}")).output().expect("curl");
    let s = text(&out.stdout);
    let (b, code) = s.rsplit_once('\n').unwrap_or(("", s.as_str()));
    (code.trim().parse().unwrap_or(0), b.to_string())
}

impl Vault {
    pub fn start(dir: &Path) -> Option<Self> {
        let bin = rvault_bin()?;
        let port = free_port();
        let dir = dir.join("vault");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cfg = dir.join("config.hcl");
        std::fs::write(
            &cfg,
            format!(
                "storage \"file\" {{\n  path = \"{}\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\nlog_level = \"warn\"\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut v = Self {
            child: Self::spawn(&bin, &cfg, &dir),
            addr: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir,
            port,
        };
        v.wait_up();
        let (code, body) = vault_call(
            &v.addr,
            "PUT",
            "sys/init",
            None,
            r#"{"secret_shares":1,"secret_threshold":1}"#,
        );
        assert_eq!(code, 200, "vault init: {body}");
        let init: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.token = init["root_token"].as_str().unwrap().to_string();
        let key = init["keys"][0].as_str().unwrap().to_string();
        std::fs::write(v.dir.join("unseal.key"), &key).unwrap();
        v.unseal();
        Some(v)
    }

    fn spawn(bin: &Path, cfg: &Path, dir: &Path) -> Child {
        Command::new(bin)
            .arg("server")
            .arg(format!("--config={}", cfg.display()))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rvault")
    }

    fn wait_up(&self) {
        assert_eventually(Duration::from_secs(20), "rvault listening", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn unseal(&self) {
        let key = std::fs::read_to_string(self.dir.join("unseal.key")).unwrap();
        let (code, body) = vault_call(
            &self.addr,
            "PUT",
            "sys/unseal",
            None,
            &format!(r#"{{"key":"{key}"}}"#),
        );
        assert_eq!(code, 200, "unseal: {body}");
    }

    /// Writes `{key: value}` at the KV v1 path `secret/<rel>`.
    pub fn put(&self, rel: &str, key: &str, value: &str) {
        let (code, body) = vault_call(
            &self.addr,
            "POST",
            &format!("secret/{rel}"),
            Some(&self.token),
            &serde_json::json!({ key: value }).to_string(),
        );
        assert!(code == 200 || code == 204, "vault write: {code} {body}");
    }

    /// Enables AppRole, creates role `firma` and returns `(role_id, secret_id)`.
    pub fn approle(&self) -> (String, String) {
        let t = Some(self.token.as_str());
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "sys/auth/approle",
            t,
            r#"{"type":"approle"}"#,
        );
        assert!(c == 200 || c == 204, "enable approle: {c} {b}");
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "auth/approle/role/firma",
            t,
            r#"{"token_policies":"default"}"#,
        );
        assert!(c == 200 || c == 204, "create role: {c} {b}");
        let (c, b) = vault_call(&self.addr, "GET", "auth/approle/role/firma/role-id", t, "");
        assert_eq!(c, 200, "role-id: {b}");
        let role: serde_json::Value = serde_json::from_str(&b).unwrap();
        let (c, b) = vault_call(
            &self.addr,
            "POST",
            "auth/approle/role/firma/secret-id",
            t,
            "",
        );
        assert_eq!(c, 200, "secret-id: {b}");
        let secret: serde_json::Value = serde_json::from_str(&b).unwrap();
        (
            role["data"]["role_id"].as_str().unwrap().to_string(),
            secret["data"]["secret_id"].as_str().unwrap().to_string(),
        )
    }

    /// Stops the server (our own child, by handle).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        self.stop();
    }
}
