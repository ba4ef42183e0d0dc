//! The order API on the TLS listener: `PUT`, `GET` and `DELETE`
//! `/api/v1/orders/{order_id}`, behind a bearer token.
//!
//! Every answer is JSON. `202` means the change and its jobs are durable;
//! nothing is recorded for any request answered with a 4xx.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::book::{Cancel, OrderAction, OrderBook, OrderBookError, OrderRecord, OrderStatus, Put};
use super::build::BuildError;
use super::model::{parse_order, valid_order_id, OrderInputError};
use crate::intake::api::{bearer_matches, error, method_not_allowed, respond, unauthorized, Body};
use crate::intake::server::read_body;
use crate::smaregi::jst;

/// Every order URL starts with this.
pub const PATH_PREFIX: &str = "/api/v1/orders/";

/// The order API: the ledger behind it and its credentials.
pub struct OrderApi {
    book: OrderBook,
    token: SecretString,
    max_body_bytes: u64,
}

impl OrderApi {
    pub fn new(book: OrderBook, token: SecretString, max_body_bytes: u64) -> Self {
        Self {
            book,
            token,
            max_body_bytes,
        }
    }

    /// Whether `path` is the order API's.
    pub fn serves(path: &str) -> bool {
        path.starts_with(PATH_PREFIX) || path == PATH_PREFIX.trim_end_matches('/')
    }

    pub async fn handle(
        &self,
        request: Request<Incoming>,
        body_timeout: Duration,
    ) -> Response<Body> {
        if !bearer_matches(&request, &self.token) {
            return unauthorized("[orders] api-token");
        }
        let order_id = request
            .uri()
            .path()
            .strip_prefix(PATH_PREFIX)
            .unwrap_or("")
            .to_owned();
        if !valid_order_id(&order_id) {
            return error(
                StatusCode::NOT_FOUND,
                "the URL must be /api/v1/orders/{order_id}, where order_id is 1 to 64 letters, \
                 digits, '-', '_' or '.'",
            );
        }
        match *request.method() {
            Method::GET => self.get(&order_id),
            Method::DELETE => self.delete(&order_id).await,
            Method::PUT => {
                let json = request
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .is_none_or(|value| value.starts_with("application/json"));
                if !json {
                    return error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "send the order as application/json",
                    );
                }
                match read_body(request, self.max_body_bytes, body_timeout).await {
                    Ok(body) => self.put(&order_id, &body).await,
                    Err(refusal) => error(refusal.status(), refusal.text().trim_end()),
                }
            }
            _ => method_not_allowed("GET, PUT, DELETE"),
        }
    }

    async fn put(&self, order_id: &str, body: &[u8]) -> Response<Body> {
        let order = match parse_order(order_id, body) {
            Ok(order) => order,
            Err(OrderInputError::Json {
                line,
                column,
                message,
            }) => {
                return respond(
                    StatusCode::BAD_REQUEST,
                    json!({
                        "error": format!("the body is not valid JSON: {message}"),
                        "line": line,
                        "column": column,
                    }),
                )
            }
            Err(OrderInputError::Invalid(problems)) => {
                return respond(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "error": "the order is invalid", "problems": problems }),
                )
            }
        };
        let revision = order.revision;
        match self.book.put(order).await {
            Ok(Put::Accepted { jobs, held }) => {
                info!(
                    order = order_id,
                    revision,
                    ?jobs,
                    held = held.is_some(),
                    "orders: revision accepted"
                );
                respond(
                    StatusCode::ACCEPTED,
                    json!({
                        "result": "accepted",
                        "order_id": order_id,
                        "revision": revision,
                        "jobs": jobs,
                        "held_for_unmapped": held,
                    }),
                )
            }
            Ok(Put::Unchanged) => respond(
                StatusCode::OK,
                json!({ "result": "unchanged", "order_id": order_id, "revision": revision }),
            ),
            Err(e) => self.refuse(order_id, e),
        }
    }

    async fn delete(&self, order_id: &str) -> Response<Body> {
        match self.book.cancel(order_id).await {
            Ok(Cancel::Accepted { jobs }) => {
                info!(order = order_id, ?jobs, "orders: cancellation accepted");
                respond(
                    StatusCode::ACCEPTED,
                    json!({ "result": "accepted", "order_id": order_id, "jobs": jobs }),
                )
            }
            Ok(Cancel::AlreadyCancelled) => respond(
                StatusCode::OK,
                json!({ "result": "unchanged", "order_id": order_id }),
            ),
            Err(e) => self.refuse(order_id, e),
        }
    }

    fn refuse(&self, order_id: &str, error_: OrderBookError) -> Response<Body> {
        match error_ {
            OrderBookError::Stale { current, .. } | OrderBookError::RevisionConflict(current) => {
                respond(
                    StatusCode::CONFLICT,
                    json!({ "error": error_.to_string(), "current_revision": current }),
                )
            }
            OrderBookError::Cancelled => error(StatusCode::CONFLICT, error_),
            OrderBookError::NotFound => error(
                StatusCode::NOT_FOUND,
                format!("no order {order_id:?} was ever accepted"),
            ),
            OrderBookError::Build(BuildError::Unmapped(lines)) => respond(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "error": "the order is invalid",
                    "problems": lines.iter().map(|u| json!({
                        "field": format!("lines[{}].external_code", u.line),
                        "message": format!("no Smaregi product is mapped to {:?} ([orders] unmapped = \"reject\")", u.external_code),
                    })).collect::<Vec<_>>(),
                }),
            ),
            OrderBookError::Build(e) => respond(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": "the order is invalid", "problems": [{"field": match e {
                    BuildError::NoStore => "store_id",
                    _ => "payment_method",
                }, "message": e.to_string()}] }),
            ),
            other => {
                warn!(order = order_id, error = %other, "orders: cannot record an order change");
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the relay cannot record orders right now; nothing was recorded, send it again later",
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, "30".parse().expect("a header value"));
                response
            }
        }
    }

    fn get(&self, order_id: &str) -> Response<Body> {
        match self.book.record(order_id) {
            Ok(Some(record)) => match self.view(&record) {
                Ok(view) => respond(StatusCode::OK, view),
                Err(e) => self.refuse(order_id, e),
            },
            Ok(None) => self.refuse(order_id, OrderBookError::NotFound),
            Err(e) => self.refuse(order_id, e),
        }
    }

    /// An order's state as a client sees it.
    fn view(&self, record: &OrderRecord) -> Result<Value, OrderBookError> {
        let head_id = |tran: &Option<String>| -> Result<Option<String>, OrderBookError> {
            Ok(match tran {
                Some(tran) => self
                    .book
                    .transaction_head_id(tran)?
                    .map(|id| id.to_string()),
                None => None,
            })
        };
        let standing = match &record.standing {
            Some(sale) => json!({
                "terminal_id": sale.terminal_id,
                "terminal_tran_id": sale.terminal_tran_id,
                "transaction_head_id": head_id(&Some(sale.terminal_tran_id.clone()))?,
                "total": sale.total(),
            }),
            None => Value::Null,
        };
        let mut events = Vec::with_capacity(record.events.len());
        for event in &record.events {
            let job = match event.job {
                Some(id) => match self.book.job(id)? {
                    Some(job) => json!({
                        "id": id,
                        "state": job.state.as_str(),
                        "attempts": job.attempts,
                        "last_error": job.last_error.map(|e| json!({"class": e.class, "message": e.message})),
                    }),
                    // Finished jobs are pruned after the retention period.
                    None => json!({ "id": id, "state": "done", "pruned": true }),
                },
                None => Value::Null,
            };
            events.push(json!({
                "at": jst::format(jst_seconds(event.at_ms)),
                "revision": event.revision,
                "action": match event.action {
                    OrderAction::Register => "register",
                    OrderAction::Cancel => "cancel",
                    OrderAction::Hold => "hold",
                },
                "terminal_tran_id": event.terminal_tran_id,
                "transaction_head_id": head_id(&event.terminal_tran_id)?,
                "job": job,
            }));
        }
        let (status, unmapped) = match &record.status {
            OrderStatus::Active => ("active", Value::Null),
            OrderStatus::Held { unmapped } => ("held", json!(unmapped)),
            OrderStatus::Cancelled => ("cancelled", Value::Null),
        };
        Ok(json!({
            "order_id": record.order.order_id,
            "revision": record.order.revision,
            "status": status,
            "unmapped": unmapped,
            "transaction": standing,
            "events": events,
        }))
    }
}

/// Unix milliseconds → JST seconds as `jst` counts them.
fn jst_seconds(unix_ms: u64) -> i64 {
    (unix_ms / 1000) as i64 + 9 * 3600
}
