//! Normalize: request -> action class, from the TOML rules files of `[sidecar.mapping]`.
//!
//! ```toml
//! [[rule]]
//! method = "POST"                 # an HTTP method, "CONNECT", or "*" (default "*")
//! host = "api.openai.com"         # exact, "*.example.com" (strict subdomains), or "*"
//! path = "/v1/chat/completions"   # exact, prefix "/v1/*", or "*" (default "*")
//! action_class = "model.inference.chat"
//! ```
//!
//! **Specificity** (the most specific matching rule wins, compared in this order):
//! 1. host: exact > `*.suffix` (a longer suffix beats a shorter one) > `*`;
//! 2. path: exact > prefix (a longer prefix beats a shorter one) > `*`;
//! 3. method: explicit > `*`.
//!
//! Two rules of equal specificity that match the same request necessarily have identical
//! patterns, so rejecting duplicate `(method, host, path)` triples at load time leaves every
//! request with exactly one winner. Rules are independent of file order.
//!
//! **Destinations** (blind tunnels, unknown protocols): only rules that claim a whole host can
//! classify a connection whose requests are never seen: rules with `method = "CONNECT"` (path
//! ignored) or with `path = "*"`. The most specific such rule by host wins; for an unknown
//! protocol the "host" matched is the literal `ip:port`.

use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A rules-file problem; always names the file and, where there is one, the rule index.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{file}: cannot read mapping rules: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{file}: not valid mapping rules TOML: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: rule[{index}]: {message}")]
    Rule {
        file: PathBuf,
        index: usize,
        message: String,
    },
    #[error(
        "{file}: rule[{index}]: duplicates {first_file} rule[{first_index}] (same method, host and path)"
    )]
    Duplicate {
        file: PathBuf,
        index: usize,
        first_file: PathBuf,
        first_index: usize,
    },
    #[error(
        "{file}: rule[{index}]: action class {action:?} is not declared in the Cedar schema (known: {known})"
    )]
    UnknownAction {
        file: PathBuf,
        index: usize,
        action: String,
        known: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default = "star")]
    method: String,
    host: String,
    #[serde(default = "star")]
    path: String,
    action_class: String,
    /// Request attributes from the JSON body (see [`super::extract`]).
    #[serde(default)]
    extract: Option<std::collections::BTreeMap<String, super::extract::RawPointers>>,
    /// Marks an MCP endpoint (see [`super::mcp`]).
    #[serde(default)]
    mcp: Option<super::mcp::RawSpec>,
    /// Streamed requests get `stream_options.include_usage: true` (OpenAI chat/completions).
    #[serde(default)]
    inject_include_usage: bool,
    /// Destination ports this rule allows for its host (default `[443]`).
    #[serde(default)]
    ports: Option<Vec<u16>>,
}

fn star() -> String {
    "*".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostPat {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` -> `.example.com`.
    Suffix(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PathPat {
    Exact(String),
    Prefix(String),
    Any,
}

/// One loaded rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Upper-case method, or `None` for `*`.
    method: Option<String>,
    host: HostPat,
    path: PathPat,
    pub action_class: String,
    /// Attributes to read from the JSON body before the decision (empty: the body streams).
    pub extract: Vec<super::extract::Extract>,
    /// An MCP endpoint: POST bodies are decided per JSON-RPC message ([`super::mcp`]).
    pub mcp: Option<super::mcp::McpSpec>,
    /// Set `stream_options.include_usage` in streamed requests (see `docs/llm-policies.md`).
    pub inject_include_usage: bool,
    /// Destination ports allowed for the rule's host (`ports`, default [`DEFAULT_PORTS`]).
    pub ports: Vec<u16>,
    /// Where the rule came from, for diagnostics.
    pub file: PathBuf,
    pub index: usize,
}

/// Specificity key: larger wins. See the module docs.
type Specificity = (u8, usize, u8, usize, u8);

impl Rule {
    fn specificity(&self) -> Specificity {
        let (hr, hl) = match &self.host {
            HostPat::Exact(h) => (3, h.len()),
            HostPat::Suffix(s) => (2, s.len()),
            HostPat::Any => (1, 0),
        };
        let (pr, pl) = match &self.path {
            PathPat::Exact(p) => (3, p.len()),
            PathPat::Prefix(p) => (2, p.len()),
            PathPat::Any => (1, 0),
        };
        (hr, hl, pr, pl, u8::from(self.method.is_some()))
    }

    fn host_matches(&self, host: &str) -> bool {
        match &self.host {
            HostPat::Exact(h) => h == host,
            HostPat::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPat::Any => true,
        }
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathPat::Exact(p) => p == path,
            PathPat::Prefix(p) => path.starts_with(p.as_str()),
            PathPat::Any => true,
        }
    }

    fn method_matches(&self, method: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }

    /// Whether this rule may classify a connection whose requests are never seen.
    fn claims_destination(&self) -> bool {
        self.method.as_deref() == Some("CONNECT") || self.path == PathPat::Any
    }
}

/// The result of classifying one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped<'a> {
    pub action_class: &'a str,
    /// What the rule extracts from the body.
    pub extract: &'a [super::extract::Extract],
    /// The MCP endpoint declaration, if the rule has one.
    pub mcp: Option<&'a super::mcp::McpSpec>,
    /// The rule's `inject_include_usage`.
    pub inject_include_usage: bool,
    /// `file:rule[i]` of the winning rule.
    pub rule: (&'a Path, usize),
}

/// All rules, indexed for lookup: exact hosts in a map (they beat everything), the rest in a
/// list ordered by decreasing specificity.
#[derive(Debug, Default)]
pub struct MappingRules {
    by_host: HashMap<String, Vec<Rule>>,
    wildcard: Vec<Rule>,
    files: Vec<PathBuf>,
}

fn parse_host(raw: &str) -> Result<HostPat, String> {
    let h = raw.trim().to_ascii_lowercase();
    if h == "*" {
        return Ok(HostPat::Any);
    }
    if let Some(rest) = h.strip_prefix("*.") {
        if rest.is_empty() || rest.contains('*') {
            return Err(format!(
                "host {raw:?}: expected `*.suffix` with a non-empty suffix"
            ));
        }
        return Ok(HostPat::Suffix(format!(".{rest}")));
    }
    if h.is_empty() || h.contains('*') || h.contains('/') {
        return Err(format!(
            "host {raw:?}: expected an exact host, `*.suffix` or `*`"
        ));
    }
    Ok(HostPat::Exact(h))
}

fn parse_path(raw: &str) -> Result<PathPat, String> {
    if raw == "*" {
        return Ok(PathPat::Any);
    }
    if !raw.starts_with('/') {
        return Err(format!(
            "path {raw:?}: expected `*` or a path starting with `/`"
        ));
    }
    match raw.find('*') {
        None => Ok(PathPat::Exact(raw.to_string())),
        Some(i) if i == raw.len() - 1 => Ok(PathPat::Prefix(raw[..i].to_string())),
        Some(_) => Err(format!(
            "path {raw:?}: `*` is only allowed as the last character (prefix match)"
        )),
    }
}

pub use crate::connector::binding::DEFAULT_PORTS;

fn parse_ports(raw: Option<Vec<u16>>) -> Result<Vec<u16>, String> {
    let Some(mut ports) = raw else {
        return Ok(DEFAULT_PORTS.to_vec());
    };
    if ports.is_empty() || ports.contains(&0) {
        return Err(format!(
            "ports {ports:?}: expected a non-empty list of ports 1-65535 (omit it for [443])"
        ));
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

fn parse_method(raw: &str) -> Result<Option<String>, String> {
    if raw == "*" {
        return Ok(None);
    }
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!(
            "method {raw:?}: expected an HTTP method name or `*`"
        ));
    }
    Ok(Some(raw.to_ascii_uppercase()))
}

impl MappingRules {
    /// The host patterns the rules name, as written in a rules file (`api.example.com`,
    /// `*.example.com`), without the catch-all `*`. The DNS guard answers these names.
    pub fn host_patterns(&self) -> Vec<String> {
        let mut out: Vec<String> = self.by_host.keys().cloned().collect();
        for r in &self.wildcard {
            if let HostPat::Suffix(s) = &r.host {
                out.push(format!("*{s}"));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Loads and merges every file, in order. Duplicates across files are errors too.
    pub fn load(paths: &[PathBuf]) -> Result<Self, MappingError> {
        let mut rules = Vec::new();
        for file in paths {
            let text = std::fs::read_to_string(file).map_err(|source| MappingError::Read {
                file: file.clone(),
                cause: source,
            })?;
            rules.extend(Self::parse_file(&text, file)?);
        }
        Self::from_rules(rules, paths.to_vec())
    }

    /// Parses one file's text (exposed for tests and benches).
    pub fn parse_file(text: &str, file: &Path) -> Result<Vec<Rule>, MappingError> {
        let parsed: RulesFile = toml::from_str(text).map_err(|e| MappingError::Syntax {
            file: file.to_path_buf(),
            message: e.message().to_string(),
        })?;
        parsed
            .rule
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                let err = |message: String| MappingError::Rule {
                    file: file.to_path_buf(),
                    index,
                    message,
                };
                if r.action_class.trim().is_empty() {
                    return Err(err("action_class: expected a non-empty action class".into()));
                }
                if r.mcp.is_some() && r.extract.is_some() {
                    return Err(err(
                        "mcp and extract: an MCP endpoint's body is read as JSON-RPC, not extracted".into(),
                    ));
                }
                if r.inject_include_usage && r.extract.is_none() {
                    return Err(err(
                        "inject_include_usage: the rule must also `extract` (its body is read, then rewritten)".into(),
                    ));
                }
                Ok(Rule {
                    method: parse_method(&r.method).map_err(err)?,
                    host: parse_host(&r.host).map_err(err)?,
                    path: parse_path(&r.path).map_err(err)?,
                    action_class: r.action_class,
                    extract: match r.extract {
                        Some(x) => super::extract::parse_spec(x).map_err(err)?,
                        None => Vec::new(),
                    },
                    mcp: match r.mcp {
                        Some(m) => Some(super::mcp::parse_spec(m).map_err(err)?),
                        None => None,
                    },
                    inject_include_usage: r.inject_include_usage,
                    ports: parse_ports(r.ports).map_err(err)?,
                    file: file.to_path_buf(),
                    index,
                })
            })
            .collect()
    }

    /// Indexes `rules`, rejecting duplicates.
    pub fn from_rules(rules: Vec<Rule>, files: Vec<PathBuf>) -> Result<Self, MappingError> {
        let mut seen: HashMap<(Option<String>, HostPat, PathPat), (PathBuf, usize)> =
            HashMap::new();
        let mut out = Self {
            files,
            ..Self::default()
        };
        for r in rules {
            let key = (r.method.clone(), r.host.clone(), r.path.clone());
            if let Some((first_file, first_index)) = seen.get(&key) {
                return Err(MappingError::Duplicate {
                    file: r.file,
                    index: r.index,
                    first_file: first_file.clone(),
                    first_index: *first_index,
                });
            }
            seen.insert(key, (r.file.clone(), r.index));
            match &r.host {
                HostPat::Exact(h) => out.by_host.entry(h.clone()).or_default().push(r),
                _ => out.wildcard.push(r),
            }
        }
        let by_spec = |a: &Rule, b: &Rule| b.specificity().cmp(&a.specificity());
        for v in out.by_host.values_mut() {
            v.sort_by(by_spec);
        }
        out.wildcard.sort_by(by_spec);
        Ok(out)
    }

    /// Fails on the first rule whose action class `known` does not contain.
    pub fn check_actions(&self, known: &BTreeSet<String>) -> Result<(), MappingError> {
        let mut all: Vec<&Rule> = self.rules().collect();
        all.sort_by(|a, b| (&a.file, a.index).cmp(&(&b.file, b.index)));
        for r in all {
            // An MCP rule also produces the MCP action classes.
            let mcp = r.mcp.iter().flat_map(|_| super::mcp::ACTION_CLASSES.iter());
            if let Some(missing) = mcp.into_iter().find(|c| !known.contains(**c)) {
                let k: Vec<&str> = known.iter().map(String::as_str).collect();
                return Err(MappingError::UnknownAction {
                    file: r.file.clone(),
                    index: r.index,
                    action: (*missing).to_string(),
                    known: k.join(", "),
                });
            }
            if !known.contains(&r.action_class) {
                let k: Vec<&str> = known.iter().map(String::as_str).collect();
                return Err(MappingError::UnknownAction {
                    file: r.file.clone(),
                    index: r.index,
                    action: r.action_class.clone(),
                    known: k.join(", "),
                });
            }
        }
        Ok(())
    }

    fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.by_host.values().flatten().chain(self.wildcard.iter())
    }

    /// Number of rules loaded.
    pub fn len(&self) -> usize {
        self.rules().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The files the rules came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn first<'a>(&'a self, host: &str, pred: impl Fn(&Rule) -> bool) -> Option<Mapped<'a>> {
        let exact = self.by_host.get(host).into_iter().flatten();
        let wild = self.wildcard.iter().filter(|r| r.host_matches(host));
        exact.chain(wild).find(|r| pred(r)).map(|r| Mapped {
            action_class: &r.action_class,
            extract: &r.extract,
            mcp: r.mcp.as_ref(),
            inject_include_usage: r.inject_include_usage,
            rule: (&r.file, r.index),
        })
    }

    /// Rules whose host pattern matches `host` (any method or path).
    fn for_host<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Rule> {
        let exact = self.by_host.get(host).into_iter().flatten();
        let host = host.to_string();
        exact.chain(self.wildcard.iter().filter(move |r| r.host_matches(&host)))
    }

    /// Whether `port` is a destination port for `host`: one the `ports` of a rule matching the
    /// host lists (a rule without `ports` allows 443). A host no rule matches (passed through
    /// with `default_protected = false`) gets 443 only. Allocation-free on the hot path.
    pub fn allows_port(&self, host: &str, port: u16) -> bool {
        let exact = self.by_host.get(host).into_iter().flatten();
        let mut any = false;
        for r in exact.chain(self.wildcard.iter().filter(|r| r.host_matches(host))) {
            any = true;
            if r.ports.contains(&port) {
                return true;
            }
        }
        !any && DEFAULT_PORTS.contains(&port)
    }

    /// Every port [`Self::allows_port`] allows for `host`, ascending (for denial details).
    pub fn ports_for(&self, host: &str) -> Vec<u16> {
        let mut out: Vec<u16> = self.for_host(host).flat_map(|r| r.ports.clone()).collect();
        if out.is_empty() {
            out = DEFAULT_PORTS.to_vec();
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a rule names `host` exactly (not through `*` or `*.suffix`): what an IP-literal
    /// destination needs to be allowed at all.
    pub fn names_exactly(&self, host: &str) -> bool {
        self.by_host.contains_key(host)
    }

    /// Classifies one request. `host` must already be lowercase (as [`super::RequestContext`]
    /// guarantees).
    pub fn classify(&self, method: &str, host: &str, path: &str) -> Option<Mapped<'_>> {
        self.first(host, |r| r.method_matches(method) && r.path_matches(path))
    }

    /// Classifies a connection decided without seeing its requests (see module docs).
    pub fn classify_destination(&self, host: &str) -> Option<Mapped<'_>> {
        self.first(host, Rule::claims_destination)
    }
}

impl crate::connector::binding::DestinationRules for MappingRules {
    fn allows_port(&self, host: &str, port: u16) -> bool {
        MappingRules::allows_port(self, host, port)
    }
    fn ports_for(&self, host: &str) -> Vec<u16> {
        MappingRules::ports_for(self, host)
    }
    fn names_exactly(&self, host: &str) -> bool {
        MappingRules::names_exactly(self, host)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> MappingRules {
        let f = Path::new("t.toml");
        MappingRules::from_rules(MappingRules::parse_file(text, f).unwrap(), vec![f.into()])
            .unwrap()
    }

    fn class<'a>(r: &'a MappingRules, m: &str, h: &str, p: &str) -> Option<&'a str> {
        r.classify(m, h, p).map(|m| m.action_class)
    }

    const SPEC: &str = r#"
        [[rule]]
        host = "*"
        action_class = "any.host"
        [[rule]]
        host = "*.example.com"
        action_class = "suffix.short"
        [[rule]]
        host = "*.api.example.com"
        action_class = "suffix.long"
        [[rule]]
        host = "api.example.com"
        action_class = "exact.any"
        [[rule]]
        host = "api.example.com"
        path = "/v1/*"
        action_class = "exact.v1"
        [[rule]]
        host = "api.example.com"
        path = "/v1/chat/*"
        action_class = "exact.v1.chat"
        [[rule]]
        host = "api.example.com"
        path = "/v1/chat/completions"
        action_class = "exact.completions"
        [[rule]]
        method = "get"
        host = "api.example.com"
        path = "/v1/chat/completions"
        action_class = "exact.completions.get"
    "#;

    #[test]
    fn host_specificity_exact_beats_longer_suffix_beats_shorter_beats_any() {
        let r = rules(SPEC);
        assert_eq!(class(&r, "GET", "api.example.com", "/x"), Some("exact.any"));
        assert_eq!(
            class(&r, "GET", "eu.api.example.com", "/x"),
            Some("suffix.long")
        );
        assert_eq!(
            class(&r, "GET", "www.example.com", "/x"),
            Some("suffix.short")
        );
        // `*.example.com` does not match the apex.
        assert_eq!(class(&r, "GET", "example.com", "/x"), Some("any.host"));
        assert_eq!(class(&r, "GET", "other.org", "/"), Some("any.host"));
    }

    #[test]
    fn path_and_method_specificity() {
        let r = rules(SPEC);
        let h = "api.example.com";
        assert_eq!(
            class(&r, "POST", h, "/v1/chat/completions"),
            Some("exact.completions")
        );
        assert_eq!(
            class(&r, "GET", h, "/v1/chat/completions"),
            Some("exact.completions.get")
        );
        assert_eq!(
            class(&r, "POST", h, "/v1/chat/other"),
            Some("exact.v1.chat")
        );
        assert_eq!(class(&r, "POST", h, "/v1/models"), Some("exact.v1"));
        assert_eq!(class(&r, "POST", h, "/v2"), Some("exact.any"));
    }

    #[test]
    fn exact_host_with_any_path_beats_wildcard_host_with_exact_path() {
        let r = rules(
            r#"
            [[rule]]
            host = "*.example.com"
            path = "/exact"
            method = "POST"
            action_class = "wild"
            [[rule]]
            host = "a.example.com"
            action_class = "exact"
            "#,
        );
        assert_eq!(class(&r, "POST", "a.example.com", "/exact"), Some("exact"));
        assert_eq!(class(&r, "POST", "b.example.com", "/exact"), Some("wild"));
        assert_eq!(class(&r, "GET", "b.example.com", "/exact"), None);
    }

    #[test]
    fn unmapped_returns_none() {
        let r = rules(
            r#"
            [[rule]]
            host = "api.openai.com"
            path = "/v1/*"
            action_class = "model.inference.chat"
            "#,
        );
        assert!(r.classify("GET", "api.openai.com", "/v2/x").is_none());
        assert!(r.classify("GET", "paste.rs", "/").is_none());
    }

    #[test]
    fn destination_rules_need_connect_or_any_path() {
        let r = rules(
            r#"
            [[rule]]
            host = "api.openai.com"
            path = "/v1/*"
            action_class = "model.inference.chat"
            [[rule]]
            method = "CONNECT"
            host = "db.internal"
            path = "/ignored"
            action_class = "data.read"
            [[rule]]
            host = "*.vendor.com"
            action_class = "communication.external.send"
            [[rule]]
            host = "127.0.0.1:5432"
            action_class = "data.read"
            "#,
        );
        assert!(r.classify_destination("api.openai.com").is_none());
        assert_eq!(
            r.classify_destination("db.internal")
                .map(|m| m.action_class),
            Some("data.read")
        );
        assert_eq!(
            r.classify_destination("x.vendor.com")
                .map(|m| m.action_class),
            Some("communication.external.send")
        );
        assert!(r.classify_destination("127.0.0.1:5432").is_some());
    }

    #[test]
    fn duplicates_and_bad_patterns_name_file_and_index() {
        let f = Path::new("dup.toml");
        let parsed = MappingRules::parse_file(
            r#"
            [[rule]]
            host = "A.com"
            action_class = "x"
            [[rule]]
            host = "a.com"
            path = "*"
            method = "*"
            action_class = "y"
            "#,
            f,
        )
        .unwrap();
        let e = MappingRules::from_rules(parsed, vec![])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dup.toml: rule[1]: duplicates dup.toml rule[0]"),
            "{e}"
        );

        for (bad, what) in [
            ("host = \"a*.com\"", "host"),
            ("host = \"a.com\"\npath = \"v1\"", "path"),
            ("host = \"a.com\"\npath = \"/v1/*/x\"", "path"),
            ("host = \"a.com\"\nmethod = \"G T\"", "method"),
            (
                "host = \"a.com\"\ninject_include_usage = true",
                "inject_include_usage",
            ),
        ] {
            let text = format!("[[rule]]\n{bad}\naction_class = \"x\"\n");
            let e = MappingRules::parse_file(&text, f).unwrap_err().to_string();
            assert!(
                e.starts_with("dup.toml: rule[0]: ") && e.contains(what),
                "{e}"
            );
        }
        let e = MappingRules::parse_file("[[rule]]\nhost = \"a\"\naction = \"x\"\n", f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dup.toml"), "{e}");
    }

    #[test]
    fn mcp_rules_declare_arguments_and_need_the_mcp_classes() {
        let r = rules(
            "[[rule]]\nhost = \"mcp.test\"\npath = \"/mcp\"\naction_class = \"mcp.session\"\nmcp = { arguments = { path = \"String\" } }\n",
        );
        let m = r.classify("POST", "mcp.test", "/mcp").unwrap();
        assert_eq!(m.mcp.unwrap().arguments.len(), 1);
        let mut known: BTreeSet<String> = ["mcp.session".to_string()].into();
        let e = r.check_actions(&known).unwrap_err().to_string();
        assert!(e.contains("mcp.tools.call"), "{e}");
        known.extend(
            super::super::mcp::ACTION_CLASSES
                .iter()
                .map(|c| c.to_string()),
        );
        r.check_actions(&known).unwrap();
        let f = Path::new("m.toml");
        let e = MappingRules::parse_file(
            "[[rule]]\nhost = \"a\"\naction_class = \"x\"\nmcp = {}\nextract = { model = \"/model\" }\n",
            f,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rule[0]: mcp and extract"), "{e}");
        let e = MappingRules::parse_file(
            "[[rule]]\nhost = \"a\"\naction_class = \"x\"\nmcp = { arguments = { p = \"Float\" } }\n",
            f,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mcp.arguments.p"), "{e}");
    }

    #[test]
    fn unknown_action_class_is_reported() {
        let r = rules("[[rule]]\nhost = \"a.com\"\naction_class = \"nope.nope\"\n");
        let known: BTreeSet<String> = ["model.inference.chat".to_string()].into();
        let e = r.check_actions(&known).unwrap_err().to_string();
        assert!(
            e.contains("t.toml: rule[0]") && e.contains("nope.nope"),
            "{e}"
        );
    }
}
