//! Config diagnostics: an error or warning tied to a place in the file.
//!
//! Rendered as `PATH:LINE:COL: message`, the format editors and CI logs turn
//! into links. Lines and columns count from 1; columns count characters, not
//! bytes, so a Japanese comment earlier on the line does not skew them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(
            f,
            "{}:{}:{}: {severity}{}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// All errors of one configuration file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// Turns byte offsets in one file's text into diagnostics.
pub(crate) struct SourceFile<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl SourceFile<'_> {
    pub fn diagnostic(
        &self,
        severity: Severity,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = span.map_or((1, 1), |span| line_column(self.text, span.start));
        Diagnostic {
            severity,
            file: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// 1-based line and character column of `offset` in `text`.
///
/// An offset past the end, or inside a multi-byte character, is clamped to
/// the nearest character boundary before it.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The span of the value at `path` (e.g. `["listener", "address"]`).
///
/// When the full path is absent, the span of the deepest key that exists is
/// returned, so "missing key" problems point at their section.
pub(crate) fn span_of(root: &DeTable<'_>, path: &[&str]) -> Option<Range<usize>> {
    let mut table = root;
    let mut best = None;
    for (depth, segment) in path.iter().enumerate() {
        let Some((key, value)) = table.iter().find(|(key, _)| key.get_ref() == segment) else {
            return best;
        };
        best = Some(if depth + 1 == path.len() {
            value.span()
        } else {
            key.span()
        });
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 8), (2, 3));
    }

    #[test]
    fn line_column_counts_characters_not_bytes() {
        let text = "# 設定\nkey = \"値\" x";
        let offset = text.find('x').unwrap();
        assert_eq!(line_column(text, offset), (2, 11));
    }

    #[test]
    fn line_column_clamps_out_of_range_and_mid_character_offsets() {
        let text = "値";
        assert_eq!(line_column(text, 1), (1, 1));
        assert_eq!(line_column(text, 99), (1, 2));
    }

    #[test]
    fn span_of_finds_nested_values_and_falls_back_to_the_section() {
        let text = "[listener]\naddress = \"x\"\n";
        let root = DeTable::parse(text).unwrap();
        let address = span_of(root.get_ref(), &["listener", "address"]).unwrap();
        assert_eq!(&text[address], "\"x\"");
        let missing = span_of(root.get_ref(), &["listener", "nope"]).unwrap();
        assert_eq!(&text[missing], "listener");
        assert_eq!(span_of(root.get_ref(), &["absent", "key"]), None);
    }
}
