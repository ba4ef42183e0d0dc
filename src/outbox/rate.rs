//! Token buckets: how fast jobs may start per upstream.
//!
//! Pure: the time (Unix milliseconds) is an argument. A bucket holds up to
//! `burst` tokens and gains `per_second` of them each second; every
//! attempt takes one. So a backlog after an outage drains at the allowed
//! pace instead of in one burst.

/// One upstream's bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    updated_at: u64,
}

impl TokenBucket {
    /// A full bucket at `now`. `per_second` and `burst` must be positive.
    pub fn new(per_second: f64, burst: u32, now: u64) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: per_second.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            updated_at: now,
        }
    }

    fn refill(&mut self, now: u64) {
        if now > self.updated_at {
            let gained = (now - self.updated_at) as f64 / 1000.0 * self.per_second;
            self.tokens = (self.tokens + gained).min(self.burst);
            self.updated_at = now;
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: u64) -> u32 {
        self.refill(now);
        self.tokens.floor() as u32
    }

    /// Takes a token at `now`; false when none is left.
    pub fn try_take(&mut self, now: u64) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next whole token will be there (now, if one is).
    pub fn ready_at(&mut self, now: u64) -> u64 {
        self.refill(now);
        if self.tokens >= 1.0 {
            return now;
        }
        let missing_ms = (1.0 - self.tokens) / self.per_second * 1000.0;
        now + missing_ms.ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2.0, 3, 0);
        assert!((0..3).all(|_| bucket.try_take(0)));
        assert!(!bucket.try_take(0));
        assert_eq!(bucket.ready_at(0), 500);
        assert!(!bucket.try_take(499));
        assert!(bucket.try_take(500));
        assert_eq!(bucket.available(10_000), 3, "never more than the burst");
    }

    proptest! {
        #[test]
        fn no_window_starts_more_than_burst_plus_rate(
            per_second in 0.5f64..50.0,
            burst in 1u32..10,
            steps in proptest::collection::vec(0u64..400, 1..200),
        ) {
            let mut bucket = TokenBucket::new(per_second, burst, 0);
            let mut now = 0;
            let mut taken = Vec::new();
            for step in steps {
                now += step;
                while bucket.try_take(now) {
                    taken.push(now);
                }
                prop_assert!(bucket.ready_at(now) > now);
            }
            // Over any window [from, to], at most burst + rate × length.
            for (i, &from) in taken.iter().enumerate() {
                for (j, &to) in taken.iter().enumerate().skip(i) {
                    let allowed = f64::from(burst) + (to - from) as f64 / 1000.0 * per_second;
                    prop_assert!((j - i + 1) as f64 <= allowed + 1e-9);
                }
            }
        }

        #[test]
        fn a_token_is_there_when_ready_at_says(per_second in 0.1f64..100.0, burst in 1u32..5, drained_at in 0u64..10_000) {
            let mut bucket = TokenBucket::new(per_second, burst, 0);
            while bucket.try_take(drained_at) {}
            let ready = bucket.ready_at(drained_at);
            prop_assert!(bucket.clone().try_take(ready));
            if ready > drained_at + 1 {
                prop_assert!(!bucket.try_take(ready - 1));
            }
        }
    }
}
