//! What the MCP suites (`mcp_enforcement.rs`, `mcp_run.rs`) share: the probe for the Python
//! `mcp` SDK and the path of their server and client scripts.

use std::path::PathBuf;
use std::process::Command;

/// Whether `python3` can import the official `mcp` SDK and `uvicorn` (`.ci/run` installs both).
pub fn python_has_mcp() -> bool {
    Command::new("python3")
        .args(["-c", "import mcp, uvicorn"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `firma/tests/mcp/<name>`: the FastMCP servers and SDK clients the suites run.
pub fn script(name: &str) -> PathBuf {
    crate::repo_root().join("firma/tests/mcp").join(name)
}
