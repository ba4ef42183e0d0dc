//! The digest core: from successive sets of active problems, when to send
//! a digest and what it says. Pure: time is a parameter (unix millis), and
//! delivery is reported back by the caller.
//!
//! The core keeps what the recipient was last told (`told`): the set of
//! problems the last delivered digest listed as active. A digest is the
//! difference between that and the problems active now:
//! - `raised`: active now, not told;
//! - `resolved`: told (or raised in a digest that failed), no longer active;
//! - `active`: active now and already told, listed for context.
//!
//! Because a digest is computed from the difference and not from the
//! stream of changes, flapping (raised, resolved, raised) between two
//! digests costs nothing, and a digest that failed is simply computed
//! again, with whatever changed since merged in. The one thing the
//! difference alone would lose, a problem raised in a failed digest and
//! resolved before the retry, is kept in `undelivered` and reported as
//! resolved.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Alert;
use crate::config::AlertsConfig;

/// When digests may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestPolicy {
    /// At most one digest per interval.
    pub interval: Duration,
    /// The first change after a quiet spell waits this long for others.
    pub grace: Duration,
    /// Problems still active are listed again after this long without a digest.
    pub reminder: Duration,
    /// The first retry after a failed delivery; doubled per failure …
    pub retry_first: Duration,
    /// … up to this.
    pub retry_max: Duration,
}

/// The first retry of a failed delivery.
pub const RETRY_FIRST: Duration = Duration::from_secs(30);
/// Retries never wait longer than this.
pub const RETRY_MAX: Duration = Duration::from_secs(30 * 60);

impl DigestPolicy {
    pub fn from_config(config: &AlertsConfig) -> Self {
        Self {
            interval: Duration::from_secs(config.digest_interval_minutes * 60),
            grace: Duration::from_secs(config.grace_seconds),
            reminder: Duration::from_secs(config.reminder_hours * 3600),
            retry_first: RETRY_FIRST,
            retry_max: RETRY_MAX,
        }
    }
}

impl Default for DigestPolicy {
    fn default() -> Self {
        Self::from_config(&AlertsConfig::default())
    }
}

/// One message's worth of changes. Each list is ordered critical first,
/// then oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub raised: Vec<Alert>,
    pub resolved: Vec<Alert>,
    /// Still active, and already reported in an earlier digest.
    pub active: Vec<Alert>,
    /// Counts the digests delivered before this one: retries of an
    /// unchanged digest can be recognised as one message.
    pub sequence: u64,
}

impl Digest {
    /// Problems active once this digest is read.
    pub fn open_count(&self) -> usize {
        self.raised.len() + self.active.len()
    }

    /// Nothing new and nothing resolved: a reminder of what is still active.
    pub fn is_reminder(&self) -> bool {
        self.raised.is_empty() && self.resolved.is_empty()
    }
}

/// The digest state of one notifier.
#[derive(Debug, Clone)]
pub struct Digester {
    policy: DigestPolicy,
    /// Active problems, by key, as last assessed.
    active: BTreeMap<String, Alert>,
    /// What the last delivered digest listed as active.
    told: BTreeMap<String, Alert>,
    /// Problems raised in digests that failed, not yet delivered.
    undelivered: BTreeMap<String, Alert>,
    /// When the last digest was delivered.
    last_delivered: Option<u64>,
    /// Since when there has been something to tell.
    pending_since: Option<u64>,
    /// Failed deliveries in a row, and when the next attempt may go.
    failures: u32,
    retry_at: Option<u64>,
    /// The digest handed out and not yet reported delivered or failed.
    in_flight: Option<Digest>,
    delivered: u64,
}

impl Digester {
    pub fn new(policy: DigestPolicy) -> Self {
        Self {
            policy,
            active: BTreeMap::new(),
            told: BTreeMap::new(),
            undelivered: BTreeMap::new(),
            last_delivered: None,
            pending_since: None,
            failures: 0,
            retry_at: None,
            in_flight: None,
            delivered: 0,
        }
    }

    /// The problems active as of `now`, replacing the previous set. An
    /// alert whose key appears twice counts once (the last one).
    pub fn update(&mut self, active: &[Alert], now: u64) {
        self.active = active
            .iter()
            .map(|alert| (alert.key.clone(), alert.clone()))
            .collect();
        self.refresh_pending(now);
    }

    /// Something differs from what the recipient was told.
    fn has_news(&self) -> bool {
        !self.undelivered.is_empty()
            || self.active.len() != self.told.len()
            || self.active.keys().any(|key| !self.told.contains_key(key))
    }

    fn refresh_pending(&mut self, now: u64) {
        if !self.has_news() {
            self.pending_since = None;
        } else if self.pending_since.is_none() {
            self.pending_since = Some(now);
        }
    }

    /// When the next digest is due (unix millis), if one is, provided
    /// nothing changes meanwhile. `None` while one is in flight.
    pub fn next_due(&self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        let after_interval = self
            .last_delivered
            .map_or(0, |last| last.saturating_add(millis(self.policy.interval)));
        let due = match self.pending_since {
            Some(since) => since
                .saturating_add(millis(self.policy.grace))
                .max(after_interval),
            None => match self.last_delivered {
                Some(last) if !self.active.is_empty() => {
                    last.saturating_add(millis(self.policy.reminder))
                }
                _ => return None,
            },
        };
        Some(due.max(self.retry_at.unwrap_or(0)))
    }

    /// The digest to send now, if one is due. It stays in flight until
    /// [`Digester::delivered`] or [`Digester::failed`] is called.
    pub fn take(&mut self, now: u64) -> Option<Digest> {
        if self.next_due()? > now {
            return None;
        }
        let mut raised = Vec::new();
        let mut active = Vec::new();
        for (key, alert) in &self.active {
            if self.told.contains_key(key) {
                active.push(alert.clone());
            } else {
                raised.push(alert.clone());
            }
        }
        let mut resolved: BTreeMap<&String, &Alert> = self
            .told
            .iter()
            .filter(|(key, _)| !self.active.contains_key(*key))
            .collect();
        for (key, alert) in &self.undelivered {
            if !self.active.contains_key(key) {
                resolved.entry(key).or_insert(alert);
            }
        }
        let mut resolved: Vec<Alert> = resolved.into_values().cloned().collect();
        for list in [&mut raised, &mut resolved, &mut active] {
            list.sort_by(|a, b| {
                (b.severity.cmp(&a.severity))
                    .then(a.since.cmp(&b.since))
                    .then_with(|| a.key.cmp(&b.key))
            });
        }
        let digest = Digest {
            raised,
            resolved,
            active,
            sequence: self.delivered,
        };
        self.in_flight = Some(digest.clone());
        Some(digest)
    }

    /// The digest in flight reached its recipient at `now`.
    pub fn delivered(&mut self, now: u64) {
        let Some(digest) = self.in_flight.take() else {
            return;
        };
        self.told = (digest.raised.iter().chain(&digest.active))
            .map(|alert| (alert.key.clone(), alert.clone()))
            .collect();
        for alert in digest.raised.iter().chain(&digest.resolved) {
            self.undelivered.remove(&alert.key);
        }
        self.last_delivered = Some(now);
        self.delivered += 1;
        self.failures = 0;
        self.retry_at = None;
        // What changed while the digest was in flight is news from now on.
        self.pending_since = None;
        self.refresh_pending(now);
    }

    /// The digest in flight could not be delivered at `now`; its contents
    /// are kept for the next attempt. Returns the wait before it.
    pub fn failed(&mut self, now: u64) -> Duration {
        let Some(digest) = self.in_flight.take() else {
            return Duration::ZERO;
        };
        for alert in digest.raised {
            self.undelivered.insert(alert.key.clone(), alert);
        }
        let wait = self
            .policy
            .retry_first
            .saturating_mul(1 << self.failures.min(16))
            .min(self.policy.retry_max);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now.saturating_add(millis(wait)));
        self.refresh_pending(now);
        wait
    }

    /// Failed deliveries in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Severity;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;

    fn alert(key: &str) -> Alert {
        Alert {
            event: "outbox.job_parked".into(),
            severity: if key.ends_with('!') {
                Severity::Critical
            } else {
                Severity::Warning
            },
            key: key.into(),
            japanese: format!("{key} が停止しています"),
            english: format!("{key} is parked"),
            since: 0,
        }
    }

    fn alerts(keys: &[&str]) -> Vec<Alert> {
        keys.iter().map(|key| alert(key)).collect()
    }

    fn keys(list: &[Alert]) -> Vec<&str> {
        list.iter().map(|a| a.key.as_str()).collect()
    }

    fn policy() -> DigestPolicy {
        DigestPolicy {
            interval: Duration::from_secs(15 * 60),
            grace: Duration::from_secs(60),
            reminder: Duration::from_secs(24 * 3600),
            retry_first: Duration::from_secs(30),
            retry_max: Duration::from_secs(30 * 60),
        }
    }

    /// Sends what is due at `now` and reports it delivered.
    fn send(digester: &mut Digester, now: u64) -> Option<Digest> {
        let digest = digester.take(now)?;
        digester.delivered(now);
        Some(digest)
    }

    #[test]
    fn a_burst_becomes_one_digest_after_the_grace() {
        let mut d = Digester::new(policy());
        assert_eq!(d.next_due(), None);
        let burst: Vec<String> = (0..500).map(|i| format!("outbox.job_parked:{i}")).collect();
        for (i, _) in burst.iter().enumerate() {
            let active: Vec<Alert> = burst[..=i].iter().map(|k| alert(k)).collect();
            d.update(&active, i as u64 * 10);
        }
        assert_eq!(d.next_due(), Some(MINUTE));
        assert_eq!(d.take(MINUTE - 1), None);
        let digest = send(&mut d, MINUTE).unwrap();
        assert_eq!(digest.raised.len(), 500);
        assert!(digest.resolved.is_empty() && digest.active.is_empty());
        assert_eq!(
            d.next_due(),
            Some(MINUTE + 24 * HOUR),
            "only a reminder is left"
        );
    }

    #[test]
    fn at_most_one_digest_per_interval() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a"]), 0);
        assert_eq!(keys(&send(&mut d, MINUTE).unwrap().raised), ["a"]);
        d.update(&alerts(&["a", "b"]), 2 * MINUTE);
        assert_eq!(d.next_due(), Some(16 * MINUTE));
        assert_eq!(d.take(15 * MINUTE), None);
        let digest = send(&mut d, 16 * MINUTE).unwrap();
        assert_eq!(
            (keys(&digest.raised), keys(&digest.active)),
            (vec!["b"], vec!["a"])
        );
    }

    #[test]
    fn after_a_quiet_spell_the_grace_applies_again() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a"]), 0);
        send(&mut d, MINUTE).unwrap();
        d.update(&alerts(&["a", "b"]), 3 * HOUR);
        assert_eq!(d.next_due(), Some(3 * HOUR + MINUTE));
    }

    #[test]
    fn a_resolution_is_reported_once() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a", "b"]), 0);
        send(&mut d, MINUTE).unwrap();
        d.update(&alerts(&["b"]), 20 * MINUTE);
        let digest = send(&mut d, 21 * MINUTE).unwrap();
        assert_eq!(
            (
                keys(&digest.raised),
                keys(&digest.resolved),
                keys(&digest.active)
            ),
            (vec![], vec!["a"], vec!["b"])
        );
        d.update(&alerts(&["b"]), 40 * MINUTE);
        assert_eq!(d.take(2 * HOUR), None);
    }

    #[test]
    fn flapping_within_an_interval_sends_nothing_extra() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a"]), 0);
        send(&mut d, MINUTE).unwrap();
        // Told "a"; it resolves and comes back before the next digest.
        d.update(&[], 2 * MINUTE);
        d.update(&alerts(&["a"]), 3 * MINUTE);
        assert_eq!(d.next_due(), Some(MINUTE + 24 * HOUR));
        // A new problem that comes and goes before a digest is never sent.
        d.update(&alerts(&["a", "b"]), 4 * MINUTE);
        d.update(&alerts(&["a"]), 5 * MINUTE);
        assert_eq!(d.take(20 * MINUTE), None);
    }

    #[test]
    fn a_problem_still_active_is_repeated_only_as_a_reminder() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a"]), 0);
        send(&mut d, MINUTE).unwrap();
        assert_eq!(d.take(MINUTE + 24 * HOUR - 1), None);
        let reminder = send(&mut d, MINUTE + 24 * HOUR).unwrap();
        assert!(reminder.is_reminder());
        assert_eq!(keys(&reminder.active), ["a"]);
        assert_eq!(d.next_due(), Some(MINUTE + 48 * HOUR));
    }

    #[test]
    fn a_failed_digest_is_retried_with_backoff_and_nothing_is_lost() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a", "b"]), 0);
        let first = d.take(MINUTE).unwrap();
        assert_eq!(d.take(MINUTE), None, "one digest in flight at a time");
        assert_eq!(d.failed(MINUTE), Duration::from_secs(30));
        assert_eq!(d.next_due(), Some(MINUTE + 30_000));
        let again = d.take(MINUTE + 30_000).unwrap();
        assert_eq!(again, first, "an unchanged retry is the same message");
        assert_eq!(d.failed(MINUTE + 30_000), Duration::from_secs(60));
        // "a" resolves and "c" is raised before the retry gets through.
        d.update(&alerts(&["b", "c"]), 2 * MINUTE);
        let merged = send(&mut d, MINUTE + 90_000).unwrap();
        assert_eq!(
            (keys(&merged.raised), keys(&merged.resolved)),
            (vec!["b", "c"], vec!["a"])
        );
        assert_eq!(d.failures(), 0);
        assert_eq!(d.next_due(), Some(MINUTE + 90_000 + 24 * HOUR));
    }

    #[test]
    fn retries_back_off_up_to_the_cap() {
        let mut d = Digester::new(policy());
        d.update(&alerts(&["a"]), 0);
        let mut now = MINUTE;
        let mut waits = Vec::new();
        for _ in 0..9 {
            d.take(now).unwrap();
            let wait = d.failed(now);
            waits.push(wait.as_secs());
            now += millis(wait);
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1800, 1800, 1800]);
    }

    #[test]
    fn lists_are_critical_first_then_oldest_first() {
        let mut d = Digester::new(policy());
        let mut list = alerts(&["w-new", "c-old!", "w-old", "c-new!"]);
        list[0].since = 20;
        list[1].since = 10;
        list[2].since = 10;
        list[3].since = 20;
        d.update(&list, 0);
        let digest = send(&mut d, MINUTE).unwrap();
        assert_eq!(keys(&digest.raised), ["c-old!", "c-new!", "w-old", "w-new"]);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes, then these keys are active.
        Assess { after: u64, keys: BTreeSet<u8> },
        /// Time passes; any due digest is attempted, and succeeds or not.
        Deliver { after: u64, ok: bool },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3 * HOUR, proptest::collection::btree_set(0u8..8, 0..6))
                .prop_map(|(after, keys)| Step::Assess { after, keys }),
            (0..3 * HOUR, proptest::bool::weighted(0.7))
                .prop_map(|(after, ok)| Step::Deliver { after, ok }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the assessments and delivery failures: digests are at
        /// least an interval apart, no problem is announced twice without
        /// a resolution between, every problem in a failed digest reaches
        /// the recipient raised or resolved, and once things settle the
        /// recipient's view is the truth.
        #[test]
        fn digests_are_spaced_deduplicated_and_complete(steps in proptest::collection::vec(step(), 1..60)) {
            let policy = policy();
            let mut d = Digester::new(policy);
            let mut now = 0u64;
            let mut last_delivered: Option<u64> = None;
            // The recipient's view: problems told active.
            let mut view: BTreeSet<String> = BTreeSet::new();
            let mut owed: BTreeSet<String> = BTreeSet::new();
            let mut truth: BTreeSet<String> = BTreeSet::new();
            for step in steps {
                match step {
                    Step::Assess { after, keys } => {
                        now += after;
                        truth = keys.iter().map(|k| format!("k{k}")).collect();
                        let list: Vec<Alert> = truth.iter().map(|k| alert(k)).collect();
                        d.update(&list, now);
                    }
                    Step::Deliver { after, ok } => {
                        let target = now + after;
                        // Every digest due up to `target`, at the time it is due.
                        while let Some(due) = d.next_due().filter(|&due| due <= target) {
                            now = now.max(due);
                            let digest = d.take(now).unwrap();
                            prop_assert!(digest.open_count() + digest.resolved.len() > 0);
                            if !ok {
                                owed.extend(digest.raised.iter().map(|a| a.key.clone()));
                                d.failed(now);
                                break;
                            }
                            if let Some(last) = last_delivered {
                                prop_assert!(now - last >= millis(policy.interval));
                            }
                            for a in &digest.raised {
                                prop_assert!(view.insert(a.key.clone()), "{} announced twice", a.key);
                                owed.remove(&a.key);
                            }
                            for a in &digest.resolved {
                                view.remove(&a.key);
                                owed.remove(&a.key);
                            }
                            for a in &digest.active {
                                prop_assert!(view.contains(&a.key));
                            }
                            d.delivered(now);
                            last_delivered = Some(now);
                        }
                        now = now.max(target);
                    }
                }
            }
            // Settle: deliveries succeed from now on.
            for _ in 0..3 {
                if view == truth && owed.is_empty() {
                    break;
                }
                let Some(due) = d.next_due() else { break };
                now = now.max(due);
                let digest = d.take(now).unwrap();
                for a in &digest.raised {
                    prop_assert!(view.insert(a.key.clone()));
                    owed.remove(&a.key);
                }
                for a in &digest.resolved {
                    view.remove(&a.key);
                    owed.remove(&a.key);
                }
                d.delivered(now);
            }
            prop_assert_eq!(view, truth);
            prop_assert!(owed.is_empty(), "never delivered: {:?}", owed);
        }
    }
}
