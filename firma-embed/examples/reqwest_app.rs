//! An application that enforces Firma in its own process: its reqwest client runs every call
//! through the embedded pipeline (no proxy, no sidecar process).
//!
//! ```sh
//! FIRMA_CAPABILITY=$(…raw token from `firma authority issue`…) \
//!   cargo run -p firma-embed --example reqwest_app -- firma.toml https://api.example.com/v1/items
//! ```
//!
//! `firma.toml`'s `[sidecar]` section is read as the sidecar reads it (mapping rules, policy
//! dir or `authority_url`, credentials, audit). A denial prints the reason and exits 3.

use firma_embed::{Error, Firma, Identity};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(url)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: reqwest_app FIRMA_TOML URL (capability in $FIRMA_CAPABILITY)");
    };
    let identity = match std::env::var("FIRMA_CAPABILITY") {
        Ok(token) => Identity::Capability(token),
        // Without a token: the seeded session named by $FIRMA_SESSION, else the request's own.
        Err(_) => std::env::var("FIRMA_SESSION").map_or(Identity::FromRequest, Identity::Session),
    };
    let firma = Firma::from_file(config.as_ref(), identity).await?;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(firma.middleware())
        .build();
    let result = client.get(&url).send().await;
    // The audit events are written before the process exits.
    firma.flush().await;
    match result {
        Ok(resp) => {
            println!("{} {}", resp.status(), url);
            Ok(())
        }
        Err(reqwest_middleware::Error::Middleware(e)) => match e.downcast_ref::<Error>() {
            Some(Error::Denied { reason, detail }) => {
                eprintln!("denied by Firma: {reason}: {detail}");
                std::process::exit(3);
            }
            _ => Err(e),
        },
        Err(e) => Err(e.into()),
    }
}
