//! docs/semantics.md names, for each row, the test that shows it. This test fails when a named
//! test does not exist, so the table cannot drift from the suite. No broker needed.
//!
//! A reference is a code span `tests/FILE.rs::NAME` (the test function `NAME`, or a scenario
//! `NAME` listed in a macro such as `differential!`), or `tests/PATH` for a script.

use std::path::Path;

/// Every code span of the document (text between single backticks).
fn code_spans(doc: &str) -> Vec<&str> {
    doc.split('`').skip(1).step_by(2).collect()
}

/// Whether `source` defines a test or scenario function `name`.
fn defines(source: &str, name: &str) -> bool {
    source.match_indices(name).any(|(at, _)| {
        let before = &source[..at];
        let after = &source[at + name.len()..];
        let whole_word = !after.starts_with(|c: char| c.is_alphanumeric() || c == '_')
            && !before.ends_with(|c: char| c.is_alphanumeric() || c == '_');
        // `fn NAME(` or an entry `NAME,` of a scenario list.
        whole_word && (before.ends_with("fn ") || after.starts_with(',') || after.starts_with(")"))
    })
}

#[test]
fn every_test_named_in_semantics_md_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/semantics.md")).expect("docs/semantics.md");
    let mut checked = 0;
    let mut missing = Vec::new();
    for span in code_spans(&doc) {
        if !span.starts_with("tests/") {
            continue;
        }
        let (file, name) = match span.split_once("::") {
            Some((f, n)) => (f, Some(n)),
            None => (span, None),
        };
        let path = root.join(file);
        if name.is_none() && path.is_dir() {
            checked += 1;
            continue;
        }
        let Ok(source) = std::fs::read_to_string(&path) else {
            missing.push(format!("{span}: no file {file}"));
            continue;
        };
        if let Some(name) = name
            && !defines(&source, name)
        {
            missing.push(format!("{span}: {file} has no test {name}"));
            continue;
        }
        checked += 1;
    }
    assert!(
        missing.is_empty(),
        "docs/semantics.md names tests that do not exist:\n  {}",
        missing.join("\n  ")
    );
    assert!(checked >= 40, "only {checked} test references found");
}

#[test]
fn the_checker_spots_a_missing_test() {
    let source = "differential!(\n    real_one,\n);\nasync fn real_two() {}\n";
    assert!(defines(source, "real_one"));
    assert!(defines(source, "real_two"));
    assert!(!defines(source, "real"));
    assert!(!defines(source, "missing"));
    assert_eq!(code_spans("a `b` c `d`"), vec!["b", "d"]);
}
