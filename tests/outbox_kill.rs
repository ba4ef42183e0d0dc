//! Kill test of the outbox: a child process drains thousands of jobs over
//! real HTTP to a sink on loopback; the test SIGKILLs it at random moments
//! and restarts it. In the end every job was delivered at least once, and
//! the jobs of each key in order.
//!
//! This test binary is its own child (see `tests/crash.rs`).
//! `cargo test --test outbox_kill` runs 30 cycles; the 1,000-cycle variant
//! is opt-in: `cargo test --release --test outbox_kill -- --ignored`.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use libtest_mimic::{Arguments, Failed, Trial};
use rand::Rng;
use smaregi_relay::config::OutboxConfig;
use smaregi_relay::outbox::engine::{AttemptOutcome, BoxFuture, EngineBuilder, Executor};
use smaregi_relay::outbox::job::{Job, JobState, NewJob};
use smaregi_relay::outbox::queue::{Counts, ListFilter, Queue};
use smaregi_relay::store::Store;
use tokio_util::sync::CancellationToken;

mod common;

const CHILD_STORE: &str = "SMAREGI_RELAY_OUTBOX_CHILD";
const CHILD_SINK: &str = "SMAREGI_RELAY_OUTBOX_SINK";
const KEYS: u64 = 60;
/// A cycle delivers 60 jobs on average before its kill: enough jobs for
/// every cycle to kill the child while it still has work.
const JOBS_PER_KEY_PER_CYCLE: u64 = 2;

fn main() {
    if let (Some(store), Ok(sink)) = (std::env::var_os(CHILD_STORE), std::env::var(CHILD_SINK)) {
        drain_until_killed(PathBuf::from(store), sink);
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test(
            "sigkill_while_draining_loses_no_job_and_keeps_key_order",
            || kill_cycles(30),
        ),
        Trial::test("sigkill_while_draining_1000_cycles", || kill_cycles(1000))
            .with_ignored_flag(true),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// Posts the job's payload to the sink; any 2xx is success.
struct HttpExecutor {
    client: reqwest::Client,
    url: String,
}

impl Executor for HttpExecutor {
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let sent = self
                .client
                .post(&self.url)
                .header("content-type", "application/json")
                .body(job.payload.to_string())
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => AttemptOutcome::Success,
                Ok(response) => AttemptOutcome::Retry {
                    reason: format!("sink answered {}", response.status()),
                    retry_after: None,
                },
                Err(e) => AttemptOutcome::Retry {
                    reason: e.to_string(),
                    retry_after: None,
                },
            }
        })
    }
}

/// The child: runs the outbox engine with the HTTP executor until killed.
fn drain_until_killed(directory: PathBuf, sink: String) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Store::open(&common::store_options(&directory)).unwrap();
        let config = OutboxConfig {
            workers: 8,
            ..OutboxConfig::default()
        };
        let executor = Arc::new(HttpExecutor {
            client: smaregi_sim::sender::http_client(None).unwrap(),
            url: sink,
        });
        let engine = EngineBuilder::new(&store, &config)
            .unwrap()
            .executor("test.deliver", "sink", executor)
            .build()
            .unwrap();
        engine.run(CancellationToken::new()).await.unwrap();
    });
    unreachable!("the engine runs until the process is killed")
}

/// A delivery the sink recorded: (key, sequence within the key).
type Delivery = (u64, u64);

/// What the sink received: every delivery in order, and the distinct ones.
#[derive(Default)]
struct Received {
    all: Vec<Delivery>,
    distinct: HashSet<Delivery>,
}

/// An HTTP/1.1 sink on loopback that records every JSON body it receives.
fn start_sink() -> (String, Arc<Mutex<Received>>, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/deliver", listener.local_addr().unwrap());
    let deliveries: Arc<Mutex<Received>> = Arc::default();
    let (delivered, progress) = mpsc::channel();
    let recorded = Arc::clone(&deliveries);
    std::thread::spawn(move || {
        for connection in listener.incoming() {
            let Ok(connection) = connection else { continue };
            let (recorded, delivered) = (Arc::clone(&recorded), delivered.clone());
            std::thread::spawn(move || serve_connection(connection, &recorded, &delivered));
        }
    });
    (url, deliveries, progress)
}

fn serve_connection(
    connection: TcpStream,
    recorded: &Mutex<Received>,
    delivered: &mpsc::Sender<()>,
) {
    connection.set_nodelay(true).unwrap();
    let mut writer = connection.try_clone().unwrap();
    let mut reader = BufReader::new(connection);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let delivery = (
            payload["key"].as_u64().unwrap(),
            payload["seq"].as_u64().unwrap(),
        );
        {
            let mut recorded = recorded.lock().unwrap();
            recorded.all.push(delivery);
            recorded.distinct.insert(delivery);
        }
        let _ = delivered.send(());
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

fn spawn_child(directory: &Path, sink: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(CHILD_STORE, directory)
        .env(CHILD_SINK, sink)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn distinct(received: &Mutex<Received>) -> usize {
    received.lock().unwrap().distinct.len()
}

fn kill_cycles(cycles: usize) -> Result<(), Failed> {
    let jobs_per_key = JOBS_PER_KEY_PER_CYCLE * cycles as u64;
    let total = (KEYS * jobs_per_key) as usize;
    let temp = tempfile::tempdir().unwrap();
    let directory = temp.path().join("db");
    enqueue_jobs(&directory, jobs_per_key);
    let (url, deliveries, progress) = start_sink();
    let mut rng = rand::rng();
    let mut kills = 0;

    for cycle in 0..=cycles {
        let last = cycle == cycles;
        let mut child = spawn_child(&directory, &url);
        // Kill after a random number of deliveries, or run to the end.
        let wanted = if last {
            usize::MAX
        } else {
            rng.random_range(1..=120)
        };
        let mut seen = 0;
        while seen < wanted && distinct(&deliveries) < total {
            if progress.recv_timeout(common::EVENT_DEADLINE).is_err() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "cycle {cycle}: no delivery for {:?}",
                    common::EVENT_DEADLINE
                )
                .into());
            }
            seen += 1;
        }
        child.kill().unwrap();
        common::wait_with_deadline(&mut child);
        kills += 1;
        if distinct(&deliveries) == total {
            break;
        }
    }
    if kills <= cycles {
        return Err(
            format!("the jobs ran out after {kills} of {cycles} kills; enqueue more").into(),
        );
    }

    let deliveries = std::mem::take(&mut deliveries.lock().unwrap().all);
    if distinct_of(&deliveries) != total {
        return Err(format!("{} of {total} jobs delivered", distinct_of(&deliveries)).into());
    }
    check_key_order(&deliveries)?;
    check_counts_agree_with_jobs(&directory, total)?;
    println!(
        "{kills} SIGKILLs; {total} jobs over {} deliveries ({} repeated after a kill), in key order",
        deliveries.len(),
        deliveries.len() - total
    );
    Ok(())
}

fn distinct_of(deliveries: &[Delivery]) -> usize {
    deliveries.iter().collect::<HashSet<_>>().len()
}

/// Per key, each delivery repeats the latest job (an attempt the kill cut
/// off after the sink got it) or is the next one.
fn check_key_order(deliveries: &[Delivery]) -> Result<(), String> {
    let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
    for &(key, seq) in deliveries {
        let allowed = match latest.get(&key) {
            None => seq == 0,
            Some(&last) => seq == last || seq == last + 1,
        };
        if !allowed {
            return Err(format!(
                "key {key}: job {seq} delivered after job {:?}",
                latest.get(&key)
            ));
        }
        latest.insert(key, seq);
    }
    Ok(())
}

/// After all the kills, the counts, the state index and the due index
/// still say what the job records say.
fn check_counts_agree_with_jobs(directory: &Path, total: usize) -> Result<(), String> {
    let store = Store::open(&common::store_options(directory)).unwrap();
    let queue = Queue::open(&store).unwrap();
    let all = ListFilter {
        limit: usize::MAX,
        ..ListFilter::default()
    };
    let jobs = queue.list(&all).unwrap();
    if jobs.len() != total {
        return Err(format!("{} job records, expected {total}", jobs.len()));
    }
    let mut tally: Counts = Counts::new();
    for job in &jobs {
        *tally.entry((job.state, job.kind.clone())).or_default() += 1;
    }
    let counts = queue.counts().unwrap();
    if counts != tally {
        return Err(format!("counts {counts:?} but the jobs say {tally:?}"));
    }
    let pending: Vec<u64> = jobs
        .iter()
        .filter(|job| job.state == JobState::Pending)
        .map(|job| job.id)
        .collect();
    let indexed: Vec<u64> = queue
        .list(&ListFilter {
            state: Some(JobState::Pending),
            ..all
        })
        .unwrap()
        .iter()
        .map(|job| job.id)
        .collect();
    if indexed != pending {
        return Err(format!("state index {indexed:?}, pending jobs {pending:?}"));
    }
    let stale = queue.stale_due_entries().unwrap();
    if !stale.is_empty() {
        return Err(format!(
            "due index entries of jobs that cannot run: {stale:?}"
        ));
    }
    drop(queue);
    current_thread_runtime().block_on(store.close()).unwrap();
    Ok(())
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn enqueue_jobs(directory: &Path, jobs_per_key: u64) {
    current_thread_runtime().block_on(async {
        let store = Store::open(&common::store_options(directory)).unwrap();
        let queue = Queue::open(&store).unwrap();
        for seq in 0..jobs_per_key {
            for key in 0..KEYS {
                let job = NewJob {
                    kind: "test.deliver".into(),
                    upstream: "sink".into(),
                    key: format!("key:{key}"),
                    payload: serde_json::json!({"v": 1, "key": key, "seq": seq}),
                };
                queue.enqueue(&job, 0).unwrap();
            }
        }
        store.commit().await.unwrap();
        store.close().await.unwrap();
    });
}
