//! Delta mode's arithmetic and the echo guard, pure: no I/O, no sled.
//!
//! A downstream in delta mode holds its own count and is sent changes.
//! For each downstream key (a store, or the summed stores, and a
//! product) the relay keeps a **baseline**: the value of the mirror that
//! the downstream's count corresponds to. The change to send is the
//! mirror's value minus the baseline; when the downstream acknowledges a
//! batch, the baseline moves by exactly what the batch carried (not *to*
//! a value), so that adjustments made meanwhile are never lost.
//!
//! **Echoes.** An order from the order API is a sale the EC side already
//! counted. When the relay registers it in Smaregi, Smaregi's stock goes
//! down and the mirror hears of it like of any other change. The
//! registration's stock moves (an echo, recorded exactly once with the
//! registration, see [`crate::smaregi::ledger`]) are added to the
//! baseline, so the change sent is only what others did. An echo is taken
//! into account by the refresh that reads the product from Smaregi after
//! the echo was recorded (the value read then includes the registration),
//! in the same transaction that stores that value: before, the mirror may
//! not show the sale yet, and moving the baseline early would send the
//! sale back as a rise.
//!
//! This module owns that arithmetic; it must never read or write the
//! store or decide when something is sent.

use std::collections::{BTreeMap, BTreeSet};

use crate::smaregi::ledger::Echo;

/// A downstream key: (downstream store id, product id).
pub type DownstreamKey = (String, String);

/// The change to send for one key, given the mirror's `current` value and
/// the `baseline`: `None` when there is no baseline yet (the first value
/// the relay learns is the starting point: the baseline becomes `current`
/// and nothing is sent), else `current − baseline` (0: nothing to send).
pub fn change_to_send(current: i64, baseline: Option<i64>) -> Option<i64> {
    baseline.map(|baseline| current.saturating_sub(baseline))
}

/// The baseline after the downstream acknowledged a change of `sent`.
pub fn acknowledge(baseline: i64, sent: i64) -> i64 {
    baseline.saturating_add(sent)
}

/// What consuming pending echoes does to the records and the baselines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EchoPlan {
    /// Per echo record (by its key): `None` to remove it, `Some` to keep
    /// the moves not yet taken into account. Records left as they were
    /// are not listed.
    pub records: Vec<(Vec<u8>, Option<Echo>)>,
    /// What to add to each baseline.
    pub baselines: BTreeMap<DownstreamKey, i64>,
}

/// Consumes the moves of `echoes` whose (store, product) was just
/// `refreshed`: they go into the baselines. `downstream_store` maps a
/// store to its downstream store id, or `None` when its echoes do not
/// matter (not followed, or not in delta mode): those moves are dropped.
/// Moves of products not refreshed stay for a later refresh.
pub fn plan_echoes(
    echoes: &[(Vec<u8>, Echo)],
    refreshed: &BTreeSet<(String, String)>,
    downstream_store: &dyn Fn(&str) -> Option<String>,
) -> EchoPlan {
    let mut plan = EchoPlan::default();
    for (key, echo) in echoes {
        let Some(dstore) = downstream_store(&echo.store_id) else {
            plan.records.push((key.clone(), None));
            continue;
        };
        let mut rest = Vec::new();
        for (product, change) in &echo.moves {
            if refreshed.contains(&(echo.store_id.clone(), product.clone())) {
                let baseline = plan
                    .baselines
                    .entry((dstore.clone(), product.clone()))
                    .or_default();
                *baseline = baseline.saturating_add(*change);
            } else {
                rest.push((product.clone(), *change));
            }
        }
        if rest.is_empty() {
            plan.records.push((key.clone(), None));
        } else if rest.len() != echo.moves.len() {
            plan.records.push((
                key.clone(),
                Some(Echo {
                    store_id: echo.store_id.clone(),
                    moves: rest,
                }),
            ));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn echo(store: &str, moves: &[(&str, i64)]) -> Echo {
        Echo {
            store_id: store.into(),
            moves: moves.iter().map(|(p, c)| ((*p).into(), *c)).collect(),
        }
    }

    fn refreshed(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        pairs
            .iter()
            .map(|(s, p)| ((*s).into(), (*p).into()))
            .collect()
    }

    #[test]
    fn the_first_value_is_the_baseline_and_then_changes_are_differences() {
        assert_eq!(change_to_send(7, None), None);
        assert_eq!(change_to_send(7, Some(7)), Some(0));
        assert_eq!(change_to_send(4, Some(7)), Some(-3));
        assert_eq!(acknowledge(7, -3), 4);
    }

    #[test]
    fn echoes_of_refreshed_products_move_the_baseline_and_the_rest_waits() {
        let echoes = vec![
            (b"a".to_vec(), echo("1", &[("113", -2), ("114", -1)])),
            (b"b".to_vec(), echo("1", &[("113", 2)])),
            (b"c".to_vec(), echo("3", &[("113", -5)])),
            (b"d".to_vec(), echo("1", &[("115", -1)])),
        ];
        let summed = |store: &str| match store {
            "1" | "2" => Some("1+2".to_owned()),
            _ => None,
        };
        let plan = plan_echoes(&echoes, &refreshed(&[("1", "113")]), &summed);
        assert_eq!(
            plan.records,
            [
                (b"a".to_vec(), Some(echo("1", &[("114", -1)]))),
                (b"b".to_vec(), None),
                (b"c".to_vec(), None),
            ]
        );
        // A sale and its cancel net to nothing.
        assert_eq!(
            plan.baselines,
            BTreeMap::from([(("1+2".to_owned(), "113".to_owned()), 0)])
        );
    }

    /// One product, one downstream: what the relay's pieces do, in any
    /// order and with any failures, as a model. Smaregi's stock moves by
    /// the store's own sales and by our registrations; the downstream
    /// counted our registrations itself.
    #[derive(Debug, Clone)]
    enum Step {
        /// A sale or delivery in the store, not through the relay.
        Foreign(i8),
        /// An order registered by the relay: Smaregi moves, the echo is
        /// recorded (before or after a refresh reads the product).
        Ours(i8, bool),
        /// A refresh reads Smaregi (consuming echoes recorded before it).
        Refresh,
        /// A push: built if none is in flight, then acknowledged or not.
        Push(bool),
        /// A duplicate delivery of the last acknowledged batch.
        Duplicate,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (-5i8..5).prop_map(Step::Foreign),
            ((-3i8..3), any::<bool>()).prop_map(|(q, late)| Step::Ours(q, late)),
            Just(Step::Refresh),
            any::<bool>().prop_map(Step::Push),
            Just(Step::Duplicate),
        ]
    }

    proptest! {
        #[test]
        fn the_downstream_ends_with_its_own_sales_plus_every_foreign_change_once(
            steps in proptest::collection::vec(step(), 0..40)
        ) {
            let key = || (String::from("1"), String::from("113"));
            let start = 50i64;
            let mut smaregi = start;
            let mut mirror = start;
            let mut baseline = Some(start);
            let mut pending: Vec<(Vec<u8>, Echo)> = Vec::new();
            let mut late: Vec<(Vec<u8>, Echo)> = Vec::new();
            let mut in_flight: Option<(u32, i64)> = None;
            let mut next_id = 0u32;
            let mut applied = BTreeSet::new();
            let mut last_acked = None;
            let mut downstream = start;
            let mut foreign = 0i64;
            let mut ours = 0i64;
            let store = |s: &str| (s == "1").then(|| "1".to_owned());
            let refresh = |mirror: &mut i64, baseline: &mut Option<i64>,
                           pending: &mut Vec<(Vec<u8>, Echo)>, smaregi: i64| {
                let plan = plan_echoes(pending, &BTreeSet::from([key()]), &store);
                for (_, change) in plan.baselines {
                    *baseline = baseline.map(|b| b + change);
                }
                pending.clear();
                *mirror = smaregi;
            };
            for step in steps {
                match step {
                    Step::Foreign(q) => {
                        smaregi += i64::from(q);
                        foreign += i64::from(q);
                    }
                    Step::Ours(q, recorded_late) => {
                        smaregi += i64::from(q);
                        ours += i64::from(q);
                        downstream += i64::from(q);
                        let record = (next_id.to_be_bytes().to_vec(), echo("1", &[("113", i64::from(q))]));
                        next_id += 1;
                        if recorded_late { late.push(record) } else { pending.push(record) }
                    }
                    Step::Refresh => {
                        refresh(&mut mirror, &mut baseline, &mut pending, smaregi);
                        pending.append(&mut late);
                    }
                    Step::Push(acknowledged) => {
                        if in_flight.is_none() {
                            if let Some(change) = change_to_send(mirror, baseline).filter(|c| *c != 0) {
                                in_flight = Some((next_id, change));
                                next_id += 1;
                            }
                        }
                        if let (true, Some((id, change))) = (acknowledged, in_flight) {
                            if applied.insert(id) {
                                downstream += change;
                            }
                            baseline = baseline.map(|b| acknowledge(b, change));
                            last_acked = Some(id);
                            in_flight = None;
                        }
                    }
                    Step::Duplicate => {
                        // The receiver drops a webhook-id it has seen.
                        if let Some(id) = last_acked {
                            prop_assert!(!applied.insert(id));
                        }
                    }
                }
            }
            // Quiet again: every echo recorded, a last refresh, pushes until acknowledged.
            pending.append(&mut late);
            refresh(&mut mirror, &mut baseline, &mut pending, smaregi);
            for _ in 0..2 {
                if in_flight.is_none() {
                    if let Some(change) = change_to_send(mirror, baseline).filter(|c| *c != 0) {
                        in_flight = Some((next_id, change));
                        next_id += 1;
                    }
                }
                if let Some((id, change)) = in_flight.take() {
                    if applied.insert(id) {
                        downstream += change;
                    }
                    baseline = baseline.map(|b| acknowledge(b, change));
                }
            }
            prop_assert_eq!(downstream, start + foreign + ours);
            prop_assert_eq!(smaregi, start + foreign + ours);
        }
    }
}
