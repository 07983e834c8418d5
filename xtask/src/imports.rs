//! `cargo xtask imports`: the file-level import graph of the product crates, measured from the
//! code, with two rules: no circle between files, and no arrow from a lower floor to a higher
//! one (the floors table below; docs/architecture.md, "Import rules").
//!
//! How it measures: the module tree is followed from `src/lib.rs` through `mod x;` declarations
//! (test-only modules and items, `#[cfg(test)]`, are left out). Each file is parsed with `syn`;
//! every `use` tree and every path in the code (types, expressions, patterns, and `crate::`/
//! `super::`/`self::` paths inside macro calls) that starts with `crate`, `self`, `super`, a child
//! module or a name a `use` brought in, is resolved to the deepest module it names. That
//! module's file is the arrow's head. Arrows to the crate root (`lib.rs`: module declarations
//! and re-exports only) are not counted. Circles are the strongly connected components (Tarjan)
//! of more than one file.

use anyhow::{Context, bail};
use proc_macro2::{TokenStream, TokenTree};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// A crate whose imports are checked, and its floors: `(path prefix, floor, why)`. The longest
/// matching prefix (a file, or a directory ending in `/`) gives a file's floor; an arrow may
/// go to the same floor or a lower one.
struct Checked {
    dir: &'static str,
    floors: &'static [(&'static str, u8, &'static str)],
}

const CRATES: &[Checked] = &[
    Checked {
        dir: "firma-sidecar",
        floors: &[
            ("server.rs", 6, "startup and wiring"),
            ("admin.rs", 6, "the admin reader (/metrics, /readyz)"),
            (
                "metrics.rs",
                6,
                "the registry every component's metrics join",
            ),
            ("interceptor/", 5, "how connections arrive and are served"),
            (
                "dns/",
                5,
                "the DNS guard (a listener, like the interceptors)",
            ),
            ("state.rs", 5, "what a connection handler shares"),
            (
                "gate.rs",
                5,
                "the decision for callers that carry the request (embedded, ext_authz)",
            ),
            ("ext_authz.rs", 5, "Envoy's ext_authz Check listener"),
            (
                "sequence.rs",
                5,
                "the one decision sequence of a request, shared by the interceptors and the gate",
            ),
            ("control/", 4, "the attach socket"),
            ("ebpf/", 4, "the kernel side"),
            (
                "node/",
                4,
                "the Kubernetes node agent: CRI pods to attachments",
            ),
            ("pipeline/", 3, "the decision"),
            ("audit/", 3, "the record of each decision"),
            ("response.rs", 3, "Firma's own answers"),
            ("error_shape.rs", 3, "the providers' error shapes"),
            (
                "connector/",
                2,
                "after an allow: credentials, binding, dial",
            ),
            ("tls/", 2, "CA, leaf cache, sniffer, upstream client config"),
            ("authority_client/", 2, "the bundle and revocation streams"),
            ("config.rs", 1, "the sidecar's configuration"),
            (
                "pipeline/session_store/config.rs",
                1,
                "the [sidecar.session_store] keys config.rs validates",
            ),
            ("conn.rs", 0, "connection, decision and outcome types"),
            ("sockopt.rs", 0, "socket options"),
            ("drain.rs", 0, "graceful shutdown"),
            ("workers.rs", 0, "connection worker threads"),
            ("http_body.rs", 0, "the one boxed HTTP body type"),
            (
                "ebpf/allow.rs",
                0,
                "the UDP/loopback allow-entry syntax config validates",
            ),
        ],
    },
    Checked {
        dir: "firma-authority",
        floors: &[
            ("server.rs", 4, "startup and wiring"),
            ("admin.rs", 4, "the admin reader (/metrics, /readyz)"),
            (
                "metrics.rs",
                4,
                "the registry every component's metrics join",
            ),
            ("service.rs", 3, "the gRPC service"),
            ("service/", 3, "the gRPC service"),
            ("collector.rs", 3, "the audit collector service"),
            ("issuance.rs", 2, "evaluate, clamp, sign"),
            ("bundles.rs", 2, "load, watch, publish bundles"),
            ("bundles/", 2, "load, watch, publish bundles"),
            ("revocation_hub.rs", 2, "watch the revocation file, fan out"),
            ("revocation_hub/", 2, "watch the revocation file, fan out"),
            (
                "etcd.rs",
                2,
                "follow the revocation set shared through etcd",
            ),
            (
                "revoke.rs",
                2,
                "the admin Revoke RPC: token check, write to the store",
            ),
            ("validate.rs", 1, "bounds on requests"),
            ("revocations.rs", 1, "the revocation file"),
            ("listen.rs", 0, "accepted connections"),
            ("config.rs", 0, "the authority's configuration"),
            ("error.rs", 0, "the library's error types"),
        ],
    },
];

#[derive(clap::Args)]
pub struct ImportsArgs {
    /// Print every arrow, not only the violations.
    #[arg(long)]
    pub verbose: bool,
}

/// Checks every crate in [`CRATES`]; fails on any circle, upward arrow or file without a floor.
pub fn run(root: &Path, args: &ImportsArgs) -> anyhow::Result<()> {
    let mut failures = 0;
    for c in CRATES {
        let graph = Graph::of(&root.join(c.dir).join("src"))?;
        let arrows: usize = graph.edges.values().map(BTreeSet::len).sum();
        let circles = graph.circles();
        let mut unplaced = Vec::new();
        let mut upward = Vec::new();
        for (from, tos) in &graph.edges {
            let Some(f) = floor(c, from) else {
                unplaced.push(from.clone());
                continue;
            };
            for to in tos {
                match floor(c, to) {
                    Some(t) if t > f => upward.push((from, f, to, t)),
                    _ => {}
                }
            }
        }
        println!(
            "{}: {} files, {arrows} arrows, {} circle(s), {} upward arrow(s)",
            c.dir,
            graph.edges.len(),
            circles.len(),
            upward.len()
        );
        if args.verbose {
            for (from, tos) in &graph.edges {
                for to in tos {
                    println!("  {from} -> {to}");
                }
            }
        }
        for circle in &circles {
            println!("  circle of {} files:", circle.len());
            for from in circle {
                for to in graph.edges[from].iter().filter(|t| circle.contains(*t)) {
                    println!("    {from} -> {to}");
                }
            }
        }
        for (from, f, to, t) in &upward {
            println!("  upward: {from} (floor {f}) -> {to} (floor {t})");
        }
        for file in &unplaced {
            println!("  no floor for {file}: add it to the table in xtask/src/imports.rs");
        }
        failures += circles.len() + upward.len() + unplaced.len();
    }
    if failures > 0 {
        bail!("{failures} import rule violation(s) (docs/architecture.md, \"Import rules\")");
    }
    Ok(())
}

fn floor(c: &Checked, file: &str) -> Option<u8> {
    c.floors
        .iter()
        .filter(|(p, _, _)| file == *p || (p.ends_with('/') && file.starts_with(p)))
        .max_by_key(|(p, _, _)| p.len())
        .map(|(_, f, _)| *f)
}

/// Files (relative to `src/`) and the files each one imports from.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

/// One leaf of a `use` tree: the path as written, the name it binds (none for a glob) and
/// whether it is a re-export (`pub use`, any `pub(...)`).
struct UseLeaf {
    path: Vec<String>,
    local: Option<String>,
    public: bool,
}

/// A module: its file, its `use` leaves and its other items (test-only items left out).
struct Module {
    file: PathBuf,
    uses: Vec<UseLeaf>,
    items: Vec<syn::Item>,
}

impl Graph {
    fn of(src: &Path) -> anyhow::Result<Self> {
        let mut modules: BTreeMap<Vec<String>, Module> = BTreeMap::new();
        discover(
            &src.join("lib.rs"),
            src.to_path_buf(),
            Vec::new(),
            &mut modules,
        )?;
        let rel = |p: &Path| -> String {
            p.strip_prefix(src)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        };
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let r = Resolver { modules: &modules };
        for (path, m) in &modules {
            let from = rel(&m.file);
            edges.entry(from.clone()).or_default();
            let mut targets = Vec::new();
            for u in m.uses.iter().filter(|u| !u.public) {
                targets.extend(r.resolve(path, &u.path, false, 0));
            }
            let mut v = PathVisitor {
                r: &r,
                module: path,
                out: &mut targets,
            };
            for item in &m.items {
                v.visit_item(item);
            }
            for t in targets {
                let to = &modules[&t].file;
                if !t.is_empty() && *to != m.file {
                    edges.entry(from.clone()).or_default().insert(rel(to));
                }
            }
        }
        edges.remove("lib.rs");
        Ok(Self { edges })
    }

    /// Strongly connected components of more than one file (Tarjan).
    fn circles(&self) -> Vec<BTreeSet<String>> {
        struct T<'a> {
            g: &'a BTreeMap<String, BTreeSet<String>>,
            index: HashMap<&'a str, usize>,
            low: HashMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on: BTreeSet<&'a str>,
            out: Vec<BTreeSet<String>>,
        }
        fn visit<'a>(t: &mut T<'a>, v: &'a str) {
            let i = t.index.len();
            t.index.insert(v, i);
            t.low.insert(v, i);
            t.stack.push(v);
            t.on.insert(v);
            let g = t.g;
            for w in g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if t.low[v] == t.index[v] {
                let mut comp = BTreeSet::new();
                while let Some(w) = t.stack.pop() {
                    t.on.remove(w);
                    comp.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    t.out.push(comp);
                }
            }
        }
        let mut t = T {
            g: &self.edges,
            index: HashMap::new(),
            low: HashMap::new(),
            stack: Vec::new(),
            on: BTreeSet::new(),
            out: Vec::new(),
        };
        for v in self.edges.keys() {
            if !t.index.contains_key(v.as_str()) {
                visit(&mut t, v);
            }
        }
        t.out
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta.require_list().is_ok_and(|l| {
                l.tokens
                    .to_string()
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == "test")
            })
    })
}

/// Reads `file` (module `path`) and, recursively, the files of its `mod x;` children.
fn discover(
    file: &Path,
    child_dir: PathBuf,
    path: Vec<String>,
    modules: &mut BTreeMap<Vec<String>, Module>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let ast = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
    add_module(ast.items, file, child_dir, path, modules)
}

fn add_module(
    items: Vec<syn::Item>,
    file: &Path,
    child_dir: PathBuf,
    path: Vec<String>,
    modules: &mut BTreeMap<Vec<String>, Module>,
) -> anyhow::Result<()> {
    let mut uses = Vec::new();
    let mut kept = Vec::new();
    for item in items {
        if item_is_test_only(&item) {
            continue;
        }
        match item {
            syn::Item::Use(u) => {
                let public = !matches!(u.vis, syn::Visibility::Inherited);
                flatten_use(&u.tree, Vec::new(), &mut |path, local| {
                    uses.push(UseLeaf {
                        path,
                        local,
                        public,
                    })
                });
            }
            syn::Item::Mod(m) => {
                let name = m.ident.to_string();
                let mut sub = path.clone();
                sub.push(name.clone());
                let dir = child_dir.join(&name);
                match m.content {
                    Some((_, inner)) => add_module(inner, file, dir, sub, modules)?,
                    None => {
                        let flat = child_dir.join(format!("{name}.rs"));
                        let f = if flat.exists() {
                            flat
                        } else {
                            dir.join("mod.rs")
                        };
                        discover(&f, dir, sub, modules)?;
                    }
                }
            }
            other => kept.push(other),
        }
    }
    modules.insert(
        path,
        Module {
            file: file.to_path_buf(),
            uses,
            items: kept,
        },
    );
    Ok(())
}

fn item_is_test_only(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => return false,
    };
    is_test_only(attrs)
}

/// Calls `f(path, local name)` for each leaf of a `use` tree (a glob has no local name).
fn flatten_use(
    tree: &syn::UseTree,
    prefix: Vec<String>,
    f: &mut impl FnMut(Vec<String>, Option<String>),
) {
    match tree {
        syn::UseTree::Path(p) => {
            let mut next = prefix;
            next.push(p.ident.to_string());
            flatten_use(&p.tree, next, f);
        }
        syn::UseTree::Name(n) => {
            let mut path = prefix;
            if n.ident != "self" {
                path.push(n.ident.to_string());
            }
            let local = path.last().cloned();
            f(path, local);
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix;
            if r.ident != "self" {
                path.push(r.ident.to_string());
            }
            f(path, Some(r.rename.to_string()));
        }
        syn::UseTree::Glob(_) => f(prefix, None),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix.clone(), f);
            }
        }
    }
}

struct Resolver<'a> {
    modules: &'a BTreeMap<Vec<String>, Module>,
}

impl Resolver<'_> {
    /// The module that defines what `path`, written in `module`, names: the deepest module
    /// on the path, followed through re-exports (`pub use`). `None`: not this crate's.
    /// `aliases`: whether the first segment may be a name a `use` of `module` bound (code
    /// paths; a `use` path itself is not resolved through its siblings).
    fn resolve(
        &self,
        module: &[String],
        path: &[String],
        aliases: bool,
        depth: u8,
    ) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let (base, rest): (Vec<String>, &[String]) = match first.as_str() {
            "crate" => (Vec::new(), rest),
            "self" => (module.to_vec(), rest),
            "super" => {
                let mut m = module.to_vec();
                m.pop();
                let mut rest = rest;
                while rest.first().is_some_and(|s| s == "super") {
                    m.pop();
                    rest = &rest[1..];
                }
                (m, rest)
            }
            _ => {
                let mut child = module.to_vec();
                child.push(first.clone());
                if self.modules.contains_key(&child) {
                    (child, rest)
                } else if aliases && depth < 8 {
                    let leaf = self
                        .modules
                        .get(module)?
                        .uses
                        .iter()
                        .find(|u| u.local.as_ref() == Some(first))?;
                    let full = [leaf.path.as_slice(), rest].concat();
                    return self.resolve(module, &full, false, depth + 1);
                } else {
                    return None;
                }
            }
        };
        self.deepest(base, rest, depth)
    }

    fn deepest(&self, mut base: Vec<String>, rest: &[String], depth: u8) -> Option<Vec<String>> {
        if !self.modules.contains_key(&base) {
            return None;
        }
        let mut rest = rest;
        while let Some((seg, tail)) = rest.split_first() {
            base.push(seg.clone());
            if self.modules.contains_key(&base) {
                rest = tail;
                continue;
            }
            base.pop();
            // An item: follow it if the module only re-exports it.
            if depth < 8
                && let Some(leaf) = self.modules[&base]
                    .uses
                    .iter()
                    .find(|u| u.public && u.local.as_ref() == Some(seg))
            {
                let full = [leaf.path.as_slice(), tail].concat();
                return self.resolve(&base, &full, false, depth + 1).or(Some(base));
            }
            break;
        }
        Some(base)
    }
}

struct PathVisitor<'a, 'b> {
    r: &'a Resolver<'a>,
    module: &'a [String],
    out: &'b mut Vec<Vec<String>>,
}

impl PathVisitor<'_, '_> {
    fn push(&mut self, segs: Vec<String>) {
        if let Some(t) = self.r.resolve(self.module, &segs, true, 0) {
            self.out.push(t);
        }
    }

    /// `crate::a::b`, `super::a`, `self::a` sequences inside a macro call's tokens.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let toks: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                TokenTree::Group(g) => self.scan_tokens(g.stream()),
                TokenTree::Ident(id)
                    if ["crate", "super", "self"].contains(&id.to_string().as_str()) =>
                {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while j + 2 < toks.len() + 1 {
                        let colons = matches!((&toks.get(j), &toks.get(j + 1)),
                            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':');
                        match (colons, toks.get(j + 2)) {
                            (true, Some(TokenTree::Ident(next))) => {
                                segs.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    if segs.len() > 1 {
                        self.push(segs);
                    }
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for PathVisitor<'_, '_> {
    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            self.push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, p);
    }

    // `pub(crate)`, `pub(in crate::x)`: visibility, not an import.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.scan_tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, _: &'ast syn::Attribute) {}

    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {}

    // Test-only items nested in impls and functions.
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
}
