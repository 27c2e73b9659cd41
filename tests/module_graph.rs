//! The crate's top-level modules import each other in one direction: this test reads every file
//! under src/, collects which modules each one names (`crate::NAME`, `use crate::{NAME, ..}`),
//! and fails on a cycle, printing it with the files that make each edge. No broker needed.
//!
//! Below them all is the codec, a crate of its own (`crates/codec`, re-exported as
//! `warren::codec`): Cargo refuses a dependency cycle between crates, so nothing here needs to
//! check that it names none of these modules.
//!
//! The layers today, from the bottom: metrics, tls, backoff, addr, memory; route, config;
//! topology, io; upstream; state; health; client and admin (side by side, never importing each
//! other); evacuate (above admin, whose management API client it uses; never client); proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level module a file under src/ belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a source text names through `crate::`, comments left out.
fn named_modules(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            // `crate::{a, b::c}`: every name in the group.
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                group
                    .split(['}', ','])
                    .map(|n| n.trim().split("::").next().unwrap_or_default())
                    .collect()
            } else {
                vec![
                    rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or_default(),
                ]
            };
            for n in names {
                if modules.contains(n) {
                    found.insert(n.to_owned());
                }
            }
        }
    }
    found
}

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<PathBuf>>>;

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut g: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        for dep in named_modules(&text, &modules) {
            if dep != m {
                g.get_mut(&m)
                    .expect("module")
                    .entry(dep)
                    .or_default()
                    .insert(f.strip_prefix(&src).expect("under src").to_path_buf());
            }
        }
    }
    g
}

/// A cycle through `start`, if any (depth-first search over the edges).
fn cycle_from(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g[at].keys() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let g = graph();
    assert!(
        g.len() >= 10,
        "modules found: {:?}",
        g.keys().collect::<Vec<_>>()
    );
    for m in g.keys() {
        if let Some(cycle) = cycle_from(&g, m) {
            let mut why = String::new();
            for (i, a) in cycle.iter().enumerate() {
                let b = &cycle[(i + 1) % cycle.len()];
                why.push_str(&format!("\n  {a} -> {b}: {:?}", g[a][b]));
            }
            panic!("import cycle {} -> {m}:{why}", cycle.join(" -> "));
        }
    }
}

/// The admin endpoint and the sessions meet only in `state` (and the admin reads the node probes
/// of `health`): the admin never steers a session directly, and sessions know nothing of HTTP.
#[test]
fn admin_and_sessions_do_not_import_each_other() {
    let g = graph();
    for (from, to) in [
        ("admin", "client"),
        ("client", "admin"),
        ("client", "health"),
        ("health", "admin"),
    ] {
        assert!(
            !g[from].contains_key(to),
            "{from} imports {to}: {:?}",
            g[from][to]
        );
    }
}

#[test]
fn the_reader_sees_grouped_and_plain_imports() {
    let modules: BTreeSet<String> = ["codec", "config", "io"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = "use crate::codec::Method;\nuse crate::{config::Config, io};\n// crate::x\n";
    let found = named_modules(text, &modules);
    assert_eq!(found, modules);
    assert!(named_modules("// use crate::codec;", &modules).is_empty());
}
