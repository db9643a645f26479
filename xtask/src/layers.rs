//! `cargo xtask layers`: the daemon's library keeps its dependencies one way. Each top-level
//! module of `observer/src` sits on a layer ([`LAYERS`], the order of `observer/src/lib.rs`'s
//! layout); a module may use its own items and those of layers below it, never a layer above
//! or a module beside it on the same layer. The simulator (`observer_sim`) is for the binary
//! only: the library never names it.
//!
//! Every `crate::…` path in a module's files counts, in `use` trees and in code alike (parsed
//! with `syn`, so comments and strings do not). The binary under `observer/src/bin/` is the
//! top of the house and is not checked.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use syn::visit::Visit;

/// The library's top-level modules, bottom layer first. Data flows up: capture or the proxy
/// hands connections and bytes to the pipeline, which runs them through the engine into
/// metrics, which the admin server serves.
pub const LAYERS: &[&[&str]] = &[
    // Vocabulary: roles, sides, directions, connection records, clocks.
    &["base"],
    // Readers of the host that know nothing of traffic: `/proc` (processes, socket tables);
    // Ollama's settings and the GPUs, found through the processes.
    &["procfs"],
    &["server_settings", "gpu", "engine"],
    &["metrics"],
    &["pipeline"],
    // What feeds the pipeline or the metrics: the kernel capture, the probe, the collectors.
    &["capture", "probe", "collectors"],
    &["admin"],
    // The start-up path `run`, `proxy` and `trace` share.
    &["daemon"],
    // The commands.
    &["run", "proxy", "trace", "check", "reference"],
];

/// One `use` (or path) of a module from a layer it may not use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub file: PathBuf,
    pub line: usize,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: `{}` uses `{}`, which is not below it",
            self.file.display(),
            self.line,
            self.from,
            self.to
        )
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Whether `from` may name `to`: itself, or a module on a lower layer.
fn allowed(from: &str, to: &str) -> bool {
    if from == to {
        return true;
    }
    match (layer_of(from), layer_of(to)) {
        (Some(a), Some(b)) => b < a,
        _ => false,
    }
}

/// Every violation in the library under `src` (`observer/src`).
pub fn check(src: &Path) -> anyhow::Result<Vec<Violation>> {
    let declared = declared_modules(&src.join("lib.rs"))?;
    let listed: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|layer| layer.iter().map(|m| (*m).to_owned()))
        .collect();
    if declared != listed {
        let missing: Vec<_> = declared.difference(&listed).collect();
        let gone: Vec<_> = listed.difference(&declared).collect();
        bail!(
            "lib.rs and xtask's LAYERS disagree: declared but on no layer {missing:?}, on a layer but not declared {gone:?}"
        );
    }
    let mut violations = Vec::new();
    for file in rust_files(src)? {
        let relative = file.strip_prefix(src).expect("under src");
        let Some(module) = top_module(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let syntax =
            syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let mut uses = Uses {
            in_test: test_only(relative),
            ..Uses::default()
        };
        uses.visit_file(&syntax);
        for to in uses.found {
            if to != "observer_sim" && !listed.contains(&to) {
                // `crate::SomeItem` of lib.rs itself: not a module.
                continue;
            }
            if !allowed(&module, &to) {
                violations.push(Violation {
                    file: relative.to_owned(),
                    line: line_naming(&text, &to),
                    from: module.clone(),
                    to,
                });
            }
        }
    }
    violations.sort();
    violations.dedup();
    Ok(violations)
}

/// The first line that names `module` after `crate::` (or at all, in a `use crate::{…}`
/// group), for the report; spans carry no lines without proc-macro2's `span-locations`.
fn line_naming(text: &str, module: &str) -> usize {
    let path = if module == "observer_sim" {
        "observer_sim".to_owned()
    } else {
        format!("crate::{module}")
    };
    let item = format!("{module}::");
    let found = text.lines().position(|l| l.contains(&path)).or_else(|| {
        text.lines()
            .position(|l| l.trim_start().starts_with(&item) || l.contains(&format!("{{{item}")))
    });
    found.map_or(0, |i| i + 1)
}

/// Files only a `#[cfg(test)] mod` includes: `tests.rs`, `*_tests.rs`, `fixtures.rs`.
fn test_only(relative: &Path) -> bool {
    relative
        .file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|stem| stem == "tests" || stem.ends_with("_tests") || stem == "fixtures")
}

/// `pub mod x;` and `mod x;` of lib.rs.
fn declared_modules(lib: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text =
        std::fs::read_to_string(lib).with_context(|| format!("reading {}", lib.display()))?;
    let syntax = syn::parse_file(&text).with_context(|| format!("parsing {}", lib.display()))?;
    Ok(syntax
        .items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Mod(m) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect())
}

/// The top-level module a file belongs to; `None` for lib.rs and the binary's files.
fn top_module(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    if relative.components().count() == 1 {
        return match first.strip_suffix(".rs")? {
            "lib" | "main" => None,
            module => Some(module.to_owned()),
        };
    }
    (first != "bin").then(|| first.to_owned())
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The module each `crate::module…` path names (and `observer_sim::…`).
#[derive(Default)]
struct Uses {
    found: Vec<String>,
    /// Inside `#[cfg(test)]` (or a file only tests include): the simulator is a fixture there.
    in_test: bool,
}

impl Uses {
    fn add(&mut self, first: &syn::Ident, second: Option<&syn::Ident>) {
        self.add_at(first, second);
    }

    fn add_at(&mut self, first: &syn::Ident, second: Option<&syn::Ident>) {
        if first == "observer_sim" {
            if !self.in_test {
                self.found.push("observer_sim".to_owned());
            }
        } else if first == "crate"
            && let Some(second) = second
        {
            self.found.push(second.to_string());
        }
    }

    /// Each path of a `use` tree, flattened: `crate::{a::X, b}` is `crate::a::X`, `crate::b`.
    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<syn::Ident>) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.clone());
                self.use_tree(&p.tree, prefix);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_path(prefix, &n.ident),
            syn::UseTree::Rename(r) => self.use_path(prefix, &r.ident),
            syn::UseTree::Glob(_) => {
                if let Some(first) = prefix.first() {
                    self.add_at(first, prefix.get(1));
                }
            }
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(tree, prefix);
                }
            }
        }
    }

    fn use_path(&mut self, prefix: &[syn::Ident], last: &syn::Ident) {
        match prefix {
            [] => self.add_at(last, None),
            [first, rest @ ..] => self.add_at(first, Some(rest.first().unwrap_or(last))),
        }
    }
}

/// Whether `attrs` hold `#[cfg(test)]`.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Ident>()
                .is_ok_and(|ident| ident == "test")
    })
}

impl<'ast> Visit<'ast> for Uses {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        let was = self.in_test;
        self.in_test |= is_test(&item.attrs);
        syn::visit::visit_item_mod(self, item);
        self.in_test = was;
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&item.tree, &mut Vec::new());
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if let Some(first) = segments.next() {
            self.add(&first.ident, segments.next().map(|s| &s.ident));
        }
        syn::visit::visit_path(self, path);
    }
}

/// Where docs/ARCHITECTURE.md's module map and the tree disagree: a module of lib.rs missing
/// from the map, a file the map names that does not exist, a layer number that is not the
/// module's layer in [`LAYERS`], a file of the binary missing.
pub fn map_mismatches(workspace: &Path) -> anyhow::Result<Vec<String>> {
    let doc = std::fs::read_to_string(workspace.join("docs/ARCHITECTURE.md"))
        .context("reading docs/ARCHITECTURE.md")?;
    let src = workspace.join("observer/src");
    let start = doc
        .find("### Module map (`observer/src`)")
        .context("ARCHITECTURE.md has no module map")?;
    let end = doc[start..].find("\n## ").map_or(doc.len(), |n| start + n);
    let mut problems = Vec::new();
    let mut mapped = BTreeSet::new();
    let mut in_binary = false;
    for line in doc[start..end].lines() {
        if line.starts_with("The binary") {
            in_binary = true;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | layer | module | owns | must not |, or | file | owns | must not | for the binary.
        let (layer, names) = match (in_binary, cells.as_slice()) {
            (false, ["", layer, names, _, _, ""]) if layer.parse::<usize>().is_ok() => {
                (layer.parse::<usize>().ok(), *names)
            }
            (true, ["", names, _, _, ""]) if names.starts_with('`') => (None, *names),
            _ => continue,
        };
        // `capture/btf.rs`, `syscalls.rs`: later names are in the first one's folder.
        let mut folder = PathBuf::new();
        for (i, name) in names
            .split(',')
            .map(|n| n.trim().trim_matches('`'))
            .enumerate()
        {
            let path = if in_binary {
                src.join("bin/observer").join(name)
            } else if i == 0 {
                folder = Path::new(name)
                    .parent()
                    .map(Path::to_owned)
                    .unwrap_or_default();
                src.join(name)
            } else {
                src.join(&folder).join(name)
            };
            if !path.exists() {
                problems.push(format!("the map names {name}, which is not in the tree"));
            }
            if in_binary {
                continue;
            }
            let relative = path.strip_prefix(&src).expect("under src");
            let module = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|m| m.trim_end_matches(".rs").to_owned())
                .unwrap_or_default();
            if layer != layer_of(&module) {
                problems.push(format!(
                    "the map puts {name} on layer {layer:?}, LAYERS on {:?}",
                    layer_of(&module)
                ));
            }
            mapped.insert(module);
        }
    }
    for module in declared_modules(&src.join("lib.rs"))? {
        if !mapped.contains(&module) {
            problems.push(format!("module {module} is not in the map"));
        }
    }
    for entry in std::fs::read_dir(src.join("bin/observer")).context("listing the binary")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // A folder beside `name.rs` holds that file's submodules (its tests).
        let named = [
            format!("`{name}`"),
            format!("`{name}/`"),
            format!("`{name}.rs`"),
        ]
        .iter()
        .any(|n| doc[start..end].contains(n.as_str()));
        if !named {
            problems.push(format!("the binary's {name} is not in the map"));
        }
    }
    Ok(problems)
}

/// `cargo xtask layers`: prints each violation; fails when there is one.
pub fn run(workspace: &Path) -> anyhow::Result<()> {
    let violations = check(&workspace.join("observer/src"))?;
    for v in &violations {
        println!("{v}");
    }
    if !violations.is_empty() {
        bail!("{} uses from a layer above or beside", violations.len());
    }
    let mismatches = map_mismatches(workspace)?;
    for m in &mismatches {
        println!("docs/ARCHITECTURE.md: {m}");
    }
    if !mismatches.is_empty() {
        bail!("the module map of docs/ARCHITECTURE.md does not match the tree");
    }
    println!(
        "observer's library: every module uses only layers below it ({} layers), as docs/ARCHITECTURE.md maps them",
        LAYERS.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(text: &str) -> Vec<String> {
        let mut uses = Uses::default();
        uses.visit_file(&syn::parse_file(text).unwrap());
        uses.found.dedup();
        uses.found
    }

    #[test]
    fn paths_in_uses_and_code_name_their_module() {
        assert_eq!(
            uses("use crate::{base::Role, engine::{Engine, Exchange}};"),
            ["base", "engine"]
        );
        assert_eq!(uses("use crate::metrics;"), ["metrics"]);
        assert_eq!(
            uses("fn f() { crate::pipeline::Pipeline::new(); }"),
            ["pipeline"]
        );
        assert_eq!(uses("use observer_sim::Dice;"), ["observer_sim"]);
        // Tests may use the simulator as a fixture; the layers still hold for them.
        assert_eq!(
            uses("#[cfg(test)]\nmod tests { use observer_sim::Dice; use crate::run; }"),
            ["run"]
        );
        // Comments and strings are not paths.
        assert!(uses("// crate::run\nconst S: &str = \"crate::run\";").is_empty());
    }

    #[test]
    fn a_module_may_use_only_lower_layers() {
        assert!(allowed("engine", "base"));
        assert!(allowed("run", "pipeline"));
        assert!(allowed("capture", "capture"));
        assert!(!allowed("base", "engine"));
        assert!(!allowed("engine", "capture"));
        assert!(!allowed("pipeline", "capture"));
        // Beside on one layer is not below.
        assert!(!allowed("capture", "probe"));
        assert!(!allowed("engine", "observer_sim"));
    }

    /// docs/ARCHITECTURE.md's module map names every module, on its layer, and only files that
    /// exist.
    #[test]
    fn the_module_map_matches_the_tree() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let problems = map_mismatches(&workspace).unwrap();
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// The acceptance check itself: the library as it is keeps its dependencies one way.
    #[test]
    fn the_library_uses_only_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../observer/src");
        let violations = check(&src).unwrap();
        let listed: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert!(listed.is_empty(), "{}", listed.join("\n"));
    }
}
