//! The metrics reference in docs/METRICS.md is generated from the code: its table must equal
//! what `observer metrics-reference` prints, every family must be explained below it, and every
//! `observer_*` name any document mentions must be one the daemon exports. And the repository
//! stands alone: no file cites one outside it.
//!
//! `UPDATE_DOCS=1 cargo test --test docs_reference` rewrites the generated table.

use std::{collections::BTreeSet, path::Path, process::Command};

use observer::{metrics::schema::sample_names, reference};

const BEGIN: &str = "<!-- BEGIN GENERATED: observer metrics-reference -->\n";
const END: &str = "<!-- END GENERATED -->";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn metrics_doc() -> String {
    std::fs::read_to_string(repo().join("docs/METRICS.md")).expect("read docs/METRICS.md")
}

#[test]
fn generated_table_matches_the_code() {
    let output = Command::new(env!("CARGO_BIN_EXE_observer"))
        .arg("metrics-reference")
        .output()
        .expect("run observer metrics-reference");
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    let doc = metrics_doc();
    let start = doc
        .find(BEGIN)
        .expect("docs/METRICS.md lost its BEGIN marker")
        + BEGIN.len();
    let end = doc[start..]
        .find(END)
        .expect("docs/METRICS.md lost its END marker")
        + start;
    if doc[start..end] == table {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let updated = format!("{}{table}{}", &doc[..start], &doc[end..]);
        std::fs::write(repo().join("docs/METRICS.md"), updated).unwrap();
        return;
    }
    panic!(
        "docs/METRICS.md's generated table differs from `observer metrics-reference`;\n\
         rewrite it with: UPDATE_DOCS=1 cargo test --test docs_reference\n\
         --- in the doc ---\n{}\n--- from the code ---\n{table}",
        &doc[start..end]
    );
}

#[test]
fn every_family_is_explained_below_the_table() {
    let doc = metrics_doc();
    let notes = &doc[doc
        .find("## What each family counts")
        .expect("docs/METRICS.md lost its 'What each family counts' section")..];
    let notes = &notes[..notes[3..].find("\n## ").map_or(notes.len(), |at| at + 3)];
    let explained: BTreeSet<&str> = notes
        .lines()
        .filter_map(|line| line.strip_prefix("- "))
        .flat_map(|line| line.split(':').next().unwrap_or("").split(", "))
        .map(|name| name.trim_matches('`'))
        .collect();
    let families = reference::families().unwrap();
    for family in &families {
        let short = family
            .name
            .strip_prefix("observer_")
            .unwrap_or(&family.name);
        let covered = explained.contains(short)
            || (short.starts_with("process_") && explained.contains("process_*"));
        assert!(
            covered,
            "{} is not explained under 'What each family counts'",
            family.name
        );
    }
    for name in &explained {
        let known = families.iter().any(|family| {
            family.name == format!("observer_{name}")
                || family.name == *name
                || *name == "process_*"
        });
        assert!(
            known,
            "'What each family counts' explains {name}, which is not exported"
        );
    }
}

/// Every `observer_…` and `gen_ai_…` token in the docs and the deploy kit (PromQL, prose) names a family or a
/// sample the daemon exports. Tokens inside recording-rule names (`instance:observer_…:rate5m`) are not
/// metric names and are skipped.
#[test]
fn documents_name_only_exported_metrics() {
    let families = reference::families().unwrap();
    let exported: BTreeSet<String> = families
        .iter()
        .flat_map(|family| [vec![family.name.clone()], sample_names(family)].concat())
        .collect();
    // The GenAI conventions' label names share the families' `gen_ai_` start.
    let label_names: BTreeSet<&str> = families
        .iter()
        .flat_map(|family| family.labels.iter().map(String::as_str))
        .collect();
    let mut files = vec![repo().join("README.md")];
    for dir in ["docs", "deploy"] {
        collect_files(&repo().join(dir), &mut files);
    }
    let mut unknown = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            let metric = token.starts_with("observer_")
                || (token.starts_with("gen_ai_") && !label_names.contains(token));
            if !metric || token.contains(':') {
                continue;
            }
            // `observer_gpu_*` in prose is a prefix of several names.
            let known = if token.ends_with('_') {
                exported.iter().any(|name| name.starts_with(token))
            } else {
                exported.contains(token)
            };
            if !known {
                unknown.push(format!("{}: {token}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "names the observer does not export:\n{}",
        unknown.join("\n")
    );
}

fn collect_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, files);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "yml" | "yaml" | "json")
        ) {
            files.push(path);
        }
    }
}

/// No tracked file points into a folder beside the repository or cites the specification it
/// started from by section number: what the code and docs need of it is in docs/DESIGN.md.
#[test]
fn the_repository_stands_alone() {
    let listed = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo())
        .output()
        .expect("run git ls-files");
    assert!(listed.status.success(), "git ls-files failed");
    let mut found = Vec::new();
    for name in listed.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        // Binary files (the kernel object) are not read.
        let Ok(text) = std::fs::read_to_string(repo().join(&name)) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            // Spelled in two pieces so that this file does not find itself.
            if line.contains(concat!("../", "shared")) || line.contains(concat!("SPEC ", "§")) {
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}
