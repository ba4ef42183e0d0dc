//! Crash tests of the durable commit, with real processes.
//!
//! This test binary is also its own child: started with `CHILD_ENV` set, it
//! opens the store and commits records from several tasks at once, printing
//! each record's id only after `Store::commit` returned for it. The parent
//! SIGKILLs it at random moments, reopens the store and checks that every
//! printed id is there, intact.
//!
//! `cargo test --test crash` runs the default campaign; the long ones are
//! opt-in: `cargo test --release --test crash -- --ignored`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use libtest_mimic::{Arguments, Failed, Trial};
use rand::Rng;
use smaregi_relay::store::keys::u64_key;
use smaregi_relay::store::{Store, StoreError, TreeName};

mod common;

/// Set to the database directory, makes this binary the committing child.
const CHILD_ENV: &str = "SMAREGI_RELAY_CRASH_CHILD";
/// The size of each record's value in the child.
const PAYLOAD_ENV: &str = "SMAREGI_RELAY_CRASH_PAYLOAD";
const RECORDS: TreeName = TreeName::new("crash-records");
const CHILD_COMMITTERS: usize = 8;

fn main() {
    if let Some(directory) = std::env::var_os(CHILD_ENV) {
        let payload = std::env::var(PAYLOAD_ENV).map_or(64, |v| v.parse().unwrap());
        commit_until_killed(PathBuf::from(directory), payload);
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("sigkill_never_loses_a_committed_record", || {
            sigkill_cycles(50)
        }),
        Trial::test("sigkill_never_loses_a_committed_record_1000_cycles", || {
            sigkill_cycles(1000)
        })
        .with_ignored_flag(true),
        Trial::test(
            "io_failure_ends_the_process_nonzero_and_keeps_committed_records",
            io_failure_is_fatal,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn payload(id: u64, len: usize) -> Vec<u8> {
    id.to_le_bytes().iter().copied().cycle().take(len).collect()
}

/// The child: commits records from several tasks until it dies. On the
/// first store error it does what the daemon does: waits for the store to
/// report itself failed, checks that no commit succeeds any more, and exits
/// with the failure's exit code.
fn commit_until_killed(directory: PathBuf, payload_len: usize) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failure = runtime.block_on(async move {
        let store = match Store::open(&common::store_options(&directory)) {
            Ok(store) => store,
            Err(e) => return e,
        };
        let mut committers: tokio::task::JoinSet<Result<(), StoreError>> =
            tokio::task::JoinSet::new();
        for _ in 0..CHILD_COMMITTERS {
            let store = store.clone();
            committers.spawn(async move {
                let records = store.tree(RECORDS)?;
                loop {
                    let id = store.generate_id()?;
                    store.check(records.insert(u64_key(id), payload(id, payload_len)))?;
                    store.commit().await?;
                    println!("{id}");
                }
            });
        }
        match committers.join_next().await {
            Some(Ok(Err(_))) => {}
            other => panic!("committer ended without a store error: {other:?}"),
        }
        let failure = tokio::time::timeout(common::EVENT_DEADLINE, store.failed())
            .await
            .expect("the store reports itself failed after an I/O error");
        if store.commit().await.is_ok() {
            panic!("a commit succeeded after the store failed");
        }
        failure
    });
    eprintln!("smaregi-relay: {failure}");
    std::process::exit(failure.exit_code().into())
}

fn spawn_child(directory: &Path, payload_len: usize, file_size_limit: Option<u64>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env(CHILD_ENV, directory)
        .env(PAYLOAD_ENV, payload_len.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = file_size_limit {
        common::limit_file_size(&mut command, limit);
    }
    command.spawn().unwrap()
}

/// Reads acknowledged ids from the child's stdout: `count` of them, or all
/// until EOF when `count` is `None`.
fn read_ids(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    count: Option<usize>,
) -> Vec<u64> {
    let mut ids = Vec::new();
    while count.is_none_or(|count| ids.len() < count) {
        match lines.next() {
            Some(Ok(line)) => ids.push(line.parse().expect("the child prints ids")),
            _ => break,
        }
    }
    ids
}

/// Opens the store and checks every acknowledged record.
fn verify(directory: &Path, acknowledged: &[u64], payload_len: usize) -> Result<(), String> {
    let store = Store::open(&common::store_options(directory))
        .map_err(|e| format!("reopen failed: {e}"))?;
    let records = store.tree(RECORDS).map_err(|e| e.to_string())?;
    for &id in acknowledged {
        match records.get(u64_key(id)).map_err(|e| e.to_string())? {
            Some(value) if *value == *payload(id, payload_len) => {}
            Some(_) => return Err(format!("record {id} was acknowledged but is corrupt")),
            None => {
                return Err(format!(
                    "record {id} was acknowledged as committed but is lost"
                ))
            }
        }
    }
    Ok(())
}

fn sigkill_cycles(cycles: usize) -> Result<(), Failed> {
    const PAYLOAD: usize = 64;
    let temp = tempfile::tempdir().unwrap();
    let directory = temp.path().join("db");
    let mut rng = rand::rng();
    let mut acknowledged = Vec::new();
    for cycle in 0..cycles {
        let mut child = spawn_child(&directory, PAYLOAD, None);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // 0 kills the child while it opens and recovers the store.
        let kill_after = rng.random_range(0..=200);
        let before_kill = read_ids(&mut lines, Some(kill_after));
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
            return Err(
                format!("cycle {cycle}: the child exited by itself ({status}): {stderr}").into(),
            );
        }
        child.kill().unwrap();
        let status = common::wait_with_deadline(&mut child);
        if status.signal() != Some(libc::SIGKILL) {
            let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
            return Err(
                format!("cycle {cycle}: the child ended by itself ({status}): {stderr}").into(),
            );
        }
        acknowledged.extend(before_kill);
        acknowledged.extend(read_ids(&mut lines, None));
        verify(&directory, &acknowledged, PAYLOAD).map_err(|e| format!("cycle {cycle}: {e}"))?;
    }
    // The campaign means something only if the children really committed.
    if acknowledged.len() < cycles * 10 {
        return Err(format!(
            "only {} records committed in {cycles} cycles",
            acknowledged.len()
        )
        .into());
    }
    println!(
        "{cycles} SIGKILL cycles, {} acknowledged records, none lost",
        acknowledged.len()
    );
    Ok(())
}

fn io_failure_is_fatal() -> Result<(), Failed> {
    const PAYLOAD: usize = 1024;
    const FILE_SIZE_LIMIT: u64 = 4 * 1024 * 1024;
    let temp = tempfile::tempdir().unwrap();
    let directory = temp.path().join("db");
    let mut child = spawn_child(&directory, PAYLOAD, Some(FILE_SIZE_LIMIT));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let acknowledged = read_ids(&mut lines, None);
    let status = common::wait_with_deadline(&mut child);
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();

    if status.code() != Some(smaregi_relay::exit::IO_ERROR.into()) {
        return Err(format!(
            "expected exit code 74 after the write failure, got {status}: {stderr}"
        )
        .into());
    }
    if !stderr.contains("durable commit on store") {
        return Err(format!("the store did not report a failed durable commit: {stderr}").into());
    }
    if !stderr.contains(&directory.display().to_string()) {
        return Err(format!("the error does not name the store path: {stderr}").into());
    }
    if acknowledged.is_empty() {
        return Err("nothing was committed before the limit; the test proves nothing".into());
    }
    verify(&directory, &acknowledged, PAYLOAD)?;
    println!(
        "child stopped with {status} after {} acknowledged records: {}",
        acknowledged.len(),
        stderr.trim()
    );
    Ok(())
}
