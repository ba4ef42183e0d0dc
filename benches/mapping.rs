//! Importing a 1,000,000-row Shift_JIS mapping file: time and peak RSS,
//! next to a bare csv-crate parse of the same file, in the same run.
//!
//! `cargo bench --locked --bench mapping`. Three steps, each in a process
//! of its own so that each peak RSS (`VmHWM`) is that step's alone, in 3
//! interleaved rounds:
//! - `bare-parse`: read the file, count its records with the csv crate;
//! - `check`: read, decode, recognise, validate (what `mapping check` does);
//! - `import`: the daemon's path: take the file from a drop folder, read,
//!   check, write the new version to a real sled store, durable commit,
//!   move the file to `processed/` with its report.
//!
//! Targets: the import reaches ≥ 60 % of the bare parse's rows/s, with a
//! peak RSS ≤ 200 MiB. Criterion then times the in-memory parts (bare parse
//! and check of the bytes already read).

mod daemon_allocator;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use smaregi_relay::config::MappingFallback;
use smaregi_relay::mapping::check::{self, Rules};
use smaregi_relay::mapping::import::{Folders, Importer, Outcome};
use smaregi_relay::mapping::MappingStore;
use smaregi_relay::store::{Store, StoreOptions};

const ROWS: u64 = 1_000_000;
const ROUNDS: usize = 3;
const CHILD: &str = "MAPPING_BENCH_STEP";
const STEPS: [&str; 3] = ["bare-parse", "check", "import"];

fn criterion_directory() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("criterion")
}

/// The file: a Japanese header, CRLF, Shift_JIS; JAN-like 13-digit codes.
fn mapping_file() -> Vec<u8> {
    let mut text = String::with_capacity(ROWS as usize * 24);
    text.push_str("スマレジ商品ID,外部コード\r\n");
    for i in 1..=ROWS {
        text.push_str(&format!(
            "{},{:013}\r\n",
            10_000_000 + i,
            4_900_000_000_000 + i
        ));
    }
    let (bytes, _, unmappable) = encoding_rs::SHIFT_JIS.encode(&text);
    assert!(!unmappable);
    bytes.into_owned()
}

/// This process's peak resident set, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn bare_parse(bytes: &[u8]) -> u64 {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    let mut record = csv::ByteRecord::new();
    let mut rows = 0;
    while reader.read_byte_record(&mut record).unwrap() {
        rows += 1;
    }
    rows
}

/// One step, in this (child) process: prints `seconds peak_kib`.
fn child(step: &str, file: &Path) {
    let rules = Rules::default();
    match step {
        "bare-parse" => {
            let started = Instant::now();
            let bytes = std::fs::read(file).unwrap();
            assert_eq!(bare_parse(&bytes), ROWS);
            println!("{} {}", started.elapsed().as_secs_f64(), peak_rss_kib());
        }
        "check" => {
            let started = Instant::now();
            let bytes = std::fs::read(file).unwrap();
            let checked = check::check(bytes, &rules);
            assert!(checked.accepted(), "{:?}", checked.errors.first());
            assert_eq!(checked.pairs.len() as u64, ROWS);
            println!("{} {}", started.elapsed().as_secs_f64(), peak_rss_kib());
        }
        "import" => {
            let workspace = file.parent().unwrap().join("import");
            let _ = std::fs::remove_dir_all(&workspace);
            let folders = Folders::new(&workspace.join("drop"));
            folders.create().unwrap();
            std::fs::copy(file, folders.drop.join("map.csv")).unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let store = Store::open(&StoreOptions {
                    directory: workspace.join("db"),
                    // The daemon's default cache.
                    cache_capacity_bytes: 32 * 1024 * 1024,
                })
                .unwrap();
                let mapping = MappingStore::open(&store, MappingFallback::Identity).unwrap();
                let importer = Importer::new(mapping.clone(), rules, folders);
                let started = Instant::now();
                let outcome = importer.take("map.csv".as_ref()).await.unwrap();
                let took = started.elapsed();
                assert!(
                    matches!(outcome, Outcome::Imported { version: 1, .. }),
                    "{outcome:?}"
                );
                assert_eq!(mapping.current().len() as u64, ROWS);
                println!("{} {}", took.as_secs_f64(), peak_rss_kib());
                store.close().await.unwrap();
            });
            let _ = std::fs::remove_dir_all(&workspace);
        }
        other => panic!("unknown step {other}"),
    }
}

fn run_child(step: &str, file: &Path) -> (f64, u64) {
    let output = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, step)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{step}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().expect("a result line");
    let (seconds, kib) = line.split_once(' ').expect("seconds peak_kib");
    (seconds.parse().unwrap(), kib.parse().unwrap())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if let Ok(step) = std::env::var(CHILD) {
        let file = std::env::args().nth(1).expect("the file");
        child(&step, Path::new(&file));
        return;
    }
    let workspace = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = workspace.path().join("mapping-1m-sjis.csv");
    let bytes = mapping_file();
    std::fs::write(&file, &bytes).unwrap();
    println!(
        "mapping file: {ROWS} rows, {:.1} MiB, Shift_JIS, CRLF",
        bytes.len() as f64 / (1024.0 * 1024.0)
    );

    let mut results: Vec<(Vec<f64>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); STEPS.len()];
    for round in 1..=ROUNDS {
        for (i, step) in STEPS.iter().enumerate() {
            let (seconds, kib) = run_child(step, &file);
            println!(
                "round {round} {step:>10}: {seconds:7.3} s  {:>10.0} rows/s  peak RSS {:6.1} MiB",
                ROWS as f64 / seconds,
                kib as f64 / 1024.0
            );
            results[i].0.push(seconds);
            results[i].1.push(kib);
        }
    }
    let rate = |i: usize| ROWS as f64 / median(results[i].0.clone());
    let peak = |i: usize| *results[i].1.iter().max().unwrap() as f64 / 1024.0;
    println!("\nmedians of {ROUNDS} rounds (peak RSS: the largest):");
    for (i, step) in STEPS.iter().enumerate() {
        println!(
            "{step:>10}: {:>10.0} rows/s ({:5.1} % of the bare parse)  peak RSS {:6.1} MiB",
            rate(i),
            100.0 * rate(i) / rate(0),
            peak(i)
        );
    }
    let import_share = 100.0 * rate(2) / rate(0);
    println!(
        "target rows/s ≥ 60 % of the bare parse: {import_share:.1} % → {}",
        if import_share >= 60.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "target peak RSS ≤ 200 MiB: {:.1} MiB → {}\n",
        peak(2),
        if peak(2) <= 200.0 { "met" } else { "NOT met" }
    );

    let mut criterion = Criterion::default()
        .output_directory(&criterion_directory())
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .configure_from_args();
    let mut group = criterion.benchmark_group("mapping_1m_rows");
    group.throughput(Throughput::Elements(ROWS));
    group.bench_function("bare_csv_parse", |b| b.iter(|| bare_parse(&bytes)));
    let rules = Rules::default();
    group.bench_function("check", |b| {
        b.iter(|| check::check(bytes.clone(), &rules).pairs.len())
    });
    group.finish();
    criterion.final_summary();
}
