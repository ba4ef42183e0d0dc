//! A mapping file, checked whole: format by header, every row by the
//! rules, every problem with its line and column. Pure; no I/O.
//!
//! Line numbers are physical lines with the header as line 1, as
//! Smaregi's own CSV import counts them; a quoted field spanning lines
//! gives its row the line it starts on.

use std::borrow::Cow;
use std::collections::HashMap;

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

use super::pairs::Clash;
pub use super::pairs::{Entries, Entry, PairTable};

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
    /// The pairs to apply, indexed; empty when there are errors.
    pub pairs: PairTable,
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
            pairs: PairTable::default(),
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

    // A map, not a search of the earlier names: a header line may hold
    // any number of fields, and a quadratic search of a 1 MB one would
    // take minutes.
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(normalized.len());
    let mut duplicates = Vec::new();
    for (i, name) in normalized.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        let first = *first_of.entry(name.as_str()).or_insert(i);
        if first != i {
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
    check_beside(bytes, rules, |_| ()).0
}

/// Checks a whole file's bytes, and runs `beside` over them on another
/// thread meanwhile (the import's digest): it is done by the time the
/// text is decoded, so that a decoded file's bytes are freed before its
/// rows are read.
pub fn check_beside<R: Send>(
    bytes: Vec<u8>,
    rules: &Rules,
    beside: impl FnOnce(&[u8]) -> R + Send,
) -> (Checked, R) {
    let (decoded, beside) = std::thread::scope(|scope| {
        let beside = scope.spawn(|| beside(&bytes));
        let decoded = decode_within(&bytes, rules);
        let beside = beside
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (decoded, beside)
    });
    let (scanned, encoding) = match decoded {
        Err(checked) => return (*checked, beside),
        Ok((Cow::Owned(text), encoding)) => {
            drop(bytes);
            // The rows own what they need: the text's memory can hold the
            // indices.
            (scan_text(&text, rules), encoding)
        }
        Ok((Cow::Borrowed(text), encoding)) => (scan_text(text, rules), encoding),
    };
    let mut checked = scanned.map_or_else(|checked| *checked, Scanned::finish);
    checked.encoding = Some(encoding);
    (checked, beside)
}

/// A file's text, or why it has none we read.
fn decode_within<'b>(
    bytes: &'b [u8],
    rules: &Rules,
) -> Result<(Cow<'b, str>, TextEncoding), Box<Checked>> {
    let size = bytes.len() as u64;
    if size > rules.max_file_bytes {
        return Err(Box::new(Checked::file_problem(ProblemKind::TooLarge {
            size,
            max: rules.max_file_bytes,
        })));
    }
    decode::decode(bytes).map_err(|e| {
        let (line, kind) = match e {
            DecodeError::Binary => (None, ProblemKind::Binary),
            DecodeError::Utf16 => (None, ProblemKind::Utf16),
            DecodeError::Undecodable { line, tried } => {
                (Some(line), ProblemKind::Undecodable { tried })
            }
        };
        let mut checked = Checked::empty();
        checked.push(Problem {
            severity: Severity::Error,
            line,
            column: None,
            value: None,
            kind,
        });
        Box::new(checked)
    })
}

/// The entries of the rows read so far, and the line of each.
#[derive(Default)]
struct Rows {
    entries: Entries,
    lines: RowLines,
}

/// The line of each row, kept as runs of rows on consecutive lines: a
/// million rows of a file without blank lines take one run, not 8 MB.
#[derive(Default)]
struct RowLines {
    /// The first row of each run, and its line.
    runs: Vec<(usize, u64)>,
    rows: usize,
}

impl RowLines {
    fn push(&mut self, line: u64) {
        let continues = self
            .runs
            .last()
            .is_some_and(|&(first, first_line)| first_line + (self.rows - first) as u64 == line);
        if !continues {
            self.runs.push((self.rows, line));
        }
        self.rows += 1;
    }

    /// # Panics
    /// When there is no row `row`.
    fn get(&self, row: usize) -> u64 {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        let run = self.runs.partition_point(|&(first, _)| first <= row) - 1;
        let (first, first_line) = self.runs[run];
        first_line + (row - first) as u64
    }

    /// Keeps the rows `keep` accepts, in order.
    fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let mut kept = Self::default();
        for row in (0..self.rows).filter(|&row| keep(row)) {
            kept.push(self.get(row));
        }
        *self = kept;
    }
}

/// Checks decoded text.
///
/// Text without a double quote has no quoted fields, and is split by a
/// reader of its own ([`PlainRecords`]) that looks for nothing but commas
/// and line breaks; it gives the same records on the same lines as the
/// csv crate (a test holds it to that). Anything else is read by the csv
/// crate.
pub fn check_text(text: &str, rules: &Rules) -> Checked {
    scan_text(text, rules).map_or_else(|checked| *checked, Scanned::finish)
}

/// Reads and checks every row of `text`; what it finds is complete
/// without the text. A check that already ended is the error.
fn scan_text(text: &str, rules: &Rules) -> Result<Scanned, Box<Checked>> {
    if text.as_bytes().contains(&b'"') {
        scan_records(CsvRecords::new(text), text, rules)
    } else {
        scan_records(PlainRecords::new(text), text, rules)
    }
}

/// A file's records, one at a time, as the csv crate reads them (an empty
/// line is no record).
trait Records {
    type Record: Fields;
    /// Moves to the next record; the physical line it starts on, or
    /// `None` at the end of the text.
    fn advance(&mut self) -> Option<u64>;
    /// The record [`Self::advance`] moved to.
    fn record(&self) -> &Self::Record;
}

/// The fields of one record.
trait Fields {
    fn len(&self) -> usize;
    /// Field `index`, if the record has it.
    fn get(&self, index: usize) -> Option<&str>;

    fn fields(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|index| self.get(index))
    }

    /// Nothing but spaces in any field: an empty line, or `,,`.
    fn is_blank(&self) -> bool {
        self.fields()
            .all(|field| field.bytes().all(|b| b.is_ascii_whitespace()))
    }
}

/// Records read by the csv crate: any CSV, quoted fields too.
struct CsvRecords<'t> {
    reader: csv::Reader<&'t [u8]>,
    record: csv::ByteRecord,
    lines: LineCounter<'t>,
}

impl<'t> CsvRecords<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            reader: csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(text.as_bytes()),
            record: csv::ByteRecord::new(),
            lines: LineCounter::new(text),
        }
    }
}

impl Records for CsvRecords<'_> {
    type Record = csv::ByteRecord;

    fn advance(&mut self) -> Option<u64> {
        // Decoded text is valid UTF-8, and a flexible reader has no other errors.
        match self.reader.read_byte_record(&mut self.record) {
            Ok(true) => Some(self.lines.line_at(&self.record)),
            Ok(false) | Err(_) => None,
        }
    }

    fn record(&self) -> &csv::ByteRecord {
        &self.record
    }
}

/// Fields split from UTF-8 text at ASCII delimiters are UTF-8.
impl Fields for csv::ByteRecord {
    fn len(&self) -> usize {
        csv::ByteRecord::len(self)
    }

    fn get(&self, index: usize) -> Option<&str> {
        csv::ByteRecord::get(self, index)
            .map(|field| std::str::from_utf8(field).expect("decoded text is UTF-8"))
    }
}

/// Records of text without a double quote: what the csv crate reads in
/// it, found by looking for commas and line breaks only. As in the csv
/// crate, a record ends at `\n`, `\r\n` or a lone `\r`, empty lines are no
/// records, and a byte-order mark that starts the text is not read; lines
/// are counted by `\n`, as [`LineCounter`] counts them.
struct PlainRecords<'t> {
    text: &'t str,
    /// Where the rest of the text starts.
    offset: usize,
    /// The line `offset` is on.
    line: u64,
    record: PlainRecord<'t>,
}

/// One record of [`PlainRecords`]: its text and where each field ends.
struct PlainRecord<'t> {
    text: &'t str,
    /// The byte after each field but the last; a comma.
    commas: Vec<usize>,
}

impl<'t> PlainRecords<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            text,
            offset: if text.starts_with('\u{FEFF}') {
                '\u{FEFF}'.len_utf8()
            } else {
                0
            },
            line: 1,
            record: PlainRecord {
                text: "",
                commas: Vec::new(),
            },
        }
    }
}

impl<'t> Records for PlainRecords<'t> {
    type Record = PlainRecord<'t>;

    fn advance(&mut self) -> Option<u64> {
        let bytes = self.text.as_bytes();
        // Line breaks before the record: no records of their own. A line
        // ends with CRLF, LF, or a CR alone (old Mac and Excel for Mac).
        while let Some(&b) = bytes.get(self.offset) {
            match b {
                b'\n' => self.line += 1,
                b'\r' if bytes.get(self.offset + 1) != Some(&b'\n') => self.line += 1,
                b'\r' => {}
                _ => break,
            }
            self.offset += 1;
        }
        if self.offset == bytes.len() {
            return None;
        }
        let start = self.offset;
        let commas = &mut self.record.commas;
        commas.clear();
        let mut end = start;
        while let Some(&b) = bytes.get(end) {
            match b {
                b',' => commas.push(end - start),
                b'\n' | b'\r' => break,
                _ => {}
            }
            end += 1;
        }
        // Commas and line breaks are ASCII: these are character boundaries.
        self.record.text = &self.text[start..end];
        self.offset = end;
        Some(self.line)
    }

    fn record(&self) -> &PlainRecord<'t> {
        &self.record
    }
}

impl Fields for PlainRecord<'_> {
    fn len(&self) -> usize {
        self.commas.len() + 1
    }

    fn get(&self, index: usize) -> Option<&str> {
        let start = match index {
            0 => 0,
            _ => *self.commas.get(index - 1)? + 1,
        };
        let end = self.commas.get(index).copied().unwrap_or(self.text.len());
        Some(&self.text[start..end])
    }
}

/// A file's rows, each read and checked: what is left are the checks
/// across rows.
struct Scanned {
    checked: Checked,
    rows: Rows,
    layout: Layout,
}

impl Scanned {
    fn finish(self) -> Checked {
        let Self {
            mut checked,
            mut rows,
            layout,
        } = self;
        let pairs = find_duplicates(&mut rows, &layout, &mut checked);
        let entries = pairs.as_ref().map_or(&rows.entries, PairTable::entries);
        find_lost_leading_zeros(entries, &rows.lines, &layout, &mut checked);
        if checked.accepted() {
            checked.pairs = pairs.expect("without errors, no pair clashes with another");
        }
        checked
    }
}

/// Reads and checks the records of a file's text, one by one.
fn scan_records(
    mut records: impl Records,
    text: &str,
    rules: &Rules,
) -> Result<Scanned, Box<Checked>> {
    let mut checked = Checked::empty();

    // The header: the first row with anything in it.
    let (header_line, layout) = loop {
        let Some(line) = records.advance() else {
            return Err(Box::new(checked.file_error(ProblemKind::NoHeader)));
        };
        let record = records.record();
        if record.is_blank() {
            continue;
        }
        let headers: Vec<String> = record.fields().map(str::to_owned).collect();
        match recognise(&headers) {
            Ok(layout) => break (line, layout),
            Err(problems) => {
                for mut problem in problems {
                    problem.line = Some(line);
                    checked.push(problem);
                }
                return Err(Box::new(checked));
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
        lines: RowLines::default(),
    };
    let code_rule = CodeRule::new(rules);
    while let Some(line) = records.advance() {
        let record = records.record();
        if record.is_blank() {
            continue;
        }
        checked.data_rows += 1;
        let line = line - line_offset;
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
        if let Some(entry) = check_row(record, line, &layout, &code_rule, &mut checked) {
            rows.entries.push(entry.smaregi_id, entry.external_code);
            rows.lines.push(line);
        }
    }

    Ok(Scanned {
        checked,
        rows,
        layout,
    })
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
        self.line += line_breaks(&self.text[self.offset..start], self.text.get(start));
        self.offset = start;
        self.line
    }
}

/// How many lines end in `bytes`, followed by `next`: at each LF, and at
/// each CR not followed by an LF (a CR alone ends a line too).
fn line_breaks(bytes: &[u8], next: Option<&u8>) -> u64 {
    let following = bytes
        .iter()
        .skip(1)
        .chain(std::iter::once(next.unwrap_or(&0)));
    bytes
        .iter()
        .zip(following)
        .filter(|&(&b, &after)| b == b'\n' || (b == b'\r' && after != b'\n'))
        .count() as u64
}

/// The external-code rule, with the common case decided by a table.
struct CodeRule<'r> {
    rules: &'r Rules,
    /// ASCII bytes a code may hold whatever their neighbours: letters,
    /// digits and the configured symbols, but never a space (the rule of
    /// edge spaces) nor `+` (the rule of scientific notation).
    plain: [bool; 128],
}

impl<'r> CodeRule<'r> {
    fn new(rules: &'r Rules) -> Self {
        let mut plain = [false; 128];
        for (byte, plain) in (0u8..).zip(plain.iter_mut()) {
            let c = char::from(byte);
            *plain = (c.is_ascii_alphanumeric() || rules.code_symbols.contains(c))
                && !c.is_ascii_whitespace()
                && c != '+';
        }
        Self { rules, plain }
    }

    /// [`check_external_code`], answered at once for a code of plain bytes.
    fn check(&self, value: &str) -> Result<(), ProblemKind> {
        let bytes = value.as_bytes();
        let plain = (1..=self.rules.code_max_length).contains(&bytes.len())
            && bytes
                .iter()
                .all(|&b| self.plain.get(usize::from(b)).copied().unwrap_or(false));
        if plain {
            Ok(())
        } else {
            check_external_code(value, self.rules)
        }
    }
}

/// Checks one data row; its entry when it has one to apply.
fn check_row<'r>(
    record: &'r impl Fields,
    line: u64,
    layout: &Layout,
    code_rule: &CodeRule<'_>,
    checked: &mut Checked,
) -> Option<Entry<'r>> {
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
            .fields()
            .skip(layout.width)
            .any(|f| !f.bytes().all(|b| b.is_ascii_whitespace()));
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
        let flag = record.get(flag_column.index).unwrap_or("");
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
    let id_text = record.get(layout.id.index).unwrap_or("");
    let code = record.get(layout.code.index).unwrap_or("");
    let id = match check_smaregi_id(id_text) {
        Ok(id) => Some(id),
        Err(kind) => {
            row_error(Some(&layout.id), Some(id_text), kind);
            None
        }
    };
    let code_ok = match code_rule.check(code) {
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
    // The common case, at once.
    if (1..=15).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(value
            .bytes()
            .fold(0, |id, digit| id * 10 + u64::from(digit - b'0')));
    }
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
    // Digits, more than 15 of them.
    Err(ProblemKind::IdTooLong)
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
/// By indexing the pairs both ways, as the version will be: the indexed
/// pairs, unless some clash. Their rows' entries are then left in `rows`,
/// without the pairs given twice.
fn find_duplicates(rows: &mut Rows, layout: &Layout, checked: &mut Checked) -> Option<PairTable> {
    let (entries, repeats) = match PairTable::index_or_repeats(std::mem::take(&mut rows.entries), 0)
    {
        Ok(pairs) => return Some(pairs),
        Err(unindexed) => unindexed,
    };
    let lines = &rows.lines;
    let mut repeated = vec![false; entries.len()];
    let mut clashes = false;
    // In file order, a row's id before its code.
    for repeat in repeats {
        let (index, first) = (repeat.index, repeat.first);
        let (entry, first_entry) = (entries.get(index), entries.get(first));
        let problem = match repeat.side {
            Clash::Id if entry.external_code == first_entry.external_code => {
                repeated[index] = true;
                Problem {
                    severity: Severity::Warning,
                    line: Some(lines.get(index)),
                    column: None,
                    value: Some(format!("{},{}", entry.smaregi_id, entry.external_code)),
                    kind: ProblemKind::PairTwice {
                        first_line: lines.get(first),
                    },
                }
            }
            Clash::Id => Problem {
                severity: Severity::Error,
                line: Some(lines.get(index)),
                column: Some(layout.id.clone()),
                value: Some(entry.smaregi_id.to_string()),
                kind: ProblemKind::IdTwice {
                    first_line: lines.get(first),
                    first_code: first_entry.external_code.to_string(),
                },
            },
            // Its code was named with its id.
            Clash::Code if repeated[index] => continue,
            Clash::Code => Problem {
                severity: Severity::Error,
                line: Some(lines.get(index)),
                column: Some(layout.code.clone()),
                value: Some(entry.external_code.to_string()),
                kind: ProblemKind::CodeTwice {
                    first_line: lines.get(first),
                    first_id: first_entry.smaregi_id,
                },
            },
        };
        clashes |= problem.severity == Severity::Error;
        checked.push(problem);
    }
    let mut entries = entries;
    entries.retain(|index| !repeated[index]);
    rows.lines.retain(|row| !repeated[row]);
    if clashes {
        rows.entries = entries;
        return None;
    }
    Some(PairTable::index(entries, 0).expect("pairs without clashes index"))
}

/// Codes that are all digits and shorter than the length most such codes
/// of the file have: Excel drops leading zeros of numbers.
fn find_lost_leading_zeros(
    entries: &Entries,
    lines: &RowLines,
    layout: &Layout,
    checked: &mut Checked,
) {
    let is_number = |code: &str| code.bytes().all(|b| b.is_ascii_digit());
    // Codes are at most 255 characters long.
    let mut lengths = [0u64; 256];
    let mut numeric = 0u64;
    for entry in entries.iter() {
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
    for (row, entry) in entries.iter().enumerate() {
        let code = entry.external_code;
        if code.len() < usual_length && is_number(code) {
            checked.push(Problem {
                severity: Severity::Warning,
                line: Some(lines.get(row)),
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
            .pairs
            .entries()
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
    fn a_repeated_header_is_named_with_its_first_column_even_on_a_huge_header_line() {
        // An export with 200,000 more columns: searching the earlier names
        // for each would be 2·10¹⁰ comparisons.
        let mut names: Vec<String> = ["smaregi-id", UPSERT_CODE_HEADER, UPSERT_FLAG_HEADER]
            .map(str::to_owned)
            .into();
        names.extend((0..200_000).map(|i| format!("extra-{i}")));
        names.push("extra-7".to_owned());
        let repeat = names.len() - 1;
        let checked = run(&format!("{}\n", names.join(",")));
        assert_eq!(
            kinds(&checked.errors),
            [(
                Some(1),
                Some(repeat),
                &ProblemKind::DuplicateHeader {
                    first: Column {
                        index: 3 + 7,
                        header: "extra-7".to_owned()
                    }
                }
            )]
        );
    }

    #[test]
    fn lines_that_end_with_a_cr_alone_are_counted_too() {
        // Excel for Mac's "Macintosh CSV": each line ends with a CR alone;
        // one file for the plain reader, one with quotes for the csv crate.
        for text in [
            "smaregi-id,external-code\r101,A-1\r\r102,B 2\r103,C-3\r103,D-4\r",
            "smaregi-id,external-code\r101,\"A-1\"\r\r102,\"B 2\"\r103,C-3\r103,D-4\r",
        ] {
            let checked = run(text);
            let lines: Vec<_> = (checked.errors.iter())
                .map(|p| match &p.kind {
                    ProblemKind::IdTwice { first_line, .. } => (p.line, Some(*first_line)),
                    _ => (p.line, None),
                })
                .collect();
            assert_eq!(
                lines,
                [(Some(4), None), (Some(6), Some(5))],
                "{text:?}: {:?}",
                checked.errors
            );
        }
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
        assert!(checked.pairs.is_empty());
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
        assert!(checked.pairs.is_empty());
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
        assert_eq!(checked.pairs.len(), 4);
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

    /// Everything a check found, for comparing two checks.
    fn findings(checked: &Checked) -> String {
        let pairs: Vec<(u64, &str)> = pairs(checked);
        format!(
            "{:?} {pairs:?} rows {} skipped {} errors {:?} +{} warnings {:?} +{}",
            checked.format,
            checked.data_rows,
            checked.skipped_rows,
            checked.errors,
            checked.errors_not_listed,
            checked.warnings,
            checked.warnings_not_listed
        )
    }

    /// Both readers of quote-free text, side by side.
    fn plain_and_csv(text: &str, rules: &Rules) -> (String, String) {
        assert!(!text.contains('"'));
        let check = |scanned: Result<Scanned, Box<Checked>>| {
            findings(&scanned.map_or_else(|checked| *checked, Scanned::finish))
        };
        (
            check(scan_records(PlainRecords::new(text), text, rules)),
            check(scan_records(CsvRecords::new(text), text, rules)),
        )
    }

    #[test]
    fn quote_free_text_reads_as_the_csv_crate_reads_it() {
        for text in [
            "smaregi-id,external-code\n1,A\n2,B",
            "\r\n\n \r\nsmaregi-id,external-code\r\n\r\n1,A\r\r\n2,B\r3,C\n\n",
            "smaregi-id,external-code,\n1,A,\n2,B, \n3,C,x\n,\n ,, \n4\n5,D,,,\n",
            "スマレジ商品ID,外部サービスコード,更新フラグ\n1,A,TRUE\n2,B,\n3,C,ｘ\n4,D,1\n",
            "smaregi-id,external-code\n1,A\n1,A\n1,B\n2,B\n3,C\n4,C\n",
            "\u{FEFF}smaregi-id,external-code\n１,Ａ\n 2,B \n4.9E+12,3\n",
            "a,b\n",
            "",
            "\n\r\n",
        ] {
            let (plain, csv) = plain_and_csv(text, &Rules::default());
            assert_eq!(plain, csv, "{text:?}");
        }
    }

    #[test]
    fn row_lines_are_kept_as_runs() {
        let mut lines = RowLines::default();
        for line in [2, 3, 4, 7, 8, 10] {
            lines.push(line);
        }
        assert_eq!(lines.runs.len(), 3);
        let all: Vec<u64> = (0..6).map(|row| lines.get(row)).collect();
        assert_eq!(all, [2, 3, 4, 7, 8, 10]);
        lines.retain(|row| row != 1 && row != 4);
        let kept: Vec<u64> = (0..4).map(|row| lines.get(row)).collect();
        assert_eq!(kept, [2, 4, 7, 10]);
    }

    proptest! {
        /// Repeated ids and codes are found as a plain look back over the
        /// rows finds them: an id or a code seen before is an error naming
        /// the first line it was on, unless the whole pair was, which is a
        /// warning, and the pair is kept once.
        #[test]
        fn repeats_are_named_with_the_first_line(rows in proptest::collection::vec((1u64..6, "[A-C]"), 0..30)) {
            let mut text = String::from("smaregi-id,external-code\n");
            for (id, code) in &rows {
                text.push_str(&format!("{id},{code}\n"));
            }
            let checked = check(text.into_bytes(), &Rules::default());
            let (mut errors, mut warnings, mut kept) = (Vec::new(), Vec::new(), Vec::new());
            for (index, (id, code)) in rows.iter().enumerate() {
                let line = index as u64 + 2;
                let first_line = |i: usize| i as u64 + 2;
                let first_id = rows[..index].iter().position(|(i, _)| i == id);
                let first_code = rows[..index].iter().position(|(_, c)| c == code);
                match first_id {
                    Some(first) if rows[first].1 == *code => {
                        warnings.push((line, ProblemKind::PairTwice { first_line: first_line(first) }));
                        continue;
                    }
                    Some(first) => errors.push((line, ProblemKind::IdTwice {
                        first_line: first_line(first),
                        first_code: rows[first].1.clone(),
                    })),
                    None => {}
                }
                if let Some(first) = first_code {
                    errors.push((line, ProblemKind::CodeTwice {
                        first_line: first_line(first),
                        first_id: rows[first].0,
                    }));
                }
                kept.push((*id, code.as_str()));
            }
            let found = |problems: &[Problem]| -> Vec<(u64, ProblemKind)> {
                problems.iter().map(|p| (p.line.unwrap(), p.kind.clone())).collect()
            };
            prop_assert_eq!(found(&checked.errors), errors.clone());
            prop_assert_eq!(found(&checked.warnings), warnings);
            if errors.is_empty() {
                prop_assert_eq!(pairs(&checked), kept);
            } else {
                prop_assert!(checked.pairs.is_empty());
            }
        }

        /// The table's quick answer is the full rule's answer.
        #[test]
        fn the_code_rule_answers_as_the_full_rule(
            value in "[A-Za-z0-9 +.\\-_Ee１Ａ\u{3000}#/]{0,12}",
            symbols in "[-_.+ #]{0,4}",
            max in 1usize..10,
        ) {
            let rules = Rules { code_symbols: symbols, code_max_length: max, ..Rules::default() };
            prop_assert_eq!(CodeRule::new(&rules).check(&value), check_external_code(&value, &rules));
        }

        #[test]
        fn an_id_is_1_to_15_digits_read_as_a_number(value in "[0-9]{0,17}|[0-9 .E+１-]{0,8}") {
            let expected = (!value.is_empty() && value.len() <= 15 && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<u64>().unwrap());
            prop_assert_eq!(check_smaregi_id(&value).ok(), expected);
        }

        /// The quote-free reader and the csv crate find the same in any text
        /// without quotes: the same rows, lines, problems and pairs.
        #[test]
        fn the_quote_free_reader_agrees_with_the_csv_crate(
            header in prop_oneof![
                Just("smaregi-id,external-code"),
                Just("外部コード,スマレジ商品ID"),
                Just("スマレジ商品ID,外部サービスコード,更新フラグ"),
                Just("a,b"),
                Just(""),
            ],
            before in "[\r\n ]{0,3}",
            body in "([0-9]{1,3}|[A-C]|[, \t\r\n+E.１Ａ\u{3000}\u{FEFF}]|TRUE){0,60}",
        ) {
            let text = format!("{before}{header}\n{body}");
            let (plain, csv) = plain_and_csv(&text, &Rules::default());
            prop_assert_eq!(plain, csv, "{:?}", text);
        }

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
            let got: Vec<(u64, String)> = checked.pairs.entries().iter().map(|e| (e.smaregi_id, e.external_code.to_string())).collect();
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
            prop_assert!(checked.accepted() || checked.pairs.is_empty());
        }
    }
}
