//! Smaregi's datetimes: `YYYY-MM-DD HH:MM:SS` in JST, as seconds on a
//! plain count (no time zones: every value here is JST).
//!
//! The simulator has its own copy on purpose: it must not share the
//! relay's reading of the protocol.

use std::time::{SystemTime, UNIX_EPOCH};

const JST_OFFSET_SECONDS: i64 = 9 * 3600;

/// Seconds since 1970-01-01 00:00:00 JST of `YYYY-MM-DD HH:MM:SS`, or of
/// `YYYY-MM-DD` at midnight.
pub fn parse(text: &str) -> Option<i64> {
    let (date, time) = match text.split_once(' ') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut date_parts = date.split('-');
    let year: i64 = number(date_parts.next()?, 4)?;
    let month: i64 = number(date_parts.next()?, 2)?;
    let day: i64 = number(date_parts.next()?, 2)?;
    if date_parts.next().is_some() || !(1..=12).contains(&month) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let seconds = match time {
        None => 0,
        Some(time) => {
            let mut parts = time.split(':');
            let hour: i64 = number(parts.next()?, 2)?;
            let minute: i64 = number(parts.next()?, 2)?;
            let second: i64 = number(parts.next()?, 2)?;
            if parts.next().is_some() || hour > 23 || minute > 59 || second > 59 {
                return None;
            }
            hour * 3600 + minute * 60 + second
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + seconds)
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since 1970-01-01 00:00:00 JST.
pub fn format(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS` JST of Unix milliseconds.
pub fn format_unix_millis(millis: u64) -> String {
    format((millis / 1000) as i64 + JST_OFFSET_SECONDS)
}

/// The current time in JST, as [`parse`] counts it.
pub fn now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    unix + JST_OFFSET_SECONDS
}

fn number(text: &str, digits: usize) -> Option<i64> {
    (text.len() == digits && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's civil calendar algorithms.
/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_dates() {
        assert_eq!(parse("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse("2024-02-29"), Some(19_782 * 86_400));
        assert_eq!(parse("2023-02-29 00:00:00"), None);
        assert_eq!(parse("2024-04-01 24:00:00"), None);
        assert_eq!(parse("2024-4-01 12:00:00"), None);
        assert_eq!(
            format(parse("2026-11-22 17:04:09").unwrap()),
            "2026-11-22 17:04:09"
        );
    }

    proptest! {
        #[test]
        fn format_and_parse_agree(seconds in 0i64..10_000_000_000) {
            prop_assert_eq!(parse(&format(seconds)), Some(seconds));
        }
    }
}
