//! The demo's story, step by step, against the running daemon.
//!
//! Every step acts as Smaregi, staff or the EC side would, then waits
//! for the real effect (the control socket's answer, the order API's
//! state, the simulator's data, the demo receiver's deliveries) and
//! prints `✔` only once it has seen it. A step that does not see its
//! effect within [`STEP_DEADLINE`] fails the demo with what it saw last.
//! Nothing here sleeps to let something happen: it polls real state, or
//! awaits a real event, until a deadline.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use smaregi_sim::sender::Sender;
use smaregi_sim::Simulator;
use tokio::time::Instant;
use tracing::info;

use super::receiver::{Delivery, Receiver};
use super::setup::{self, DemoOrder, Secrets, PRODUCTS, STORE_ID};
use super::DemoError;
use crate::control::Command;
use crate::daemon::Running;
use crate::smaregi::jst;

/// How long one step may take; each normally takes well under a second,
/// the outage a few.
pub const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// How often polled state is looked at again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The outage ends when the demo ends it; this only bounds it should the
/// demo stop half-way.
const OUTAGE_LIMIT: Duration = Duration::from_secs(120);
/// Failed attempts to see before the outage ends: the first failure
/// shows the order is queued, the second that it is retried.
const FAILURES_TO_SHOW: u64 = 2;

/// Writes one line to stdout. A closed stdout (`demo | head`) must not
/// stop the demo: the daemon keeps running until Ctrl-C.
pub fn say(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// A step of the story: its number and what it confirms, in Japanese and
/// in English.
#[derive(Debug, Clone, Copy)]
struct Step {
    number: u32,
    ja: &'static str,
    en: &'static str,
}

impl Step {
    const fn new(number: u32, ja: &'static str, en: &'static str) -> Self {
        Self { number, ja, en }
    }

    /// Prints the step as confirmed, with `detail` (the numbers) after it.
    fn done(&self, detail: &str) {
        info!(step = self.number, what = self.en, %detail, "demo: step confirmed");
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        say(&format!(
            "✔ {}. {} / {}{detail}",
            self.number, self.ja, self.en
        ));
    }

    fn failed(&self, detail: impl Into<String>) -> DemoError {
        DemoError::Step {
            number: self.number,
            ja: self.ja,
            en: self.en,
            detail: detail.into(),
        }
    }
}

/// Something happening within a step, indented under it.
fn event(ja: &str, en: &str, detail: &str) {
    say(&format!("   · {ja} / {en}: {detail}"));
}

/// Polls until a step's deadline; remembers what was seen last, for the
/// failure message.
struct Poll {
    step: Step,
    deadline: Instant,
    ticks: tokio::time::Interval,
    seen: String,
}

impl Poll {
    fn new(step: Step) -> Self {
        let mut ticks = tokio::time::interval(POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            step,
            deadline: Instant::now() + STEP_DEADLINE,
            ticks,
            seen: "nothing yet".into(),
        }
    }

    /// Waits for the next look; fails the step once past its deadline.
    async fn next(&mut self) -> Result<(), DemoError> {
        if Instant::now() >= self.deadline {
            return Err(self.step.failed(format!(
                "{} s で確認できませんでした / not seen within {} s; last seen: {}",
                STEP_DEADLINE.as_secs(),
                STEP_DEADLINE.as_secs(),
                self.seen
            )));
        }
        self.ticks.tick().await;
        Ok(())
    }

    fn saw(&mut self, seen: impl Into<String>) {
        self.seen = seen.into();
    }
}

/// The parts of the demo the story talks to.
pub struct Script<'a> {
    pub sim: &'a Simulator,
    pub receiver: &'a mut Receiver,
    pub secrets: &'a Secrets,
    /// The config's drop folder for mapping CSVs.
    pub drop: PathBuf,
    /// The certificate the daemon generates and serves.
    pub certificate: PathBuf,
}

/// What the story leaves for the lines printed after it.
#[derive(Debug, Clone)]
pub struct Ran {
    pub running: Running,
    pub base: String,
    pub certificate: PathBuf,
}

/// The daemon as the story reaches it, once it runs.
struct Relay {
    running: Running,
    /// `https://localhost:PORT`: a name the generated certificate holds.
    base: String,
    certificate: PathBuf,
    socket: PathBuf,
    http: reqwest::Client,
    orders_token: String,
}

impl Script<'_> {
    /// Plays the story once the daemon reports `running`.
    pub async fn run(mut self, running: Running) -> Result<Ran, DemoError> {
        let relay = self.started(running)?;
        self.mapping(&relay).await?;
        self.stock(&relay).await?;
        let registered = self.orders(&relay).await?;
        self.edit(&relay, &registered).await?;
        self.cancel(&relay, &registered).await?;
        self.outage(&relay).await?;
        self.stock_after_orders(&relay).await?;
        self.summary(&relay).await?;
        Ok(Ran {
            running: relay.running,
            base: relay.base,
            certificate: relay.certificate,
        })
    }

    fn started(&self, running: Running) -> Result<Relay, DemoError> {
        let step = Step::new(
            1,
            "模擬スマレジとデーモンを起動しました",
            "Started the simulated Smaregi and the daemon",
        );
        let certificate = self.certificate.clone();
        let Some(socket) = running.control_socket.clone() else {
            return Err(step.failed(
                "制御ソケットを開けませんでした / the control socket could not be opened (see the log)",
            ));
        };
        let http = smaregi_sim::sender::http_client(Some(&certificate))
            .map_err(|e| step.failed(format!("HTTPS client: {e}")))?;
        let base = format!("https://localhost:{}", running.intake.port());
        event(
            "受信口",
            "listener",
            &format!(
                "{base} (自己署名証明書 / self-signed certificate, SHA-256 {})",
                running.fingerprint
            ),
        );
        event("模擬スマレジ", "simulated Smaregi", &self.sim.url());
        event(
            "ECサイト（デモの受信側）",
            "EC site (the demo's receiver)",
            &self.receiver.url(),
        );
        step.done("");
        Ok(Relay {
            running,
            base,
            certificate,
            socket,
            http,
            orders_token: self.secrets.orders_token.clone(),
        })
    }

    async fn mapping(&self, relay: &Relay) -> Result<(), DemoError> {
        let step = Step::new(
            2,
            "商品マッピングCSVを取り込みました",
            "Imported the product mapping CSV",
        );
        let drop = &self.drop;
        // Written under a name the watcher leaves alone, then renamed in
        // whole, as a careful copy into the shared folder does.
        let partial = drop.join(format!("{}.part", setup::MAPPING_FILE));
        let path = drop.join(setup::MAPPING_FILE);
        std::fs::write(&partial, setup::mapping_csv())
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| step.failed(format!("{}: {e}", path.display())))?;
        event(
            "ドロップフォルダに置きました",
            "dropped into the drop folder",
            &path.display().to_string(),
        );
        let mut poll = Poll::new(step);
        let status = loop {
            poll.next().await?;
            let rejected = drop.join("rejected").join(format!(
                "{}{}",
                setup::MAPPING_FILE,
                crate::mapping::import::REPORT_SUFFIX
            ));
            if let Ok(report) = std::fs::read_to_string(&rejected) {
                return Err(step.failed(format!("rejected:\n{report}")));
            }
            let status = control(relay, Command::MappingStatus)
                .await
                .map_err(|e| step.failed(e))?;
            if status["version"].as_u64() >= Some(1) {
                break status;
            }
            poll.saw(format!("mapping status {status}"));
        };
        for product in &PRODUCTS {
            event(
                "対応",
                "maps",
                &format!(
                    "商品ID / product {} ↔ {} ({})",
                    product.smaregi_id, product.code, product.name
                ),
            );
        }
        step.done(&format!(
            "{} products, version {}",
            status["current"]["entries"], status["version"]
        ));
        Ok(())
    }

    async fn stock(&mut self, relay: &Relay) -> Result<(), DemoError> {
        let received = Step::new(
            3,
            "スマレジから在庫通知を受信し、ディスクに保存しました",
            "Received Smaregi's stock notification and stored it durably",
        );
        let now = smaregi_sim::time::now();
        self.sim.with_contract(|contract| {
            for product in &PRODUCTS {
                contract.set_stock(STORE_ID, product.smaregi_id, product.stock, now);
            }
        });
        let rows: Vec<Value> = PRODUCTS
            .iter()
            .map(|p| stock_row(p.smaregi_id, p.stock, p.stock, "01"))
            .collect();
        let answer = self
            .notify(relay, rows)
            .await
            .map_err(|e| received.failed(e))?;
        received.done(&format!(
            "stock_send, {} products, answered {answer}",
            PRODUCTS.len()
        ));

        let refreshed = Step::new(
            4,
            "スマレジから最新の在庫を読み直しました",
            "Refreshed the stock from Smaregi",
        );
        let mut poll = Poll::new(refreshed);
        let jobs = loop {
            poll.next().await?;
            let jobs = done_jobs(relay, crate::stock::book::REFRESH_KIND)
                .await
                .map_err(|e| refreshed.failed(e))?;
            if !jobs.is_empty() {
                break jobs;
            }
            poll.saw("no stock.refresh job done yet");
        };
        refreshed.done(&format!(
            "stock_ref, job {}",
            jobs.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));

        let forwarded = Step::new(
            5,
            "在庫をECサイトへ転送しました（署名を確認済み）",
            "Forwarded the stock to the EC site, signature verified",
        );
        let expected: BTreeMap<&str, i64> =
            PRODUCTS.iter().map(|p| (p.smaregi_id, p.stock)).collect();
        let batches = self.forwarded(forwarded, &expected).await?;
        forwarded.done(&signed_batches(batches));
        Ok(())
    }

    /// Sends a `stock_send` of `rows` as Smaregi's API送信 does; the answer.
    async fn notify(&self, relay: &Relay, rows: Vec<Value>) -> Result<String, String> {
        let sender = Sender::new(Some(&relay.certificate)).map_err(|e| e.to_string())?;
        let count = rows.len();
        let params = json!({"data": [{"table_name": "Stock", "rows": rows}]});
        let url = format!("{}/smaregi/notify", relay.base);
        let secret = ("relay_secret".to_owned(), self.secrets.intake.clone());
        let (status, body) = sender
            .send(&url, "stock_send", &params, &[secret])
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        if status != 200 {
            return Err(format!("POST {url}: answered {status}: {body}"));
        }
        event(
            "受信",
            "received",
            &format!("stock_send ({count} rows) → HTTP {status} {}", body.trim()),
        );
        Ok(format!("HTTP {status}"))
    }

    /// Waits until the EC side holds `expected` (Smaregi product id →
    /// stock) for the demo store, printing each value as it arrives;
    /// the number of batches that took.
    async fn forwarded(
        &mut self,
        step: Step,
        expected: &BTreeMap<&str, i64>,
    ) -> Result<usize, DemoError> {
        let deadline = Instant::now() + STEP_DEADLINE;
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        let mut batches = 0;
        let arrived = |latest: &BTreeMap<String, i64>| {
            expected
                .iter()
                .all(|(product, stock)| latest.get(*product) == Some(stock))
        };
        while !arrived(&latest) {
            let delivery = tokio::time::timeout_at(deadline, self.receiver.next())
                .await
                .map_err(|_| {
                    step.failed(format!(
                        "{} s で届きませんでした / did not arrive within {} s; the EC site holds {latest:?}",
                        STEP_DEADLINE.as_secs(),
                        STEP_DEADLINE.as_secs()
                    ))
                })?
                .ok_or_else(|| step.failed("the demo receiver stopped"))?;
            let items = match delivery {
                Delivery::Batch { webhook_id, items } => {
                    batches += 1;
                    event(
                        "ECサイトが受信",
                        "EC site received",
                        &format!("batch {webhook_id}, 署名OK / signature verified"),
                    );
                    items
                }
                Delivery::Refused { status, reason } => {
                    return Err(
                        step.failed(format!("the EC site refused a batch ({status}): {reason}"))
                    )
                }
            };
            for item in items {
                let mapped = setup::PRODUCTS
                    .iter()
                    .find(|p| p.smaregi_id == item.smaregi_product_id)
                    .map(|p| p.code);
                if item.external_code.as_deref() != mapped {
                    return Err(step.failed(format!(
                        "product {} arrived as {:?}, not as its mapped code {mapped:?}",
                        item.smaregi_product_id, item.external_code
                    )));
                }
                event(
                    "転送",
                    "forwarded",
                    &format!(
                        "{} = {} (商品ID / product {}, 店舗 / store {})",
                        item.external_code.as_deref().unwrap_or("?"),
                        item.stock,
                        item.smaregi_product_id,
                        item.store_id
                    ),
                );
                latest.insert(item.smaregi_product_id, item.stock);
            }
        }
        Ok(batches)
    }

    async fn orders(&self, relay: &Relay) -> Result<BTreeMap<&'static str, u64>, DemoError> {
        let step = Step::new(
            6,
            "注文をスマレジに取引として登録しました",
            "Registered the orders in Smaregi as transactions",
        );
        let orders = [setup::PLAIN, setup::EDITED, setup::CANCELLED];
        for order in &orders {
            put(relay, order, step).await?;
        }
        let mut registered = BTreeMap::new();
        for order in &orders {
            let state = settled(relay, step, order.order_id, |state| {
                state["status"] == "active" && head_id(&state["transaction"]).is_some()
            })
            .await?;
            let id = head_id(&state["transaction"]).expect("checked");
            self.in_smaregi(step, id, order.total())?;
            event(
                "登録",
                "registered",
                &format!(
                    "{} → スマレジ取引 / Smaregi transaction {id}, 合計 / total {} yen",
                    order.order_id,
                    yen(order.total())
                ),
            );
            registered.insert(order.order_id, id);
        }
        step.done(&format!(
            "{} orders, transactions {}",
            orders.len(),
            registered
                .values()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(registered)
    }

    async fn edit(
        &self,
        relay: &Relay,
        registered: &BTreeMap<&'static str, u64>,
    ) -> Result<(), DemoError> {
        let step = Step::new(
            7,
            "注文の変更を反映しました（打消して再登録）",
            "Applied an order edit: cancelled, then registered again",
        );
        let order = setup::EDITED_REVISION;
        let original = registered[order.order_id];
        put(relay, &order, step).await?;
        let state = settled(relay, step, order.order_id, |state| {
            state["revision"] == order.revision && head_id(&state["transaction"]).is_some()
        })
        .await?;
        let reversal = reversal_of(&state, order.revision)
            .ok_or_else(|| step.failed(format!("no reversal in {state}")))?;
        self.reverses(step, reversal, original)?;
        let id = head_id(&state["transaction"]).expect("checked");
        self.in_smaregi(step, id, order.total())?;
        event(
            "打消",
            "reversed",
            &format!("transaction {original} by transaction {reversal}"),
        );
        event(
            "再登録",
            "registered again",
            &format!(
                "{} revision {} → transaction {id}, 合計 / total {} yen",
                order.order_id,
                order.revision,
                yen(order.total())
            ),
        );
        step.done(&format!(
            "{}: transaction {original} reversed by {reversal}, revision {} is transaction {id}",
            order.order_id, order.revision
        ));
        Ok(())
    }

    async fn cancel(
        &self,
        relay: &Relay,
        registered: &BTreeMap<&'static str, u64>,
    ) -> Result<(), DemoError> {
        let step = Step::new(8, "注文を取り消しました", "Cancelled an order");
        let order = setup::CANCELLED;
        let original = registered[order.order_id];
        let answer = request(relay, reqwest::Method::DELETE, order.order_id, None)
            .await
            .map_err(|e| step.failed(e))?;
        if answer.0 != 202 {
            return Err(step.failed(format!("DELETE answered {}: {}", answer.0, answer.1)));
        }
        event(
            "受付",
            "accepted",
            &format!(
                "DELETE {} → HTTP 202, job {}",
                order.order_id,
                jobs(&answer.1)
            ),
        );
        let state = settled(relay, step, order.order_id, |state| {
            state["status"] == "cancelled"
        })
        .await?;
        let reversal = reversal_of(&state, order.revision)
            .ok_or_else(|| step.failed(format!("no reversal in {state}")))?;
        self.reverses(step, reversal, original)?;
        event(
            "打消",
            "reversed",
            &format!("transaction {original} by transaction {reversal}"),
        );
        step.done(&format!(
            "{}: transaction {original} reversed by {reversal}, nothing stands",
            order.order_id
        ));
        Ok(())
    }

    async fn outage(&self, relay: &Relay) -> Result<(), DemoError> {
        let step = Step::new(
            9,
            "スマレジ障害中の注文を保存し、再送し、復旧後に登録しました",
            "Queued an order during a Smaregi outage, retried it and registered it once Smaregi was back",
        );
        let order = setup::DURING_OUTAGE;
        self.sim.start_maintenance(OUTAGE_LIMIT);
        event(
            "障害発生",
            "outage",
            "模擬スマレジがメンテナンス中になりました / the simulated Smaregi is down for maintenance (answers 503)",
        );
        let job = put(relay, &order, step).await?;
        let mut poll = Poll::new(step);
        let mut failures = 0;
        loop {
            poll.next().await?;
            let state = get(relay, order.order_id)
                .await
                .map_err(|e| step.failed(e))?;
            let register = &state["events"][0]["job"];
            let attempts = register["attempts"].as_u64().unwrap_or(0);
            if register["state"] == "done" {
                return Err(
                    step.failed("registered while Smaregi was down: the outage did not take")
                );
            }
            while failures < attempts {
                failures += 1;
                event(
                    &format!("試行 {failures} 失敗、再送します"),
                    &format!("attempt {failures} failed, will retry"),
                    register["last_error"]["message"]
                        .as_str()
                        .unwrap_or("(no message)"),
                );
            }
            if failures >= FAILURES_TO_SHOW {
                break;
            }
            poll.saw(format!("job {job}: {register}"));
        }
        self.sim.start_maintenance(Duration::ZERO);
        event(
            "復旧",
            "Smaregi is back",
            "メンテナンスが終わりました / maintenance is over",
        );
        let state = settled(relay, step, order.order_id, |state| {
            head_id(&state["transaction"]).is_some()
        })
        .await?;
        let id = head_id(&state["transaction"]).expect("checked");
        self.in_smaregi(step, id, order.total())?;
        let attempts = state["events"][0]["job"]["attempts"].as_u64().unwrap_or(0);
        event(
            "登録",
            "registered",
            &format!(
                "{} → スマレジ取引 / Smaregi transaction {id} on attempt {attempts}, 合計 / total {} yen",
                order.order_id,
                yen(order.total())
            ),
        );
        // Counted by the job itself: an attempt may have failed between
        // the last look and the end of the outage.
        step.done(&format!(
            "{}: {} failed attempts, then transaction {id}",
            order.order_id,
            attempts.saturating_sub(1)
        ));
        Ok(())
    }

    async fn stock_after_orders(&mut self, relay: &Relay) -> Result<(), DemoError> {
        let step = Step::new(
            10,
            "注文による在庫の変化をECサイトへ転送しました",
            "Forwarded the stock changes the orders made",
        );
        let contract = self.sim.contract();
        let mut rows = Vec::new();
        let mut expected = BTreeMap::new();
        for product in &PRODUCTS {
            let now = contract
                .stock
                .get(STORE_ID)
                .and_then(|store| store.get(product.smaregi_id))
                .map_or(0, |stock| stock.amount);
            let should = setup::stock_after_orders(product);
            if now != should {
                return Err(step.failed(format!(
                    "Smaregi holds {now} of {}, not the {should} the orders leave",
                    product.code
                )));
            }
            event(
                "スマレジの在庫",
                "Smaregi's stock",
                &format!("{}: {} → {now}", product.code, product.stock),
            );
            rows.push(stock_row(
                product.smaregi_id,
                now - product.stock,
                now,
                "02",
            ));
            expected.insert(product.smaregi_id, now);
        }
        self.notify(relay, rows).await.map_err(|e| step.failed(e))?;
        let batches = self.forwarded(step, &expected).await?;
        step.done(&format!(
            "{}, {}",
            PRODUCTS
                .iter()
                .map(|p| format!("{} = {}", p.code, expected[p.smaregi_id]))
                .collect::<Vec<_>>()
                .join(", "),
            signed_batches(batches)
        ));
        Ok(())
    }

    async fn summary(&self, relay: &Relay) -> Result<(), DemoError> {
        let step = Step::new(11, "まとめ", "Summary");
        let contract = self.sim.contract();
        let reversals = contract
            .transactions
            .values()
            .filter(|t| t.field("disposeDivision") == Some("2"))
            .count();
        let sales = contract.transactions.len() - reversals;
        let standing: i64 = setup::STANDING.iter().map(DemoOrder::total).sum();
        let stats = self.sim.stats();
        event(
            "スマレジ（模擬）",
            "Smaregi (simulated)",
            &format!(
                "{} transactions ({sales} sales, {reversals} reversals); {} orders stand, {} yen; {} calls, {} answered 503 during the outage",
                contract.transactions.len(),
                setup::STANDING.len(),
                yen(standing),
                stats.calls,
                stats.maintenance
            ),
        );
        // The outbox may still be recording the last push as done.
        let mut poll = Poll::new(step);
        let status = loop {
            poll.next().await?;
            let status = control(relay, Command::Status)
                .await
                .map_err(|e| step.failed(e))?;
            if status["outbox"]["pending"] == 0 {
                break status;
            }
            poll.saw(format!("status {status}"));
        };
        let outbox = &status["outbox"];
        event(
            "デーモン",
            "daemon",
            &format!(
                "outbox {} done, {} pending, {} parked; mapping version {}",
                outbox["done"], outbox["pending"], outbox["parked"], status["mapping_version"]
            ),
        );
        step.done("");
        Ok(())
    }

    /// Checks that the simulator holds transaction `id` with `total`.
    fn in_smaregi(&self, step: Step, id: u64, total: i64) -> Result<(), DemoError> {
        let contract = self.sim.contract();
        let held = contract
            .transactions
            .get(&id)
            .and_then(|t| t.field("total"))
            .and_then(|t| t.parse::<i64>().ok());
        if held != Some(total) {
            return Err(step.failed(format!(
                "Smaregi holds transaction {id} with total {held:?}, not {total}"
            )));
        }
        Ok(())
    }

    /// Checks that the simulator holds `reversal` as the reversal of `original`.
    fn reverses(&self, step: Step, reversal: u64, original: u64) -> Result<(), DemoError> {
        let contract = self.sim.contract();
        let points_at = contract
            .transactions
            .get(&reversal)
            .filter(|t| t.field("disposeDivision") == Some("2"))
            .and_then(|t| t.field("disposeServerTransactionHeadId"))
            .and_then(|id| id.parse::<u64>().ok());
        if points_at != Some(original) {
            return Err(step.failed(format!(
                "Smaregi's transaction {reversal} does not reverse {original} (it points at {points_at:?})"
            )));
        }
        Ok(())
    }
}

/// A `Stock` row of a `stock_send`, as Smaregi writes them.
fn stock_row(product: &str, change: i64, amount: i64, division: &str) -> Value {
    json!({
        "storeId": STORE_ID,
        "productId": product,
        "amount": change.to_string(),
        "stockAmount": amount.to_string(),
        "stockDivision": division,
        "updDateTime": jst::format(jst::now()),
    })
}

fn signed_batches(count: usize) -> String {
    match count {
        1 => "1 signed batch".to_owned(),
        n => format!("{n} signed batches"),
    }
}

/// `12,345`.
pub fn yen(amount: i64) -> String {
    let digits = amount.unsigned_abs().to_string();
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if amount < 0 {
        grouped.insert(0, '-');
    }
    grouped
}

/// A transaction view's `transaction_head_id`, as a number.
fn head_id(transaction: &Value) -> Option<u64> {
    transaction["transaction_head_id"].as_str()?.parse().ok()
}

/// The reversal an order's cancel of `revision` registered.
fn reversal_of(state: &Value, revision: u64) -> Option<u64> {
    state["events"]
        .as_array()?
        .iter()
        .filter(|event| event["action"] == "cancel" && event["revision"] == revision)
        .find_map(head_id)
}

fn jobs(answer: &Value) -> String {
    answer["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// A request to the order API: status and JSON body.
async fn request(
    relay: &Relay,
    method: reqwest::Method,
    order_id: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let url = format!(
        "{}{}{order_id}",
        relay.base,
        crate::orders::api::PATH_PREFIX
    );
    let mut request = relay
        .http
        .request(method.clone(), &url)
        .bearer_auth(&relay.orders_token);
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let json = serde_json::from_str(&text)
        .map_err(|e| format!("{method} {url} answered {status}, not JSON ({e}): {text}"))?;
    Ok((status, json))
}

/// The order's state from the order API.
async fn get(relay: &Relay, order_id: &str) -> Result<Value, String> {
    match request(relay, reqwest::Method::GET, order_id, None).await? {
        (200, state) => Ok(state),
        (status, body) => Err(format!("GET {order_id} answered {status}: {body}")),
    }
}

/// Sends `order` to the order API, as the EC side does; the first job queued.
async fn put(relay: &Relay, order: &DemoOrder, step: Step) -> Result<String, DemoError> {
    let ordered_at = jst::format(jst::now());
    let (status, answer) = request(
        relay,
        reqwest::Method::PUT,
        order.order_id,
        Some(&order.json(&ordered_at)),
    )
    .await
    .map_err(|e| step.failed(e))?;
    if status != 202 {
        return Err(step.failed(format!(
            "PUT {} answered {status}: {answer}",
            order.order_id
        )));
    }
    let jobs = jobs(&answer);
    event(
        "受付・保存",
        "accepted and queued",
        &format!(
            "PUT {} revision {} ({}) → HTTP 202, job {jobs}",
            order.order_id,
            order.revision,
            order.describe()
        ),
    );
    Ok(jobs)
}

/// Polls the order until `condition` holds and every job it has is done.
async fn settled(
    relay: &Relay,
    step: Step,
    order_id: &str,
    condition: impl Fn(&Value) -> bool,
) -> Result<Value, DemoError> {
    let mut poll = Poll::new(step);
    loop {
        poll.next().await?;
        let state = get(relay, order_id).await.map_err(|e| step.failed(e))?;
        let done = state["events"].as_array().is_some_and(|events| {
            events
                .iter()
                .all(|event| event["job"].is_null() || event["job"]["state"] == "done")
        });
        if done && condition(&state) {
            return Ok(state);
        }
        poll.saw(format!("order {order_id}: {state}"));
    }
}

/// Asks the daemon over its control socket, as `smaregi-relay status` does.
async fn control(relay: &Relay, command: Command) -> Result<Value, String> {
    let socket = relay.socket.clone();
    tokio::task::spawn_blocking(move || crate::control::client::send(&socket, &command))
        .await
        .map_err(|e| format!("control socket: {e}"))?
        .map_err(|e| format!("control socket: {e}"))
}

/// The ids of the done jobs of `kind`.
async fn done_jobs(relay: &Relay, kind: &str) -> Result<Vec<u64>, String> {
    let jobs = control(
        relay,
        Command::OutboxList {
            state: Some("done".into()),
            kind: Some(kind.into()),
            key: None,
            limit: Some(100),
        },
    )
    .await?;
    Ok(jobs
        .as_array()
        .map(|jobs| jobs.iter().filter_map(|job| job["id"].as_u64()).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yen_are_grouped_by_thousands() {
        assert_eq!(yen(0), "0");
        assert_eq!(yen(999), "999");
        assert_eq!(yen(1000), "1,000");
        assert_eq!(yen(19_790), "19,790");
        assert_eq!(yen(-1_234_567), "-1,234,567");
    }

    #[test]
    fn a_reversal_is_found_by_its_cancel_event() {
        let state = json!({"events": [
            {"action": "register", "revision": 1, "transaction_head_id": "2"},
            {"action": "cancel", "revision": 2, "transaction_head_id": "4"},
            {"action": "register", "revision": 2, "transaction_head_id": "5"},
        ]});
        assert_eq!(reversal_of(&state, 2), Some(4));
        assert_eq!(reversal_of(&state, 1), None);
        assert_eq!(head_id(&json!({"transaction_head_id": "7"})), Some(7));
        assert_eq!(head_id(&Value::Null), None);
    }
}
