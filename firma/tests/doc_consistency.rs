//! The documentation cannot drift from the code unnoticed. Each fact has one home in the docs,
//! and these tests hold that home against the code:
//! - the deny reasons listed in docs/architecture.md ("Decisions") against `DenyReason`;
//! - the metric names in docs/metrics.md against what a real `firma sidecar` and `firma
//!   authority` serve on `/metrics`;
//! - the config keys in docs/configuration.md against the schema, read from the real binary's
//!   own "unknown field, expected one of …" answers (so nothing is copied out of the code);
//! - every relative link in the Markdown files resolves (file and `#anchor`), every repository
//!   path cited in docs, comments and scripts exists, every `FILE.md "Section"` citation names a
//!   heading of that file, no doc speaks of issues or of files outside the repository, and no
//!   file holds merge conflict markers.

use firma_testing::authority;
use firma_testing::process::firma_bin;
use firma_testing::prometheus::get;
use firma_testing::sidecar::{Deployment, Settings, genai_app_policy};
use firma_testing::{free_port, repo_root};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The lines of `## heading` in `doc` up to the next heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no `{heading}` heading"))
        + heading.len()
        + 2;
    let level = heading.chars().take_while(|c| *c == '#').count();
    let rest = &doc[start..];
    let end = rest
        .match_indices("\n#")
        .find(|(i, _)| {
            let h = &rest[i + 1..];
            let n = h.chars().take_while(|c| *c == '#').count();
            n <= level && h[n..].starts_with(' ')
        })
        .map_or(rest.len(), |(i, _)| i);
    &rest[..end]
}

/// The backticked first cell of each table row: `| `name` | …`.
fn first_column(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect()
}

fn diff(what: &str, code: &BTreeSet<String>, doc: &BTreeSet<String>, doc_file: &str) {
    let missing: Vec<_> = code.difference(doc).collect();
    let extra: Vec<_> = doc.difference(code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{doc_file} drifted from the code's {what}:\n  in the code, not in {doc_file}: {missing:?}\n  in {doc_file}, not in the code: {extra:?}"
    );
}

#[test]
fn deny_reasons_are_listed_once_and_match_the_enum() {
    let conn = read("firma-sidecar/src/conn.rs");
    let body = conn
        .split_once("pub enum DenyReason {")
        .expect("enum DenyReason in conn.rs")
        .1
        .split_once("\n}")
        .unwrap()
        .0;
    let code: BTreeSet<String> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && !l.starts_with("#["))
        .filter_map(|l| l.strip_suffix(','))
        .map(String::from)
        .collect();
    assert!(code.len() >= 16, "parsed too few reasons: {code:?}");
    let arch = read("docs/architecture.md");
    let doc = first_column(section(&arch, "## Decisions"));
    diff(
        "deny reasons",
        &code,
        &doc,
        "docs/architecture.md#decisions",
    );

    // One list: no other page enumerates the reasons again (a paragraph or table naming more
    // than a third of them is a copy that will drift).
    for file in markdown_files() {
        let rel = rel(&file);
        if rel == "docs/architecture.md" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // The unit is a paragraph, or one row of a table.
        let units = text.split("\n\n").flat_map(|para| {
            if para.starts_with('|') {
                para.lines().collect::<Vec<_>>()
            } else {
                vec![para]
            }
        });
        for unit in units {
            let named = code
                .iter()
                .filter(|r| unit.contains(&format!("`{r}`")))
                .count();
            assert!(
                named <= code.len() / 3,
                "{rel} lists {named} deny reasons; link to docs/architecture.md#decisions instead:\n{unit}"
            );
        }
    }
}

/// Metric names in an OpenMetrics scrape: counters are declared without `_total`.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name kind");
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            }
        })
        .collect()
}

#[test]
fn metrics_doc_lists_exactly_what_sidecar_and_authority_serve() {
    let settings = Settings {
        extra: "[sidecar.admin]\nlisten_addr = \"127.0.0.1:0\"\n".into(),
        ..Settings::default()
    };
    let d = Deployment::new(None, &settings);
    let sc = d.start(&[]);
    let (code, sidecar) = sc.admin_get("/metrics");
    assert_eq!(code, 200, "{sidecar}");

    let admin = free_port();
    let a = authority::Deployment::with_extra(
        "permit (principal, action, resource);",
        &genai_app_policy(),
        &format!("admin_addr = \"127.0.0.1:{admin}\"\n"),
    );
    let _server = a.start();
    let (code, auth) = get(&format!("http://127.0.0.1:{admin}/metrics"));
    assert_eq!(code, 200, "{auth}");

    let mut served = scraped_names(&sidecar);
    served.extend(scraped_names(&auth));
    assert!(
        served.iter().any(|n| n.starts_with("firma_sidecar_"))
            && served.iter().any(|n| n.starts_with("firma_authority_")),
        "both scrapes carry metrics: {served:?}"
    );
    let doc = first_column(&read("docs/metrics.md"));
    diff("metrics", &served, &doc, "docs/metrics.md");
}

/// What `firma doctor -c` says about one probe config: the fields `expected` by the section
/// the probe key sits in, or the type error when the path is not a table of that shape.
enum Probe {
    Fields(BTreeSet<String>),
    NotATable(String),
}

fn probe(dir: &Path, segments: &[(String, bool)]) -> Probe {
    let mut text = String::new();
    for i in 0..segments.len() {
        let path: Vec<&str> = segments[..=i].iter().map(|(s, _)| s.as_str()).collect();
        let path = path.join(".");
        let is_array = segments[i].1;
        // Array ancestors need their element header; plain ancestors are implied.
        if is_array {
            text.push_str(&format!("[[{path}]]\n"));
        } else if i == segments.len() - 1 {
            text.push_str(&format!("[{path}]\n"));
        }
    }
    text.push_str("zz_probe = 1\n");
    let file = dir.join("probe.toml");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(firma_bin())
        // Only the config error matters here; the hook probe would load the eBPF object per call.
        .args(["doctor", "--no-probe", "-c"])
        .arg(&file)
        .output()
        .expect("run firma doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("probe.toml"))
        .unwrap_or_else(|| panic!("doctor names no config error for\n{text}\n{stdout}"))
        .to_string();
    match line.split_once("unknown field `zz_probe`, expected ") {
        Some((_, list)) => Probe::Fields(
            list.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect(),
        ),
        None if line.contains("there are no fields") => Probe::Fields(BTreeSet::new()),
        None => Probe::NotATable(line),
    }
}

/// Every section of the schema (dotted path, `[[array]]` marked) with its leaf keys.
fn schema_sections() -> BTreeMap<String, BTreeSet<String>> {
    let tmp = tempfile::tempdir().unwrap();
    let mut sections = BTreeMap::new();
    let mut pending: Vec<Vec<(String, bool)>> = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        let Probe::Fields(fields) = probe(tmp.path(), &path) else {
            panic!("{path:?} was a table a moment ago");
        };
        let mut leaves = BTreeSet::new();
        for f in fields {
            let mut child = path.clone();
            child.push((f.clone(), false));
            match probe(tmp.path(), &child) {
                Probe::Fields(_) => pending.push(child),
                Probe::NotATable(e) if e.contains("expected a sequence") => {
                    child.last_mut().unwrap().1 = true;
                    match probe(tmp.path(), &child) {
                        Probe::Fields(_) => pending.push(child),
                        Probe::NotATable(_) => {
                            leaves.insert(f);
                        }
                    }
                }
                Probe::NotATable(_) => {
                    leaves.insert(f);
                }
            }
        }
        let name: Vec<&str> = path.iter().map(|(s, _)| s.as_str()).collect();
        sections.insert(name.join("."), leaves);
    }
    sections
}

/// The configuration table: section -> (the row's whole text, the keys it names outside
/// parentheses). A `[x]` or `[[x]]` token inside a row switches to that sub-section.
fn documented_sections(doc: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `[")) {
        let (head, keys) = line[2..].split_once(" | ").expect("| section | keys |");
        let mut current = head
            .trim_matches(|c| c == '`' || c == '[' || c == ']')
            .to_string();
        out.entry(current.clone()).or_default().0 = keys.to_string();
        let mut depth = 0i32;
        for (i, part) in keys.split('`').enumerate() {
            if i % 2 == 0 {
                depth += part.matches('(').count() as i32 - part.matches(')').count() as i32;
                continue;
            }
            if depth > 0 {
                continue;
            }
            if part.starts_with('[') {
                current = part.trim_matches(|c| c == '[' || c == ']').to_string();
                out.entry(current.clone()).or_default().0 = keys.to_string();
            } else if part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                out.entry(current.clone())
                    .or_default()
                    .1
                    .insert(part.to_string());
            }
        }
    }
    out
}

#[test]
fn configuration_doc_names_every_schema_key_and_no_other() {
    let schema = schema_sections();
    assert!(
        schema.contains_key("sidecar.interceptor") && schema.contains_key("authority"),
        "probing found the sections: {:?}",
        schema.keys()
    );
    let doc = documented_sections(&read("docs/configuration.md"));
    let mut problems = Vec::new();
    for (section, keys) in &schema {
        if keys.is_empty() {
            continue;
        }
        // A section without a row of its own (an array of small tables such as `workloads`)
        // is documented in its parent's row.
        let mut owner = section.as_str();
        let row = loop {
            if let Some(r) = doc.get(owner) {
                break Some(r);
            }
            match owner.rsplit_once('.') {
                Some((parent, _)) => owner = parent,
                None => break None,
            }
        };
        let Some((text, _)) = row else {
            problems.push(format!("[{section}] has no row (keys {keys:?})"));
            continue;
        };
        for k in keys {
            if !text.contains(&format!("`{k}`")) {
                problems.push(format!("[{section}] {k}: not documented"));
            }
        }
    }
    for (section, (_, keys)) in &doc {
        let Some(code) = schema.get(section) else {
            problems.push(format!(
                "[{section}] is documented but not a section of the schema"
            ));
            continue;
        };
        let subsections: BTreeSet<&str> = schema
            .keys()
            .filter_map(|s| s.strip_prefix(&format!("{section}.")))
            .collect();
        for k in keys {
            if !code.contains(k) && !subsections.contains(k.as_str()) {
                problems.push(format!("[{section}] {k}: documented but not in the schema"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md drifted from the schema:\n  {}",
        problems.join("\n  ")
    );
}

/// Markdown files a reader meets: the README, docs/, and each crate's or folder's README.
fn markdown_files() -> Vec<PathBuf> {
    files_under(&repo_root(), &|p| p.extension().is_some_and(|e| e == "md"))
}

/// Tracked-looking text files: skips build output, dependencies, fuzz corpora and VCS data.
fn files_under(root: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                if !matches!(
                    name.as_str(),
                    "target" | "node_modules" | "corpus" | "artifacts" | "prebuilt"
                ) && !name.starts_with('.')
                    || name == ".ci"
                {
                    pending.push(p);
                }
            } else if keep(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo_root())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation other than `-`/`_`
/// dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Headings of a Markdown file (outside code fences), as written.
fn headings(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            let h = line.trim_start_matches('#');
            if h.starts_with(' ') {
                out.push(h.trim().to_string());
            }
        }
    }
    out
}

/// What a `FILE.md "Name"` citation may name: a heading, or a paragraph's bold lead
/// (`**Destination binding** (…)`), the way docs/architecture.md names its parts.
fn citable_names(text: &str) -> Vec<String> {
    let mut names = headings(text);
    for line in text.lines() {
        if let Some((lead, _)) = line.strip_prefix("**").and_then(|r| r.split_once("**")) {
            names.push(lead.trim_end_matches('.').to_string());
        }
    }
    names
}

/// The comment text of a Rust source (`//`, `///`, `//!` to the end of the line): code builds
/// paths at run time (`root.join("<dir>/<file>")`) that are not citations.
fn rust_comments(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.split_once("//").map(|(_, c)| c))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of a Markdown file outside code fences and inline code.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            for (i, part) in line.split('`').enumerate() {
                if i % 2 == 0 {
                    out.push_str(part);
                }
            }
            out.push('\n');
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let text = prose(&text);
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: ({target}): no such file", rel(&file)));
                continue;
            }
            if !anchor.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
                let t = std::fs::read_to_string(&resolved).unwrap();
                if !headings(&t).iter().any(|h| slug(h) == anchor) {
                    broken.push(format!("{}: ({target}): no such heading", rel(&file)));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

/// Repository-relative paths cited in `text`: tokens starting with a top-level folder of the
/// repository and ending in a known file extension.
fn cited_paths(text: &str, top: &BTreeSet<String>) -> Vec<String> {
    const EXT: [&str; 10] = [
        ".rs",
        ".md",
        ".sh",
        ".toml",
        ".proto",
        ".cedar",
        ".cedarschema",
        ".json",
        ".py",
        ".js",
    ];
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c)))
        .map(|t| t.trim_end_matches(['.', '/']))
        .filter(|t| {
            t.split_once('/')
                .is_some_and(|(first, rest)| top.contains(first) && !rest.is_empty())
                && EXT.iter().any(|e| t.ends_with(e))
                && !t.contains('*')
        })
        .map(String::from)
        .collect()
}

#[test]
fn cited_files_and_sections_exist_and_docs_speak_of_no_issues() {
    let root = repo_root();
    let top: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target")
        .collect();
    let sources = files_under(&root, &|p| {
        p.extension().is_some_and(|e| {
            ["rs", "md", "sh", "toml", "py", "js", "proto", "cedar"].contains(&e.to_str().unwrap())
        }) || p.ends_with(".ci/run")
    });
    let mut problems = Vec::new();
    for file in &sources {
        let name = rel(file);
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("<<<<<<< "))
            && text.lines().any(|l| l.starts_with(">>>>>>> "))
        {
            problems.push(format!("{name}: holds merge conflict markers"));
        }
        let text = if name.ends_with(".rs") {
            rust_comments(&text)
        } else {
            text
        };
        for p in cited_paths(&text, &top) {
            // Paths the tests create at run time or outside the tree are not citations.
            if p.starts_with("target/") || p.contains("/tmp/") || p.contains("..") {
                continue;
            }
            if !root.join(&p).exists() {
                problems.push(format!("{name}: cites {p}, which does not exist"));
            }
        }
        // `FILE.md "Section"` / `FILE.md, "Section"`: the heading must exist.
        for (i, _) in text.match_indices(".md") {
            let after = &text[i + 3..];
            let after = after.strip_prefix(',').unwrap_or(after);
            let Some(q) = after
                .strip_prefix(" \"")
                .or_else(|| after.strip_prefix(" (\""))
            else {
                continue;
            };
            let Some(end) = q.find('"') else { continue };
            let heading = &q[..end];
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c)))
                .map_or(0, |s| s + 1);
            let cited = &text[start..i + 3];
            let target = if cited.contains('/') {
                root.join(cited)
            } else {
                // A bare `run.md` is a page of docs/ (or the file's own folder).
                let own = file.parent().unwrap().join(cited);
                if own.exists() {
                    own
                } else {
                    root.join("docs").join(cited)
                }
            };
            let Ok(t) = std::fs::read_to_string(&target) else {
                continue; // a missing file is reported above when it is a path
            };
            let hs = citable_names(&t);
            if !hs
                .iter()
                .any(|h| h.contains(heading) || slug(h) == slug(heading))
            {
                problems.push(format!(
                    "{name}: cites {cited} \"{heading}\", which has no such heading"
                ));
            }
        }
        if name.ends_with(".md") {
            let lower = prose(&text).to_lowercase();
            for stale in [
                "the issue",
                "this issue",
                "issue #",
                "design.md",
                "toolchain.md",
                "/work/",
            ] {
                if lower.contains(stale) {
                    problems.push(format!(
                        "{name}: speaks of \"{stale}\", which a reader cannot see"
                    ));
                }
            }
        }
    }
    // Citations of a README section: the README is a front door, its sections are few.
    let readme = read("README.md");
    let readme_headings = headings(&readme);
    for file in &sources {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (i, _) in text.match_indices("README \"") {
            let q = &text[i + 8..];
            let Some(end) = q.find('"') else { continue };
            if !readme_headings.iter().any(|h| h.contains(&q[..end])) {
                problems.push(format!(
                    "{}: cites README \"{}\", which has no such heading",
                    rel(file),
                    &q[..end]
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "stale references:\n  {}",
        problems.join("\n  ")
    );
}
