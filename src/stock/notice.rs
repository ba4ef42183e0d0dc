//! What a stored notification says about stock: the (store, product)
//! pairs whose stock changed, with the amount when the notification
//! carries one. Pure: no I/O.
//!
//! A notification is a hint — "this product's stock changed" — never an
//! ordered log: Smaregi does not promise order or single delivery. A row
//! that cannot be used (a store id of more than 9 digits, a product id of
//! more than 15, an amount that is not a number) is reported with its
//! reason and skipped; the other rows still count.

use serde_json::Value;

use crate::intake::form::{self, ProcName};
use crate::intake::inbox::Route;

/// One product whose stock changed in one store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StockHint {
    pub store_id: String,
    pub product_id: String,
    /// `stockAmount` after the change, when the notification carries it.
    pub amount: Option<i64>,
    /// Smaregi's `updDateTime` of the change, when given.
    pub updated_at: Option<String>,
}

/// A row that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    pub row: usize,
    pub reason: String,
}

/// What one notification says about stock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StockNotice {
    pub hints: Vec<StockHint>,
    pub skipped: Vec<SkippedRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("the stored notification no longer reads: {0}")]
    Unreadable(String),
}

fn digits(text: &str, max: usize) -> bool {
    (1..=max).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

/// A row's column as text: Smaregi sends strings, numbers are tolerated.
fn text(row: &serde_json::Map<String, Value>, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads a stored notification. `follows(store)` says whether a store's
/// stock is forwarded; rows of other stores are dropped silently.
pub fn read_notice(
    route: Route,
    kind: &str,
    body: &[u8],
    follows: &dyn Fn(&str) -> bool,
) -> Result<StockNotice, NoticeError> {
    let mut notice = StockNotice::default();
    let mut add = |row: usize,
                   store: Option<String>,
                   product: Option<String>,
                   amount: Option<String>,
                   updated_at: Option<String>| {
        let (Some(store), Some(product)) = (store, product) else {
            notice.skipped.push(SkippedRow {
                row,
                reason: "storeId or productId is missing".into(),
            });
            return;
        };
        if !digits(&store, 9) {
            notice.skipped.push(SkippedRow {
                row,
                reason: format!("storeId {store:?} is not 1 to 9 digits"),
            });
            return;
        }
        if !digits(&product, 15) {
            notice.skipped.push(SkippedRow {
                row,
                reason: format!("productId {product:?} is not 1 to 15 digits"),
            });
            return;
        }
        let amount = match amount.filter(|a| !a.is_empty()) {
            None => None,
            Some(text) => match text.parse::<i64>() {
                Ok(n) if (-999_999_999..=999_999_999).contains(&n) => Some(n),
                _ => {
                    notice.skipped.push(SkippedRow {
                        row,
                        reason: format!("stockAmount {text:?} is not a stock amount"),
                    });
                    return;
                }
            },
        };
        if follows(&store) {
            notice.hints.push(StockHint {
                store_id: store,
                product_id: product,
                amount,
                updated_at,
            });
        }
    };
    match route {
        Route::Notify => {
            let fields =
                form::decode_form(body).map_err(|e| NoticeError::Unreadable(e.to_string()))?;
            let notification = form::read_notification(&fields)
                .map_err(|e| NoticeError::Unreadable(e.to_string()))?;
            if notification.proc_name != ProcName::StockSend {
                return Ok(StockNotice::default());
            }
            let params: Value = serde_json::from_str(&notification.params)
                .map_err(|e| NoticeError::Unreadable(e.to_string()))?;
            let tables = params["data"].as_array().cloned().unwrap_or_default();
            let rows = tables
                .iter()
                .filter(|table| table["table_name"] == "Stock")
                .flat_map(|table| table["rows"].as_array().cloned().unwrap_or_default());
            for (i, row) in rows.enumerate() {
                let Some(row) = row.as_object() else { continue };
                add(
                    i,
                    text(row, "storeId"),
                    text(row, "productId"),
                    text(row, "stockAmount"),
                    text(row, "updDateTime"),
                );
            }
        }
        Route::Webhook => {
            if kind != "pos:stock" {
                return Ok(StockNotice::default());
            }
            let json: Value =
                serde_json::from_slice(body).map_err(|e| NoticeError::Unreadable(e.to_string()))?;
            let ids = json["ids"].as_array().cloned().unwrap_or_default();
            for (i, id) in ids.iter().enumerate() {
                let Some(id) = id.as_object() else { continue };
                add(i, text(id, "storeId"), text(id, "productId"), None, None);
            }
        }
    }
    // A burst of rows for one product is one change: keep the last.
    let mut seen = std::collections::HashSet::new();
    let mut hints: Vec<StockHint> = notice
        .hints
        .into_iter()
        .rev()
        .filter(|h| seen.insert((h.store_id.clone(), h.product_id.clone())))
        .collect();
    hints.reverse();
    notice.hints = hints;
    Ok(notice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stock_send(rows: Value) -> Vec<u8> {
        let params = json!({"data": [{"table_name": "Stock", "rows": rows}]}).to_string();
        form_urlencoded::Serializer::new(String::new())
            .append_pair("proc_name", "stock_send")
            .append_pair("params", &params)
            .append_pair("relay_secret", "x")
            .finish()
            .into_bytes()
    }

    fn all(_: &str) -> bool {
        true
    }

    #[test]
    fn rows_become_hints_and_a_burst_for_one_product_is_one() {
        let body = stock_send(json!([
            {"storeId": "1", "productId": "8000001", "amount": "-1", "stockAmount": "9", "stockDivision": "02"},
            {"storeId": "1", "productId": "8000002", "amount": "-1", "stockAmount": "4"},
            {"storeId": "1", "productId": "8000001", "amount": "-1", "stockAmount": "8", "updDateTime": "2026-11-22 10:00:01"},
        ]));
        let notice = read_notice(Route::Notify, "stock_send", &body, &all).unwrap();
        assert_eq!(
            notice.hints,
            [
                StockHint {
                    store_id: "1".into(),
                    product_id: "8000002".into(),
                    amount: Some(4),
                    updated_at: None
                },
                StockHint {
                    store_id: "1".into(),
                    product_id: "8000001".into(),
                    amount: Some(8),
                    updated_at: Some("2026-11-22 10:00:01".into())
                },
            ]
        );
        assert!(notice.skipped.is_empty());
    }

    #[test]
    fn bad_rows_are_skipped_with_their_reason_and_the_rest_still_count() {
        let body = stock_send(json!([
            {"storeId": "1234567890", "productId": "1"},
            {"storeId": "1", "productId": "1234567890123456"},
            {"storeId": "1", "productId": "7", "stockAmount": "many"},
            {"storeId": "1"},
            {"storeId": "2", "productId": "8"},
            {"storeId": "1", "productId": "9", "stockAmount": "-3"},
        ]));
        let notice = read_notice(Route::Notify, "stock_send", &body, &|s| s == "1").unwrap();
        assert_eq!(notice.hints.len(), 1, "{notice:?}");
        assert_eq!(notice.hints[0].amount, Some(-3));
        let rows: Vec<usize> = notice.skipped.iter().map(|s| s.row).collect();
        assert_eq!(rows, [0, 1, 2, 3], "store 2 is not followed, not an error");
        assert!(notice.skipped[2].reason.contains("many"));
    }

    #[test]
    fn platform_stock_events_name_products_without_amounts() {
        let body = json!({"contractId": "c", "event": "pos:stock", "action": "edited",
            "ids": [{"id": "1", "productId": "8000001", "storeId": "3"}]})
        .to_string();
        let notice = read_notice(Route::Webhook, "pos:stock", body.as_bytes(), &all).unwrap();
        assert_eq!(notice.hints.len(), 1);
        assert_eq!(notice.hints[0].amount, None);
        let other = read_notice(Route::Webhook, "pos:products", body.as_bytes(), &all).unwrap();
        assert!(other.hints.is_empty());
    }

    #[test]
    fn other_notifications_say_nothing_about_stock() {
        let params = json!({"data": [{"table_name": "TransactionHead", "rows": []}]}).to_string();
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("proc_name", "transaction_send")
            .append_pair("params", &params)
            .finish();
        let notice = read_notice(Route::Notify, "transaction_send", body.as_bytes(), &all).unwrap();
        assert_eq!(notice, StockNotice::default());
    }
}
