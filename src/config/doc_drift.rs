//! Keeps `docs/configuration.md` and the configuration code in step (a child module of
//! `config`, so it can see the private `Raw*` structs the file is deserialized into).
//!
//! **The keys the code accepts** are found by walking [`RawConfig`]'s `Deserialize` impl with
//! [`Walker`], a deserializer that answers every struct with all of its fields (serde hands the
//! field names to `deserialize_struct`) and every value with a dummy of the asked type. It
//! records each key's path (`limits.frame_max`, `clusters.probe.user`) and shape (integer,
//! string, table, array of ...). `toml::Spanned`, `Option`, `Vec` and newtypes are seen
//! through, so a new key or a new table anywhere under `RawConfig` (e.g. a `[tls]` section or a
//! per-cluster `tls` table) is found without editing this file.
//!
//! **The keys the doc lists** are the rows of the tables under the section headings of
//! `docs/configuration.md`: `## Top-level keys`, `## [name]`, `## [[name]]` and `### a.b` (see
//! [`parse_doc`]).
//!
//! The tests fail, naming every key, when a key or a section exists on one side only, when a
//! documented type does not match the code's, when a documented default differs from the
//! code's (a literal default is written into a minimal file, which must then parse to the same
//! [`Config`] as without it), or when a ```` ```toml ```` example in the doc is not a valid file.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde::de::value::{BorrowedStrDeserializer, UsizeDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::Config;
use super::raw::RawConfig;

const DOC: &str = include_str!("../../docs/configuration.md");
const DOC_NAME: &str = "docs/configuration.md";

/// Sections whose every key must have a literal default in the doc, checked against the code.
const DEFAULTS_REQUIRED_IN: [&str; 3] = ["timeouts", "limits", "runtime"];

/// The smallest valid file, in two parts so keys can be put in between.
const BASE_LISTEN: &str = "listen = \"127.0.0.1:5673\"\n";
const BASE_CLUSTER: &str =
    "[[clusters]]\nname = \"doc-test\"\nrole = \"shard\"\nnodes = [\"doc-test.invalid:5672\"]\n";

// ---------------------------------------------------------------------------------------------
// The code side: walking the Raw structs.

/// What a key holds, as the doc's Type column names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Integer,
    Float,
    Boolean,
    String,
    /// A struct: a table with a fixed set of keys (a section of the doc).
    Table,
    /// A map: a table with free-form keys.
    AnyTable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kind {
    shape: Shape,
    /// How many arrays it is inside: 1 for `nodes` (array of strings) or `clusters` (array of
    /// tables).
    arrays: usize,
}

impl Kind {
    fn is_section(self) -> bool {
        self.shape == Shape::Table
    }
}

impl fmt::Display for Kind {
    /// The words the doc's Type column must start with.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.shape {
            Shape::Integer => "integer",
            Shape::Float => "float",
            Shape::Boolean => "boolean",
            Shape::String => "string",
            Shape::Table | Shape::AnyTable => "table",
        };
        for _ in 0..self.arrays {
            f.write_str("array of ")?;
        }
        f.write_str(word)?;
        if self.arrays > 0 {
            f.write_str("s")?;
        }
        Ok(())
    }
}

/// Every key of the file, by dotted path ("" is the top level itself), as the code accepts it.
fn code_keys() -> BTreeMap<String, Kind> {
    let found = RefCell::new(BTreeMap::new());
    let walker = Walker {
        path: String::new(),
        arrays: 0,
        found: &found,
    };
    if let Err(e) = RawConfig::deserialize(walker) {
        panic!("cannot walk the configuration types: {e}");
    }
    let keys = found.into_inner();
    // The walk itself must work: a few keys that exist for sure.
    for sure in [
        "listen",
        "limits.frame_max",
        "clusters.nodes",
        "clusters.probe.user",
    ] {
        assert!(keys.contains_key(sure), "walker missed `{sure}`: {keys:?}");
    }
    keys
}

#[derive(Debug)]
struct WalkError(String);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl de::Error for WalkError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

/// A deserializer that produces a dummy value of whatever type asks, recording what it saw.
#[derive(Clone)]
struct Walker<'a> {
    path: String,
    arrays: usize,
    found: &'a RefCell<BTreeMap<String, Kind>>,
}

/// `serde_spanned`'s private protocol: `Spanned<T>` deserializes as a struct of this name with
/// fields start, end and value.
const SPANNED: &str = "$__serde_spanned_private_Spanned";

impl Walker<'_> {
    fn record(&self, shape: Shape) {
        self.found.borrow_mut().insert(
            self.path.clone(),
            Kind {
                shape,
                arrays: self.arrays,
            },
        );
    }

    fn unsupported(&self, what: &str) -> WalkError {
        WalkError(format!(
            "key `{}`: its type asks for {what}, which src/config/doc_drift.rs cannot describe; \
             teach its Walker about it",
            self.path
        ))
    }
}

macro_rules! integers {
    ($($method:ident => $visit:ident($zero:expr)),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
            self.record(Shape::Integer);
            visitor.$visit($zero)
        }
    )*};
}

impl<'de> Deserializer<'de> for Walker<'_> {
    type Error = WalkError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("any value (deserialize_any: an untagged enum, toml::Value...)"))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Boolean);
        visitor.visit_bool(false)
    }

    integers! {
        deserialize_i8 => visit_i64(0),
        deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0),
        deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0),
        deserialize_u64 => visit_u64(0),
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Float);
        visitor.visit_f64(0.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Float);
        visitor.visit_f64(0.0)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::String);
        visitor.visit_char('x')
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::String);
        visitor.visit_borrowed_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::String);
        visitor.visit_borrowed_str("")
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("bytes"))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("bytes"))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        let element = Walker {
            arrays: self.arrays + 1,
            ..self
        };
        visitor.visit_seq(OneElement(Some(element)))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("a tuple"))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, WalkError> {
        Err(self.unsupported("a tuple struct"))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        // A map (or a struct with #[serde(flatten)]): keys are not known in advance.
        self.record(Shape::AnyTable);
        visitor.visit_map(NoEntries)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        if name == SPANNED {
            return visitor.visit_map(SpannedFields {
                fields,
                next: 0,
                value: self,
            });
        }
        self.record(Shape::Table);
        visitor.visit_map(StructFields {
            fields,
            next: 0,
            parent: self,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        // A unit-variant enum reads a string from the file; its first variant will do.
        self.record(Shape::String);
        let Some(first) = variants.first() else {
            return Err(self.unsupported("an enum without variants"));
        };
        visitor.visit_enum(BorrowedStrDeserializer::new(first))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("an identifier"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        visitor.visit_unit()
    }
}

/// A sequence of exactly one element.
struct OneElement<'a>(Option<Walker<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = WalkError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, WalkError> {
        self.0.take().map(|w| seed.deserialize(w)).transpose()
    }
}

struct NoEntries;

impl<'de> MapAccess<'de> for NoEntries {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        _: K,
    ) -> Result<Option<K::Value>, WalkError> {
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, _: V) -> Result<V::Value, WalkError> {
        Err(WalkError("no value".into()))
    }
}

/// Every field of a struct, each value walked under its own path.
struct StructFields<'a> {
    fields: &'static [&'static str],
    next: usize,
    parent: Walker<'a>,
}

impl<'de> MapAccess<'de> for StructFields<'_> {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, WalkError> {
        match self.fields.get(self.next) {
            Some(field) => seed
                .deserialize(BorrowedStrDeserializer::new(field))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, WalkError> {
        let field = self.fields[self.next];
        self.next += 1;
        let path = if self.parent.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.parent.path)
        };
        seed.deserialize(Walker {
            path,
            arrays: 0,
            found: self.parent.found,
        })
    }
}

/// `Spanned<T>`: a dummy span, and the value walked under the same path.
struct SpannedFields<'a> {
    fields: &'static [&'static str],
    next: usize,
    value: Walker<'a>,
}

impl<'de> MapAccess<'de> for SpannedFields<'_> {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, WalkError> {
        match self.fields.get(self.next) {
            Some(field) => seed
                .deserialize(BorrowedStrDeserializer::new(field))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, WalkError> {
        let field = self.fields[self.next];
        self.next += 1;
        if field.ends_with("value") {
            seed.deserialize(self.value.clone())
        } else {
            seed.deserialize(UsizeDeserializer::new(0))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The doc side.

#[derive(Debug)]
struct DocSection {
    line: usize,
    /// `[[name]]` in the heading.
    array: bool,
}

#[derive(Debug)]
struct DocRow {
    line: usize,
    ty: String,
    default: String,
}

#[derive(Debug)]
struct DocBlock {
    line: usize,
    info: String,
    text: String,
}

#[derive(Debug, Default)]
struct Doc {
    /// By path, "" for `## Top-level keys`.
    sections: BTreeMap<String, DocSection>,
    /// By full path, e.g. `timeouts.connect_ms`.
    rows: BTreeMap<String, DocRow>,
    blocks: Vec<DocBlock>,
    /// Lines the parser could not make sense of.
    problems: Vec<String>,
}

/// The section a heading names: `Top-level keys` is "", `[name]` and `[[name]]` top-level
/// tables, `a.b` (possibly in backticks) a table inside another. Other headings name none.
fn heading_section(text: &str) -> Option<(String, bool)> {
    let text = text.trim().trim_matches('`');
    if text.eq_ignore_ascii_case("top-level keys") {
        return Some((String::new(), false));
    }
    let is_path = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
    };
    if let Some(name) = text.strip_prefix("[[").and_then(|t| t.strip_suffix("]]")) {
        return is_path(name).then(|| (name.to_owned(), true));
    }
    if let Some(name) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return is_path(name).then(|| (name.to_owned(), false));
    }
    (is_path(text) && text.contains('.')).then(|| (text.to_owned(), false))
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

/// Parses the doc: section headings, the key tables under them, and the code blocks.
///
/// Under a section heading, each Markdown table must have `Key`, `Type` and `Default` columns,
/// and each of its rows a key in backticks in the Key column. Tables under other headings (and
/// anything in code blocks) are not key lists.
fn parse_doc(doc: &str) -> Doc {
    let mut out = Doc::default();
    let mut section: Option<String> = None;
    // Column indices of the current table: (key, type, default); None between tables.
    let mut columns: Option<Option<(usize, usize, usize)>> = None;
    let mut block: Option<DocBlock> = None;
    for (index, line) in doc.lines().enumerate() {
        let n = index + 1;
        if let Some(b) = &mut block {
            if line.trim_start().starts_with("```") {
                out.blocks.extend(block.take());
            } else {
                b.text.push_str(line);
                b.text.push('\n');
            }
            continue;
        }
        if let Some(info) = line.trim_start().strip_prefix("```") {
            block = Some(DocBlock {
                line: n,
                info: info.trim().to_owned(),
                text: String::new(),
            });
            columns = None;
            continue;
        }
        if line.starts_with("##") {
            let text = line.trim_start_matches('#');
            section = heading_section(text).map(|(name, array)| {
                if let Some(first) = out.sections.get(&name) {
                    out.problems.push(format!(
                        "line {n}: section `{name}` again (first at line {})",
                        first.line
                    ));
                }
                out.sections
                    .insert(name.clone(), DocSection { line: n, array });
                name
            });
            columns = None;
            continue;
        }
        if !line.trim_start().starts_with('|') {
            columns = None;
            continue;
        }
        let Some(section) = &section else { continue };
        let row = cells(line);
        let Some(cols) = columns else {
            // The header row of a new table.
            let find = |name: &str| row.iter().position(|c| c.eq_ignore_ascii_case(name));
            columns = Some(match (find("key"), find("type"), find("default")) {
                (Some(k), Some(t), Some(d)) => Some((k, t, d)),
                _ => {
                    out.problems.push(format!(
                        "line {n}: a table in section `{section}` needs Key, Type and Default \
                         columns"
                    ));
                    None
                }
            });
            continue;
        };
        let Some((k, t, d)) = cols else { continue };
        if row
            .iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue; // the separator row
        }
        let key = row
            .get(k)
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
            .filter(|c| {
                !c.is_empty()
                    && c.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            });
        let Some(key) = key else {
            out.problems.push(format!(
                "line {n}: the Key column must hold one key in backticks: {line}"
            ));
            continue;
        };
        let path = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        let cell = |i: usize| row.get(i).cloned().unwrap_or_default();
        let doc_row = DocRow {
            line: n,
            ty: cell(t),
            default: cell(d),
        };
        if let Some(first) = out.rows.get(&path) {
            out.problems.push(format!(
                "line {n}: key `{path}` again (first at line {})",
                first.line
            ));
        }
        out.rows.insert(path, doc_row);
    }
    if let Some(b) = block {
        out.problems
            .push(format!("line {}: code block never closed", b.line));
    }
    out
}

/// The literal TOML value a Default cell starts with (`` `60` ``, `` `"/"` ``), if any.
fn literal_default(cell: &str) -> Option<&str> {
    let rest = cell.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some(&rest[..end])
}

fn fail_with(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{DOC_NAME} and the configuration code disagree ({what}):\n  {}\n",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Every key and section the code accepts is documented, and nothing else is; types match.
#[test]
fn config_keys_match_docs() {
    let code = code_keys();
    let doc = parse_doc(DOC);
    let mut problems = doc.problems.clone();

    let code_sections: BTreeSet<&str> = code
        .iter()
        .filter(|(_, kind)| kind.is_section())
        .map(|(path, _)| path.as_str())
        .collect();
    for (path, kind) in &code {
        let shown = if path.is_empty() { "top level" } else { path };
        if kind.is_section() {
            match doc.sections.get(path) {
                None => problems.push(format!(
                    "section `{shown}` ({kind}) is in the code but has no heading in {DOC_NAME}"
                )),
                Some(s) if !path.contains('.') && !path.is_empty() => {
                    let want_array = kind.arrays > 0;
                    if s.array != want_array {
                        let want = if want_array {
                            format!("[[{path}]]")
                        } else {
                            format!("[{path}]")
                        };
                        problems.push(format!(
                            "line {}: the heading of section `{path}` should read `{want}`",
                            s.line
                        ));
                    }
                }
                Some(_) => {}
            }
        }
        // A table inside a section may also have a row (probe in [[clusters]]); a leaf must.
        match doc.rows.get(path) {
            None if !kind.is_section() => problems.push(format!(
                "key `{path}` ({kind}) is in the code but not in {DOC_NAME}"
            )),
            None => {}
            Some(row) => {
                let ty = row.ty.replace('`', "").to_ascii_lowercase();
                if !ty.starts_with(&kind.to_string()) {
                    problems.push(format!(
                        "line {}: key `{path}` is documented as \"{}\" but the code reads {kind}",
                        row.line, row.ty
                    ));
                }
            }
        }
    }
    for (path, row) in &doc.rows {
        if !code.contains_key(path) {
            problems.push(format!(
                "line {}: key `{path}` is in {DOC_NAME} but not in the code",
                row.line
            ));
        }
    }
    for (path, s) in &doc.sections {
        if !code_sections.contains(path.as_str()) {
            problems.push(format!(
                "line {}: section `{path}` is in {DOC_NAME} but not in the code",
                s.line
            ));
        }
    }
    fail_with("keys", &problems);
}

fn parent(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(p, _)| p)
}

/// A file with `key = value` set in its section, for sections where that is simple: the top
/// level, a top-level table, and `[[clusters]]` entries.
fn file_with(code: &BTreeMap<String, Kind>, path: &str, value: &str) -> Option<String> {
    let base = format!("{BASE_LISTEN}\n{BASE_CLUSTER}");
    let (section, key) = path.rsplit_once('.').unwrap_or(("", path));
    let set = format!("{key} = {value}\n");
    match code.get(section) {
        _ if section.is_empty() => Some(format!("{set}{base}")),
        Some(kind) if !section.contains('.') && kind.arrays == 0 => {
            Some(format!("{base}\n[{section}]\n{set}"))
        }
        _ if section == "clusters" => Some(format!("{base}{set}")),
        _ => None,
    }
}

/// A default the doc writes as a literal (`` `60` ``) is the one the code applies: setting the
/// key to it changes nothing. Every key of [timeouts] and [limits] must have one.
#[test]
fn documented_defaults_match_code() {
    let code = code_keys();
    let doc = parse_doc(DOC);
    let base = format!("{BASE_LISTEN}\n{BASE_CLUSTER}");
    let without = Config::parse(&base, "base.toml").expect("the base file is valid");
    let mut problems = Vec::new();
    let mut checked = 0;
    for (path, row) in &doc.rows {
        let required = DEFAULTS_REQUIRED_IN.contains(&parent(path));
        let Some(value) = literal_default(&row.default) else {
            if required {
                problems.push(format!(
                    "line {}: `{path}` needs its default as a literal in backticks, e.g. `60`",
                    row.line
                ));
            }
            continue;
        };
        let Some(text) = file_with(&code, path, value) else {
            continue;
        };
        match Config::parse(&text, "with-default.toml") {
            Ok(with) if with == without => checked += 1,
            Ok(with) => problems.push(format!(
                "line {}: `{path}` is documented with default {value}, but setting it to that \
                 changes the configuration: {}",
                row.line,
                difference(&format!("{without:?}"), &format!("{with:?}"))
            )),
            // A key of a section with required keys cannot be checked this simply.
            Err(e) if !required && e.message().contains("missing required key") => {}
            Err(e) => problems.push(format!(
                "line {}: `{path}` is documented with default {value}, which is rejected: {e}",
                row.line
            )),
        }
    }
    fail_with("defaults", &problems);
    assert!(checked >= 15, "only {checked} defaults checked");
}

/// What differs between two `Debug` renderings, e.g. `heartbeat_secs: 60 -> heartbeat_secs: 45`.
fn difference(without: &str, with: &str) -> String {
    let (a, b): (Vec<_>, Vec<_>) = (without.split(", ").collect(), with.split(", ").collect());
    if a.len() != b.len() {
        return format!("\n    without: {without}\n    with:    {with}");
    }
    let changed: Vec<String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{x} -> {y}"))
        .collect();
    changed.join(", ")
}

/// Every ```` ```toml ```` block of the doc is a valid file; a ```` ```toml fragment ```` block
/// is valid once completed with `listen` and a cluster; ```` ```toml ignore ```` is skipped
/// (e.g. an example that needs certificate files).
#[test]
fn doc_examples_are_valid() {
    let doc = parse_doc(DOC);
    let mut problems = doc.problems.clone();
    let mut checked = 0;
    for block in &doc.blocks {
        let mut words = block.info.split_whitespace();
        if words.next() != Some("toml") {
            continue;
        }
        let text = match words.next() {
            None => block.text.clone(),
            Some("fragment") => {
                let clusters = if block.text.contains("[[clusters]]") {
                    ""
                } else {
                    BASE_CLUSTER
                };
                format!("{BASE_LISTEN}{}\n{clusters}", block.text)
            }
            Some("ignore") => continue,
            Some(other) => {
                problems.push(format!(
                    "line {}: unknown code block kind `toml {other}` (use fragment or ignore)",
                    block.line
                ));
                continue;
            }
        };
        checked += 1;
        if let Err(e) = Config::parse(&text, "example.toml") {
            problems.push(format!(
                "line {}: example rejected: {e}\n{text}",
                block.line
            ));
        }
    }
    fail_with("examples", &problems);
    assert!(checked > 0, "no toml example found in {DOC_NAME}");
}

/// The doc parser itself: sections, rows and problems.
#[test]
fn doc_parser_reads_sections_rows_and_blocks() {
    let doc = parse_doc(
        "# Title\n\n## Top-level keys\n\n| Key | Type | Default |\n|---|---|---|\n\
         | `listen` | string | required |\n\n## [[clusters]]\n\n| Key | Type | Default |\n\
         |---|---|---|\n| `weight` | integer | `1` |\n| weight | integer | `1` |\n\n\
         ### clusters.probe\n\n```toml fragment\n## [not-a-section]\n```\n\n## Reloading\n\n\
         | Key | What |\n|---|---|\n| anything | goes |\n",
    );
    let sections: Vec<_> = doc.sections.keys().map(String::as_str).collect();
    assert_eq!(sections, ["", "clusters", "clusters.probe"]);
    assert!(doc.sections["clusters"].array);
    let rows: Vec<_> = doc.rows.keys().map(String::as_str).collect();
    assert_eq!(rows, ["clusters.weight", "listen"]);
    assert_eq!(
        literal_default(&doc.rows["clusters.weight"].default),
        Some("1")
    );
    assert_eq!(literal_default(&doc.rows["listen"].default), None);
    assert_eq!(doc.blocks.len(), 1);
    assert_eq!(doc.blocks[0].info, "toml fragment");
    assert_eq!(doc.problems.len(), 1, "{:?}", doc.problems);
    assert!(doc.problems[0].contains("line 14"), "{:?}", doc.problems);
}
