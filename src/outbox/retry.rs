//! When to try a failed job again, and when to give up and park it.
//!
//! Pure: the current time and the random draw for jitter are arguments, so
//! every decision can be tested exactly. Times are Unix milliseconds, the
//! form jobs are stored in.
//!
//! After the n-th failed attempt the job waits a random time between zero
//! and the n-th delay of the schedule ("full jitter": retries of many jobs
//! after an outage spread out instead of arriving together); past the end
//! of the schedule, between zero and `repeat_every`. An upstream's
//! `Retry-After` is honoured as a lower bound, capped at
//! `max_retry_after`. A job older than `max_age` is parked, never dropped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::OutboxConfig;

/// The retry schedule and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delays after the 1st, 2nd, … failure.
    pub schedule: Vec<Duration>,
    /// The delay after every failure past the schedule.
    pub repeat_every: Duration,
    /// The longest `Retry-After` that is honoured.
    pub max_retry_after: Duration,
    /// Jobs older than this are parked instead of retried.
    pub max_age: Duration,
}

/// What to do with a job after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time (Unix milliseconds).
    RetryAt(u64),
    /// Stop retrying; an operator decides.
    Park,
}

impl RetryPolicy {
    pub fn from_config(outbox: &OutboxConfig) -> Self {
        Self {
            schedule: outbox
                .retry_schedule_seconds
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
            repeat_every: Duration::from_secs(outbox.retry_repeat_seconds),
            max_retry_after: Duration::from_secs(outbox.max_retry_after_seconds),
            max_age: Duration::from_secs(outbox.max_age_hours * 3600),
        }
    }

    /// The upper bound of the wait after the `failures`-th failure (1-based).
    pub fn base_delay(&self, failures: u32) -> Duration {
        let index = failures.saturating_sub(1) as usize;
        self.schedule
            .get(index)
            .copied()
            .unwrap_or(self.repeat_every)
    }

    /// Decides after the `failures`-th failed attempt of a job created at
    /// `created_at`, failing at `now`. `jitter` is a uniform draw in [0, 1).
    pub fn decide(
        &self,
        failures: u32,
        created_at: u64,
        now: u64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> RetryDecision {
        if u128::from(now.saturating_sub(created_at)) >= self.max_age.as_millis() {
            return RetryDecision::Park;
        }
        let base = self.base_delay(failures).as_millis() as f64;
        let jittered = (base * jitter.clamp(0.0, 1.0)) as u64;
        let floor = retry_after.map_or(0, |wait| wait.min(self.max_retry_after).as_millis() as u64);
        RetryDecision::RetryAt(now.saturating_add(jittered.max(floor)))
    }
}

/// Parses an HTTP `Retry-After` value: delay seconds, or an HTTP-date
/// (a date in the past means now). `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok().map(Duration::from_secs);
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3_600_000;

    fn default_policy() -> RetryPolicy {
        RetryPolicy::from_config(&OutboxConfig::default())
    }

    #[test]
    fn the_default_schedule_is_the_documented_one() {
        let policy = default_policy();
        let minutes = |m: u64| Duration::from_secs(m * 60);
        let expected = [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_secs(30),
            minutes(2),
            minutes(10),
            minutes(30),
            minutes(60),
            minutes(120),
            minutes(120),
        ];
        for (failures, delay) in (1..).zip(expected) {
            assert_eq!(
                policy.base_delay(failures),
                delay,
                "after failure {failures}"
            );
        }
        assert_eq!(policy.max_age, Duration::from_secs(72 * 3600));
    }

    #[test]
    fn the_first_retry_is_immediate() {
        assert_eq!(
            default_policy().decide(1, 0, 1000, None, 0.99),
            RetryDecision::RetryAt(1000)
        );
    }

    #[test]
    fn retry_after_is_a_floor_and_is_capped() {
        let policy = default_policy();
        let ten_minutes = Some(Duration::from_secs(600));
        assert_eq!(
            policy.decide(2, 0, 1000, ten_minutes, 0.5),
            RetryDecision::RetryAt(601_000)
        );
        let a_year = Some(Duration::from_secs(365 * 86_400));
        assert_eq!(
            policy.decide(2, 0, 0, a_year, 0.0),
            RetryDecision::RetryAt(policy.max_retry_after.as_millis() as u64)
        );
    }

    #[test]
    fn jobs_past_the_max_age_are_parked() {
        let policy = default_policy();
        assert_eq!(
            policy.decide(9, 0, 72 * HOUR, None, 0.0),
            RetryDecision::Park
        );
        assert!(matches!(
            policy.decide(9, 0, 72 * HOUR - 1, None, 0.0),
            RetryDecision::RetryAt(_)
        ));
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        for garbage in ["", "-5", "1.5", "soon", "99999999999999999999999"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    proptest! {
        #[test]
        fn the_wait_stays_within_its_bounds(
            failures in 1u32..50,
            age in 0u64..(72 * HOUR),
            retry_after in proptest::option::of(0u64..100_000),
            jitter in 0.0f64..1.0,
        ) {
            let policy = default_policy();
            let now = 10 * 365 * 24 * HOUR;
            let retry_after = retry_after.map(Duration::from_secs);
            let RetryDecision::RetryAt(at) = policy.decide(failures, now - age, now, retry_after, jitter) else {
                return Err(TestCaseError::fail("a young job was parked"));
            };
            let wait = Duration::from_millis(at - now);
            let floor = retry_after.map_or(Duration::ZERO, |r| r.min(policy.max_retry_after));
            prop_assert!(wait >= floor);
            prop_assert!(wait <= policy.base_delay(failures).max(floor));
            prop_assert!(wait <= policy.repeat_every.max(policy.max_retry_after));
        }

        #[test]
        fn full_jitter_spreads_waits_over_the_whole_range(failures in 2u32..20, jitter in 0.0f64..1.0) {
            let policy = default_policy();
            let base = policy.base_delay(failures).as_millis() as f64;
            let RetryDecision::RetryAt(at) = policy.decide(failures, 0, 0, None, jitter) else {
                return Err(TestCaseError::fail("parked"));
            };
            prop_assert!((at as f64 - base * jitter).abs() <= 1.0);
        }

        #[test]
        fn base_delays_never_shrink(failures in 1u32..100) {
            let policy = default_policy();
            prop_assert!(policy.base_delay(failures + 1) >= policy.base_delay(failures));
        }

        #[test]
        fn old_jobs_are_always_parked(failures in 1u32..100, extra in 0u64..HOUR, jitter in 0.0f64..1.0) {
            let policy = default_policy();
            prop_assert_eq!(policy.decide(failures, 0, 72 * HOUR + extra, None, jitter), RetryDecision::Park);
        }

        #[test]
        fn delay_seconds_round_trip(seconds in 0u64..10_000_000) {
            prop_assert_eq!(
                parse_retry_after(&seconds.to_string(), SystemTime::now()),
                Some(Duration::from_secs(seconds))
            );
        }
    }
}
