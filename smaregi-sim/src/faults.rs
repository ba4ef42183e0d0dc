//! Faults the simulator injects into `/access/` calls, set at run time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Probabilities (0.0–1.0) per call, and fixed delays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Faults {
    /// Answer 500 without doing anything.
    pub error_rate: f64,
    /// Drop the connection without doing anything.
    pub reset_rate: f64,
    /// Answer nothing for `hang-ms`, then drop the connection; nothing is done.
    pub hang_rate: f64,
    pub hang_ms: u64,
    /// Do the call (store the transaction), then answer 500 or drop the
    /// connection (half each): the caller cannot know it succeeded.
    pub commit_then_fail_rate: f64,
    /// Answer 200 with something that is not the call's answer (an HTML
    /// page, truncated JSON, an empty `TransactionHeadIds`, wrong types),
    /// after doing the call or not (half each).
    pub malformed_rate: f64,
    /// Added before every answer.
    pub latency_ms: u64,
    /// `proc_name`s that answer error 23 (function disabled in 機能設定).
    pub disabled: Vec<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            reset_rate: 0.0,
            hang_rate: 0.0,
            hang_ms: 30_000,
            commit_then_fail_rate: 0.0,
            malformed_rate: 0.0,
            latency_ms: 0,
            disabled: Vec::new(),
        }
    }
}

/// What to do to one call, drawn before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    None,
    Error,
    Reset,
    Hang(Duration),
    CommitThenError,
    CommitThenReset,
    /// A malformed 200, with or without doing the call first.
    Malformed {
        commit: bool,
    },
}

impl Faults {
    /// Draws the fault for one call from `roll` (uniform in 0..1) and
    /// `coin` (a fair coin).
    pub fn draw(&self, roll: f64, coin: bool) -> Injected {
        let mut threshold = 0.0;
        let mut next = |rate: f64| {
            threshold += rate;
            roll < threshold
        };
        if next(self.error_rate) {
            Injected::Error
        } else if next(self.reset_rate) {
            Injected::Reset
        } else if next(self.hang_rate) {
            Injected::Hang(Duration::from_millis(self.hang_ms))
        } else if next(self.commit_then_fail_rate) {
            if coin {
                Injected::CommitThenError
            } else {
                Injected::CommitThenReset
            }
        } else if next(self.malformed_rate) {
            Injected::Malformed { commit: coin }
        } else {
            Injected::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_add_up_in_order() {
        let faults = Faults {
            error_rate: 0.1,
            reset_rate: 0.1,
            hang_rate: 0.1,
            commit_then_fail_rate: 0.1,
            ..Faults::default()
        };
        assert_eq!(faults.draw(0.05, true), Injected::Error);
        assert_eq!(faults.draw(0.15, true), Injected::Reset);
        assert!(matches!(faults.draw(0.25, true), Injected::Hang(_)));
        assert_eq!(faults.draw(0.35, true), Injected::CommitThenError);
        assert_eq!(faults.draw(0.35, false), Injected::CommitThenReset);
        assert_eq!(faults.draw(0.45, true), Injected::None);
        let malformed = Faults {
            malformed_rate: 0.5,
            ..Faults::default()
        };
        assert_eq!(
            malformed.draw(0.2, false),
            Injected::Malformed { commit: false }
        );
        assert_eq!(Faults::default().draw(0.0, true), Injected::None);
    }
}
