//! The demo's EC site: an HTTP endpoint that receives the relay's stock
//! batches, checks each one's Standard Webhooks signature and timestamp,
//! and hands what it got to the demo script over a channel.
//!
//! It owns nothing durable. It must never answer 200 to a batch whose
//! signature or timestamp does not check out: it shows a new user what a
//! real receiver has to do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stock::sign;

/// The path the relay pushes stock to.
pub const PATH: &str = "/ec/stock";
/// Larger batches are refused (the relay's are a few hundred bytes here).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Standard Webhooks' advice: refuse timestamps further off than this,
/// so a captured batch cannot be replayed later.
const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// One stock value as the EC side received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub external_code: Option<String>,
    pub smaregi_product_id: String,
    pub store_id: String,
    pub stock: i64,
}

/// One POST, as judged by the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Signature and timestamp checked out; answered 200.
    Batch {
        webhook_id: String,
        items: Vec<Item>,
    },
    /// Answered `status` (401: not ours or not now; 400: not a batch), with why.
    Refused { status: u16, reason: String },
}

/// The running receiver. Stop it with [`Receiver::stop`].
pub struct Receiver {
    address: SocketAddr,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Receiver {
    /// Listens on a free loopback port; verifies with `secret`, the
    /// relay's `[stock.downstream] secret`.
    pub async fn start(secret: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let (sender, deliveries) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept(
            listener,
            Arc::new(sign::key_of(secret)),
            sender,
            shutdown.clone(),
            tasks.clone(),
        ));
        Ok(Self {
            address,
            deliveries,
            shutdown,
            tasks,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.address)
    }

    /// The next POST received; `None` once stopped.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// Stops listening and drops open connections.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept(
    listener: TcpListener,
    key: Arc<Vec<u8>>,
    sender: mpsc::UnboundedSender<Delivery>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "demo receiver: accept failed");
                    continue;
                }
            },
        };
        let (key, sender, shutdown) = (Arc::clone(&key), sender.clone(), shutdown.clone());
        tasks.spawn(async move {
            let service = service_fn(move |request| {
                let (key, sender) = (Arc::clone(&key), sender.clone());
                async move { Ok::<_, Infallible>(handle(request, &key, &sender).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = connection => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    key: &[u8],
    sender: &mpsc::UnboundedSender<Delivery>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::POST || request.uri().path() != PATH {
        return answer(StatusCode::NOT_FOUND, "not found");
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) => Err((400, format!("cannot read the body: {e}"))),
    };
    let delivery = match body {
        Ok(body) => judge(key, &id, &timestamp, &signature, &body, unix_now()),
        Err((status, reason)) => Delivery::Refused { status, reason },
    };
    let (status, text) = match &delivery {
        Delivery::Batch { .. } => (200, "ok".to_owned()),
        Delivery::Refused { status, reason } => (*status, reason.clone()),
    };
    // The script may have stopped listening; the answer still goes out.
    let _ = sender.send(delivery);
    answer(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &text,
    )
}

fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "result": text }).to_string(),
        )))
        .expect("a valid response")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a receiver makes of one POST: the checks in the order a real
/// receiver should make them. Pure.
pub fn judge(
    key: &[u8],
    id: &str,
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: u64,
) -> Delivery {
    let refused = |status: u16, reason: &str| Delivery::Refused {
        status,
        reason: reason.to_owned(),
    };
    let Ok(sent_at) = timestamp.parse::<u64>() else {
        return refused(401, "unsigned: no webhook-timestamp");
    };
    if !sign::verify(key, id, sent_at, body, signature) {
        return refused(
            401,
            "the signature does not match: not from the relay, or changed on the way",
        );
    }
    if now.abs_diff(sent_at) > TIMESTAMP_TOLERANCE.as_secs() {
        return refused(401, "signed too long ago or in the future: a replay?");
    }
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return refused(400, "not JSON");
    };
    let Some(rows) = json.get("stock").and_then(Value::as_array) else {
        return refused(400, "not a stock batch: no `stock` array");
    };
    let text = |row: &Value, name: &str| row.get(name).and_then(Value::as_str).map(str::to_owned);
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(product), Some(store), Some(stock)) = (
            text(row, "smaregi_product_id"),
            text(row, "store_id"),
            row.get("stock").and_then(Value::as_i64),
        ) else {
            return refused(
                400,
                "not a stock batch: an item lacks its product, store or stock",
            );
        };
        items.push(Item {
            external_code: text(row, "external_code"),
            smaregi_product_id: product,
            store_id: store,
            stock,
        });
    }
    Delivery::Batch {
        webhook_id: id.to_owned(),
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn a_signed_batch_is_taken_and_anything_else_refused() {
        let key = sign::key_of(SECRET);
        let body = br#"{"stock":[{"external_code":"MUG-BLU","smaregi_product_id":"8002","store_id":"1","stock":12}]}"#;
        let now = 1_800_000_000;
        let signature = sign::signature(&key, "stock_1", now, body);
        assert_eq!(
            judge(&key, "stock_1", &now.to_string(), &signature, body, now + 3),
            Delivery::Batch {
                webhook_id: "stock_1".into(),
                items: vec![Item {
                    external_code: Some("MUG-BLU".into()),
                    smaregi_product_id: "8002".into(),
                    store_id: "1".into(),
                    stock: 12,
                }],
            }
        );
        let refused = |delivery: Delivery| matches!(delivery, Delivery::Refused { .. });
        let changed = br#"{"stock":[{"external_code":"MUG-BLU","smaregi_product_id":"8002","store_id":"1","stock":99}]}"#;
        assert!(refused(judge(
            &key,
            "stock_1",
            &now.to_string(),
            &signature,
            changed,
            now
        )));
        assert!(refused(judge(
            &key,
            "stock_2",
            &now.to_string(),
            &signature,
            body,
            now
        )));
        assert!(refused(judge(&key, "stock_1", "", &signature, body, now)));
        assert!(refused(judge(
            &key,
            "stock_1",
            &now.to_string(),
            &signature,
            body,
            now + 3600
        )));
        let other_key = sign::key_of("whsec_b3RoZXIgc2VjcmV0IG9mIDMyIGJ5dGVzISEhISE=");
        assert!(refused(judge(
            &other_key,
            "stock_1",
            &now.to_string(),
            &signature,
            body,
            now
        )));
    }
}
