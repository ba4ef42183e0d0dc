//! A test downstream: the store's EC side receiving stock batches. It
//! checks every signature and records what it got, in order. Like a
//! careful receiver, it applies a webhook-id once: a resend of a batch it
//! took counts as a duplicate, not as more changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use smaregi_relay::stock::sign;
use tokio::sync::watch;

use super::smaregi::{ACCESS_TOKEN, CONTRACT_ID, TERMINAL};
use smaregi_sim::Simulator;
use std::path::Path;

pub const DOWNSTREAM_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One stock value as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub stock: i64,
    /// Delta mode: the change.
    pub delta: Option<i64>,
    pub updated_at: Option<String>,
    pub external_code: Option<String>,
}

/// Everything received so far.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// (store, product) → every value received, in order.
    pub values: BTreeMap<(String, String), Vec<Received>>,
    pub batches: usize,
    pub bad_signatures: usize,
    pub refused: usize,
    /// Batches refused because they held the rejected product.
    pub rejected: usize,
    /// Batches whose webhook-id had been taken before: not applied again.
    pub duplicates: usize,
    /// The webhook-id of every batch refused with the status set by `answer`.
    pub refused_ids: Vec<String>,
    /// Every webhook-id taken.
    pub ids: BTreeSet<String>,
    /// Delta mode: the sum of the changes applied, per product.
    pub applied: BTreeMap<(String, String), i64>,
}

impl Log {
    /// The latest value of each product.
    pub fn latest(&self) -> BTreeMap<(String, String), i64> {
        self.values
            .iter()
            .map(|(key, values)| (key.clone(), values.last().unwrap().stock))
            .collect()
    }
}

pub struct Downstream {
    pub address: SocketAddr,
    pub log: watch::Receiver<Log>,
    /// The status it answers with: 200 normally.
    status: Arc<AtomicU16>,
    /// A product whose batches are refused with 422.
    reject: Arc<Mutex<Option<String>>>,
    /// Whether a 200 comes with a body that is not JSON.
    garbage: Arc<AtomicBool>,
}

impl Downstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (log_tx, log) = watch::channel(Log::default());
        let log_tx = Arc::new(log_tx);
        let status = Arc::new(AtomicU16::new(200));
        let key = sign::key_of(DOWNSTREAM_SECRET);
        let answer_status = Arc::clone(&status);
        let reject = Arc::new(Mutex::new(None::<String>));
        let rejecting = Arc::clone(&reject);
        let garbage = Arc::new(AtomicBool::new(false));
        let garbling = Arc::clone(&garbage);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let log_tx = Arc::clone(&log_tx);
                let status = Arc::clone(&answer_status);
                let rejecting = Arc::clone(&rejecting);
                let garbling = Arc::clone(&garbling);
                let key = key.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let log_tx = Arc::clone(&log_tx);
                            let status = Arc::clone(&status);
                            let rejecting = Arc::clone(&rejecting);
                            let garbling = Arc::clone(&garbling);
                            let key = key.clone();
                            async move {
                                let header = |name: &str| {
                                    request
                                        .headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned()
                                };
                                let (id, timestamp, signature) = (
                                    header("webhook-id"),
                                    header("webhook-timestamp"),
                                    header("webhook-signature"),
                                );
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let mut answer = status.load(Ordering::SeqCst);
                                let valid = timestamp
                                    .parse()
                                    .is_ok_and(|ts| sign::verify(&key, &id, ts, &body, &signature));
                                let json: Value = serde_json::from_slice(&body).unwrap_or_default();
                                let rejected =
                                    rejecting.lock().unwrap().clone().is_some_and(|p| {
                                        json["stock"].as_array().into_iter().flatten().any(|item| {
                                            item["smaregi_product_id"].as_str() == Some(&p)
                                        })
                                    });
                                if answer == 200 && rejected {
                                    answer = 422;
                                }
                                log_tx.send_modify(|log| {
                                    if !valid {
                                        log.bad_signatures += 1;
                                        return;
                                    }
                                    if rejected {
                                        log.rejected += 1;
                                        return;
                                    }
                                    if answer != 200 {
                                        log.refused += 1;
                                        log.refused_ids.push(id.clone());
                                        return;
                                    }
                                    if !log.ids.insert(id.clone()) {
                                        log.duplicates += 1;
                                        return;
                                    }
                                    log.batches += 1;
                                    for item in json["stock"].as_array().unwrap() {
                                        let key = (
                                            item["store_id"].as_str().unwrap().to_owned(),
                                            item["smaregi_product_id"].as_str().unwrap().to_owned(),
                                        );
                                        let delta = item["delta"].as_i64();
                                        if let Some(delta) = delta {
                                            *log.applied.entry(key.clone()).or_default() += delta;
                                        }
                                        log.values.entry(key).or_default().push(Received {
                                            stock: item["stock"].as_i64().unwrap(),
                                            delta,
                                            updated_at: item["updated_at"]
                                                .as_str()
                                                .map(str::to_owned),
                                            external_code: item["external_code"]
                                                .as_str()
                                                .map(str::to_owned),
                                        });
                                    }
                                });
                                let status = if valid { answer } else { 401 };
                                let body = if status == 422 {
                                    Bytes::from_static(b"{\"error\": \"unknown product\"}")
                                } else if garbling.load(Ordering::SeqCst) {
                                    Bytes::from_static(b"<html>\xff\xfe oops")
                                } else {
                                    Bytes::from_static(b"{}")
                                };
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .body(Full::new(body))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            address,
            log,
            status,
            reject,
            garbage,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/stock", self.address)
    }

    /// Refuses, with 422, every batch that holds `product` (`None`: none).
    pub fn reject_product(&self, product: Option<&str>) {
        *self.reject.lock().unwrap() = product.map(str::to_owned);
    }

    /// Answers 200 with a body that is not JSON (nor UTF-8) from now on.
    pub fn answer_garbage(&self) {
        self.garbage.store(true, Ordering::SeqCst);
    }

    /// Answers every batch with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// A daemon config in `dir` calling the simulator and pushing to
/// `downstream`: `extra` goes into `[stock]`, `tables` after everything.
/// Back-fill is off unless `extra` sets it, so that the Smaregi calls a
/// test counts are its notices' own.
pub fn stock_config(
    dir: &Path,
    sim: &Simulator,
    downstream: &Downstream,
    extra: &str,
    tables: &str,
) -> std::path::PathBuf {
    let extra = if extra.contains("backfill-interval-minutes") {
        extra.to_owned()
    } else {
        format!("backfill-interval-minutes = 0\n{extra}")
    };
    super::write_file(dir, "smaregi-token", ACCESS_TOKEN, 0o600);
    super::write_file(dir, "downstream-secret", DOWNSTREAM_SECRET, 0o600);
    super::write_config(
        dir,
        &format!(
            "[smaregi]\nendpoint = \"{}\"\ncontract-id = \"{CONTRACT_ID}\"\n\
             access-token = {{ file = \"smaregi-token\" }}\nterminal-id = \"{TERMINAL}\"\n\n\
             [outbox]\nretry-schedule-seconds = [0, 1]\nretry-repeat-seconds = 1\n\n\
             [stock]\n{extra}\n[stock.downstream]\nurl = \"{}\"\nsecret = {{ file = \"downstream-secret\" }}\n\
             batch-size = 100\n{tables}",
            sim.url(),
            downstream.url()
        ),
    )
}
