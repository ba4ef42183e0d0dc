//! The systemd watchdog (`WatchdogSec=`): fed only while every vital loop
//! of the daemon is alive.
//!
//! Each vital loop registers once ([`Liveness::register`]) and keeps the
//! [`Heartbeat`] it gets; it beats by polling [`Heartbeat::tick`] in its
//! `select!` (so an idle loop that is still being polled beats too), and
//! dropping the heartbeat — the loop ended or panicked — marks it dead.
//! [`feed`] sends `WATCHDOG=1` at half the interval systemd asked for, and
//! only while every registered heartbeat is fresh: a hung or dead loop
//! makes systemd kill and restart the daemon.
//!
//! This module owns the freshness rule and the feeding. It must never
//! feed the watchdog on behalf of a loop that has not beaten, and never
//! decide anything else about the daemon's health.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// One registered loop: when it last beat, and whether its heartbeat is
/// still held.
#[derive(Debug)]
struct Slot {
    name: &'static str,
    last_beat: Mutex<Instant>,
    dropped: std::sync::atomic::AtomicBool,
}

/// The registry of vital loops. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Liveness {
    slots: Arc<Mutex<Vec<Arc<Slot>>>>,
    beat_interval: Duration,
}

/// A registered loop's heartbeat. Dropping it marks the loop dead.
#[derive(Debug)]
pub struct Heartbeat {
    slot: Option<Arc<Slot>>,
    beat_interval: Duration,
}

/// What a heartbeat looked like when the feeder checked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// When the loop last beat.
    pub last: Instant,
    /// Its heartbeat was dropped: the loop ended.
    pub dropped: bool,
}

/// The names of the loops that are not alive at `now`: dropped, or whose
/// last beat is older than `max_age`. Empty means the watchdog may be fed.
pub fn unhealthy<'a>(
    beats: impl IntoIterator<Item = (&'a str, Beat)>,
    now: Instant,
    max_age: Duration,
) -> Vec<&'a str> {
    beats
        .into_iter()
        .filter(|(_, beat)| beat.dropped || now.saturating_duration_since(beat.last) > max_age)
        .map(|(name, _)| name)
        .collect()
}

impl Liveness {
    /// A registry whose loops beat every `beat_interval`.
    pub fn new(beat_interval: Duration) -> Self {
        Self {
            slots: Arc::new(Mutex::new(Vec::new())),
            beat_interval,
        }
    }

    /// Registers a vital loop; it counts as alive from now on.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let slot = Arc::new(Slot {
            name,
            last_beat: Mutex::new(Instant::now()),
            dropped: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&self.slots).push(Arc::clone(&slot));
        Heartbeat {
            slot: Some(slot),
            beat_interval: self.beat_interval,
        }
    }

    /// The loops that are not alive now; see [`unhealthy`].
    pub fn unhealthy_now(&self, max_age: Duration) -> Vec<&'static str> {
        let slots = lock(&self.slots);
        let beats = slots.iter().map(|slot| {
            let beat = Beat {
                last: *lock(&slot.last_beat),
                dropped: slot.dropped.load(std::sync::atomic::Ordering::Acquire),
            };
            (slot.name, beat)
        });
        unhealthy(beats, Instant::now(), max_age)
    }
}

impl Heartbeat {
    /// A heartbeat nobody watches, for loops run without a watchdog
    /// (tests, benches): it never beats and never goes stale.
    pub fn detached() -> Self {
        Self {
            slot: None,
            beat_interval: Duration::MAX,
        }
    }

    /// Records that the loop is alive now.
    pub fn beat(&self) {
        if let Some(slot) = &self.slot {
            *lock(&slot.last_beat) = Instant::now();
        }
    }

    /// Completes (having beaten) when the next beat is due; to be polled in
    /// the loop's `select!`. The due time is absolute, so a loop that
    /// recreates this future on every turn still beats on time.
    pub async fn tick(&self) {
        let Some(slot) = &self.slot else {
            return std::future::pending().await;
        };
        let Some(due) = lock(&slot.last_beat).checked_add(self.beat_interval) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(due).await;
        self.beat();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.dropped
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The watchdog interval systemd set (`WATCHDOG_USEC`), if any.
pub fn interval_from_systemd() -> Option<Duration> {
    match systemd::daemon::watchdog_enabled() {
        Ok(0) | Err(_) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
    }
}

/// How often loops beat for a watchdog `interval`: often enough that a
/// live loop is never older than half the interval when checked.
pub fn beat_interval(interval: Duration) -> Duration {
    interval / 4
}

/// Sends `WATCHDOG=1` every `interval / 2` while every loop in `liveness`
/// is alive, until `shutdown`. When one is not, it logs which and stops
/// feeding, so systemd's watchdog fires.
pub async fn feed(liveness: Liveness, interval: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(interval / 2);
    let mut reported = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let unhealthy = liveness.unhealthy_now(interval / 2);
        if unhealthy.is_empty() {
            if let Err(e) = systemd::daemon::notify([("WATCHDOG", "1")].iter()) {
                error!(error = %e, "watchdog: sd_notify failed");
            }
            if reported {
                info!("watchdog: every vital loop is alive again");
                reported = false;
            }
        } else if !reported {
            error!(
                loops = unhealthy.join(", "),
                "watchdog: a vital loop is hung or stopped; no longer feeding systemd's watchdog"
            );
            reported = true;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_AGE: Duration = Duration::from_secs(15);

    fn beat(last: Instant) -> Beat {
        Beat {
            last,
            dropped: false,
        }
    }

    #[test]
    fn fresh_beats_are_healthy() {
        let now = Instant::now();
        let beats = [
            ("intake", beat(now - Duration::from_secs(1))),
            ("outbox", beat(now - MAX_AGE)),
        ];
        assert!(unhealthy(beats, now, MAX_AGE).is_empty());
    }

    #[test]
    fn a_stale_beat_is_named() {
        let now = Instant::now();
        let beats = [
            ("intake", beat(now)),
            ("outbox", beat(now - MAX_AGE - Duration::from_millis(1))),
        ];
        assert_eq!(unhealthy(beats, now, MAX_AGE), ["outbox"]);
    }

    #[test]
    fn a_dropped_heartbeat_is_unhealthy_however_recent() {
        let now = Instant::now();
        let beats = [(
            "intake",
            Beat {
                last: now,
                dropped: true,
            },
        )];
        assert_eq!(unhealthy(beats, now, MAX_AGE), ["intake"]);
    }

    #[test]
    fn no_loops_is_healthy() {
        assert!(unhealthy([], Instant::now(), MAX_AGE).is_empty());
    }

    // Virtual time (the clock moves only when every task waits): the
    // subject is how heartbeats age, exactly, whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn a_registered_loop_is_alive_while_it_beats_and_dead_once_dropped() {
        let max_age = Duration::from_millis(100);
        let liveness = Liveness::new(Duration::from_millis(20));
        let heartbeat = liveness.register("intake");
        assert!(liveness.unhealthy_now(max_age).is_empty());

        tokio::time::sleep(max_age * 2).await;
        assert_eq!(liveness.unhealthy_now(max_age), ["intake"]);

        heartbeat.tick().await;
        assert!(liveness.unhealthy_now(max_age).is_empty());

        drop(heartbeat);
        assert_eq!(liveness.unhealthy_now(max_age), ["intake"]);
    }

    #[tokio::test(start_paused = true)]
    async fn tick_is_due_at_an_absolute_time() {
        let interval = Duration::from_millis(200);
        let liveness = Liveness::new(interval);
        let heartbeat = liveness.register("outbox");
        let start = Instant::now();
        // Recreated futures dropped early do not push the beat back.
        for _ in 0..3 {
            let _ = tokio::time::timeout(interval / 8, heartbeat.tick()).await;
        }
        heartbeat.tick().await;
        let took = Instant::now() - start;
        assert_eq!(
            took, interval,
            "beat after {took:?}: the early futures pushed it back"
        );
    }
}
