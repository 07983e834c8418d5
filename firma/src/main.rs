//! `firma`: a thin CLI over the authority and sidecar libraries.

fn main() -> anyhow::Result<()> {
    Ok(())
}
