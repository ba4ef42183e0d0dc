//! The outbox's durable queue on a real store: per-key order, parking,
//! atomic enqueue with a caller's records, and what survives a reopen.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use proptest::prelude::*;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use smaregi_relay::outbox::job::{ErrorClass, JobError, JobState, NewJob};
use smaregi_relay::outbox::queue::{ListFilter, Queue, QueueError};
use smaregi_relay::store::{Store, TreeName};

mod common;

fn open(directory: &Path) -> (Store, Queue) {
    let store = Store::open(&common::store_options(directory)).unwrap();
    let queue = Queue::open(&store).unwrap();
    (store, queue)
}

fn job(key: &str) -> NewJob {
    NewJob {
        kind: "test.deliver".into(),
        upstream: "sink".into(),
        key: key.into(),
        payload: serde_json::json!({"v": 1}),
    }
}

fn due(queue: &Queue, now: u64) -> Vec<u64> {
    queue.due("sink", now, usize::MAX, |_| false).unwrap()
}

fn failure(at: u64) -> JobError {
    JobError::new(ErrorClass::Retryable, "connection reset", at)
}

#[test]
fn only_the_oldest_unfinished_job_of_a_key_may_run() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let a1 = queue.enqueue(&job("order:a"), 10).unwrap();
    let a2 = queue.enqueue(&job("order:a"), 11).unwrap();
    let b1 = queue.enqueue(&job("order:b"), 12).unwrap();
    let a3 = queue.enqueue(&job("order:a"), 13).unwrap();
    assert_eq!(due(&queue, 100), [a1, b1]);

    queue.complete(a1, 100).unwrap();
    assert_eq!(
        due(&queue, 100),
        [a2, b1],
        "a2 was enqueued at 11, before b1 at 12"
    );
    queue.complete(a2, 101).unwrap();
    queue.complete(b1, 102).unwrap();
    assert_eq!(due(&queue, 200), [a3]);
    queue.complete(a3, 103).unwrap();
    assert!(due(&queue, u64::MAX).is_empty());

    let done = queue.job(a1).unwrap().unwrap();
    assert_eq!(
        (done.state, done.attempts, done.finished_at),
        (JobState::Done, 1, Some(100))
    );
    assert!(matches!(
        queue.complete(a1, 104),
        Err(QueueError::WrongState { .. })
    ));
}

#[test]
fn a_rescheduled_job_waits_for_its_time_and_keeps_its_history() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let id = queue.enqueue(&job("order:a"), 0).unwrap();
    queue.reschedule(id, 5_000, failure(1)).unwrap();
    assert!(due(&queue, 4_999).is_empty());
    assert_eq!(queue.next_due("sink", |_| false).unwrap(), Some(5_000));
    assert_eq!(due(&queue, 5_000), [id]);
    let stored = queue.job(id).unwrap().unwrap();
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.last_error.unwrap().message, "connection reset");
}

#[test]
fn a_parked_job_blocks_its_key_until_retried_or_discarded() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let a1 = queue.enqueue(&job("order:a"), 0).unwrap();
    let a2 = queue.enqueue(&job("order:a"), 0).unwrap();
    let b1 = queue.enqueue(&job("order:b"), 0).unwrap();
    queue
        .park(
            a1,
            JobError::new(ErrorClass::Permanent, "subtotal mismatch", 1),
        )
        .unwrap();

    assert_eq!(due(&queue, 10), [b1], "a2 waits behind the parked a1");
    assert_eq!(queue.blocked_keys().unwrap(), [("order:a".to_owned(), a1)]);

    queue.retry(a1, 20).unwrap();
    assert!(queue.blocked_keys().unwrap().is_empty());
    assert_eq!(due(&queue, 20), [b1, a1]);

    queue
        .park(a1, JobError::new(ErrorClass::Permanent, "again", 21))
        .unwrap();
    queue
        .discard(a1, "registered by hand in Smaregi", 30)
        .unwrap();
    assert_eq!(
        due(&queue, 30),
        [a2, b1],
        "a2 has waited since it was enqueued at 0"
    );
    let discarded = queue.job(a1).unwrap().unwrap();
    assert_eq!(discarded.state, JobState::Discarded);
    assert_eq!(discarded.attempts, 2);
    let audit = queue.discards().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].job, audit[0].reason.as_str()),
        (a1, "registered by hand in Smaregi")
    );
}

#[test]
fn discarding_a_waiting_job_keeps_the_order_of_the_others() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let ids: Vec<u64> = (0..4)
        .map(|_| queue.enqueue(&job("order:a"), 0).unwrap())
        .collect();
    queue.discard(ids[2], "duplicate", 1).unwrap();
    let mut order = Vec::new();
    while let Some(&head) = due(&queue, 10).first() {
        order.push(head);
        queue.complete(head, 10).unwrap();
    }
    assert_eq!(order, [ids[0], ids[1], ids[3]]);
}

#[test]
fn running_jobs_can_be_left_out_of_the_due_list() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let a = queue.enqueue(&job("order:a"), 0).unwrap();
    let b = queue.enqueue(&job("order:b"), 0).unwrap();
    assert_eq!(queue.due("sink", 0, usize::MAX, |id| id == a).unwrap(), [b]);
    assert_eq!(queue.due("sink", 0, 1, |_| false).unwrap(), [a]);
    assert!(queue
        .due("other-upstream", 0, usize::MAX, |_| false)
        .unwrap()
        .is_empty());
}

#[test]
fn a_record_and_its_jobs_are_written_together_or_not_at_all() {
    const ORDERS: TreeName = TreeName::new("orders");
    let temp = tempfile::tempdir().unwrap();
    let (store, queue) = open(temp.path());
    let orders = store.tree(ORDERS).unwrap();
    let id = store.generate_id().unwrap();

    let failed: Result<(), TransactionError<&str>> =
        (&orders, queue.tree()).transaction(|(orders, outbox)| {
            orders.insert("order:a", "revision 1")?;
            Queue::stage(outbox, id, &job("order:a"), 0)
                .map_err(|_| ConflictableTransactionError::Abort("stage"))?;
            Err(ConflictableTransactionError::Abort(
                "the caller's own check failed",
            ))
        });
    assert!(failed.is_err());
    assert!(orders.get("order:a").unwrap().is_none());
    assert!(queue.job(id).unwrap().is_none());
    assert!(due(&queue, 0).is_empty());

    (&orders, queue.tree())
        .transaction(|(orders, outbox)| {
            orders.insert("order:a", "revision 1")?;
            Queue::stage(outbox, id, &job("order:a"), 0)
                .map_err(|_| ConflictableTransactionError::Abort(()))?;
            Ok(())
        })
        .unwrap();
    assert!(orders.get("order:a").unwrap().is_some());
    assert_eq!(due(&queue, 0), [id]);
}

#[test]
fn invalid_jobs_are_refused_and_nothing_is_written() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let mut bad = job("has space");
    assert!(matches!(
        queue.enqueue(&bad, 0),
        Err(QueueError::Invalid(_))
    ));
    bad = job("order:a");
    bad.payload = serde_json::json!({"blob": "x".repeat(70 * 1024)});
    assert!(matches!(
        queue.enqueue(&bad, 0),
        Err(QueueError::Invalid(_))
    ));
    assert!(due(&queue, u64::MAX).is_empty());
}

#[tokio::test]
async fn committed_jobs_are_runnable_again_after_a_reopen() {
    let temp = tempfile::tempdir().unwrap();
    let (head, later) = {
        let (store, queue) = open(temp.path());
        let head = queue.enqueue(&job("order:a"), 0).unwrap();
        let later = queue.enqueue(&job("order:a"), 0).unwrap();
        queue.reschedule(head, 50, failure(1)).unwrap();
        store.commit().await.unwrap();
        store.close().await.unwrap();
        (head, later)
    };
    let (_store, queue) = open(temp.path());
    assert_eq!(
        due(&queue, 50),
        [head],
        "a job that was running is simply due again"
    );
    queue.complete(head, 60).unwrap();
    assert_eq!(due(&queue, 60), [later]);
}

/// An operation of the model-based test.
#[derive(Debug, Clone)]
enum Operation {
    Enqueue(u8),
    CompleteHead(u8),
    RescheduleHead(u8, u64),
    ParkHead(u8),
    RetryParked(u8),
    Discard(usize),
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        3 => (0u8..3).prop_map(Operation::Enqueue),
        2 => (0u8..3).prop_map(Operation::CompleteHead),
        1 => ((0u8..3), 0u64..100).prop_map(|(k, at)| Operation::RescheduleHead(k, at)),
        1 => (0u8..3).prop_map(Operation::ParkHead),
        1 => (0u8..3).prop_map(Operation::RetryParked),
        1 => any::<usize>().prop_map(Operation::Discard),
    ]
}

/// The model: per key, the unfinished jobs in order and whether the head is parked.
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, (VecDeque<u64>, bool)>,
    finished_in_order: BTreeMap<String, Vec<u64>>,
    enqueued_in_order: BTreeMap<String, Vec<u64>>,
    discarded: Vec<u64>,
}

impl Model {
    fn runnable_heads(&self) -> Vec<u64> {
        let mut heads: Vec<u64> = self
            .keys
            .values()
            .filter(|(jobs, parked)| !parked && !jobs.is_empty())
            .map(|(jobs, _)| jobs[0])
            .collect();
        heads.sort_unstable();
        heads
    }

    fn parked_heads(&self) -> Vec<u64> {
        let mut heads: Vec<u64> = self
            .keys
            .values()
            .filter(|(jobs, parked)| *parked && !jobs.is_empty())
            .map(|(jobs, _)| jobs[0])
            .collect();
        heads.sort_unstable();
        heads
    }

    fn pending(&self) -> Vec<u64> {
        let parked = self.parked_heads();
        let mut pending: Vec<u64> = self
            .keys
            .values()
            .flat_map(|(jobs, _)| jobs.iter().copied())
            .filter(|id| !parked.contains(id))
            .collect();
        pending.sort_unstable();
        pending
    }

    fn done(&self) -> usize {
        self.finished_in_order.values().map(Vec::len).sum()
    }
}

fn ids(jobs: Vec<smaregi_relay::outbox::job::Job>) -> Vec<u64> {
    jobs.into_iter().map(|job| job.id).collect()
}

fn listed(queue: &Queue, state: Option<JobState>) -> Vec<u64> {
    let filter = ListFilter {
        state,
        limit: usize::MAX,
        ..ListFilter::default()
    };
    ids(queue.list(&filter).unwrap())
}

fn count(queue: &Queue, state: JobState) -> usize {
    let counts = queue.counts().unwrap();
    counts
        .get(&(state, "test.deliver".to_owned()))
        .copied()
        .unwrap_or(0) as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_queue_behaves_like_per_key_fifos(operations in proptest::collection::vec(operation(), 1..60)) {
        let temp = tempfile::tempdir().unwrap();
        let (_store, queue) = open(temp.path());
        let mut model = Model::default();
        let now = 1_000;
        for operation in operations {
            let key_name = |k: u8| format!("order:{k}");
            let head = |model: &Model, k: u8| model.keys.get(&key_name(k)).and_then(|(jobs, parked)| jobs.front().map(|&h| (h, *parked)));
            match operation {
                Operation::Enqueue(k) => {
                    let id = queue.enqueue(&job(&key_name(k)), 0).unwrap();
                    model.keys.entry(key_name(k)).or_default().0.push_back(id);
                    model.enqueued_in_order.entry(key_name(k)).or_default().push(id);
                }
                Operation::CompleteHead(k) => {
                    if let Some((id, false)) = head(&model, k) {
                        queue.complete(id, now).unwrap();
                        model.keys.get_mut(&key_name(k)).unwrap().0.pop_front();
                        model.finished_in_order.entry(key_name(k)).or_default().push(id);
                    }
                }
                Operation::RescheduleHead(k, at) => {
                    if let Some((id, false)) = head(&model, k) {
                        queue.reschedule(id, at, failure(now)).unwrap();
                    }
                }
                Operation::ParkHead(k) => {
                    if let Some((id, false)) = head(&model, k) {
                        queue.park(id, failure(now)).unwrap();
                        model.keys.get_mut(&key_name(k)).unwrap().1 = true;
                    }
                }
                Operation::RetryParked(k) => {
                    if let Some((id, true)) = head(&model, k) {
                        queue.retry(id, 0).unwrap();
                        model.keys.get_mut(&key_name(k)).unwrap().1 = false;
                    }
                }
                Operation::Discard(pick) => {
                    let unfinished: Vec<(String, usize, u64)> = model.keys.iter()
                        .flat_map(|(key, (jobs, _))| jobs.iter().enumerate().map(move |(i, &id)| (key.clone(), i, id)))
                        .collect();
                    if !unfinished.is_empty() {
                        let (key, position, id) = unfinished[pick % unfinished.len()].clone();
                        queue.discard(id, "test", now).unwrap();
                        let (jobs, parked) = model.keys.get_mut(&key).unwrap();
                        jobs.remove(position);
                        if position == 0 {
                            *parked = false;
                        }
                        model.discarded.push(id);
                    }
                }
            }
            let mut runnable = queue.due("sink", u64::MAX, usize::MAX, |_| false).unwrap();
            runnable.sort_unstable();
            prop_assert_eq!(runnable, model.runnable_heads());
            let mut blocked: Vec<u64> = queue.blocked_keys().unwrap().into_iter().map(|(_, id)| id).collect();
            blocked.sort_unstable();
            prop_assert_eq!(&blocked, &model.parked_heads());
            // The counts and the state index agree with the jobs.
            prop_assert_eq!(listed(&queue, Some(JobState::Parked)), model.parked_heads());
            prop_assert_eq!(listed(&queue, Some(JobState::Pending)), model.pending());
            prop_assert_eq!(count(&queue, JobState::Parked), model.parked_heads().len());
            prop_assert_eq!(count(&queue, JobState::Pending), model.pending().len());
            prop_assert_eq!(count(&queue, JobState::Done), model.done());
            prop_assert_eq!(count(&queue, JobState::Discarded), model.discarded.len());
            prop_assert_eq!(queue.oldest_pending().unwrap().map(|o| o.id), model.pending().first().copied());
        }
        // Every key finished its jobs in enqueue order.
        for (key, finished) in &model.finished_in_order {
            let expected: Vec<u64> = model.enqueued_in_order[key].iter().copied().filter(|id| finished.contains(id)).collect();
            prop_assert_eq!(finished, &expected);
        }
    }
}

#[test]
fn finished_jobs_are_pruned_after_their_retention_and_unfinished_ones_never() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let done = queue.enqueue(&job("order:a"), 0).unwrap();
    queue.complete(done, 100).unwrap();
    let discarded = queue.enqueue(&job("order:b"), 0).unwrap();
    queue.discard(discarded, "duplicate", 200).unwrap();
    let pending = queue.enqueue(&job("order:c"), 0).unwrap();
    let parked = queue.enqueue(&job("order:d"), 0).unwrap();
    queue.park(parked, failure(1)).unwrap();

    assert_eq!(queue.prune_finished(150, 100).unwrap(), 1);
    assert!(queue.job(done).unwrap().is_none());
    assert!(
        queue.job(discarded).unwrap().is_some(),
        "finished at 200, after the cut-off"
    );

    assert_eq!(
        queue.prune_finished(u64::MAX, 0).unwrap(),
        0,
        "the limit holds"
    );
    assert_eq!(queue.prune_finished(u64::MAX, 100).unwrap(), 1);
    assert!(queue.job(discarded).unwrap().is_none());
    assert_eq!(
        count(&queue, JobState::Done),
        0,
        "pruned jobs leave the counts"
    );
    assert_eq!(count(&queue, JobState::Discarded), 0);
    assert_eq!(count(&queue, JobState::Pending), 1);
    assert_eq!(count(&queue, JobState::Parked), 1);
    assert_eq!(queue.discards().unwrap().len(), 1, "the audit record stays");

    assert!(queue.job(pending).unwrap().is_some());
    assert!(queue.job(parked).unwrap().is_some());
    assert_eq!(due(&queue, 0), [pending]);
    assert_eq!(
        queue.blocked_keys().unwrap(),
        [("order:d".to_owned(), parked)]
    );
}

#[test]
fn listings_filter_by_state_kind_and_key_and_page_by_id() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let mut all = Vec::new();
    for i in 0..10 {
        let mut new = job(&format!("order:{}", i % 3));
        if i % 2 == 1 {
            new.kind = "test.other".into();
        }
        all.push(queue.enqueue(&new, i).unwrap());
    }
    queue.complete(all[0], 50).unwrap();
    queue.park(all[1], failure(60)).unwrap();

    assert_eq!(listed(&queue, None), all);
    assert_eq!(listed(&queue, Some(JobState::Done)), [all[0]]);
    assert_eq!(listed(&queue, Some(JobState::Parked)), [all[1]]);
    assert_eq!(listed(&queue, Some(JobState::Pending)), all[2..]);

    let by_kind = ListFilter {
        kind: Some("test.other".into()),
        limit: usize::MAX,
        ..ListFilter::default()
    };
    assert_eq!(
        ids(queue.list(&by_kind).unwrap()),
        [all[1], all[3], all[5], all[7], all[9]]
    );
    let by_key = ListFilter {
        key: Some("order:1".into()),
        state: Some(JobState::Pending),
        limit: usize::MAX,
        ..ListFilter::default()
    };
    assert_eq!(ids(queue.list(&by_key).unwrap()), [all[4], all[7]]);

    // Pages of three, each after the last id of the one before.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = ids(queue
            .list(&ListFilter {
                after,
                limit: 3,
                ..ListFilter::default()
            })
            .unwrap());
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after = page.last().copied();
        pages.extend(page);
    }
    assert_eq!(pages, all);

    let counts = queue.counts().unwrap();
    assert_eq!(counts[&(JobState::Pending, "test.deliver".to_owned())], 4);
    assert_eq!(counts[&(JobState::Pending, "test.other".to_owned())], 4);
    assert_eq!(counts[&(JobState::Done, "test.deliver".to_owned())], 1);
    assert_eq!(counts[&(JobState::Parked, "test.other".to_owned())], 1);
    assert_eq!(counts.len(), 4);
    let oldest = queue.oldest_pending().unwrap().unwrap();
    assert_eq!((oldest.id, oldest.created_at), (all[2], 2));
}

#[test]
fn retry_now_brings_a_waiting_head_forward_but_never_jumps_its_key() {
    let temp = tempfile::tempdir().unwrap();
    let (_store, queue) = open(temp.path());
    let head = queue.enqueue(&job("order:a"), 0).unwrap();
    let behind = queue.enqueue(&job("order:a"), 0).unwrap();
    queue.reschedule(head, 7_200_000, failure(10)).unwrap();
    assert!(due(&queue, 100).is_empty(), "waiting two hours");

    assert!(matches!(
        queue.retry(behind, 100),
        Err(QueueError::NotHead { head: h, .. }) if h == head
    ));
    queue.retry(head, 100).unwrap();
    assert_eq!(due(&queue, 100), [head]);
    let job = queue.job(head).unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempts, job.next_attempt_at),
        (JobState::Pending, 1, 100)
    );

    queue.complete(head, 200).unwrap();
    assert!(matches!(
        queue.retry(head, 300),
        Err(QueueError::WrongState {
            state: JobState::Done,
            ..
        })
    ));
    assert!(matches!(
        queue.retry(9_999_999, 300),
        Err(QueueError::NotFound(_))
    ));
}

#[tokio::test]
async fn an_operator_pause_is_stored_until_cleared() {
    let temp = tempfile::tempdir().unwrap();
    let (store, queue) = open(temp.path());
    let pause = smaregi_relay::outbox::queue::OperatorPause {
        reason: "棚卸し中 (stocktake)".into(),
        at: 5,
    };
    queue.set_operator_pause("smaregi", Some(&pause)).unwrap();
    store.close().await.unwrap();
    drop((store, queue));
    let (store, queue) = open(temp.path());
    assert_eq!(
        queue.operator_pauses().unwrap(),
        [("smaregi".to_owned(), pause)]
    );
    queue.set_operator_pause("smaregi", None).unwrap();
    assert!(queue.operator_pauses().unwrap().is_empty());
    store.close().await.unwrap();
}
