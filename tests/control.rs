//! The operator commands against a running daemon, over its control
//! socket: `status`, `outbox list|show|retry|discard`, `pause`, `resume`,
//! and what the socket does with garbage.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::downstream::{stock_config, Downstream};
use common::smaregi::simulator;
use common::{run_relay, RunningDaemon};
use serde_json::Value;

/// Runs an operator command with the test's config; (code, stdout, stderr).
fn relay(config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    run_relay(&all, &[])
}

fn relay_json(config: &Path, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = relay(config, &all);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_fix_a_parked_job_and_pause_delivery() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay_daemon = RunningDaemon::start(temp.path(), &config);

    let status = relay_json(&config, &["status"]);
    assert_eq!(status["outbox"]["parked"], 0);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let (code, human, _) = relay(&config, &["status"]);
    assert_eq!(code, 0);
    assert!(human.contains("正常 (all well)"), "{human}");

    // The EC side refuses a stock batch: the push job parks.
    downstream.answer(400);
    sim.with_contract(|c| c.set_stock("1", "501", 4, 1));
    common::smaregi::notify_stock_of(&relay_daemon, "501").await;
    let mut log = downstream.log.clone();
    tokio::time::timeout(common::EVENT_DEADLINE, log.wait_for(|l| l.refused > 0))
        .await
        .unwrap()
        .unwrap();
    // Parking is recorded just after the refusal; nothing outside the
    // daemon can be told, so poll, with a deadline.
    let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
    let parked = loop {
        let list = relay_json(&config, &["outbox", "list", "--state", "parked"]);
        if let Some(job) = list.as_array().unwrap().first() {
            break job.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the push never parked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(parked["kind"], "stock.push-held");
    let id = parked["id"].as_u64().unwrap().to_string();
    let shown = relay_json(&config, &["outbox", "show", &id]);
    assert!(
        shown["last-error"]["message"]
            .as_str()
            .unwrap()
            .contains("400"),
        "{shown}"
    );
    let (_, human, _) = relay(&config, &["status"]);
    assert!(human.contains("要対応 (needs attention)"), "{human}");
    assert!(human.contains("blocked: stock-push"), "{human}");

    // A discard needs --yes; without it nothing changes.
    let (code, _, stderr) = relay(&config, &["outbox", "discard", &id, "--reason", "test"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(
        relay_json(&config, &["outbox", "show", &id])["state"],
        "parked"
    );
    // Retry after the EC side is fixed: delivered.
    downstream.answer(200);
    assert_eq!(relay(&config, &["outbox", "retry", &id]).0, 0);
    let mut log = downstream.log.clone();
    tokio::time::timeout(common::EVENT_DEADLINE, log.wait_for(|l| l.batches > 0))
        .await
        .unwrap()
        .unwrap();
    // Unknown jobs: exit 1 with the reason.
    let (code, _, stderr) = relay(&config, &["outbox", "retry", "999999999"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no job 999999999"), "{stderr}");

    // 停止 and 稼働.
    assert_eq!(
        relay(&config, &["pause", "smaregi", "--reason", "棚卸中"]).0,
        0
    );
    let status = relay_json(&config, &["status"]);
    assert_eq!(status["outbox"]["paused"]["smaregi"]["reason"], "棚卸中");
    assert_eq!(relay(&config, &["pause", "nowhere"]).0, 1);
    let (code, _, stderr) = relay(&config, &["resume", "smaregii"]);
    assert_eq!(code, 1, "a typo resumes nothing: {stderr}");
    assert!(stderr.contains("no upstream \"smaregii\""), "{stderr}");
    assert_eq!(
        relay_json(&config, &["status"])["outbox"]["paused"]["smaregi"]["reason"],
        "棚卸中"
    );
    assert_eq!(relay(&config, &["resume"]).0, 0);
    assert!(relay_json(&config, &["status"])["outbox"]["paused"]
        .as_object()
        .unwrap()
        .is_empty());

    // Garbage and a huge frame on the socket: refused, daemon unaffected.
    let socket = temp.path().join("control.sock");
    for garbage in [b"hello\n".to_vec(), vec![b'x'; 200_000]] {
        let mut stream = UnixStream::connect(&socket).unwrap();
        let _ = stream.write_all(&garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.contains("bad-request"), "{answer}");
    }
    assert_eq!(relay(&config, &["status"]).0, 0);

    assert!(relay_daemon.stop().success());
    let (code, _, stderr) = relay(&config, &["status"]);
    assert_eq!(code, 69, "a stopped daemon: {stderr}");
    assert!(stderr.contains("cannot reach the daemon"), "{stderr}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_status_lookup_history_and_rollback() {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let relay_daemon = RunningDaemon::start(temp.path(), &config);
    let drop = relay_daemon.state.join("drop");
    let import = |name: &str, body: &str| {
        let staged = temp.path().join(name);
        std::fs::write(&staged, body).unwrap();
        std::fs::rename(&staged, drop.join(name)).unwrap();
    };
    // Imports are recorded by the daemon alone: poll, with a deadline.
    let wait_for_version = |version: u64| {
        let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
        loop {
            let status = relay_json(&config, &["mapping", "status"]);
            if status["version"] == version {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "{status}");
            std::thread::yield_now();
        }
    };

    assert_eq!(relay_json(&config, &["mapping", "status"])["version"], 0);
    import("first.csv", "smaregi-id,external-code\n8000001,TEA-500\n");
    let status = wait_for_version(1);
    assert_eq!(status["current"]["entries"], 1);
    let found = relay_json(
        &config,
        &["mapping", "lookup", "--external-code", "TEA-500"],
    );
    assert_eq!(found["smaregi_id"], "8000001");
    let found = relay_json(&config, &["mapping", "lookup", "--smaregi-id", "8000001"]);
    assert_eq!(found["external_code"], "TEA-500");

    import("second.csv", "smaregi-id,external-code\n8000002,TEA-500\n");
    wait_for_version(2);
    assert_eq!(
        relay_json(&config, &["mapping", "history"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(relay(&config, &["mapping", "rollback", "1"]).0, 0);
    let found = relay_json(
        &config,
        &["mapping", "lookup", "--external-code", "TEA-500"],
    );
    assert_eq!(found["smaregi_id"], "8000001", "version 1 again");
    let (code, _, stderr) = relay(&config, &["mapping", "rollback", "99"]);
    assert_eq!(code, 1, "{stderr}");
    let (code, _, _) = relay(&config, &["mapping", "lookup", "--external-code", "NOPE"]);
    assert_eq!(code, 1);

    // A rejected file shows in `status`, and still does after a restart.
    import(
        "broken.csv",
        "smaregi-id,external-code\nnot-a-number,TEA-500\n",
    );
    let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
    let rejected = loop {
        let status = relay_json(&config, &["status"]);
        if status["last_import"]["result"] == "rejected" {
            break status["last_import"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::yield_now();
    };
    assert_eq!(rejected["file"], "broken.csv", "{rejected}");
    assert!(rejected["errors"].as_u64().unwrap() >= 1, "{rejected}");
    assert!(relay_daemon.stop().success());
    std::fs::remove_file(temp.path().join("notify.sock")).unwrap();
    let relay_daemon = RunningDaemon::start(temp.path(), &config);
    let status = relay_json(&config, &["status"]);
    assert_eq!(status["last_import"]["result"], "rejected", "{status}");
    assert_eq!(status["last_import"]["file"], "broken.csv");
    assert_eq!(status["last_import"]["errors"], rejected["errors"]);
    assert!(relay_daemon.stop().success());
}

/// Runs an operator command as `uid`:`gid` on `socket` (the config,
/// 0640 root, is not theirs to read); (code, stdout, stderr).
fn relay_as(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let output = std::process::Command::new(common::relay_binary())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_are_audited_retry_all_parked_and_outsiders_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    // Others may traverse the folder: the socket's own mode decides.
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay_daemon = RunningDaemon::start(temp.path(), &config);
    let socket = temp.path().join("control.sock");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o660
    );

    // Tests run as root; uid 65534 (nobody) is outside the socket's group,
    // and gets a clear message and exit 77, the daemon unaffected.
    if unsafe { libc::geteuid() } == 0 {
        let (code, _, stderr) = relay_as(65534, 65534, &socket, &["status"]);
        assert_eq!(code, 77, "{stderr}");
        assert!(stderr.contains("group smaregi-relay"), "{stderr}");
        // A member of the socket's group (here root's group 0) may.
        let (code, stdout, stderr) = relay_as(65534, 0, &socket, &["status", "--json"]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("\"version\""), "{stdout}");
    }

    // The EC side refuses stock: the push parks.
    downstream.answer(400);
    let notice = |product: &'static str| {
        sim.with_contract(|c| c.set_stock("1", product, 4, 1));
        common::smaregi::notify_stock_of(&relay_daemon, product)
    };
    let parked_ids = || -> Vec<u64> {
        relay_json(&config, &["outbox", "list", "--state", "parked"])
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["id"].as_u64().unwrap())
            .collect()
    };
    let wait_parked = || async {
        let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
        loop {
            let ids = parked_ids();
            if !ids.is_empty() {
                return ids;
            }
            assert!(std::time::Instant::now() < deadline, "nothing parked");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    notice("501").await;
    let first = wait_parked().await[0].to_string();

    // Discarded with --yes: audited with the operator's reason and uid.
    let (code, _, stderr) = relay(
        &config,
        &[
            "outbox",
            "discard",
            &first,
            "--reason",
            "EC側で手入力済み",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let shown = relay_json(&config, &["outbox", "show", &first]);
    assert_eq!(shown["state"], "discarded", "{shown}");
    assert_eq!(relay_json(&config, &["status"])["outbox"]["discarded"], 1);
    let log = relay_daemon.daemon.stderr();
    assert!(
        log.contains("operator command") && log.contains("uid 0") && log.contains("OutboxDiscard"),
        "{log}"
    );

    // The next refusal parks too; --all-parked retries it once the EC side is fixed.
    notice("502").await;
    wait_parked().await;
    downstream.answer(200);
    let retried = relay_json(&config, &["outbox", "retry", "--all-parked"]);
    assert!(retried["retried"].as_u64().unwrap() >= 1, "{retried}");
    let mut log = downstream.log.clone();
    tokio::time::timeout(common::EVENT_DEADLINE, log.wait_for(|l| l.batches > 0))
        .await
        .unwrap()
        .unwrap();
    assert!(parked_ids().is_empty());
    sim.stop().await;
}
