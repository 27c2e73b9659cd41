//! [`ConfigError`]: how a bad `proxy.toml` is reported, and how that report is printed.
//!
//! Operators read these messages to fix the file, so each one points at the exact place
//! (`proxy.toml:12:9: reason`) and speaks of keys and value ranges rather than Rust types.
//! Validation only carries byte spans (see `validate.rs`); turning a span into a line and
//! column happens once, here, when the error is made.

use std::fmt;

/// Where in the file an error is: 1-based line, 1-based column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// A configuration error, displayed as `origin:line:column: reason`, e.g.
/// `proxy.toml:12:9: duplicate cluster name "shard-a" (first defined at line 4)`.
///
/// The only errors without a location are those about the file as a whole (it cannot be
/// read); they display as `origin: reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    origin: String,
    location: Option<Location>,
    message: String,
}

impl ConfigError {
    /// File name (or other origin) the error is about.
    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn location(&self) -> Option<Location> {
        self.location
    }
    /// 1-based line, if the error points into the file.
    pub fn line(&self) -> Option<usize> {
        self.location.map(|l| l.line)
    }
    /// The reason alone, without `file:line:column: `.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An error at byte `offset` of `text` (the file's contents).
    pub(super) fn at(origin: &str, text: &str, offset: usize, message: String) -> ConfigError {
        ConfigError {
            origin: origin.to_owned(),
            location: Some(locate(text, offset)),
            message,
        }
    }

    /// An error about the file as a whole (it cannot be read): no line or column to show.
    pub(super) fn whole_file(origin: &str, message: String) -> ConfigError {
        ConfigError {
            origin: origin.to_owned(),
            location: None,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(Location { line, column }) => {
                write!(f, "{}:{}:{}: {}", self.origin, line, column, self.message)
            }
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column (counted in characters) of byte `offset` in `text`.
pub(super) fn locate(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Rewords the TOML/serde messages in the file's own terms ("key", ranges instead of Rust types).
pub(super) fn toml_message(message: &str, spanned_text: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing required key {rest}");
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if message == "duplicate key" && !spanned_text.is_empty() {
        return format!("duplicate key `{}`", spanned_text.trim());
    }
    for (rust, plain) in [
        ("u16", "an integer from 0 to 65535"),
        ("u32", "an integer from 0 to 4294967295"),
        ("u64", "a non-negative integer"),
        ("usize", "a non-negative integer"),
    ] {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {plain}");
        }
    }
    message.to_owned()
}
