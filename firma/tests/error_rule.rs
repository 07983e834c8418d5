//! The error rule (docs/architecture.md, "Errors"): a message embeds its cause or chains it,
//! never both. thiserror chains any field named `source` (and `#[from]` fields), so a message
//! that prints `{source}` or the `#[from]` field prints that cause twice on the CLI.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_error_message_embeds_a_chained_cause() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["firma", "firma-common", "firma-sidecar", "firma-authority"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(
        files.len() > 20,
        "source tree not found from {}",
        root.display()
    );
    let mut offenders = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            // An #[error("...")] attribute may span a few lines; `{source}` in it is chained too.
            if line.contains("#[error(") {
                let attr: String = lines[i..(i + 4).min(lines.len())].concat();
                let attr = &attr[..attr.find(")]").unwrap_or(attr.len())];
                if attr.contains("{source}") {
                    offenders.push(format!("{}:{}", f.display(), i + 1));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "messages that embed a chained `source` (rename the field `cause`): {offenders:?}"
    );
}
