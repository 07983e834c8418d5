//! `firma policy validate DIR…`: load each directory as a bundle (the same loader the Authority
//! and sidecar use) and validate it strictly against its schema.

use firma_common::policy::PolicyBundle;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Parse and strictly validate every `*.cedar` file in each DIR against the schema
    /// (the DIR's own `*.cedarschema`, else the shipped Firma schema).
    Validate {
        #[arg(value_name = "DIR", required = true)]
        dirs: Vec<PathBuf>,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Cmd::Validate { dirs } = args.command;
    let mut failed = false;
    for dir in &dirs {
        let result = PolicyBundle::load_dir(dir).and_then(|b| {
            let compiled = b.compile()?;
            Ok((b, compiled))
        });
        match result {
            Ok((bundle, compiled)) => println!(
                "{}: ok: {} file(s), {} policies [{}], version {}",
                dir.display(),
                bundle.file_count(),
                compiled.policy_ids().len(),
                compiled.policy_ids().join(", "),
                bundle.version
            ),
            Err(e) => {
                failed = true;
                eprintln!("{}: invalid:", dir.display());
                for line in e.to_string().lines() {
                    eprintln!("  {line}");
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
