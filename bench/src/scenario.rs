//! The setup the scenarios share, so that each scenario file is about its own measurement: the
//! `firma` binary, the HTTPS upstream, the token-budget sidecar of the LLM-shaped scenarios
//! (streams, bodies, idle), and the in-process client's runtime and targets.

use crate::client::Target;
use crate::deploy::{self, Deployment, Mode, SidecarToml};
use crate::upstream::{Kind, Upstream};
use anyhow::{Context, bail};
use firma_testing::sidecar::Sidecar;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `--firma` as an absolute path (the sidecar and the Authority run in other directories).
pub fn firma_binary(firma: &Path) -> anyhow::Result<PathBuf> {
    firma
        .canonicalize()
        .with_context(|| format!("firma binary {}", firma.display()))
}

/// The HTTPS upstream for [`deploy::HOST`] on a loopback port, its files under `dir`: `choice`,
/// else nginx when installed, else the builtin server. It counts the requests that carry the
/// injected credential. Returns it, its kind and why that kind.
pub fn upstream(dir: &Path, choice: Option<Kind>) -> anyhow::Result<(Upstream, Kind, String)> {
    let (kind, why) = Kind::choose(choice);
    let up = Upstream::start(
        kind,
        dir,
        &[deploy::HOST],
        "127.0.0.1:0".parse()?,
        &deploy::injected_auth(),
    )?;
    eprintln!(
        "upstream: {kind:?} ({why}) on https://{} as {}",
        up.addr,
        deploy::HOST
    );
    Ok((up, kind, why))
}

/// A deployment under `root` (created) of an http_proxy sidecar routing [`deploy::HOST`] to
/// `upstream` (trusting `upstream_ca`), strict MITM, the credential injected, the shipped
/// genai-app policy, metrics off; `edit` adjusts its config before it is written.
pub fn proxy_deployment(
    firma: &Path,
    root: &Path,
    upstream: SocketAddr,
    upstream_ca: &Path,
    edit: impl FnOnce(&mut SidecarToml),
) -> anyhow::Result<Deployment> {
    std::fs::create_dir_all(root)?;
    let parts = (upstream, upstream_ca, &Mode::HttpProxy);
    Deployment::new_with(firma, root, parts, false, true, edit)
}

/// The sidecar of the LLM-shaped scenarios, started: the [`proxy_deployment`] plus the shipped
/// `llm` token budget ([`budget_policy`]), so every call is metered.
pub fn llm_sidecar(
    firma: &Path,
    root: &Path,
    upstream: SocketAddr,
    upstream_ca: &Path,
    edit: impl FnOnce(&mut SidecarToml),
) -> anyhow::Result<(Deployment, Sidecar)> {
    let d = proxy_deployment(firma, root, upstream, upstream_ca, edit)?;
    std::fs::write(root.join("policies/llm.cedar"), budget_policy()?)?;
    let sc = d.start_sidecar()?;
    Ok((d, sc))
}

/// The shipped `llm` budget policy with the session token budget raised so a benchmark's
/// thousands of metered calls stay allowed (the budget is still evaluated on every call).
pub fn budget_policy() -> anyhow::Result<String> {
    let shipped =
        std::fs::read_to_string(firma_testing::repo_root().join("policies/runtime/llm/llm.cedar"))
            .context("read policies/runtime/llm/llm.cedar")?;
    let needle = "context.session.tokens_used >= 200000";
    if !shipped.contains(needle) {
        bail!("policies/runtime/llm/llm.cedar no longer has `{needle}`: update the bench");
    }
    Ok(shipped.replace(needle, "context.session.tokens_used >= 1000000000000"))
}

/// The runtime of the in-process clients (bodies, idle): two worker threads.
pub fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The `CONNECT` authority a client sends an http_proxy sidecar.
pub fn sidecar_connect() -> String {
    format!("{}:443", deploy::HOST)
}

/// An in-process client target straight to the upstream at `addr`, trusting `ca`.
pub fn direct_target(addr: SocketAddr, ca: &Path) -> anyhow::Result<Target> {
    Target::new(addr, deploy::HOST, None, &[ca.to_path_buf()])
}

/// An in-process client target through the http_proxy sidecar of `d` listening on `addr`
/// (`CONNECT`, then TLS trusting the Firma CA).
pub fn sidecar_target(addr: SocketAddr, d: &Deployment) -> anyhow::Result<Target> {
    Target::new(addr, deploy::HOST, Some(sidecar_connect()), &[d.firma_ca()])
}
