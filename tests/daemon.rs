//! The real `smaregi-relay run` process: readiness, clean shutdown, and
//! refusing to start on a bad config or store.

mod common;

use std::path::Path;

use common::{write_config, Daemon};
use smaregi_relay::exit;
use smaregi_relay::store::{Store, StoreOptions};

fn store_options(state: &Path) -> StoreOptions {
    common::store_options(&state.join("db"))
}

#[test]
fn reports_ready_then_stops_cleanly_on_sigterm() {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), "");
    let mut daemon = Daemon::start(temp.path(), &config);

    let ready = daemon.notify.wait_for("READY=1");
    assert!(ready.is_ok(), "{ready:?}; stderr: {}", daemon.stderr());
    daemon.signal(libc::SIGTERM);
    let stopping = daemon.notify.wait_for("STOPPING=1");
    assert!(
        stopping.is_ok(),
        "{stopping:?}; stderr: {}",
        daemon.stderr()
    );
    let status = daemon.wait();
    assert_eq!(status.code(), Some(0), "stderr: {}", daemon.stderr());
    assert!(
        daemon.stderr().contains("stopped cleanly"),
        "{}",
        daemon.stderr()
    );

    // The store was closed: its lock is free and it opens.
    Store::open(&store_options(&temp.path().join("state"))).unwrap();
}

/// Runs the daemon until ready, stops it, and returns its stderr.
fn stderr_of_a_run(extra_config: &str, envs: &[(&str, &str)]) -> String {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), extra_config);
    let mut daemon = Daemon::start_with_env(temp.path(), &config, envs);
    daemon.notify.wait_for("READY=1").unwrap();
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait().code(), Some(0), "{}", daemon.stderr());
    daemon.stderr()
}

#[test]
fn the_log_level_comes_from_the_config_and_rust_log_overrides_it() {
    let quiet = "[logging]\nlevel = \"warn\"\n";
    let at_info = stderr_of_a_run("", &[]);
    assert!(
        at_info.contains("INFO") && at_info.contains("ready"),
        "{at_info}"
    );
    assert!(!at_info.contains("DEBUG"), "{at_info}");

    let at_warn = stderr_of_a_run(quiet, &[]);
    assert!(!at_warn.contains("INFO"), "{at_warn}");

    let overridden = stderr_of_a_run(quiet, &[("RUST_LOG", "smaregi_relay=debug")]);
    assert!(overridden.contains("ready"), "{overridden}");
}

#[test]
fn sigint_stops_it_too() {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), "");
    let mut daemon = Daemon::start(temp.path(), &config);
    daemon.notify.wait_for("READY=1").unwrap();
    daemon.signal(libc::SIGINT);
    assert_eq!(daemon.wait().code(), Some(0), "{}", daemon.stderr());
}

#[test]
fn an_invalid_config_exits_78_naming_the_line_and_starts_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), "[outbox]\nworkers = 0\n");
    let mut daemon = Daemon::start(temp.path(), &config);
    let status = daemon.wait();
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(exit::CONFIG.into()), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:8:11: must be between 1 and 256, not 0",
            config.display()
        )),
        "{stderr}"
    );
    assert!(
        !temp.path().join("state").exists(),
        "nothing may be started or created"
    );
    assert!(daemon.notify.received().is_empty());
}

#[test]
fn a_missing_config_exits_66() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("nope.toml");
    let mut daemon = Daemon::start(temp.path(), &missing);
    let status = daemon.wait();
    assert_eq!(
        status.code(),
        Some(exit::NO_INPUT.into()),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.stderr().contains(&missing.display().to_string()));
}

#[test]
fn a_store_locked_by_another_process_stops_it_with_one_line_naming_the_path() {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), "");
    let state = temp.path().join("state");
    let holder = Store::open(&store_options(&state)).unwrap();

    let mut daemon = Daemon::start(temp.path(), &config);
    let status = daemon.wait();
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(exit::TEMP_FAIL.into()), "{stderr}");
    let error_lines: Vec<_> = stderr.lines().filter(|l| l.contains("locked")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(
        error_lines[0].contains(&state.join("db").display().to_string()),
        "{stderr}"
    );
    assert!(!daemon
        .notify
        .received()
        .iter()
        .any(|m| m.contains("READY=1")));
    drop(holder);
}

#[test]
fn a_store_of_another_schema_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let config = write_config(temp.path(), "");
    let database = temp.path().join("state/db");
    {
        let db = common::open_raw_sled(&database);
        db.open_tree("meta")
            .unwrap()
            .insert("schema-version", &7u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let mut daemon = Daemon::start(temp.path(), &config);
    let status = daemon.wait();
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(exit::DATA_ERR.into()), "{stderr}");
    assert!(stderr.contains("schema version 7"), "{stderr}");
    assert!(stderr.contains(&database.display().to_string()), "{stderr}");
}

#[test]
fn an_unwritable_state_directory_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    std::fs::write(
        temp.path().join("state"),
        "a file where the directory should be",
    )
    .unwrap();
    let config = write_config(temp.path(), "");
    let mut daemon = Daemon::start(temp.path(), &config);
    let status = daemon.wait();
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(exit::CANT_CREATE.into()), "{stderr}");
    assert!(stderr.contains("not writable"), "{stderr}");
}
