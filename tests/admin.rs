//! The admin listener of a running daemon: `/metrics` scraped and checked
//! for every family the operator relies on, `/healthz`, `/readyz`, bad
//! requests, and the staff status page rendered by headless Chromium
//! (Debian's `chromium` and `chromium-driver`, which `.ci/run` installs).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::downstream::{stock_config, Downstream};
use common::smaregi::simulator;
use common::{RunningDaemon, EVENT_DEADLINE, INTAKE_SECRET};
use serde_json::{json, Value};
use smaregi_sim::Simulator;

fn http() -> reqwest::Client {
    smaregi_sim::sender::http_client(None).unwrap()
}

/// `name{labels}` → value, for every sample line of a metrics page.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value = match value {
                "+Inf" => f64::INFINITY,
                value => value.parse().unwrap_or_else(|_| panic!("{line}")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

async fn get(url: &str) -> (u16, String) {
    let response = http().get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Sends Smaregi's stock notice for product 501 of store 1.
async fn stock_notice(relay: &RunningDaemon, secret: &str) -> u16 {
    let rows = json!([{"storeId": "1", "productId": "501"}]);
    common::smaregi::send_stock_rows(relay, rows, secret)
        .await
        .0
}

/// Polls `url` until `done` holds for its body; the daemon tells no one
/// outside when an attempt has been counted.
async fn poll(url: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let (_, body) = get(url).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "never: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn started(dir: &Path, sim: &Simulator, downstream: &Downstream) -> RunningDaemon {
    let config = stock_config(dir, sim, downstream, "", "");
    let relay = RunningDaemon::start(dir, &config);
    assert!(
        relay.admin.is_some(),
        "the STATUS= line names the status page"
    );
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_report_what_happened() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let relay = started(temp.path(), &sim, &downstream).await;
    let admin = relay.admin.clone().unwrap();
    assert!(admin.starts_with("http://127.0.0.1:"), "{admin}");

    assert_eq!(get(&format!("{admin}healthz")).await, (200, "ok\n".into()));
    assert_eq!(
        get(&format!("{admin}readyz")).await,
        (200, "ready\n".into())
    );

    sim.with_contract(|c| c.set_stock("1", "501", 4, 1));
    assert_eq!(stock_notice(&relay, INTAKE_SECRET).await, 200);
    assert_eq!(stock_notice(&relay, "wrong-secret-0123456789").await, 401);
    let mut log = downstream.log.clone();
    tokio::time::timeout(EVENT_DEADLINE, log.wait_for(|l| l.batches > 0))
        .await
        .unwrap()
        .unwrap();

    let push_succeeded =
        r#"smaregi_relay_outbox_attempts_total{kind="stock.push",outcome="success"} 1"#;
    // The engine counts the attempt before it marks the job done, and a
    // scrape reads the job counts before the counters: wait for both.
    let push_done = r#"smaregi_relay_outbox_jobs{state="done",kind="stock.push"} 1"#;
    let page = poll(&format!("{admin}metrics"), |page| {
        page.contains(push_succeeded) && page.contains(push_done)
    })
    .await;
    let samples = samples(&page);
    let value = |series: &str| -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{page}"))
    };
    assert_eq!(
        value(r#"smaregi_relay_notifications_accepted_total{route="notify",outcome="stored"}"#),
        1.0
    );
    assert_eq!(
        value(r#"smaregi_relay_notifications_refused_total{route="notify",reason="unauthorized"}"#),
        1.0
    );
    // At least the notice's commit and the jobs' own.
    assert!(value("smaregi_relay_commit_latency_seconds_count") >= 3.0);
    assert_eq!(
        value(r#"smaregi_relay_commit_latency_seconds_bucket{le="+Inf"}"#),
        value("smaregi_relay_commit_latency_seconds_count")
    );
    assert_eq!(
        value(r#"smaregi_relay_outbox_attempts_total{kind="stock.refresh",outcome="success"}"#),
        1.0
    );
    assert_eq!(
        value(r#"smaregi_relay_outbox_jobs{state="done",kind="stock.push"}"#),
        1.0
    );
    assert_eq!(value("smaregi_relay_outbox_parked_jobs"), 0.0);
    assert_eq!(
        value("smaregi_relay_outbox_oldest_pending_age_seconds"),
        0.0
    );
    assert!(value("smaregi_relay_store_size_bytes") > 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // rcgen's self-signed certificates are valid for years.
    assert!(value("smaregi_relay_certificate_expiry_timestamp_seconds") > now + 365.0 * 86_400.0);
    let last = value("smaregi_relay_last_notification_timestamp_seconds");
    assert!((now - last).abs() < 600.0, "{last} vs {now}");
    assert_eq!(value("smaregi_relay_health"), 0.0);
    for family in [
        "smaregi_relay_disk_free_bytes",
        "smaregi_relay_mapping_version",
        "smaregi_relay_uptime_seconds",
    ] {
        value(family);
    }
    assert!(page.contains("# TYPE smaregi_relay_commit_latency_seconds histogram"));

    let status: Value = serde_json::from_str(&get(&format!("{admin}status.json")).await.1).unwrap();
    assert_eq!(status["light"], "green", "{status}");

    // Wrong paths and methods get their status and a readable body.
    let (code, body) = get(&format!("{admin}nope")).await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    let response = http().post(format!("{admin}metrics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    // The daemon keeps serving.
    assert_eq!(get(&format!("{admin}healthz")).await.0, 200);
    sim.stop().await;
}

/// Sends `body` as JSON; the answer's JSON.
async fn send_json(request: reqwest::RequestBuilder, body: &Value) -> Value {
    let text = request
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A WebDriver session with Debian's chromium, through chromedriver.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start(profile: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group: Drop ends chromedriver and the browsers
        // it started together, even when the test fails half-way.
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian packages chromium and chromium-driver; .ci/run installs them)");
        let base = format!("http://127.0.0.1:{port}");
        let http = http();
        let deadline = Instant::now() + EVENT_DEADLINE;
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // As a phone sees it; flags per the machine's notes: no sandbox as
        // root, and no background connections the closed network refuses.
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=390,844",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let answer = send_json(http.post(format!("{base}/session")), &capabilities).await;
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_owned();
        Self {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let request = self.http.request(method.clone(), url);
        let answer = if method == reqwest::Method::GET {
            let text = request.send().await.unwrap().text().await.unwrap();
            serde_json::from_str(&text).unwrap()
        } else {
            send_json(request, &body).await
        };
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self
            .command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 PNG"))
            .unwrap()
    }
}

impl Browser {
    /// Ends the session: chromedriver closes the browser.
    async fn quit(&self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = -(self.driver.id() as libc::pid_t);
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_parked_job_in_chromium() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let relay = started(temp.path(), &sim, &downstream).await;
    let admin = relay.admin.clone().unwrap();

    // The EC side refuses the batch: the push job parks.
    downstream.answer(400);
    sim.with_contract(|c| c.set_stock("1", "501", 4, 1));
    assert_eq!(stock_notice(&relay, INTAKE_SECRET).await, 200);
    let status = poll(&format!("{admin}status.json"), |body| {
        serde_json::from_str::<Value>(body).is_ok_and(|s| s["snapshot"]["parked"] == 1)
    })
    .await;
    let status: Value = serde_json::from_str(&status).unwrap();
    let job = status["snapshot"]["parked_jobs"][0]["id"].as_u64().unwrap();
    assert_eq!(status["light"], "red");
    // systemd hears of it, and the log names the event.
    relay
        .daemon
        .notify
        .wait_for_containing("red (1 problem: outbox.job_parked)")
        .unwrap();
    let log = relay.daemon.stderr();
    assert!(
        log.contains("ERROR") && log.contains("event=\"outbox.job_parked\""),
        "{log}"
    );

    let browser = Browser::start(&temp.path().join("chromium")).await;
    browser.open(&admin).await;
    let page = browser
        .script(&format!(
            "return {{
                light: document.getElementById('light').dataset.light,
                headline: document.getElementById('light').innerText,
                text: document.body.innerText,
                parked: document.querySelector('[data-job=\"{job}\"]') !== null,
                attention: document.querySelectorAll('#attention li').length,
                lang: document.documentElement.lang,
                overflows: document.documentElement.scrollWidth > window.innerWidth,
                width: window.innerWidth
            }};"
        ))
        .await;
    assert_eq!(page["light"], "red", "{page}");
    assert!(
        page["headline"]
            .as_str()
            .unwrap()
            .starts_with("対応が必要です"),
        "{page}"
    );
    assert_eq!(page["parked"], true, "{page}");
    assert!(page["attention"].as_u64().unwrap() >= 1, "{page}");
    let text = page["text"].as_str().unwrap();
    assert!(text.contains("ECに受け付けられなかった在庫"), "{text}");
    assert!(text.contains("400"), "the downstream's answer: {text}");
    assert!(text.contains(&format!("outbox retry {job}")), "{text}");
    assert_eq!(page["lang"], "ja");
    assert_eq!(
        page["overflows"], false,
        "readable on a {} px phone",
        page["width"]
    );

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("status-page-parked.png"), &png).unwrap();

    // Fixed and retried: the page turns green.
    downstream.answer(200);
    let (code, _, stderr) = common::run_relay(
        &[
            "outbox",
            "retry",
            &job.to_string(),
            "--config",
            temp.path().join("config.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    poll(&format!("{admin}status.json"), |body| {
        serde_json::from_str::<Value>(body).is_ok_and(|s| s["light"] == "green")
    })
    .await;
    browser.open(&admin).await;
    let light = browser
        .script("return document.getElementById('light').dataset.light;")
        .await;
    assert_eq!(light, "green");
    browser.quit().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_lan_the_page_is_https_and_asks_for_the_token() {
    const TOKEN: &str = "status-0123456789abcdef";
    let temp = tempfile::tempdir().unwrap();
    common::write_file(temp.path(), "status-token", TOKEN, 0o600);
    let config = common::write_config(
        temp.path(),
        "[admin]\ncontrol-socket = \"control.sock\"\nlisten = \"0.0.0.0:0\"\n\
         status-token = { file = \"status-token\" }\n",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    let admin = relay.admin.clone().unwrap();
    let port = admin
        .strip_prefix("https://0.0.0.0:")
        .unwrap_or_else(|| panic!("{admin}"))
        .trim_end_matches('/');
    let https = smaregi_sim::sender::http_client(Some(&relay.certificate())).unwrap();
    let base = format!("https://localhost:{port}");
    let status = |url: String| {
        let https = https.clone();
        async move { https.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(format!("{base}/healthz")).await, 200);
    assert_eq!(status(format!("{base}/")).await, 401);
    assert_eq!(status(format!("{base}/metrics?token=wrong")).await, 401);
    assert_eq!(status(format!("{base}/?token={TOKEN}")).await, 200);
    let metrics = https
        .get(format!("{base}/metrics"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    // Plain HTTP to it gets no page.
    assert!(http()
        .get(format!("http://127.0.0.1:{port}/?token={TOKEN}"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_reaches_the_alert_webhook_as_a_digest() {
    use common::alerts::{WebhookReceiver, WEBHOOK_SECRET};
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start(temp.path()).await;
    common::write_file(temp.path(), "alerts-secret", WEBHOOK_SECRET, 0o600);
    let alerts = format!(
        "\n[alerts]\ngrace-seconds = 0\n\n[alerts.webhook]\nurl = \"{}\"\n\
         secret = {{ file = \"alerts-secret\" }}\nca-file = \"{}\"\n",
        receiver.url(),
        receiver.certificate.display()
    );
    let config = stock_config(temp.path(), &sim, &downstream, "", &alerts);
    let relay = RunningDaemon::start(temp.path(), &config);

    downstream.answer(400);
    sim.with_contract(|c| c.set_stock("1", "501", 4, 1));
    assert_eq!(stock_notice(&relay, INTAKE_SECRET).await, 200);
    let log = tokio::time::timeout(
        EVENT_DEADLINE,
        receiver.wait_for(|log| !log.digests.is_empty()),
    )
    .await
    .expect("a digest within the deadline");
    assert_eq!(log.bad_signatures, 0);
    let digest = &log.digests[0];
    let raised = digest["raised"].as_array().unwrap();
    assert!(
        raised
            .iter()
            .any(|alert| alert["event"] == "outbox.job_parked" && alert["severity"] == "critical"),
        "{digest}"
    );
    assert!(
        raised[0]["japanese"]
            .as_str()
            .unwrap()
            .contains("止まっています"),
        "{digest}"
    );
    sim.stop().await;
}
