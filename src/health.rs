//! Whether all is well: the facts about the running daemon, and the pure
//! judgement of which of them need someone's attention.
//!
//! This module owns [`Snapshot`] (what the components report at one
//! moment), [`assess`] (snapshot → [`Problem`]s, each with a stable event
//! name, a severity and a text in Japanese and English) and [`Light`], the
//! one green/amber/red answer. The status page, `/readyz`, the `STATUS=`
//! line, the `status` command and the alerts all read the same judgement,
//! so they never disagree. Nothing here does I/O: the admin module
//! gathers the snapshot.

use std::path::PathBuf;

use serde::Serialize;

/// A problem's weight. Ordered: `Warning < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Someone should look today (amber).
    Warning,
    /// Work is not flowing, or soon will not (red).
    Critical,
}

/// The one-line answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Light {
    Green,
    Amber,
    Red,
}

impl Light {
    pub fn of(problems: &[Problem]) -> Self {
        match problems.iter().map(|p| p.severity).max() {
            None => Self::Green,
            Some(Severity::Warning) => Self::Amber,
            Some(Severity::Critical) => Self::Red,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Green => "green",
            Self::Amber => "amber",
            Self::Red => "red",
        }
    }
}

/// Something that needs attention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable event name, also in the log line: `outbox.job_parked`, …
    pub event: &'static str,
    pub severity: Severity,
    /// Identifies this problem across snapshots (`outbox.job_parked:17`).
    pub key: String,
    pub japanese: String,
    pub english: String,
}

/// Stable event names.
pub mod events {
    pub const JOB_PARKED: &str = "outbox.job_parked";
    pub const UPSTREAM_PAUSED: &str = "upstream.paused";
    pub const CSV_REJECTED: &str = "mapping.csv_rejected";
    pub const CERTIFICATE_EXPIRING: &str = "tls.certificate_expiring";
    pub const DISK_NEARLY_FULL: &str = "storage.disk_nearly_full";
    pub const NO_NOTIFICATIONS: &str = "intake.no_notifications";
    pub const BACKLOG: &str = "outbox.backlog";
}

/// A parked job, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedJob {
    pub id: u64,
    pub kind: String,
    pub key: String,
    pub reason: String,
    /// When it was parked (Unix milliseconds).
    pub at: u64,
}

/// A paused upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PausedUpstream {
    pub upstream: String,
    pub reason: String,
    /// Paused by `pause` (deliberate), not by a credential failure.
    pub by_operator: bool,
}

/// The latest mapping file's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum ImportFacts {
    Imported {
        file: String,
        version: u64,
        at: u64,
    },
    Rejected {
        file: String,
        errors: u64,
        at: u64,
        report: PathBuf,
        /// The report's first lines.
        excerpt: String,
    },
}

/// Everything the judgement needs, read at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Unix milliseconds.
    pub now: u64,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub listening: String,
    pub certificate_fingerprint: String,
    /// Unix seconds.
    pub certificate_not_after: Option<i64>,
    /// Unix milliseconds, since this start.
    pub last_notification_at: Option<u64>,
    pub pending: u64,
    pub parked: u64,
    /// `(state, kind, count)`.
    pub outbox_counts: Vec<(String, String, u64)>,
    /// `(job id, kind, age in seconds)`.
    pub oldest_pending: Option<(u64, String, u64)>,
    /// The first parked jobs, oldest first.
    pub parked_jobs: Vec<ParkedJob>,
    /// Ordering keys whose head is parked, with that job.
    pub blocked_keys: Vec<(String, u64)>,
    pub paused: Vec<PausedUpstream>,
    pub mapping_version: u64,
    pub mapping_entries: u64,
    pub last_import: Option<ImportFacts>,
    pub store_bytes: u64,
    /// `(free, total)` bytes on the state directory's filesystem.
    pub disk: Option<(u64, u64)>,
}

/// When the facts become problems (config `[admin]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Warn this many days before the certificate expires.
    pub certificate_days: i64,
    /// Opening hours in Japan time, `(from, to)` in minutes after midnight.
    pub opening_hours: Option<(u32, u32)>,
    /// Minutes without a notification, during opening hours, before a warning.
    pub quiet_minutes: u64,
    /// Free space below this fraction (or byte count) of the disk: warning;
    /// below a fifth of it: critical.
    pub disk_free_fraction: f64,
    pub disk_free_bytes: u64,
    /// A pending job older than this many minutes: warning.
    pub backlog_minutes: u64,
}

/// Parked jobs listed one by one; beyond them, one summary problem.
pub const PARKED_LISTED: usize = 20;

/// Japan has no daylight saving time: JST is UTC+9 all year.
const JST_OFFSET_MINUTES: u64 = 9 * 60;

/// The problems in `snapshot`, most severe first.
pub fn assess(snapshot: &Snapshot, thresholds: &Thresholds) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut add = |event, severity, key: String, japanese: String, english: String| {
        problems.push(Problem {
            event,
            severity,
            key,
            japanese,
            english,
        })
    };
    for job in &snapshot.parked_jobs {
        let (ja_what, en_what) = describe_kind(&job.kind);
        add(
            events::JOB_PARKED,
            Severity::Critical,
            format!("{}:{}", events::JOB_PARKED, job.id),
            format!(
                "{ja_what}（ジョブ {}、{}）が止まっています: {}。原因を直してから `smaregi-relay outbox retry {}` を実行してください。",
                job.id, job.key, job.reason, job.id
            ),
            format!(
                "{en_what} (job {}, {}) is parked: {}. Fix the cause, then run `smaregi-relay outbox retry {}`.",
                job.id, job.key, job.reason, job.id
            ),
        );
    }
    let unlisted = snapshot
        .parked
        .saturating_sub(snapshot.parked_jobs.len() as u64);
    if unlisted > 0 {
        add(
            events::JOB_PARKED,
            Severity::Critical,
            format!("{}:more", events::JOB_PARKED),
            format!("ほかに {unlisted} 件のジョブが止まっています（`smaregi-relay outbox list --state parked`）。"),
            format!("{unlisted} more jobs are parked (`smaregi-relay outbox list --state parked`)."),
        );
    }
    for paused in &snapshot.paused {
        let (event, severity) = (
            events::UPSTREAM_PAUSED,
            if paused.by_operator {
                Severity::Warning
            } else {
                Severity::Critical
            },
        );
        let key = format!("{event}:{}", paused.upstream);
        let target = upstream_name(&paused.upstream);
        if paused.by_operator {
            add(event, severity, key,
                format!("{}への送信は停止中です（{}）。再開するには `smaregi-relay resume {}`。受信と蓄積は続いています。", target.0, paused.reason, paused.upstream),
                format!("Delivery to {} is paused ({}). `smaregi-relay resume {}` delivers again; notifications and orders are still accepted and queued.", target.1, paused.reason, paused.upstream));
        } else {
            add(event, severity, key,
                format!("{}への送信が認証・設定エラーで止まっています: {}。設定（契約ID・アクセストークン等）を確認してください。", target.0, paused.reason),
                format!("Delivery to {} stopped on a credential or configuration error: {}. Check the configuration (contract id, access token, …).", target.1, paused.reason));
        }
    }
    if let Some(ImportFacts::Rejected {
        file,
        errors,
        report,
        ..
    }) = &snapshot.last_import
    {
        add(
            events::CSV_REJECTED,
            Severity::Warning,
            format!("{}:{file}", events::CSV_REJECTED),
            format!("商品マッピングCSV「{file}」は取り込まれませんでした（問題 {errors} 件）。以前のマッピングのままです。理由: {}", report.display()),
            format!("The product mapping CSV \"{file}\" was rejected ({errors} problems); the previous mapping stays. Report: {}", report.display()),
        );
    }
    if let Some(not_after) = snapshot.certificate_not_after {
        let seconds_left = not_after - (snapshot.now / 1000) as i64;
        let days_left = seconds_left.div_euclid(86_400);
        if seconds_left <= 0 {
            add(
                events::CERTIFICATE_EXPIRING,
                Severity::Critical,
                events::CERTIFICATE_EXPIRING.into(),
                "TLS証明書の有効期限が切れています。スマレジからの通知が届きません。証明書を更新してください。".into(),
                "The TLS certificate has expired: Smaregi's notifications cannot reach us. Renew the certificate.".into(),
            );
        } else if days_left < thresholds.certificate_days {
            add(
                events::CERTIFICATE_EXPIRING,
                Severity::Warning,
                events::CERTIFICATE_EXPIRING.into(),
                format!("TLS証明書の有効期限まであと {days_left} 日です。更新してください（更新後は再起動不要です）。"),
                format!("The TLS certificate expires in {days_left} days. Renew it (no restart needed)."),
            );
        }
    }
    if let Some((free, total)) = snapshot.disk {
        let floor =
            ((total as f64 * thresholds.disk_free_fraction) as u64).max(thresholds.disk_free_bytes);
        if total > 0 && free < floor {
            let severity = if free < floor / 5 {
                Severity::Critical
            } else {
                Severity::Warning
            };
            add(
                events::DISK_NEARLY_FULL,
                severity,
                events::DISK_NEARLY_FULL.into(),
                format!("ディスクの空きが少なくなっています（残り {}）。満杯になると受信を保存できません。", human_bytes(free)),
                format!("The disk is nearly full ({} free). When it is full, notifications cannot be stored.", human_bytes(free)),
            );
        }
    }
    if let Some((from, to)) = thresholds.opening_hours {
        let quiet_ms = thresholds.quiet_minutes * 60_000;
        let since = snapshot
            .last_notification_at
            .unwrap_or(snapshot.now.saturating_sub(snapshot.uptime_seconds * 1000));
        let minute_of_day = ((snapshot.now / 60_000 + JST_OFFSET_MINUTES) % 1440) as u32;
        let open = if from <= to {
            (from..to).contains(&minute_of_day)
        } else {
            minute_of_day >= from || minute_of_day < to
        };
        let quiet_for = snapshot.now.saturating_sub(since);
        if open && quiet_for >= quiet_ms {
            let minutes = quiet_for / 60_000;
            add(
                events::NO_NOTIFICATIONS,
                Severity::Warning,
                events::NO_NOTIFICATIONS.into(),
                format!("営業時間中ですが、スマレジからの通知が {minutes} 分間ありません。スマレジの API送信設定と回線を確認してください。"),
                format!("No notification from Smaregi for {minutes} minutes during opening hours. Check Smaregi's API送信 settings and the network."),
            );
        }
    }
    if let Some((id, kind, age_seconds)) = &snapshot.oldest_pending {
        if *age_seconds >= thresholds.backlog_minutes * 60 {
            let (ja_what, en_what) = describe_kind(kind);
            add(
                events::BACKLOG,
                Severity::Warning,
                events::BACKLOG.into(),
                format!(
                    "{ja_what}（ジョブ {id}）が {} 分間送信待ちです。再試行中です。",
                    age_seconds / 60
                ),
                format!(
                    "{en_what} (job {id}) has been waiting {} minutes; it is being retried.",
                    age_seconds / 60
                ),
            );
        }
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.severity));
    problems
}

/// What a job of `kind` does, in words staff know.
pub fn describe_kind(kind: &str) -> (&'static str, &'static str) {
    match kind {
        crate::smaregi::jobs::REGISTER_KIND => {
            ("スマレジへの取引登録", "Registering a sale in Smaregi")
        }
        crate::smaregi::jobs::CANCEL_KIND => ("スマレジの取引取消", "Cancelling a sale in Smaregi"),
        crate::stock::book::REFRESH_KIND => {
            ("スマレジからの在庫取得", "Reading stock from Smaregi")
        }
        crate::stock::book::HELD_KIND => {
            ("ECに受け付けられなかった在庫", "Stock the EC side refused")
        }
        crate::stock::book::PUSH_KIND => ("ECへの在庫送信", "Sending stock to the EC side"),
        crate::stock::book::BACKFILL_KIND => ("在庫変動の取り込み", "Catching up stock changes"),
        _ => ("送信", "A delivery"),
    }
}

fn upstream_name(upstream: &str) -> (&'static str, &'static str) {
    match upstream {
        "smaregi" => ("スマレジ", "Smaregi"),
        "downstream" => ("EC側", "the EC side"),
        _ => ("送信先", "an upstream"),
    }
}

/// `1.5 GiB`, `300 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// `10:00-20:00` → minutes after midnight. Pure, for config validation.
pub fn parse_opening_hours(text: &str) -> Result<(u32, u32), String> {
    let minutes = |part: &str| -> Result<u32, String> {
        let (h, m) = part
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{part:?} is not HH:MM"))?;
        let (h, m): (u32, u32) = (
            h.parse().map_err(|_| format!("{part:?} is not HH:MM"))?,
            m.parse().map_err(|_| format!("{part:?} is not HH:MM"))?,
        );
        if h > 24 || m > 59 || (h == 24 && m > 0) {
            return Err(format!("{part:?} is not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let (from, to) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not HH:MM-HH:MM"))?;
    let (from, to) = (minutes(from)?, minutes(to)?);
    if from == to {
        return Err("opening and closing times are the same".into());
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            certificate_days: 14,
            opening_hours: Some((10 * 60, 20 * 60)),
            quiet_minutes: 120,
            disk_free_fraction: 0.1,
            disk_free_bytes: 0,
            backlog_minutes: 60,
        }
    }

    /// 2026-11-23 12:00 JST (03:00 UTC), in Unix milliseconds.
    const NOON_JST: u64 = 1_795_392_000_000 + 3 * 3_600_000;

    fn healthy() -> Snapshot {
        Snapshot {
            now: NOON_JST,
            version: "0.1.0",
            uptime_seconds: 86_400,
            listening: "listening on 0.0.0.0:8443".into(),
            certificate_fingerprint: "AB:CD".into(),
            certificate_not_after: Some((NOON_JST / 1000) as i64 + 90 * 86_400),
            last_notification_at: Some(NOON_JST - 60_000),
            pending: 0,
            parked: 0,
            outbox_counts: Vec::new(),
            oldest_pending: None,
            parked_jobs: Vec::new(),
            blocked_keys: Vec::new(),
            paused: Vec::new(),
            mapping_version: 3,
            mapping_entries: 10,
            last_import: None,
            store_bytes: 1 << 20,
            disk: Some((50 << 30, 100 << 30)),
        }
    }

    fn events(problems: &[Problem]) -> Vec<(&str, Severity)> {
        problems.iter().map(|p| (p.event, p.severity)).collect()
    }

    #[test]
    fn a_healthy_snapshot_is_green() {
        let problems = assess(&healthy(), &thresholds());
        assert_eq!(problems, vec![]);
        assert_eq!(Light::of(&problems), Light::Green);
    }

    #[test]
    fn a_parked_job_is_red_and_says_how_to_retry_it() {
        let mut snapshot = healthy();
        snapshot.parked = 23;
        snapshot.parked_jobs = (1..=PARKED_LISTED as u64)
            .map(|id| ParkedJob {
                id,
                kind: crate::smaregi::jobs::REGISTER_KIND.into(),
                key: format!("order:{id}"),
                reason: "商品IDが存在しません".into(),
                at: NOON_JST,
            })
            .collect();
        let problems = assess(&snapshot, &thresholds());
        assert_eq!(Light::of(&problems), Light::Red);
        assert_eq!(problems.len(), PARKED_LISTED + 1);
        assert!(problems[0].japanese.contains("スマレジへの取引登録"));
        assert!(problems[0].english.contains("outbox retry 1"));
        assert!(problems.last().unwrap().english.starts_with("3 more jobs"));
    }

    #[test]
    fn pauses_are_red_on_credentials_and_amber_by_an_operator() {
        let mut snapshot = healthy();
        snapshot.paused = vec![PausedUpstream {
            upstream: "smaregi".into(),
            reason: "paused by an operator".into(),
            by_operator: true,
        }];
        assert_eq!(Light::of(&assess(&snapshot, &thresholds())), Light::Amber);
        snapshot.paused[0].by_operator = false;
        let problems = assess(&snapshot, &thresholds());
        assert_eq!(
            events(&problems),
            vec![(events::UPSTREAM_PAUSED, Severity::Critical)]
        );
        assert!(problems[0].japanese.contains("認証"));
    }

    #[test]
    fn the_certificate_warns_inside_fourteen_days_and_is_red_once_expired() {
        let mut snapshot = healthy();
        let now = (NOON_JST / 1000) as i64;
        snapshot.certificate_not_after = Some(now + 14 * 86_400);
        assert_eq!(assess(&snapshot, &thresholds()), vec![]);
        snapshot.certificate_not_after = Some(now + 13 * 86_400 + 1);
        let problems = assess(&snapshot, &thresholds());
        assert_eq!(
            events(&problems),
            vec![(events::CERTIFICATE_EXPIRING, Severity::Warning)]
        );
        assert!(problems[0].english.contains("13 days"));
        snapshot.certificate_not_after = Some(now - 1);
        assert_eq!(
            events(&assess(&snapshot, &thresholds())),
            vec![(events::CERTIFICATE_EXPIRING, Severity::Critical)]
        );
    }

    #[test]
    fn silence_warns_only_during_opening_hours() {
        let mut snapshot = healthy();
        snapshot.last_notification_at = Some(NOON_JST - 121 * 60_000);
        let problems = assess(&snapshot, &thresholds());
        assert_eq!(
            events(&problems),
            vec![(events::NO_NOTIFICATIONS, Severity::Warning)]
        );
        assert!(problems[0].english.contains("121 minutes"));
        // 23:00 JST: closed.
        snapshot.now = NOON_JST + 11 * 3_600_000;
        snapshot.last_notification_at = Some(snapshot.now - 600 * 60_000);
        snapshot.certificate_not_after = None;
        assert_eq!(assess(&snapshot, &thresholds()), vec![]);
        // Overnight hours (22:00-02:00) wrap around midnight.
        let mut overnight = thresholds();
        overnight.opening_hours = Some((22 * 60, 2 * 60));
        assert_eq!(
            events(&assess(&snapshot, &overnight)),
            vec![(events::NO_NOTIFICATIONS, Severity::Warning)]
        );
    }

    #[test]
    fn a_nearly_full_disk_warns_then_turns_red() {
        let mut snapshot = healthy();
        snapshot.disk = Some((9 << 30, 100 << 30));
        assert_eq!(
            events(&assess(&snapshot, &thresholds())),
            vec![(events::DISK_NEARLY_FULL, Severity::Warning)]
        );
        snapshot.disk = Some((1 << 30, 100 << 30));
        assert_eq!(
            events(&assess(&snapshot, &thresholds())),
            vec![(events::DISK_NEARLY_FULL, Severity::Critical)]
        );
    }

    #[test]
    fn a_rejected_csv_and_an_old_backlog_are_amber() {
        let mut snapshot = healthy();
        snapshot.last_import = Some(ImportFacts::Rejected {
            file: "codes.csv".into(),
            errors: 2,
            at: NOON_JST,
            report: "rejected/codes.csv.report.txt".into(),
            excerpt: String::new(),
        });
        snapshot.oldest_pending = Some((7, "stock.push".into(), 3601));
        let problems = assess(&snapshot, &thresholds());
        assert_eq!(
            events(&problems),
            vec![
                (events::CSV_REJECTED, Severity::Warning),
                (events::BACKLOG, Severity::Warning)
            ]
        );
        assert!(problems[0].japanese.contains("codes.csv"));
        assert!(problems[1].english.contains("60 minutes"));
    }

    #[test]
    fn opening_hours_parse_or_say_why_not() {
        assert_eq!(parse_opening_hours("10:00-20:00"), Ok((600, 1200)));
        assert_eq!(parse_opening_hours(" 22:30 - 02:00 "), Ok((1350, 120)));
        assert!(parse_opening_hours("10-20").is_err());
        assert!(parse_opening_hours("10:00-25:00").is_err());
        assert!(parse_opening_hours("10:00-10:00").is_err());
    }
}
