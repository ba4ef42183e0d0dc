//! The staff status page: one HTML document, server-rendered, without
//! scripts or external assets, readable on a phone; Japanese first, then
//! English. Pure: it renders what it is given.

use std::fmt::Write;

use super::JournalEntry;
use crate::health::{self, ImportFacts, Light, Problem, Snapshot};
use crate::smaregi::jst;

/// Seconds between the page's own reloads.
const REFRESH_SECONDS: u32 = 30;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn headline(light: Light, problems: usize) -> (&'static str, String, String) {
    match light {
        Light::Green => (
            "green",
            "すべて正常に動いています".into(),
            "All is well".into(),
        ),
        Light::Amber => (
            "amber",
            format!("確認が必要なことが {problems} 件あります"),
            format!("{problems} thing(s) to look at"),
        ),
        Light::Red => (
            "red",
            format!("対応が必要です（{problems} 件）"),
            format!("Action needed ({problems})"),
        ),
    }
}

fn when(millis: u64) -> String {
    format!("{} JST", jst::format_unix_millis(millis))
}

fn ago(now: u64, then: u64) -> (String, String) {
    let minutes = now.saturating_sub(then) / 60_000;
    match minutes {
        0 => ("たった今".into(), "just now".into()),
        m if m < 120 => (format!("{m} 分前"), format!("{m} min ago")),
        m => (format!("{} 時間前", m / 60), format!("{} h ago", m / 60)),
    }
}

/// The page.
pub fn render(snapshot: &Snapshot, problems: &[Problem], recent: &[JournalEntry]) -> String {
    let light = Light::of(problems);
    let (class, japanese, english) = headline(light, problems.len());
    let mut html = String::with_capacity(8 * 1024);
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="ja">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>smaregi-relay — {japanese}</title>
<style>
body{{font-family:system-ui,-apple-system,"Hiragino Sans","Noto Sans CJK JP",sans-serif;margin:0;padding:0 12px 24px;background:#f6f6f4;color:#222;line-height:1.5}}
main{{max-width:720px;margin:0 auto}}
h1{{font-size:1.05rem;margin:16px 0 8px;color:#555}}
h2{{font-size:1rem;margin:20px 0 6px}}
.en{{color:#666;font-size:.9em}}
#light{{border-radius:10px;padding:14px 16px;color:#fff;font-size:1.2rem;font-weight:bold}}
#light .en{{color:#fff;opacity:.9;font-weight:normal;display:block}}
.green{{background:#2e7d32}}.amber{{background:#b26a00}}.red{{background:#c62828}}
ul{{padding-left:0;list-style:none;margin:0}}
li{{background:#fff;border-radius:8px;padding:10px 12px;margin:6px 0;overflow-wrap:anywhere}}
li.critical{{border-left:6px solid #c62828}}li.warning{{border-left:6px solid #b26a00}}li.info{{border-left:6px solid #9e9e9e}}
dl{{display:grid;grid-template-columns:max-content 1fr;gap:4px 12px;background:#fff;border-radius:8px;padding:10px 12px;margin:0}}
dt{{color:#555}}dd{{margin:0;overflow-wrap:anywhere}}
pre{{white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border-radius:8px;padding:10px 12px;font-size:.85rem}}
time{{color:#666;font-size:.85em}}
</style>
</head>
<body>
<main>
<h1>smaregi-relay {version}</h1>
<div id="light" class="{class}" data-light="{light}">{japanese}<span class="en">{english}</span></div>
"#,
        version = escape(snapshot.version),
        light = light.as_str(),
    );

    html.push_str(
        "<section id=\"attention\">\n<h2>要対応 <span class=\"en\">Needs attention</span></h2>\n",
    );
    if problems.is_empty() {
        html.push_str("<p>ありません。<span class=\"en\">Nothing.</span></p>\n");
    } else {
        html.push_str("<ul>\n");
        for problem in problems {
            let severity = match problem.severity {
                health::Severity::Warning => "warning",
                health::Severity::Critical => "critical",
            };
            let _ = writeln!(
                html,
                "<li class=\"{severity}\" data-event=\"{}\" data-key=\"{}\">{}<br><span class=\"en\">{}</span></li>",
                escape(problem.event),
                escape(&problem.key),
                escape(&problem.japanese),
                escape(&problem.english),
            );
        }
        html.push_str("</ul>\n");
    }
    if let Some(ImportFacts::Rejected { file, excerpt, .. }) = &snapshot.last_import {
        let _ = writeln!(
            html,
            "<h2>取り込めなかったCSV <span class=\"en\">Rejected CSV</span>: {}</h2>\n<pre id=\"csv-report\">{}</pre>",
            escape(file),
            escape(excerpt)
        );
    }
    html.push_str("</section>\n");

    html.push_str(
        "<section id=\"overview\">\n<h2>状況 <span class=\"en\">Overview</span></h2>\n<dl>\n",
    );
    let mut row = |ja: &str, en: &str, value: String| {
        let _ = writeln!(
            html,
            "<dt>{ja} <span class=\"en\">{en}</span></dt><dd>{value}</dd>"
        );
    };
    row(
        "最後の通知",
        "Last notification",
        match snapshot.last_notification_at {
            Some(at) => {
                let (ja, en) = ago(snapshot.now, at);
                format!(
                    "{ja} <span class=\"en\">{en}</span> <time>{}</time>",
                    when(at)
                )
            }
            None => "起動後まだありません <span class=\"en\">none since start</span>".into(),
        },
    );
    row(
        "送信待ち",
        "Waiting to be sent",
        format!("{} 件 <span class=\"en\">jobs</span>", snapshot.pending),
    );
    row(
        "停止中のジョブ",
        "Parked jobs",
        format!("{} 件 <span class=\"en\">jobs</span>", snapshot.parked),
    );
    row(
        "送信の一時停止",
        "Paused delivery",
        if snapshot.paused.is_empty() {
            "なし <span class=\"en\">none</span>".into()
        } else {
            escape(
                &snapshot
                    .paused
                    .iter()
                    .map(|p| p.upstream.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        },
    );
    row(
        "商品マッピング",
        "Product mapping",
        format!(
            "バージョン {} ({} 件) <span class=\"en\">version {}, {} entries</span>",
            snapshot.mapping_version,
            snapshot.mapping_entries,
            snapshot.mapping_version,
            snapshot.mapping_entries
        ),
    );
    row(
        "証明書の期限",
        "Certificate expires",
        snapshot.certificate_not_after.map_or_else(
            || "不明 <span class=\"en\">unknown</span>".into(),
            |at| when(at.max(0) as u64 * 1000),
        ),
    );
    if let Some((free, total)) = snapshot.disk {
        row(
            "ディスクの空き",
            "Disk free",
            format!(
                "{} / {}",
                health::human_bytes(free),
                health::human_bytes(total)
            ),
        );
    }
    row(
        "稼働時間",
        "Up for",
        format!(
            "{} 時間 {} 分 <span class=\"en\">{}h {}m</span>",
            snapshot.uptime_seconds / 3600,
            snapshot.uptime_seconds % 3600 / 60,
            snapshot.uptime_seconds / 3600,
            snapshot.uptime_seconds % 3600 / 60
        ),
    );
    html.push_str("</dl>\n</section>\n");

    if !snapshot.parked_jobs.is_empty() {
        html.push_str("<section id=\"parked\">\n<h2>停止中のジョブ <span class=\"en\">Parked jobs</span></h2>\n<ul>\n");
        for job in &snapshot.parked_jobs {
            let (ja, en) = health::describe_kind(&job.kind);
            let _ = writeln!(
                html,
                "<li class=\"critical\" data-job=\"{id}\">#{id} {ja} <span class=\"en\">{en}</span> — {key}<br>{reason} <time>{at}</time></li>",
                id = job.id,
                key = escape(&job.key),
                reason = escape(&job.reason),
                at = when(job.at),
            );
        }
        html.push_str("</ul>\n</section>\n");
    }

    html.push_str(
        "<section id=\"recent\">\n<h2>最近の出来事 <span class=\"en\">Recent events</span></h2>\n",
    );
    if recent.is_empty() {
        html.push_str("<p>まだありません。<span class=\"en\">None yet.</span></p>\n");
    } else {
        html.push_str("<ul>\n");
        for entry in recent {
            let _ = writeln!(
                html,
                "<li class=\"{}\"><time>{}</time><br>{}<br><span class=\"en\">{}</span></li>",
                entry.level,
                when(entry.at),
                escape(&entry.japanese),
                escape(&entry.english),
            );
        }
        html.push_str("</ul>\n");
    }
    let _ = write!(
        html,
        "</section>\n<p class=\"en\">{} · {}</p>\n</main>\n</body>\n</html>\n",
        escape(&snapshot.listening),
        when(snapshot.now)
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ParkedJob, Severity};

    fn snapshot() -> Snapshot {
        Snapshot {
            now: 1_795_392_000_000,
            version: "0.1.0",
            uptime_seconds: 3_900,
            listening: "listening on 0.0.0.0:8443".into(),
            certificate_fingerprint: "AB".into(),
            certificate_not_after: Some(1_800_000_000),
            last_notification_at: Some(1_795_392_000_000 - 5 * 60_000),
            pending: 2,
            parked: 1,
            outbox_counts: vec![],
            oldest_pending: None,
            parked_jobs: vec![ParkedJob {
                id: 42,
                kind: "stock.push".into(),
                key: "stock-push".into(),
                reason: "HTTP 400 <b>bad</b>".into(),
                at: 1_795_392_000_000,
            }],
            blocked_keys: vec![],
            paused: vec![],
            mapping_version: 3,
            mapping_entries: 120,
            last_import: None,
            store_bytes: 0,
            disk: Some((10 << 30, 100 << 30)),
        }
    }

    #[test]
    fn the_page_leads_with_the_light_and_escapes_what_it_shows() {
        let problem = Problem {
            event: "outbox.job_parked",
            severity: Severity::Critical,
            key: "outbox.job_parked:42".into(),
            japanese: "止まっています <script>".into(),
            english: "parked".into(),
        };
        let html = render(&snapshot(), std::slice::from_ref(&problem), &[]);
        assert!(html.contains(r#"class="red" data-light="red">対応が必要です（1 件）"#));
        assert!(html.contains("止まっています &lt;script&gt;"));
        assert!(html.contains("HTTP 400 &lt;b&gt;bad&lt;/b&gt;"));
        assert!(!html.contains("<script"));
        assert!(html.contains("5 分前"));
        assert!(html.contains(r#"data-job="42""#));

        let green = render(&snapshot(), &[], &[]);
        assert!(green.contains("すべて正常に動いています"));
        assert!(green.contains("All is well"));
    }

    #[test]
    fn a_rejected_csv_shows_its_report() {
        let mut snapshot = snapshot();
        snapshot.last_import = Some(ImportFacts::Rejected {
            file: "codes.csv".into(),
            errors: 1,
            at: 0,
            report: "rejected/codes.csv.report.txt".into(),
            excerpt: "3行目: スマレジ商品IDが空です".into(),
        });
        let html = render(&snapshot, &[], &[]);
        assert!(html.contains("<pre id=\"csv-report\">3行目: スマレジ商品IDが空です</pre>"));
    }
}
