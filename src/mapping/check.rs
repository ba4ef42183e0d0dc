//! A mapping file, checked whole: format by header, every row by the
//! rules, every problem with its line and column. Pure; no I/O.
//!
//! Line numbers are physical lines with the header as line 1, as
//! Smaregi's own CSV import counts them; a quoted field spanning lines
//! gives its row the line it starts on.

use crate::config::MappingConfig;

use super::decode::{self, DecodeError, TextEncoding};

/// What a file may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub max_file_bytes: u64,
    pub max_rows: u64,
    pub code_max_length: usize,
    /// Allowed besides half-width letters and digits.
    pub code_symbols: String,
}

impl Rules {
    pub fn from_config(config: &MappingConfig) -> Self {
        Self {
            max_file_bytes: config.max_file_bytes,
            max_rows: config.max_rows,
            code_max_length: config.external_code_max_length as usize,
            code_symbols: config.external_code_symbols.clone(),
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self::from_config(&MappingConfig::default())
    }
}

/// The kind of file, recognised by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `smaregi-id` + external code: the file is the whole new mapping.
    FullReplacement,
    /// ロジクラ-style: rows whose `更新フラグ` is TRUE add or change entries.
    Upsert,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::FullReplacement => "full-replacement",
            Self::Upsert => "upsert",
        }
    }
}

pub use super::pairs::{Entries, Entry};

/// A column of the file: its position and its header as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// 0-based.
    pub index: usize,
    pub header: String,
}

impl Column {
    /// The spreadsheet letter: A, B, …, Z, AA, …
    pub fn letter(&self) -> String {
        let mut n = self.index + 1;
        let mut letters = Vec::new();
        while n > 0 {
            let rem = (n - 1) % 26;
            letters.push(b'A' + rem as u8);
            n = (n - 1) / 26;
        }
        letters.reverse();
        String::from_utf8(letters).expect("ASCII letters")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file is rejected.
    Error,
    /// Reported; the file is still imported.
    Warning,
}

/// One problem, where it is, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub line: Option<u64>,
    pub column: Option<Column>,
    pub value: Option<String>,
    pub kind: ProblemKind,
}

/// Every rule a file can break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    TooLarge {
        size: u64,
        max: u64,
    },
    Binary,
    Utf16,
    Undecodable {
        tried: TextEncoding,
    },
    NoHeader,
    UnknownFormat {
        headers: Vec<String>,
    },
    /// The upsert format without a column it needs.
    MissingColumn {
        wanted: &'static str,
    },
    DuplicateHeader {
        first: Column,
    },
    TooManyRows {
        max: u64,
    },
    TooFewFields {
        expected: usize,
        found: usize,
    },
    ExtraFields {
        expected: usize,
        found: usize,
    },
    Empty,
    EdgeSpaces,
    ScientificNotation,
    FullWidth {
        half_width: String,
    },
    IdNotDigits,
    IdTooLong,
    CodeTooLong {
        max: usize,
    },
    CodeCharacter {
        character: char,
    },
    /// The same Smaregi id on two lines with different codes.
    IdTwice {
        first_line: u64,
        first_code: String,
    },
    /// The same code on two lines with different Smaregi ids.
    CodeTwice {
        first_line: u64,
        first_id: u64,
    },
    /// The same pair twice (warning).
    PairTwice {
        first_line: u64,
    },
    /// Digits only and shorter than most codes of the file (warning).
    LostLeadingZeros {
        usual_length: usize,
    },
    BadFlag,
    /// Dropped in the folder, but not a regular file.
    NotRegularFile {
        what: &'static str,
    },
    /// The file could not be read.
    Unreadable {
        reason: String,
    },
    /// Its size or time changed while it was read.
    ChangedWhileReading,
}

/// The result of checking a file.
#[derive(Debug, Clone)]
pub struct Checked {
    pub encoding: Option<TextEncoding>,
    pub format: Option<Format>,
    /// The entries to apply; empty when there are errors.
    pub entries: Entries,
    /// Non-empty rows after the header.
    pub data_rows: u64,
    /// Upsert rows whose flag is not TRUE.
    pub skipped_rows: u64,
    /// At most [`MAX_LISTED_PROBLEMS`] of each severity.
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    /// Problems found beyond those listed.
    pub errors_not_listed: u64,
    pub warnings_not_listed: u64,
}

/// Problems listed in a report, per severity; the rest are counted.
pub const MAX_LISTED_PROBLEMS: usize = 10_000;

impl Checked {
    /// Whether the file would be imported.
    pub fn accepted(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.len() as u64 + self.errors_not_listed
    }

    pub fn warning_count(&self) -> u64 {
        self.warnings.len() as u64 + self.warnings_not_listed
    }

    /// A file rejected before its contents were checked.
    pub fn file_problem(kind: ProblemKind) -> Self {
        Self::empty().file_error(kind)
    }

    fn empty() -> Self {
        Self {
            encoding: None,
            format: None,
            entries: Entries::default(),
            data_rows: 0,
            skipped_rows: 0,
            errors: Vec::new(),
            warnings: Vec::new(),
            errors_not_listed: 0,
            warnings_not_listed: 0,
        }
    }

    fn push(&mut self, problem: Problem) {
        let (listed, not_listed) = match problem.severity {
            Severity::Error => (&mut self.errors, &mut self.errors_not_listed),
            Severity::Warning => (&mut self.warnings, &mut self.warnings_not_listed),
        };
        if listed.len() < MAX_LISTED_PROBLEMS {
            listed.push(problem);
        } else {
            *not_listed += 1;
        }
    }

    fn file_error(mut self, kind: ProblemKind) -> Self {
        self.push(Problem {
            severity: Severity::Error,
            line: None,
            column: None,
            value: None,
            kind,
        });
        self
    }
}

/// Header names, normalised, of the Smaregi id column.
const SMAREGI_ID_HEADERS: &[&str] = &[
    "smaregi-id",
    "smaregi-product-id",
    "product-id",
    "productid",
    "スマレジ商品id",
    "スマレジid",
    "商品id",
];
/// Header names, normalised, of the external code column.
const EXTERNAL_CODE_HEADERS: &[&str] = &[
    "external-code",
    "nextengine-code",
    "next-engine-code",
    "ne-code",
    "外部コード",
    "外部商品コード",
    "ネクストエンジン商品コード",
];
const UPSERT_CODE_HEADER: &str = "外部サービスコード";
const UPSERT_FLAG_HEADER: &str = "更新フラグ";

/// A header name as compared: trimmed, full-width ASCII made half-width,
/// ASCII lower-cased, spaces and underscores made hyphens.
pub fn normalize_header(header: &str) -> String {
    to_half_width(header.trim_matches(|c: char| c.is_whitespace() || c == '\u{FEFF}'))
        .chars()
        .map(|c| match c {
            ' ' | '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Full-width ASCII (U+FF01–U+FF5E) and the ideographic space made half-width.
pub fn to_half_width(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            c => c,
        })
        .collect()
}

fn is_full_width_ascii(c: char) -> bool {
    ('\u{FF01}'..='\u{FF5E}').contains(&c)
}

/// Excel's scientific notation of a long number: `4.90123E+12`.
pub fn is_scientific_notation(value: &str) -> bool {
    let Some((mantissa, exponent)) = value.split_once(['E', 'e']) else {
        return false;
    };
    let Some(exponent) = exponent.strip_prefix('+') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => whole.len() == 1 && digits(whole) && digits(fraction),
        None => mantissa.len() == 1 && digits(mantissa),
    };
    mantissa_ok && digits(exponent)
}

/// The columns a format reads.
#[derive(Debug, Clone)]
struct Layout {
    format: Format,
    id: Column,
    code: Column,
    flag: Option<Column>,
    /// Fields a row of the full-replacement format has.
    width: usize,
}

fn recognise(headers: &[String]) -> Result<Layout, Vec<Problem>> {
    let normalized: Vec<String> = headers.iter().map(|h| normalize_header(h)).collect();
    let column = |index: usize| Column {
        index,
        header: headers[index].clone(),
    };
    let find = |names: &[&str]| normalized.iter().position(|h| names.contains(&h.as_str()));
    let error = |column: Option<Column>, kind| Problem {
        severity: Severity::Error,
        line: Some(1),
        column,
        value: None,
        kind,
    };

    let mut duplicates = Vec::new();
    for (i, name) in normalized.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        if let Some(first) = normalized[..i].iter().position(|h| h == name) {
            duplicates.push(error(
                Some(column(i)),
                ProblemKind::DuplicateHeader {
                    first: column(first),
                },
            ));
        }
    }

    let upsert_code = find(&[UPSERT_CODE_HEADER]);
    let flag = find(&[UPSERT_FLAG_HEADER]);
    let id = find(SMAREGI_ID_HEADERS);
    let layout = if upsert_code.is_some() || flag.is_some() {
        let mut missing = Vec::new();
        for (found, wanted) in [
            (id, "スマレジ商品ID (smaregi-id)"),
            (upsert_code, UPSERT_CODE_HEADER),
            (flag, UPSERT_FLAG_HEADER),
        ] {
            if found.is_none() {
                missing.push(error(None, ProblemKind::MissingColumn { wanted }));
            }
        }
        match (id, upsert_code, flag) {
            (Some(id), Some(code), Some(flag)) if missing.is_empty() => Layout {
                format: Format::Upsert,
                id: column(id),
                code: column(code),
                flag: Some(column(flag)),
                width: headers.len(),
            },
            _ => return Err(missing),
        }
    } else {
        let code = find(EXTERNAL_CODE_HEADERS);
        let named = normalized.iter().filter(|h| !h.is_empty()).count();
        match (id, code) {
            (Some(id), Some(code)) if named == 2 && id.max(code) == 1 => Layout {
                format: Format::FullReplacement,
                id: column(id),
                code: column(code),
                flag: None,
                width: 2,
            },
            _ => {
                return Err(vec![error(
                    None,
                    ProblemKind::UnknownFormat {
                        headers: headers.to_vec(),
                    },
                )])
            }
        }
    };
    if duplicates.is_empty() {
        Ok(layout)
    } else {
        Err(duplicates)
    }
}

/// Checks a whole file's bytes.
pub fn check(bytes: Vec<u8>, rules: &Rules) -> Checked {
    let checked = Checked::empty();
    let size = bytes.len() as u64;
    if size > rules.max_file_bytes {
        return checked.file_error(ProblemKind::TooLarge {
            size,
            max: rules.max_file_bytes,
        });
    }
    let (text, encoding) = match decode::decode(bytes) {
        Ok(decoded) => decoded,
        Err(e) => {
            let (line, kind) = match e {
                DecodeError::Binary => (None, ProblemKind::Binary),
                DecodeError::Utf16 => (None, ProblemKind::Utf16),
                DecodeError::Undecodable { line, tried } => {
                    (Some(line), ProblemKind::Undecodable { tried })
                }
            };
            let mut checked = checked;
            checked.push(Problem {
                severity: Severity::Error,
                line,
                column: None,
                value: None,
                kind,
            });
            return checked;
        }
    };
    let mut checked = check_text(&text, rules);
    checked.encoding = Some(encoding);
    checked
}

/// The entries of the rows read so far, and the line of each.
#[derive(Default)]
struct Rows {
    entries: Entries,
    lines: Vec<u64>,
}

/// Checks decoded text.
pub fn check_text(text: &str, rules: &Rules) -> Checked {
    let mut checked = Checked::empty();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut record = csv::ByteRecord::new();
    let mut lines = LineCounter::new(text);

    // The header: the first row with anything in it.
    let (header_line, layout) = loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            // Decoded text is valid UTF-8, and a flexible reader has no other errors.
            Ok(false) | Err(_) => return checked.file_error(ProblemKind::NoHeader),
        }
        if is_blank(&record) {
            continue;
        }
        let headers: Vec<String> = record
            .iter()
            .map(|field| String::from_utf8_lossy(field).into_owned())
            .collect();
        let line = lines.line_at(&record);
        match recognise(&headers) {
            Ok(layout) => break (line, layout),
            Err(problems) => {
                for mut problem in problems {
                    problem.line = Some(line);
                    checked.push(problem);
                }
                return checked;
            }
        }
    };
    checked.format = Some(layout.format);
    // Lines are counted from the header, wherever the file put it.
    let line_offset = header_line - 1;

    // About one row per line: no regrowing (and copying) of a large file's rows.
    let estimated = text
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        .min(rules.max_rows as usize);
    let mut rows = Rows {
        entries: Entries::with_capacity(estimated, text.len()),
        lines: Vec::with_capacity(estimated),
    };
    while reader.read_byte_record(&mut record).unwrap_or(false) {
        if is_blank(&record) {
            continue;
        }
        checked.data_rows += 1;
        let line = lines.line_at(&record) - line_offset;
        if checked.data_rows > rules.max_rows {
            checked.push(Problem {
                severity: Severity::Error,
                line: Some(line),
                column: None,
                value: None,
                kind: ProblemKind::TooManyRows {
                    max: rules.max_rows,
                },
            });
            break;
        }
        if let Some(entry) = check_row(&record, line, &layout, rules, &mut checked) {
            rows.entries.push(entry.smaregi_id, entry.external_code);
            rows.lines.push(line);
        }
    }

    find_duplicates(&mut rows, &layout, &mut checked);
    find_lost_leading_zeros(&rows, &layout, &mut checked);
    if checked.accepted() {
        checked.entries = rows.entries;
    }
    checked
}

/// Physical line numbers from records' byte offsets (the csv crate's own
/// line count skips blank lines).
struct LineCounter<'a> {
    text: &'a [u8],
    offset: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            offset: 0,
            line: 1,
        }
    }

    /// The 1-based line a record starts on; records come in order.
    fn line_at(&mut self, record: &csv::ByteRecord) -> u64 {
        let start = record.position().map_or(self.offset, |p| p.byte() as usize);
        let mut start = start.clamp(self.offset, self.text.len());
        // The position is where reading began, before the blank lines the
        // reader skipped; a record itself never starts with a line break.
        while matches!(self.text.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        self.line += self.text[self.offset..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        self.offset = start;
        self.line
    }
}

fn is_blank(record: &csv::ByteRecord) -> bool {
    record
        .iter()
        .all(|field| field.iter().all(|b| b.is_ascii_whitespace()))
}

/// Checks one data row; its entry when it has one to apply.
fn check_row<'r>(
    record: &'r csv::ByteRecord,
    line: u64,
    layout: &Layout,
    rules: &Rules,
    checked: &mut Checked,
) -> Option<Entry<'r>> {
    let field = |column: &Column| {
        record
            .get(column.index)
            .map(|f| std::str::from_utf8(f).expect("decoded text is UTF-8"))
    };
    let mut row_error = |column: Option<&Column>, value: Option<&str>, kind| {
        checked.push(Problem {
            severity: Severity::Error,
            line: Some(line),
            column: column.cloned(),
            value: value.map(str::to_owned),
            kind,
        });
    };
    let needed = layout
        .id
        .index
        .max(layout.code.index)
        .max(layout.flag.as_ref().map_or(0, |f| f.index))
        + 1;
    if record.len() < needed {
        row_error(
            None,
            None,
            ProblemKind::TooFewFields {
                expected: layout.width.max(needed),
                found: record.len(),
            },
        );
        return None;
    }
    if layout.format == Format::FullReplacement {
        let extra_filled = record
            .iter()
            .skip(layout.width)
            .any(|f| !f.iter().all(|b| b.is_ascii_whitespace()));
        if extra_filled {
            row_error(
                None,
                None,
                ProblemKind::ExtraFields {
                    expected: layout.width,
                    found: record.len(),
                },
            );
            return None;
        }
    }
    if let Some(flag_column) = &layout.flag {
        let flag = field(flag_column).unwrap_or("");
        match to_half_width(flag).trim().to_ascii_lowercase().as_str() {
            "true" | "1" => {}
            "false" | "0" | "" => {
                checked.skipped_rows += 1;
                return None;
            }
            _ => {
                row_error(Some(flag_column), Some(flag), ProblemKind::BadFlag);
                return None;
            }
        }
    }
    let id_text = field(&layout.id).unwrap_or("");
    let code = field(&layout.code).unwrap_or("");
    let id = match check_smaregi_id(id_text) {
        Ok(id) => Some(id),
        Err(kind) => {
            row_error(Some(&layout.id), Some(id_text), kind);
            None
        }
    };
    let code_ok = match check_external_code(code, rules) {
        Ok(()) => true,
        Err(kind) => {
            row_error(Some(&layout.code), Some(code), kind);
            false
        }
    };
    match (id, code_ok) {
        (Some(smaregi_id), true) => Some(Entry {
            smaregi_id,
            external_code: code,
        }),
        _ => None,
    }
}

/// A Smaregi 商品ID: 1–15 half-width digits, nothing around them.
pub fn check_smaregi_id(value: &str) -> Result<u64, ProblemKind> {
    if value.is_empty() {
        return Err(ProblemKind::Empty);
    }
    if value.trim() != value {
        return Err(ProblemKind::EdgeSpaces);
    }
    if is_scientific_notation(value) {
        return Err(ProblemKind::ScientificNotation);
    }
    if value.chars().any(is_full_width_ascii) {
        return Err(ProblemKind::FullWidth {
            half_width: to_half_width(value),
        });
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProblemKind::IdNotDigits);
    }
    if value.len() > 15 {
        return Err(ProblemKind::IdTooLong);
    }
    Ok(value.parse().expect("1 to 15 digits fit in a u64"))
}

/// An external code: 1 to `code_max_length` of half-width letters,
/// digits and `code_symbols`, matched exactly (never trimmed).
pub fn check_external_code(value: &str, rules: &Rules) -> Result<(), ProblemKind> {
    if value.is_empty() {
        return Err(ProblemKind::Empty);
    }
    if value.trim() != value {
        return Err(ProblemKind::EdgeSpaces);
    }
    if is_scientific_notation(value) {
        return Err(ProblemKind::ScientificNotation);
    }
    if value.chars().any(is_full_width_ascii) {
        return Err(ProblemKind::FullWidth {
            half_width: to_half_width(value),
        });
    }
    if let Some(character) = value
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || rules.code_symbols.contains(c)))
    {
        return Err(ProblemKind::CodeCharacter { character });
    }
    if value.chars().count() > rules.code_max_length {
        return Err(ProblemKind::CodeTooLong {
            max: rules.code_max_length,
        });
    }
    Ok(())
}

/// One id to two codes, or one code to two ids: an error naming both
/// lines. The same pair twice is a warning, and kept once.
///
/// By sorting row numbers (4 bytes a row) rather than hashing entries:
/// a million rows stay cheap in memory.
fn find_duplicates(rows: &mut Rows, layout: &Layout, checked: &mut Checked) {
    let entries = &rows.entries;
    let mut problems: Vec<Problem> = Vec::new();
    let mut repeated = vec![false; entries.len()];
    let mut order: Vec<u32> = (0..entries.len() as u32).collect();

    // Stable sorts: within a group, the first row of the file comes first.
    order.sort_by_key(|&i| entries.get(i as usize).smaregi_id);
    for group in order
        .chunk_by(|&a, &b| entries.get(a as usize).smaregi_id == entries.get(b as usize).smaregi_id)
    {
        let first = group[0] as usize;
        for &i in &group[1..] {
            let i = i as usize;
            let (entry, first_entry) = (entries.get(i), entries.get(first));
            if entry.external_code == first_entry.external_code {
                repeated[i] = true;
                problems.push(Problem {
                    severity: Severity::Warning,
                    line: Some(rows.lines[i]),
                    column: None,
                    value: Some(format!("{},{}", entry.smaregi_id, entry.external_code)),
                    kind: ProblemKind::PairTwice {
                        first_line: rows.lines[first],
                    },
                });
            } else {
                problems.push(Problem {
                    severity: Severity::Error,
                    line: Some(rows.lines[i]),
                    column: Some(layout.id.clone()),
                    value: Some(entry.smaregi_id.to_string()),
                    kind: ProblemKind::IdTwice {
                        first_line: rows.lines[first],
                        first_code: first_entry.external_code.to_string(),
                    },
                });
            }
        }
    }
    order.sort_by(|&a, &b| {
        entries
            .get(a as usize)
            .external_code
            .cmp(entries.get(b as usize).external_code)
    });
    for group in order.chunk_by(|&a, &b| {
        entries.get(a as usize).external_code == entries.get(b as usize).external_code
    }) {
        let first = group[0] as usize;
        for &i in &group[1..] {
            let i = i as usize;
            if repeated[i] {
                continue;
            }
            problems.push(Problem {
                severity: Severity::Error,
                line: Some(rows.lines[i]),
                column: Some(layout.code.clone()),
                value: Some(entries.get(i).external_code.to_string()),
                kind: ProblemKind::CodeTwice {
                    first_line: rows.lines[first],
                    first_id: entries.get(first).smaregi_id,
                },
            });
        }
    }
    drop(order);
    // In file order, ids before codes on the same line.
    problems.sort_by_key(|p| {
        (
            p.line,
            p.column.as_ref().map(|c| c.index != layout.id.index),
        )
    });
    for problem in problems {
        checked.push(problem);
    }
    if repeated.contains(&true) {
        rows.entries.retain(|index| !repeated[index]);
        let mut keep = repeated.iter().map(|r| !r);
        rows.lines.retain(|_| keep.next().unwrap_or(true));
    }
}

/// Codes that are all digits and shorter than the length most such codes
/// of the file have: Excel drops leading zeros of numbers.
fn find_lost_leading_zeros(rows: &Rows, layout: &Layout, checked: &mut Checked) {
    let is_number = |code: &str| code.bytes().all(|b| b.is_ascii_digit());
    // Codes are at most 255 characters long.
    let mut lengths = [0u64; 256];
    let mut numeric = 0u64;
    for entry in rows.entries.iter() {
        if is_number(entry.external_code) {
            numeric += 1;
            lengths[entry.external_code.len().min(255)] += 1;
        }
    }
    // Only a clear majority sets the usual length.
    let Some((usual_length, &count)) = lengths
        .iter()
        .enumerate()
        .max_by_key(|(len, count)| (**count, *len))
    else {
        return;
    };
    if numeric < 3 || count * 2 <= numeric {
        return;
    }
    for (entry, line) in rows.entries.iter().zip(&rows.lines) {
        let code = entry.external_code;
        if code.len() < usual_length && is_number(code) {
            checked.push(Problem {
                severity: Severity::Warning,
                line: Some(*line),
                column: Some(layout.code.clone()),
                value: Some(code.to_string()),
                kind: ProblemKind::LostLeadingZeros { usual_length },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::report::{render, ReportContext};
    use proptest::prelude::*;

    fn sjis(text: &str) -> Vec<u8> {
        let (bytes, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
        assert!(!unmappable);
        bytes.into_owned()
    }

    fn run(text: &str) -> Checked {
        check(text.as_bytes().to_vec(), &Rules::default())
    }

    fn pairs(checked: &Checked) -> Vec<(u64, &str)> {
        checked
            .entries
            .iter()
            .map(|e| (e.smaregi_id, e.external_code))
            .collect()
    }

    fn kinds(problems: &[Problem]) -> Vec<(Option<u64>, Option<usize>, &ProblemKind)> {
        problems
            .iter()
            .map(|p| (p.line, p.column.as_ref().map(|c| c.index), &p.kind))
            .collect()
    }

    #[test]
    fn a_two_column_file_is_a_full_replacement() {
        let checked = run("smaregi-id,external-code\n101,A-1\n102,B_2.x\n");
        assert!(checked.accepted(), "{:?}", checked.errors);
        assert_eq!(checked.format, Some(Format::FullReplacement));
        assert_eq!(checked.encoding, Some(TextEncoding::Utf8));
        assert_eq!(pairs(&checked), [(101, "A-1"), (102, "B_2.x")]);
        assert_eq!(checked.data_rows, 2);
    }

    #[test]
    fn columns_may_come_in_either_order() {
        let checked = run("nextengine-code,smaregi-id\nA-1,101\n");
        assert_eq!(pairs(&checked), [(101, "A-1")]);
    }

    #[test]
    fn shift_jis_with_japanese_headers_and_crlf() {
        let bytes = sjis("スマレジ商品ID,外部コード\r\n101,A-1\r\n\r\n102,B-2\r\n");
        let checked = check(bytes, &Rules::default());
        assert!(checked.accepted(), "{:?}", checked.errors);
        assert_eq!(checked.encoding, Some(TextEncoding::ShiftJis));
        assert_eq!(pairs(&checked), [(101, "A-1"), (102, "B-2")]);
    }

    #[test]
    fn utf8_with_bom_and_full_width_headers() {
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend_from_slice(" 商品ＩＤ ,\u{3000}ネクストエンジン商品コード\n7,X\n".as_bytes());
        let checked = check(bytes, &Rules::default());
        assert!(checked.accepted(), "{:?}", checked.errors);
        assert_eq!(checked.encoding, Some(TextEncoding::Utf8WithBom));
        assert_eq!(pairs(&checked), [(7, "X")]);
    }

    #[test]
    fn header_names_are_normalised() {
        assert_eq!(
            normalize_header("\u{3000}ＳＭＡＲＥＧＩ＿ＩＤ "),
            "smaregi-id"
        );
        assert_eq!(normalize_header("External Code"), "external-code");
        assert_eq!(normalize_header("スマレジ商品ID"), "スマレジ商品id");
    }

    #[test]
    fn a_header_only_file_clears_the_mapping() {
        let checked = run("smaregi-id,external-code\r\n");
        assert!(checked.accepted());
        assert_eq!(checked.format, Some(Format::FullReplacement));
        assert!(checked.entries.is_empty());
    }

    #[test]
    fn quoted_fields_and_line_numbers_across_them() {
        let text = "smaregi-id,外部サービスコード,更新フラグ,商品名\n\
                    \"1\",\"A-1\",TRUE,\"名前, 改行\n2行目\"\n\
                    2,B 2,TRUE,x\n";
        let checked = run(text);
        // Row 2 spans lines 2–3, so the row with the bad code is on line 4.
        assert_eq!(
            kinds(&checked.errors),
            [(
                Some(4),
                Some(1),
                &ProblemKind::CodeCharacter { character: ' ' }
            )]
        );
    }

    #[test]
    fn empty_lines_are_ignored_but_counted() {
        let checked = run("smaregi-id,external-code\n\n1,A\n,\n\nx,B\n");
        assert_eq!(checked.data_rows, 2);
        assert_eq!(
            kinds(&checked.errors),
            [(Some(6), Some(0), &ProblemKind::IdNotDigits)]
        );
    }

    #[test]
    fn spaces_are_errors_with_their_column_never_trimmed() {
        let checked = run("smaregi-id,external-code\n1,A \n 2,B\n3,\u{3000}C\n");
        assert_eq!(
            kinds(&checked.errors),
            [
                (Some(2), Some(1), &ProblemKind::EdgeSpaces),
                (Some(3), Some(0), &ProblemKind::EdgeSpaces),
                (Some(4), Some(1), &ProblemKind::EdgeSpaces),
            ]
        );
        assert!(checked.entries.is_empty());
    }

    #[test]
    fn excel_damage_is_named() {
        let checked = run("smaregi-id,external-code\n4.90123E+12,A\n2,4.90123E+12\n３,B\n4,Ｃ１\n");
        assert_eq!(
            kinds(&checked.errors),
            [
                (Some(2), Some(0), &ProblemKind::ScientificNotation),
                (Some(3), Some(1), &ProblemKind::ScientificNotation),
                (
                    Some(4),
                    Some(0),
                    &ProblemKind::FullWidth {
                        half_width: "3".into()
                    }
                ),
                (
                    Some(5),
                    Some(1),
                    &ProblemKind::FullWidth {
                        half_width: "C1".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn smaregi_ids_are_1_to_15_digits() {
        assert_eq!(check_smaregi_id("1"), Ok(1));
        assert_eq!(check_smaregi_id("999999999999999"), Ok(999_999_999_999_999));
        assert_eq!(
            check_smaregi_id("1000000000000000"),
            Err(ProblemKind::IdTooLong)
        );
        assert_eq!(check_smaregi_id("12a"), Err(ProblemKind::IdNotDigits));
        assert_eq!(check_smaregi_id("-1"), Err(ProblemKind::IdNotDigits));
        assert_eq!(check_smaregi_id(""), Err(ProblemKind::Empty));
    }

    #[test]
    fn external_codes_follow_the_configured_rule() {
        let rules = Rules {
            code_max_length: 5,
            code_symbols: "-".into(),
            ..Rules::default()
        };
        assert_eq!(check_external_code("aB-9", &rules), Ok(()));
        assert_eq!(
            check_external_code("abcdef", &rules),
            Err(ProblemKind::CodeTooLong { max: 5 })
        );
        assert_eq!(
            check_external_code("a_b", &rules),
            Err(ProblemKind::CodeCharacter { character: '_' })
        );
        assert_eq!(
            check_external_code("商品", &rules),
            Err(ProblemKind::CodeCharacter { character: '商' })
        );
        assert_eq!(check_external_code("", &rules), Err(ProblemKind::Empty));
    }

    #[test]
    fn one_id_to_two_codes_or_one_code_to_two_ids_names_both_lines() {
        let checked = run("smaregi-id,external-code\n1,A\n2,B\n1,C\n3,B\n");
        assert_eq!(
            kinds(&checked.errors),
            [
                (
                    Some(4),
                    Some(0),
                    &ProblemKind::IdTwice {
                        first_line: 2,
                        first_code: "A".into()
                    }
                ),
                (
                    Some(5),
                    Some(1),
                    &ProblemKind::CodeTwice {
                        first_line: 3,
                        first_id: 2
                    }
                ),
            ]
        );
        let report = render(
            &checked,
            &ReportContext {
                file_name: "f.csv",
                imported_version: None,
            },
            &Rules::default(),
        );
        assert!(
            report.contains("4行目 A列「smaregi-id」 値「1」: このスマレジ商品IDは 2 行目で"),
            "{report}"
        );
    }

    #[test]
    fn ids_that_differ_only_by_leading_zeros_are_the_same_id() {
        let checked = run("smaregi-id,external-code\n01,A\n1,B\n");
        assert_eq!(
            kinds(&checked.errors),
            [(
                Some(3),
                Some(0),
                &ProblemKind::IdTwice {
                    first_line: 2,
                    first_code: "A".into()
                }
            )]
        );
    }

    #[test]
    fn the_same_pair_twice_is_a_warning_and_counted_once() {
        let checked = run("smaregi-id,external-code\n1,A\n1,A\n");
        assert!(checked.accepted());
        assert_eq!(pairs(&checked), [(1, "A")]);
        assert_eq!(
            kinds(&checked.warnings),
            [(Some(3), None, &ProblemKind::PairTwice { first_line: 2 })]
        );
    }

    #[test]
    fn a_number_that_lost_leading_zeros_is_a_warning() {
        let checked =
            run("smaregi-id,external-code\n1,0491234567890\n2,4912345678901\n3,491234567892\n4,4912345678903\n");
        assert!(checked.accepted());
        assert_eq!(
            kinds(&checked.warnings),
            [(
                Some(4),
                Some(1),
                &ProblemKind::LostLeadingZeros { usual_length: 13 }
            )]
        );
        assert_eq!(checked.entries.len(), 4);
    }

    #[test]
    fn upsert_takes_rows_flagged_true_only() {
        let text = "商品名,スマレジ商品ID,外部サービスコード,更新フラグ\n\
                    a,1,A,TRUE\nb,2,B,FALSE\nc,,,\nd,3,C,true\ne,4,D,yes\n";
        let checked = check(sjis(text), &Rules::default());
        assert_eq!(checked.format, Some(Format::Upsert));
        assert_eq!(checked.skipped_rows, 2);
        assert_eq!(
            kinds(&checked.errors),
            [(Some(6), Some(3), &ProblemKind::BadFlag)]
        );
        let fixed = check(sjis(&text.replace("yes", "FALSE")), &Rules::default());
        assert!(fixed.accepted(), "{:?}", fixed.errors);
        assert_eq!(pairs(&fixed), [(1, "A"), (3, "C")]);
    }

    #[test]
    fn upsert_without_an_id_column_names_the_missing_column() {
        let checked = run("外部サービスコード,更新フラグ\nA,TRUE\n");
        assert_eq!(
            kinds(&checked.errors),
            [(
                Some(1),
                None,
                &ProblemKind::MissingColumn {
                    wanted: "スマレジ商品ID (smaregi-id)"
                }
            )]
        );
    }

    #[test]
    fn unknown_headers_are_rejected_with_the_accepted_formats() {
        let checked = run("foo,bar\n1,2\n");
        assert_eq!(
            kinds(&checked.errors),
            [(
                Some(1),
                None,
                &ProblemKind::UnknownFormat {
                    headers: vec!["foo".into(), "bar".into()]
                }
            )]
        );
        let report = render(
            &checked,
            &ReportContext {
                file_name: "f.csv",
                imported_version: None,
            },
            &Rules::default(),
        );
        assert!(
            report.contains("受け付ける形式 / Accepted formats"),
            "{report}"
        );
        assert!(run("smaregi-id,external-code,extra\n").errors.len() == 1);
    }

    #[test]
    fn limits_on_rows_and_size() {
        let rules = Rules {
            max_rows: 2,
            ..Rules::default()
        };
        let checked = check(
            b"smaregi-id,external-code\n1,A\n2,B\n3,C\n".to_vec(),
            &rules,
        );
        assert_eq!(
            kinds(&checked.errors),
            [(Some(4), None, &ProblemKind::TooManyRows { max: 2 })]
        );
        let rules = Rules {
            max_file_bytes: 10,
            ..Rules::default()
        };
        let checked = check(b"smaregi-id,external-code\n".to_vec(), &rules);
        assert_eq!(
            kinds(&checked.errors),
            [(None, None, &ProblemKind::TooLarge { size: 25, max: 10 })]
        );
    }

    #[test]
    fn rows_with_missing_or_extra_fields() {
        let checked = run("smaregi-id,external-code\n1\n2,B,\n3,C,x\n");
        assert_eq!(
            kinds(&checked.errors),
            [
                (
                    Some(2),
                    None,
                    &ProblemKind::TooFewFields {
                        expected: 2,
                        found: 1
                    }
                ),
                (
                    Some(4),
                    None,
                    &ProblemKind::ExtraFields {
                        expected: 2,
                        found: 3
                    }
                ),
            ]
        );
    }

    #[test]
    fn bad_bytes_are_rejected_with_their_line() {
        assert_eq!(
            kinds(&check(b"\x00\x01\x02".to_vec(), &Rules::default()).errors),
            [(None, None, &ProblemKind::Binary)]
        );
        let mut bytes = sjis("スマレジ商品ID,外部コード\n1,A\n");
        bytes.push(0x82);
        assert_eq!(
            kinds(&check(bytes, &Rules::default()).errors),
            [(
                Some(3),
                None,
                &ProblemKind::Undecodable {
                    tried: TextEncoding::ShiftJis
                }
            )]
        );
    }

    #[test]
    fn a_10_mb_single_line_is_rejected_with_a_short_report() {
        let line = "x".repeat(10 * 1024 * 1024);
        let checked = run(&line);
        assert!(!checked.accepted());
        let report = render(
            &checked,
            &ReportContext {
                file_name: "big.csv",
                imported_version: None,
            },
            &Rules::default(),
        );
        assert!(report.len() < 10_000, "{} bytes", report.len());
    }

    #[test]
    fn the_report_gives_japanese_then_english_for_every_problem() {
        let checked = run("smaregi-id,external-code\n1,A \n");
        let report = render(
            &checked,
            &ReportContext {
                file_name: "f.csv",
                imported_version: None,
            },
            &Rules::default(),
        );
        let ja = report
            .find("2行目 B列「external-code」 値「A 」: 値の前後に空白があります")
            .expect(&report);
        let en = report
            .find("  line 2, column B (external-code), value \"A \": the value has spaces")
            .expect(&report);
        assert!(ja < en);
        assert!(report.contains("マッピングは変わっていません"));
    }

    #[test]
    fn column_letters() {
        let letter = |index| {
            Column {
                index,
                header: String::new(),
            }
            .letter()
        };
        assert_eq!(letter(0), "A");
        assert_eq!(letter(25), "Z");
        assert_eq!(letter(26), "AA");
        assert_eq!(letter(27), "AB");
    }

    fn code() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,30}"
            .prop_filter("not scientific notation", |c| !is_scientific_notation(c))
    }

    /// A mapping as a file: any encoding we read, LF or CRLF, quoted or not.
    fn file_of(pairs: &[(u64, String)], crlf: bool, quote: bool, encoding: u8) -> Vec<u8> {
        let newline = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("スマレジ商品ID,外部コード{newline}");
        for (id, code) in pairs {
            if quote {
                text.push_str(&format!("\"{id}\",\"{code}\"{newline}"));
            } else {
                text.push_str(&format!("{id},{code}{newline}"));
            }
        }
        match encoding {
            0 => text.into_bytes(),
            1 => [b"\xEF\xBB\xBF".as_slice(), text.as_bytes()].concat(),
            _ => sjis(&text),
        }
    }

    proptest! {
        #[test]
        fn any_valid_mapping_round_trips(
            map in proptest::collection::btree_map(code(), 1u64..=999_999_999_999_999, 0..40),
            crlf: bool, quote: bool, encoding in 0u8..3,
        ) {
            // Unique codes; make ids unique too.
            let mut seen = std::collections::HashSet::new();
            let pairs: Vec<(u64, String)> = map.into_iter().filter(|(_, id)| seen.insert(*id)).map(|(c, id)| (id, c)).collect();
            let checked = check(file_of(&pairs, crlf, quote, encoding), &Rules::default());
            prop_assert!(checked.accepted(), "{:?}", checked.errors);
            let got: Vec<(u64, String)> = checked.entries.iter().map(|e| (e.smaregi_id, e.external_code.to_string())).collect();
            prop_assert_eq!(got, pairs);
        }

        #[test]
        fn errors_carry_the_physical_line(blank_lines in proptest::collection::vec(0usize..3, 5), bad in 0usize..5) {
            let mut text = String::from("smaregi-id,external-code\n");
            let mut line = 1;
            let mut bad_line = 0;
            for (i, blanks) in blank_lines.iter().enumerate() {
                for _ in 0..*blanks { text.push('\n'); line += 1; }
                line += 1;
                if i == bad { text.push_str(&format!("{i},bad code\n")); bad_line = line; }
                else { text.push_str(&format!("{i},C{i}\n")); }
            }
            let checked = check(text.into_bytes(), &Rules::default());
            prop_assert_eq!(checked.errors.len(), 1);
            prop_assert_eq!(checked.errors[0].line, Some(bad_line as u64));
        }

        #[test]
        fn header_normalisation_is_idempotent(header in "\\PC{0,20}") {
            let once = normalize_header(&header);
            prop_assert_eq!(normalize_header(&once), once.clone());
        }

        #[test]
        fn checking_never_panics_and_rejects_or_gives_entries(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let checked = check(bytes, &Rules::default());
            prop_assert!(checked.accepted() || checked.entries.is_empty());
        }
    }
}
