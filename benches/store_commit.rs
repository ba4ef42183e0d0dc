//! Durable commits per second and commit latency, against `fdatasync` of a
//! plain file in the same directory, measured in the same run.
//!
//! `cargo bench --locked --bench store_commit`. After criterion's own report
//! it measures, in interleaved rounds, the two ratios the store is held to:
//! - 64 concurrent committers reach ≥ 10× the commits/s of one (group commit);
//! - one commit's latency is ≤ 1.5× the plain-file `fdatasync` latency.
//!
//! Each iteration of `committers/N` is one commit by each of N concurrent
//! tasks; each commit follows a 64-byte insert of its own.

mod daemon_allocator;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use smaregi_relay::store::keys::u64_key;
use smaregi_relay::store::{Store, StoreOptions, TreeName};

const GROUP: &str = "store_commit";
const COMMITTERS: [u64; 3] = [1, 8, 64];
const RECORD: [u8; 64] = [0x5a; 64];
const RECORDS: TreeName = TreeName::new("bench-records");

fn criterion_directory() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("criterion")
}

fn main() {
    let workspace = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(&StoreOptions {
        directory: workspace.path().join("db"),
        cache_capacity_bytes: 32 * 1024 * 1024,
    })
    .unwrap();

    let mut criterion = Criterion::default()
        .output_directory(&criterion_directory())
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = criterion.benchmark_group(GROUP);

    // A write-ahead log's durable append: 64 bytes at the end, then fdatasync.
    let mut plain = File::create(workspace.path().join("plain-file")).unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function("plain_fdatasync", |b| {
        b.iter(|| {
            plain.write_all(&RECORD).unwrap();
            plain.sync_data().unwrap();
        })
    });

    for committers in COMMITTERS {
        group.throughput(Throughput::Elements(committers));
        group.bench_with_input(
            BenchmarkId::new("committers", committers),
            &committers,
            |b, &committers| {
                b.to_async(&runtime).iter_custom(|iterations| {
                    let store = store.clone();
                    async move { concurrent_commits(&store, committers, iterations).await }
                })
            },
        );
    }
    group.finish();
    criterion.final_summary();

    let rounds = paired_rounds(&runtime, &store, &mut plain);
    print_targets(&rounds, store.sync_count());
}

/// `committers` tasks each commit `iterations` records; returns the wall time.
async fn concurrent_commits(store: &Store, committers: u64, iterations: u64) -> Duration {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..committers {
        let store = store.clone();
        tasks.spawn(async move {
            let records = store.tree(RECORDS).unwrap();
            for _ in 0..iterations {
                let id = store.generate_id().unwrap();
                records.insert(u64_key(id), &RECORD[..]).unwrap();
                store.commit().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    started.elapsed()
}

/// One interleaved round: nanoseconds per plain fdatasync, per commit with
/// one committer, and per commit with 64 committers.
struct PairedRound {
    fdatasync: f64,
    single_commit: f64,
    commit_at_64: f64,
}

const PAIRED_ROUNDS: usize = 15;
const OPERATIONS_PER_ROUND: u64 = 200;

/// The disk's latency drifts over minutes on shared machines, so the target
/// ratios come from short rounds of each measurement in turn, not from the
/// criterion runs above, which follow one another.
fn paired_rounds(
    runtime: &tokio::runtime::Runtime,
    store: &Store,
    plain: &mut File,
) -> Vec<PairedRound> {
    (0..PAIRED_ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..OPERATIONS_PER_ROUND {
                plain.write_all(&RECORD).unwrap();
                plain.sync_data().unwrap();
            }
            let fdatasync = started.elapsed().as_nanos() as f64 / OPERATIONS_PER_ROUND as f64;
            let single = runtime.block_on(concurrent_commits(store, 1, OPERATIONS_PER_ROUND));
            let at_64 = runtime.block_on(concurrent_commits(store, 64, OPERATIONS_PER_ROUND / 4));
            PairedRound {
                fdatasync,
                single_commit: single.as_nanos() as f64 / OPERATIONS_PER_ROUND as f64,
                commit_at_64: at_64.as_nanos() as f64 / (64 * OPERATIONS_PER_ROUND / 4) as f64,
            }
        })
        .collect()
}

/// Minimum, median and maximum.
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

fn print_targets(rounds: &[PairedRound], syncs: u64) {
    let per_round = |f: fn(&PairedRound) -> f64| spread(rounds.iter().map(f).collect());
    let (fd_min, fd_median, fd_max) = per_round(|r| r.fdatasync);
    let (one_min, one_median, one_max) = per_round(|r| r.single_commit);
    let (many_min, many_median, many_max) = per_round(|r| r.commit_at_64);
    // Ratios per round, so both sides of each share the disk's state.
    let (speedup_min, speedup, speedup_max) = per_round(|r| r.single_commit / r.commit_at_64);
    let (latency_min, latency, latency_max) = per_round(|r| r.single_commit / r.fdatasync);
    println!("\nstore_commit targets: {PAIRED_ROUNDS} interleaved rounds, min / median / max");
    println!(
        "  plain append + fdatasync  {:>6.1} / {:>6.1} / {:>6.1} µs",
        fd_min / 1e3,
        fd_median / 1e3,
        fd_max / 1e3
    );
    println!(
        "  1 committer               {:>6.1} / {:>6.1} / {:>6.1} µs per commit ({:.0} commits/s at the median)",
        one_min / 1e3, one_median / 1e3, one_max / 1e3, 1e9 / one_median
    );
    println!(
        "  64 committers             {:>6.1} / {:>6.1} / {:>6.1} µs per commit ({:.0} commits/s at the median)",
        many_min / 1e3, many_median / 1e3, many_max / 1e3, 1e9 / many_median
    );
    println!(
        "  group commit: 64 committers = {speedup_min:.1} / {speedup:.1} / {speedup_max:.1}× the commits/s of one (target ≥ 10×): {}",
        verdict(speedup >= 10.0)
    );
    println!(
        "  one commit = {latency_min:.2} / {latency:.2} / {latency_max:.2}× a plain fdatasync (target ≤ 1.5×): {}",
        verdict(latency <= 1.5)
    );
    println!("  flush + fdatasync rounds in the whole run: {syncs}");
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}
