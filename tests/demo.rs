//! `smaregi-relay demo --exit-when-done`: the real binary runs the whole
//! story non-interactively, and what it prints adds up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use smaregi_relay::demo::setup::{self, PRODUCTS};

/// The demo takes a few seconds; a minute means it hangs.
const DEADLINE: Duration = Duration::from_secs(60);

fn spawn_demo(args: &[&str]) -> Child {
    Command::new(common::relay_binary())
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the binary with `args`; its exit code, stdout and stderr.
fn run_demo(args: &[&str]) -> (i32, String, String) {
    let mut child = spawn_demo(args);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (exited, exit) = mpsc::channel();
    let pid = child.id() as libc::pid_t;
    std::thread::spawn(move || {
        let mut out = String::new();
        let mut err = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        let _ = exited.send((child.wait().unwrap(), out, err));
    });
    match exit.recv_timeout(DEADLINE) {
        Ok((status, out, err)) => (status.code().unwrap_or(-1), out, err),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("demo did not finish within {DEADLINE:?}");
        }
    }
}

/// The line of `stdout` that contains `needle`.
fn line<'a>(stdout: &'a str, needle: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
}

/// The number right after `word` (and a space) in `text`.
fn number_after(text: &str, word: &str) -> u64 {
    let at = text
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {text:?}"));
    let digits: String = text[at + word.len()..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {word:?} in {text:?}"))
}

/// `CODE = N` values of the forwarded lines between two step marks.
fn forwarded(stdout: &str, from: &str, to: &str) -> BTreeMap<String, Vec<i64>> {
    let start = stdout.find(from).unwrap();
    let end = stdout.find(to).unwrap();
    let mut values: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in stdout[start..end].lines() {
        let Some(rest) = line.split("forwarded: ").nth(1) else {
            continue;
        };
        let (code, rest) = rest.split_once(" = ").unwrap();
        let value = rest.split_whitespace().next().unwrap().parse().unwrap();
        values.entry(code.to_owned()).or_default().push(value);
    }
    values
}

#[test]
fn the_demo_runs_its_story_to_the_end_and_the_numbers_add_up() {
    let (code, stdout, stderr) = run_demo(&["--exit-when-done"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for step in 1..=11 {
        assert!(
            stdout.contains(&format!("✔ {step}. ")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains('✘'), "{stdout}");

    // 2: the mapping, 3 products.
    let mapping = line(&stdout, "✔ 2. ");
    assert!(
        mapping.contains(&format!("({} products, version 1)", PRODUCTS.len())),
        "{mapping}"
    );

    // 5: the EC side got each product's starting stock under its mapped code.
    let first = forwarded(&stdout, "✔ 4. ", "✔ 5. ");
    for product in &PRODUCTS {
        assert_eq!(
            first.get(product.code).and_then(|v| v.last()),
            Some(&product.stock),
            "{product:?} in {first:?}"
        );
    }

    // 6–9: every transaction id printed is a different one.
    let registered = line(&stdout, "✔ 6. ");
    let ids: Vec<u64> = registered
        .rsplit("transactions ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .split(", ")
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{registered}");
    let plain = number_after(line(&stdout, "registered: DEMO-1001"), "transaction");
    let edited_first = number_after(line(&stdout, "registered: DEMO-1002"), "transaction");
    let cancelled_first = number_after(line(&stdout, "registered: DEMO-1003"), "transaction");
    assert_eq!(
        BTreeSet::from([plain, edited_first, cancelled_first]),
        ids.iter().copied().collect()
    );

    let edit = line(&stdout, "✔ 7. ");
    assert_eq!(number_after(edit, "DEMO-1002: transaction"), edited_first);
    let edit_reversal = number_after(edit, "reversed by");
    let edited = number_after(edit, "revision 2 is transaction");

    let cancel = line(&stdout, "✔ 8. ");
    assert_eq!(
        number_after(cancel, "DEMO-1003: transaction"),
        cancelled_first
    );
    let cancel_reversal = number_after(cancel, "reversed by");

    let outage = line(&stdout, "✔ 9. ");
    let failures = number_after(outage, "DEMO-1004:");
    assert!(failures >= 2, "queued and retried: {outage}");
    let after_outage = number_after(outage, "then transaction");
    let attempts = number_after(line(&stdout, "registered: DEMO-1004"), "on attempt");
    assert_eq!(attempts, failures + 1, "{stdout}");

    let every_id = BTreeSet::from([
        plain,
        edited_first,
        cancelled_first,
        edit_reversal,
        edited,
        cancel_reversal,
        after_outage,
    ]);
    assert_eq!(every_id.len(), 7, "{every_id:?}");

    // 10: what the orders left is what the EC side got.
    let last = forwarded(&stdout, "✔ 9. ", "✔ 10. ");
    for product in &PRODUCTS {
        let left = setup::stock_after_orders(product);
        assert_eq!(
            last.get(product.code).and_then(|v| v.last()),
            Some(&left),
            "{product:?} in {last:?}"
        );
        assert!(
            line(&stdout, "✔ 10. ").contains(&format!("{} = {left}", product.code)),
            "{stdout}"
        );
    }

    // 11: the simulator's and the daemon's counts agree with the story.
    let smaregi = line(&stdout, "Smaregi (simulated): ");
    assert_eq!(
        number_after(smaregi, "Smaregi (simulated):"),
        7,
        "{smaregi}"
    );
    assert_eq!(number_after(smaregi, "transactions ("), 5, "{smaregi}");
    assert_eq!(number_after(smaregi, "sales,"), 2, "{smaregi}");
    assert_eq!(number_after(smaregi, "reversals);"), 3, "{smaregi}");
    let standing: i64 = setup::STANDING.iter().map(|o| o.total()).sum();
    assert!(
        smaregi.contains(&format!(
            "{} yen",
            smaregi_relay::demo::script::yen(standing)
        )),
        "{smaregi}"
    );
    assert!(
        number_after(smaregi, "calls,") >= failures,
        "every failed attempt was a 503: {smaregi}"
    );
    let daemon = line(&stdout, "daemon: outbox");
    assert!(daemon.contains(" 0 pending, 0 parked"), "{daemon}");
    assert_eq!(number_after(daemon, "mapping version"), 1);

    // The status page and the commands to try, then a clean stop.
    assert!(
        stdout.contains("status page"),
        "the status page line: {stdout}"
    );
    assert!(
        stdout.contains("smaregi-relay status --socket "),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("stopped cleanly"), "{stdout}");

    // The temporary folder is gone.
    let folder = line(&stdout, "folder: ")
        .split("folder: ")
        .nth(1)
        .unwrap()
        .split(" (")
        .next()
        .unwrap();
    assert!(!PathBuf::from(folder).exists(), "{folder} is left behind");
}

#[test]
fn keep_refuses_a_folder_that_is_not_empty() {
    let temp = tempfile::tempdir().unwrap();
    std::fs::write(temp.path().join("something"), "here").unwrap();
    let (code, stdout, stderr) =
        run_demo(&["--exit-when-done", "--keep", temp.path().to_str().unwrap()]);
    assert_eq!(code, 64, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("not empty"), "{stderr}");
    assert!(!stdout.contains('✔'), "{stdout}");
}

#[test]
fn without_exit_when_done_the_daemon_answers_until_ctrl_c_then_stops_cleanly() {
    let temp = tempfile::tempdir().unwrap();
    let kept = temp.path().join("demo");
    let mut child = spawn_demo(&["--keep", kept.to_str().unwrap()]);
    let pid = child.id() as libc::pid_t;
    let (lines, line) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for text in BufReader::new(stdout).lines() {
            let Ok(text) = text else { return };
            if lines.send(text).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let next_line = |seen: &mut Vec<String>| {
        let left = deadline.saturating_duration_since(Instant::now());
        match line.recv_timeout(left) {
            Ok(text) => {
                seen.push(text.clone());
                Some(text)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the demo stalled; printed so far:\n{}", seen.join("\n"));
            }
        }
    };
    let (mut socket, mut page) = (None, None);
    loop {
        let Some(text) = next_line(&mut seen) else {
            panic!("the demo ended early:\n{}", seen.join("\n"));
        };
        if let Some(rest) = text.split("smaregi-relay status --socket ").nth(1) {
            socket = Some(rest.trim().to_owned());
        }
        if let Some(rest) = text.split("status page: http://").nth(1) {
            page = Some(rest.trim().trim_end_matches('/').to_owned());
        }
        if text.contains("press Ctrl-C to stop") {
            break;
        }
    }

    // The command it suggests reaches the daemon, which is still running.
    let socket = socket.expect("a status command is suggested");
    let (code, status, stderr) = common::run_relay(&["status", "--socket", &socket], &[]);
    assert_eq!(code, 0, "{status}{stderr}");
    // Not "all well": the light also judges the machine (e.g. its disk).
    assert!(status.contains("outbox: 0 pending, 0 parked"), "{status}");
    assert!(status.contains("mapping version: 1"), "{status}");

    // So does the status page, plain HTTP on loopback.
    let page = page.expect("the status page's address is printed");
    let mut http = std::net::TcpStream::connect(&page).unwrap();
    std::io::Write::write_all(&mut http, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");

    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    while next_line(&mut seen).is_some() {}
    let status = common::wait_with_deadline(&mut child);
    assert_eq!(status.code(), Some(0), "{}", seen.join("\n"));
    assert_eq!(
        seen.last().map(String::as_str),
        Some("停止しました / stopped cleanly")
    );

    // --keep: the folder stays, with the daemon's log (not the terminal's)
    // and a config only its owner may read, which holds secrets.
    let log = std::fs::read_to_string(kept.join("relay.log")).unwrap();
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!seen.iter().any(|line| line.contains(" INFO ")), "{seen:?}");
    let mode = std::fs::metadata(kept.join("config.toml"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}

#[test]
fn a_step_it_cannot_confirm_fails_the_demo_and_keeps_the_folder_for_a_look() {
    // A control socket path longer than a Unix socket address can hold:
    // the daemon runs, but without its control socket.
    let temp = tempfile::tempdir().unwrap();
    let kept = temp.path().join("x".repeat(110));
    let (code, stdout, stderr) = run_demo(&["--exit-when-done", "--keep", kept.to_str().unwrap()]);
    assert_eq!(code, 70, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("✘ 1. ") && stderr.contains("control socket"),
        "{stderr}"
    );
    assert!(!stdout.contains("✔ 1. "), "{stdout}");
    assert!(stderr.contains("kept the demo folder"), "{stderr}");
    assert!(kept.join("relay.log").exists());
}
