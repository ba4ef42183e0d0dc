//! The report staff read: every problem with its line, column, value and
//! what to do, in Japanese first, then English. Pure; no I/O.

use std::fmt::Write as _;

use super::check::{Checked, Column, Format, Problem, ProblemKind, Rules};

/// Values longer than this are shortened in reports (a 10 MB line stays a line).
const MAX_VALUE_CHARS: usize = 60;

/// The formats a file may have, for staff who sent something else.
pub const ACCEPTED_FORMATS: &str = "\
受け付ける形式 / Accepted formats:
  1. 全件置き換え / full replacement — 2列 / two columns:
       スマレジ商品ID (smaregi-id, 商品ID, product-id)
       外部コード (external-code, nextengine-code, ネクストエンジン商品コード)
     ファイルの内容がマッピング全体になります。見出し行だけのファイルはマッピングを空にします。
     The file becomes the whole mapping; a file with only the header clears it.
  2. 差分更新 (ロジクラ形式) / upsert (ロジクラ-style export) — 列 / columns:
       スマレジ商品ID (smaregi-id), 外部サービスコード, 更新フラグ (他の列は無視 / other columns are ignored)
     更新フラグが TRUE の行だけが追加・更新されます。 / Only rows whose 更新フラグ is TRUE are added or changed.
  文字コード / Encoding: UTF-8 (BOMあり・なし / with or without BOM) または / or Shift_JIS.";

/// What the report is about.
#[derive(Debug, Clone)]
pub struct ReportContext<'a> {
    pub file_name: &'a str,
    /// The version that became current, for an imported file.
    pub imported_version: Option<u64>,
}

/// The full report of a checked file.
pub fn render(checked: &Checked, context: &ReportContext<'_>, rules: &Rules) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "マッピングファイル確認結果 / Mapping file report");
    let _ = writeln!(out, "ファイル / File: {}", context.file_name);
    let verdict = match (checked.accepted(), context.imported_version) {
        (true, Some(version)) => format!(
            "取り込みました（バージョン {version}）/ imported as version {version}"
        ),
        (true, None) => "取り込めます / would be imported".to_owned(),
        (false, _) => {
            "取り込みませんでした。マッピングは変わっていません。/ rejected; the mapping is unchanged"
                .to_owned()
        }
    };
    let _ = writeln!(out, "結果 / Result: {verdict}");
    if let Some(encoding) = checked.encoding {
        let _ = writeln!(out, "文字コード / Encoding: {}", encoding.name());
    }
    if let Some(format) = checked.format {
        let name = match format {
            Format::FullReplacement => "全件置き換え / full replacement",
            Format::Upsert => "差分更新（ロジクラ形式）/ upsert (ロジクラ-style)",
        };
        let _ = writeln!(out, "形式 / Format: {name}");
        let _ = writeln!(out, "データ行 / Data rows: {}", checked.data_rows);
        if format == Format::Upsert {
            let _ = writeln!(
                out,
                "更新フラグがTRUEでない行（無視）/ Rows not flagged TRUE (ignored): {}",
                checked.skipped_rows
            );
        }
    }
    let _ = writeln!(
        out,
        "エラー / Errors: {}   警告 / Warnings: {}",
        checked.error_count(),
        checked.warning_count()
    );
    section(
        &mut out,
        "エラー（直してから置き直してください）/ Errors (fix them and drop the file again)",
        &checked.errors,
        checked.errors_not_listed,
        rules,
    );
    section(
        &mut out,
        "警告（取り込みは止めません）/ Warnings (these do not stop the import)",
        &checked.warnings,
        checked.warnings_not_listed,
        rules,
    );
    if checked.errors.iter().any(|p| {
        matches!(
            p.kind,
            ProblemKind::UnknownFormat { .. } | ProblemKind::MissingColumn { .. }
        )
    }) {
        let _ = writeln!(out, "\n{ACCEPTED_FORMATS}");
    }
    out
}

fn section(out: &mut String, title: &str, problems: &[Problem], not_listed: u64, rules: &Rules) {
    if problems.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n== {title} ==");
    for problem in problems {
        let (ja, en) = describe(problem, rules);
        let (where_ja, where_en) = location(problem);
        let _ = writeln!(out, "{where_ja}{ja}");
        let _ = writeln!(out, "  {where_en}{en}");
    }
    if not_listed > 0 {
        let _ = writeln!(
            out,
            "… ほかに {not_listed} 件（省略）/ … and {not_listed} more, not listed"
        );
    }
}

/// "3行目 B列「外部コード」 値「x」: " and "line 3, column B (外部コード), value "x": ".
fn location(problem: &Problem) -> (String, String) {
    let mut ja = String::new();
    let mut en = Vec::new();
    if let Some(line) = problem.line {
        let _ = write!(ja, "{line}行目 ");
        en.push(format!("line {line}"));
    }
    if let Some(column) = &problem.column {
        let _ = write!(ja, "{}列「{}」 ", column.letter(), shorten(&column.header));
        en.push(format!(
            "column {} ({})",
            column.letter(),
            shorten(&column.header)
        ));
    }
    if let Some(value) = &problem.value {
        let _ = write!(ja, "値「{}」", shorten(value));
        en.push(format!("value \"{}\"", shorten(value)));
    }
    if !ja.is_empty() {
        ja = format!("{}: ", ja.trim_end());
    }
    let en = if en.is_empty() {
        String::new()
    } else {
        format!("{}: ", en.join(", "))
    };
    (ja, en)
}

/// A value as shown: invisible edges made visible, long ones shortened.
fn shorten(value: &str) -> String {
    let visible: String = value
        .chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\r' => '␍',
            '\t' => '␉',
            c => c,
        })
        .collect();
    let count = visible.chars().count();
    if count <= MAX_VALUE_CHARS {
        visible
    } else {
        let head: String = visible.chars().take(MAX_VALUE_CHARS).collect();
        format!("{head}…（{count}文字 / {count} characters）")
    }
}

fn column_name(column: &Column) -> String {
    format!("{}列「{}」", column.letter(), shorten(&column.header))
}

/// What the problem is and what to do, in Japanese and in English.
fn describe(problem: &Problem, rules: &Rules) -> (String, String) {
    use ProblemKind::*;
    match &problem.kind {
        TooLarge { size, max } => (
            format!("ファイルが大きすぎます（{size} バイト、上限 {max} バイト）。ファイルを分けるか、管理者に上限（max-file-bytes）の変更を依頼してください。"),
            format!("the file is too large ({size} bytes, the limit is {max}); split it, or ask the administrator to raise max-file-bytes."),
        ),
        Binary => (
            "テキストのCSVではありません（Excelブック・画像などのバイナリ）。Excelで「CSV UTF-8」または「CSV」で保存し直してください。".to_owned(),
            "this is not a CSV text file (an Excel workbook, an image, …); save it from Excel as \"CSV UTF-8\" or \"CSV\".".to_owned(),
        ),
        Utf16 => (
            "UTF-16（Unicodeテキスト）は読めません。Excelで「CSV UTF-8」で保存し直してください。".to_owned(),
            "UTF-16 (\"Unicode text\") is not read; save it from Excel as \"CSV UTF-8\".".to_owned(),
        ),
        Undecodable { tried } => (
            format!("この行に {} として読めない文字があります（途中で切れた文字など）。UTF-8 か Shift_JIS で保存し直してください。", tried.name()),
            format!("this line holds bytes that are not valid {} (e.g. a character cut in half); save the file again as UTF-8 or Shift_JIS.", tried.name()),
        ),
        NoHeader => (
            "ファイルが空です（見出し行がありません）。".to_owned(),
            "the file is empty (no header line).".to_owned(),
        ),
        UnknownFormat { headers } => {
            let shown = headers.iter().map(|h| format!("「{}」", shorten(h))).collect::<Vec<_>>().join(" ");
            (
                format!("見出し行 {shown} はどの形式にも当てはまりません。下の「受け付ける形式」に合わせてください。"),
                format!("the header {shown} matches no accepted format; see the accepted formats below."),
            )
        }
        MissingColumn { wanted } => (
            format!("ロジクラ形式に必要な列「{wanted}」がありません。"),
            format!("the ロジクラ-style format needs a column \"{wanted}\", which is missing."),
        ),
        DuplicateHeader { first } => (
            format!("同じ見出しの列が {} にもあります。どちらか一方にしてください。", column_name(first)),
            format!("the same header is also in column {}; keep only one.", first.letter()),
        ),
        TooManyRows { max } => (
            format!("行数が上限（{max} 行）を超えています。ファイルを分けるか、管理者に上限（max-rows）の変更を依頼してください。"),
            format!("more than {max} data rows; split the file, or ask the administrator to raise max-rows."),
        ),
        TooFewFields { expected, found } => (
            format!("列が足りません（{expected} 列のはずが {found} 列）。"),
            format!("too few columns ({found}, expected {expected})."),
        ),
        ExtraFields { expected, found } => (
            format!("余分な列に値があります（{expected} 列のはずが {found} 列）。値に「,」が入っている場合は \"…\" で囲んでください。"),
            format!("values in extra columns ({found}, expected {expected}); a value containing \",\" must be quoted."),
        ),
        Empty => (
            "値が空です。入力してください。".to_owned(),
            "the value is empty; fill it in.".to_owned(),
        ),
        EdgeSpaces => (
            "値の前後に空白があります。コードは完全一致で照合するため、空白を消してください。".to_owned(),
            "the value has spaces at its start or end; codes are matched exactly, so remove the spaces.".to_owned(),
        ),
        ScientificNotation => (
            "Excelが数字を指数表記（例 4.90123E+12）に変えてしまい、元の値が失われています。列の書式を「文字列」にして元データから入れ直してください。".to_owned(),
            "Excel turned a long number into scientific notation (e.g. 4.90123E+12) and the original digits are lost; format the column as Text and enter the values again from the source.".to_owned(),
        ),
        FullWidth { half_width } => (
            format!("全角の英数字が入っています。半角で入力してください（「{}」）。", shorten(half_width)),
            format!("full-width letters or digits; type them half-width (\"{}\").", shorten(half_width)),
        ),
        IdNotDigits => (
            "スマレジ商品IDは半角数字だけです。".to_owned(),
            "a Smaregi product id has half-width digits only.".to_owned(),
        ),
        IdTooLong => (
            "スマレジ商品IDは15桁以内です。".to_owned(),
            "a Smaregi product id has at most 15 digits.".to_owned(),
        ),
        CodeTooLong { max } => (
            format!("外部コードは {max} 文字以内です。"),
            format!("an external code has at most {max} characters."),
        ),
        CodeCharacter { character } => (
            format!("外部コードに使えない文字「{character}」があります。使えるのは半角英数字と「{}」です。", rules.code_symbols),
            format!("the external code holds \"{character}\", which is not allowed; use half-width letters, digits and \"{}\".", rules.code_symbols),
        ),
        IdTwice { first_line, first_code } => (
            format!("このスマレジ商品IDは {first_line} 行目で別の外部コード「{}」に対応付けられています。どちらか一方にしてください。", shorten(first_code)),
            format!("this Smaregi product id is mapped to another external code (\"{}\") on line {first_line}; keep only one.", shorten(first_code)),
        ),
        CodeTwice { first_line, first_id } => (
            format!("この外部コードは {first_line} 行目で別のスマレジ商品ID「{first_id}」に対応付けられています。どちらか一方にしてください。"),
            format!("this external code is mapped to another Smaregi product id ({first_id}) on line {first_line}; keep only one."),
        ),
        PairTwice { first_line } => (
            format!("{first_line} 行目と同じ行です（重複は1行として扱います）。"),
            format!("the same pair as on line {first_line} (counted once)."),
        ),
        LostLeadingZeros { usual_length } => (
            format!("このファイルの数字だけのコードの多くは {usual_length} 桁です。Excelで先頭の0が消えていないか確認してください。"),
            format!("most all-digit codes in this file have {usual_length} digits; check that Excel did not drop leading zeros."),
        ),
        NotRegularFile { what } => (
            format!("ファイルではありません（{}）。CSVファイルそのものを置いてください。", match *what {
                "folder" => "フォルダー",
                "symbolic link" => "シンボリックリンク",
                _ => "特殊ファイル",
            }),
            format!("this is not a file but a {what}; drop the CSV file itself."),
        ),
        Unreadable { reason } => (
            format!("ファイルを読めませんでした（{reason}）。アクセス権を確認して置き直してください。"),
            format!("the file could not be read ({reason}); check its permissions and drop it again."),
        ),
        ChangedWhileReading => (
            "読み込み中にファイルが書き換えられました。コピーが終わってから置き直してください。".to_owned(),
            "the file changed while it was being read; drop it again once it is completely copied.".to_owned(),
        ),
        BadFlag => (
            "更新フラグは TRUE か FALSE です。".to_owned(),
            "更新フラグ must be TRUE or FALSE.".to_owned(),
        ),
    }
}
