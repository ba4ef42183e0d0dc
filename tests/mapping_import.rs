//! Mapping files through the real binary: `mapping check`, and the daemon
//! taking files from its drop folder (real files, real sled, SIGKILL).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smaregi_relay::config::MappingFallback;
use smaregi_relay::mapping::MappingStore;
use smaregi_relay::store::Store;

mod common;
use common::{run_relay, write_config, RunningDaemon, EVENT_DEADLINE};

const MAPPING_CONFIG: &str = "[mapping]\nsettle-milliseconds = 200\nrescan-interval-seconds = 60\n";

fn sjis(text: &str) -> Vec<u8> {
    let (bytes, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
    assert!(!unmappable);
    bytes.into_owned()
}

/// Polls `condition` until it holds; fails the test after the deadline.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENT_DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What staff see in `dir`: names, sorted, without hidden (dot) files.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The mapping as the daemon left it (it must have stopped).
fn stored_mapping(state: &Path) -> (u64, Vec<(String, String)>) {
    let store = Store::open(&common::store_options(&state.join("db"))).unwrap();
    let mapping = MappingStore::open(&store, MappingFallback::None).unwrap();
    let current = mapping.current();
    let mut pairs: Vec<(String, String)> = current
        .pairs()
        .map(|(code, id)| (code.to_owned(), id.to_string()))
        .collect();
    pairs.sort();
    (current.version(), pairs)
}

struct Setup {
    _temp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    drop: PathBuf,
}

fn setup(extra: &str) -> Setup {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = temp.path().to_path_buf();
    let config = write_config(&dir, extra);
    let drop = dir.join("state/drop");
    Setup {
        _temp: temp,
        dir,
        config,
        drop,
    }
}

/// Writes a file beside the drop folder and renames it in, as a finished copy.
fn drop_file(drop: &Path, name: &str, bytes: &[u8]) {
    let staging = drop.parent().unwrap().join(format!("staging-{name}"));
    fs::write(&staging, bytes).unwrap();
    fs::rename(&staging, drop.join(name)).unwrap();
}

#[test]
fn mapping_check_reports_without_a_daemon_or_a_store() {
    let temp = tempfile::tempdir().unwrap();
    let good = temp.path().join("good.csv");
    fs::write(
        &good,
        sjis("スマレジ商品ID,外部コード\r\n101,A-1\r\n102,B-2\r\n"),
    )
    .unwrap();
    let (code, stdout, _) = run_relay(&["mapping", "check", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("取り込めます / would be imported"),
        "{stdout}"
    );
    assert!(stdout.contains("Shift_JIS"), "{stdout}");

    let bad = temp.path().join("bad.csv");
    fs::write(&bad, "smaregi-id,external-code\n1,4.90123E+12\n").unwrap();
    let (code, stdout, _) = run_relay(&["mapping", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("2行目 B列「external-code」 値「4.90123E+12」"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 2, column B (external-code)"),
        "{stdout}"
    );

    let missing = temp.path().join("missing.csv");
    let (code, _, stderr) = run_relay(&["mapping", "check", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 66, "{stderr}");
    let (code, _, _) = run_relay(&["mapping", "check", temp.path().to_str().unwrap()], &[]);
    assert_eq!(code, 66);

    // Limits come from a config when one is named.
    let config = write_config(temp.path(), "[mapping]\nmax-rows = 1\n");
    let (code, stdout, _) = run_relay(
        &[
            "mapping",
            "check",
            "--config",
            config.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("1 行"), "{stdout}");
    // Nothing was created next to the file or in the config's state directory.
    assert!(!temp.path().join("state").exists());
}

#[test]
fn the_daemon_imports_good_files_and_rejects_bad_ones_with_reports() {
    let s = setup(MAPPING_CONFIG);
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    drop_file(
        &s.drop,
        "map.csv",
        &sjis("スマレジ商品ID,外部コード\r\n101,A-1\r\n102,B-2\r\n"),
    );
    let processed = s.drop.join("processed");
    wait_until("the file is processed", || names(&processed).len() == 2);
    let reports: Vec<String> = names(&processed);
    assert!(reports[0].ends_with("-map.csv"), "{reports:?}");
    assert_eq!(reports[1], format!("{}.report.txt", reports[0]));
    let report = fs::read_to_string(processed.join(&reports[1])).unwrap();
    assert!(report.contains("バージョン 1"), "{report}");
    let all = fs::read_dir(&processed).unwrap().count();
    assert_eq!(all, 2, "no partial report is left behind");

    drop_file(
        &s.drop,
        "broken.csv",
        b"smaregi-id,external-code\n101,A-1 \n",
    );
    let rejected = s.drop.join("rejected");
    wait_until("the file is rejected", || names(&rejected).len() == 2);
    assert_eq!(names(&rejected), ["broken.csv", "broken.csv.report.txt"]);
    let report = fs::read_to_string(rejected.join("broken.csv.report.txt")).unwrap();
    assert!(
        report.contains("2行目 B列「external-code」 値「A-1 」"),
        "{report}"
    );

    assert!(daemon.stop().success());
    let (version, pairs) = stored_mapping(&s.dir.join("state"));
    assert_eq!(version, 1);
    assert_eq!(
        pairs,
        [("A-1".into(), "101".into()), ("B-2".into(), "102".into())]
    );
}

#[test]
fn folders_staff_deleted_are_made_again_and_no_file_is_stranded() {
    let s = setup(MAPPING_CONFIG);
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    let (processed, rejected) = (s.drop.join("processed"), s.drop.join("rejected"));
    wait_until("the daemon made its folders", || rejected.is_dir());
    for folder in [".work", "processed", "rejected"] {
        fs::remove_dir_all(s.drop.join(folder)).unwrap();
    }

    drop_file(
        &s.drop,
        "broken.csv",
        b"smaregi-id,external-code\n101,A-1 \n",
    );
    wait_until("the file is rejected", || names(&rejected).len() == 2);
    assert_eq!(names(&rejected), ["broken.csv", "broken.csv.report.txt"]);
    drop_file(&s.drop, "map.csv", b"smaregi-id,external-code\n101,A-1\n");
    wait_until("the file is processed", || names(&processed).len() == 2);
    assert_eq!(
        names(&s.drop),
        ["processed", "rejected"],
        "nothing left behind"
    );
    assert!(names(&s.drop.join(".work")).is_empty(), "nothing stranded");

    assert!(daemon.stop().success());
    let (version, pairs) = stored_mapping(&s.dir.join("state"));
    assert_eq!((version, pairs), (1, vec![("A-1".into(), "101".into())]));
}

#[test]
fn the_polling_watcher_takes_files_too() {
    let s = setup(
        "[mapping]\nwatch = \"poll\"\npoll-interval-seconds = 1\nsettle-milliseconds = 200\n",
    );
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice("スマレジ商品ID,外部コード\n5,E-5\n".as_bytes());
    drop_file(&s.drop, "polled.csv", &bom);
    let processed = s.drop.join("processed");
    wait_until("the first file is processed", || {
        names(&processed).len() == 2
    });
    // The start-up rescan is over. Written in place, not renamed in: only polling and the settle time see it complete.
    fs::write(
        s.drop.join("in-place.csv"),
        "smaregi-id,external-code\n6,F-6\n",
    )
    .unwrap();
    let processed = s.drop.join("processed");
    wait_until("both files are processed", || names(&processed).len() == 4);
    assert!(daemon.stop().success());
    let (version, pairs) = stored_mapping(&s.dir.join("state"));
    assert_eq!(version, 2);
    assert_eq!(pairs.len(), 1, "{pairs:?}");
}

#[test]
fn a_file_copied_in_slowly_is_imported_once_and_complete() {
    // The pauses between chunks are far shorter than the settle time, so
    // that a stalled writer on a loaded machine is still "copying".
    let s = setup("[mapping]\nsettle-milliseconds = 5000\n");
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    let rows: Vec<String> = (1..=2000).map(|i| format!("{i},CODE-{i}\n")).collect();
    let mut file = fs::File::create(s.drop.join("slow.csv")).unwrap();
    file.write_all(b"smaregi-id,external-code\n").unwrap();
    for chunk in rows.chunks(400) {
        file.write_all(chunk.concat().as_bytes()).unwrap();
        file.flush().unwrap();
        // Shorter than the settle time, as a slow network copy.
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(file);
    let processed = s.drop.join("processed");
    wait_until("the file is processed", || names(&processed).len() == 2);
    // Files are taken one at a time: once a later file has been handled,
    // a wrong second take of the slow one would have happened too.
    drop_file(&s.drop, "zz-marker.csv", b"not,a,mapping\n");
    let rejected = s.drop.join("rejected");
    wait_until("the marker is handled", || names(&rejected).len() == 2);
    assert_eq!(names(&processed).len(), 2);
    assert!(
        names(&rejected)
            .iter()
            .all(|n| n.starts_with("zz-marker.csv")),
        "{:?}",
        names(&rejected)
    );
    assert!(daemon.stop().success());
    let (version, pairs) = stored_mapping(&s.dir.join("state"));
    assert_eq!(version, 1);
    assert_eq!(pairs.len(), 2000);
}

#[test]
fn a_hundred_files_at_once_are_all_processed() {
    let s = setup(MAPPING_CONFIG);
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    for i in 0..100 {
        let text = if i % 10 == 9 {
            format!("smaregi-id,external-code\n{i},bad code\n")
        } else {
            format!("smaregi-id,external-code\n{i},C{i}\n")
        };
        drop_file(&s.drop, &format!("f{i:03}.csv"), text.as_bytes());
    }
    let (processed, rejected) = (s.drop.join("processed"), s.drop.join("rejected"));
    wait_until("all 100 files are processed", || {
        names(&processed).len() + names(&rejected).len() == 200
    });
    assert_eq!(names(&rejected).len(), 20);
    assert!(names(&s.drop)
        .iter()
        .all(|n| n == "processed" || n == "rejected" || n == ".work"));
    assert!(daemon.stop().success());
    let (version, _) = stored_mapping(&s.dir.join("state"));
    assert_eq!(version, 90);
}

#[test]
fn unreadable_files_folders_and_symlinks_are_reported_and_nothing_crashes() {
    let s = setup(MAPPING_CONFIG);
    let daemon = RunningDaemon::start(&s.dir, &s.config);
    fs::create_dir(s.drop.join("a-folder")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", s.drop.join("link.csv")).unwrap();
    drop_file(&s.drop, "binary.csv", b"PK\x03\x04\x00\x00\x00");
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        drop_file(&s.drop, "secret.csv", b"smaregi-id,external-code\n1,A\n");
        fs::set_permissions(s.drop.join("secret.csv"), fs::Permissions::from_mode(0o000)).unwrap();
    }
    let rejected = s.drop.join("rejected");
    let expected = if root { 6 } else { 8 };
    wait_until("every bad entry is rejected", || {
        names(&rejected).len() == expected
    });
    let report =
        |name: &str| fs::read_to_string(rejected.join(format!("{name}.report.txt"))).unwrap();
    assert!(report("a-folder").contains("フォルダー"));
    assert!(report("link.csv").contains("symbolic link"));
    assert!(report("binary.csv").contains("not a CSV text file"));
    if !root {
        assert!(report("secret.csv").contains("could not be read"));
    }
    // Still running, still importing.
    drop_file(&s.drop, "good.csv", b"smaregi-id,external-code\n1,A\n");
    wait_until("the good file is imported", || {
        names(&s.drop.join("processed")).len() == 2
    });
    assert!(daemon.stop().success());
}

/// A file of `rows` rows mapping `CODE-<i>-<tag>` to id i.
fn large_file(rows: u64, tag: &str) -> Vec<u8> {
    let mut text = String::from("スマレジ商品ID,外部コード\r\n");
    for i in 1..=rows {
        text.push_str(&format!("{i},CODE-{i}-{tag}\r\n"));
    }
    sjis(&text)
}

#[test]
fn sigkill_during_a_large_import_leaves_the_old_or_the_new_version() {
    const ROWS: u64 = 50_000;
    // How long an uninterrupted import of the file takes here, so that the
    // kills land early, midway and late in it.
    let took = {
        let s = setup(MAPPING_CONFIG);
        let daemon = RunningDaemon::start(&s.dir, &s.config);
        drop_file(&s.drop, "new.csv", &large_file(ROWS, "new"));
        wait_until("the file is taken", || !s.drop.join("new.csv").exists());
        let taken = Instant::now();
        wait_until("the file is processed", || {
            names(&s.drop.join("processed")).len() == 2
        });
        let took = taken.elapsed();
        assert!(daemon.stop().success());
        took
    };
    eprintln!("an import of {ROWS} rows took {took:?}");
    let delays = [0.0, 0.5, 0.9, 0.97];
    for (round, fraction) in delays.into_iter().enumerate() {
        let delay_ms = (took.as_millis() as f64 * fraction) as u64;
        let s = setup(MAPPING_CONFIG);
        let state = s.dir.join("state");
        let daemon = RunningDaemon::start(&s.dir, &s.config);
        drop_file(
            &s.drop,
            "old.csv",
            b"smaregi-id,external-code\n1,OLD-1\n2,OLD-2\n",
        );
        wait_until("the old mapping is imported", || {
            names(&s.drop.join("processed")).len() == 2
        });

        drop_file(&s.drop, "new.csv", &large_file(ROWS, "new"));
        wait_until("the new file is taken", || !s.drop.join("new.csv").exists());
        std::thread::sleep(Duration::from_millis(delay_ms));
        let mut daemon = daemon.daemon;
        daemon.signal(libc::SIGKILL);
        daemon.wait();
        drop(daemon);
        fs::remove_file(s.dir.join("notify.sock")).unwrap();

        let (version, pairs) = stored_mapping(&state);
        eprintln!(
            "round {round}: killed {delay_ms} ms after the take; version {version} is current"
        );
        match version {
            1 => assert_eq!(
                pairs,
                [("OLD-1".into(), "1".into()), ("OLD-2".into(), "2".into())],
                "round {round}"
            ),
            2 => {
                assert_eq!(pairs.len() as u64, ROWS, "round {round}");
                assert!(pairs
                    .iter()
                    .all(|(code, id)| *code == format!("CODE-{id}-new")));
            }
            other => panic!("round {round}: version {other}"),
        }

        // Restarted, the daemon finishes the interrupted file.
        let daemon = RunningDaemon::start(&s.dir, &s.config);
        wait_until("the new file is processed", || {
            names(&s.drop.join("processed")).len() == 4
        });
        assert!(daemon.stop().success());
        let (version, pairs) = stored_mapping(&state);
        assert!(version == 2 || version == 3, "round {round}: {version}");
        assert_eq!(pairs.len() as u64, ROWS);
        assert!(names(&s.drop.join(".work")).is_empty());
    }
}
