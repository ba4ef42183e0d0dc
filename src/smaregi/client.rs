//! The HTTP client of Smaregi's legacy API: one connection pool, rustls,
//! the timeouts of `[smaregi]`, and the credentials in headers that never
//! reach a log or a `Debug` output.

use std::time::Duration;

use serde_json::{json, Value};

use super::api::{self, CallError, Row};
use super::sale::Sale;
use secrecy::{ExposeSecret, SecretString};

use crate::config::SmaregiConfig;

/// Products per `stock_ref` call, and rows per page.
pub const STOCK_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// Stock of one product in one store, as Smaregi reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockRow {
    pub store_id: String,
    pub product_id: String,
    pub amount: i64,
    /// `YYYY-MM-DD HH:MM:SS` JST, as Smaregi wrote it.
    pub updated_at: String,
}

/// Calls Smaregi's legacy API. Cheap to clone.
#[derive(Clone)]
pub struct SmaregiClient {
    http: reqwest::Client,
    endpoint: String,
    contract_id: SecretString,
    access_token: SecretString,
    lookup_window_seconds: i64,
}

impl std::fmt::Debug for SmaregiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmaregiClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl SmaregiClient {
    pub fn new(config: &SmaregiConfig) -> Result<Self, ClientError> {
        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(config.connect_timeout_seconds))
            .timeout(Duration::from_secs(config.request_timeout_seconds))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("smaregi-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            endpoint: config.endpoint.clone(),
            contract_id: SecretString::from(config.contract_id.clone()),
            access_token: SecretString::from(config.access_token.expose().to_owned()),
            lookup_window_seconds: config.lookup_window_hours as i64 * 3600,
        })
    }

    /// One call: `proc_name` with `params`; the answer's JSON.
    pub async fn call(&self, proc_name: &str, params: &Value) -> Result<Value, CallError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("proc_name", proc_name)
            .append_pair("params", &params.to_string())
            .finish();
        let response = self
            .http
            .post(&self.endpoint)
            .header("X_contract_id", self.contract_id.expose_secret())
            .header("X_access_token", self.access_token.expose_secret())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=UTF-8",
            )
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(transport_error)?;
        api::read_answer(status, retry_after.as_deref(), &body, &self.secrets())
    }

    /// What every snippet of an answer kept on a job must not show.
    fn secrets(&self) -> [&str; 2] {
        [
            self.contract_id.expose_secret(),
            self.access_token.expose_secret(),
        ]
    }

    /// 取引登録: registers `sale`; Smaregi's `transactionHeadId`.
    pub async fn register(&self, sale: &Sale) -> Result<u64, CallError> {
        let answer = self
            .call("transaction_upd", &sale.transaction_upd_params())
            .await?;
        api::registered_id(&answer, &self.secrets())
    }

    /// 取消: marks the registered transaction `transaction_head_id` as
    /// cancelled (`cancelDivision` 1). Doing it twice changes nothing.
    pub async fn cancel_flag(&self, transaction_head_id: u64) -> Result<(), CallError> {
        let params = json!({
            "proc_info": {"proc_division": "U"},
            "data": [{"table_name": "TransactionHead", "rows": [{
                "transactionHeadId": transaction_head_id.to_string(),
                "cancelDivision": "1",
            }]}],
        });
        let answer = self.call("transaction_upd", &params).await?;
        let id = api::registered_id(&answer, &self.secrets())?;
        if id != transaction_head_id {
            return Err(CallError::Malformed {
                problem: format!("cancelled transaction {id}, not {transaction_head_id}"),
                snippet: api::snippet(answer.to_string().as_bytes(), &self.secrets()),
            });
        }
        Ok(())
    }

    /// Looks `sale` up by store, terminal and `terminalTranId` within the
    /// lookup window around its time; its `transactionHeadId` if found.
    pub async fn find_registered(&self, sale: &Sale) -> Result<Option<u64>, CallError> {
        let at = crate::smaregi::jst::parse(&sale.terminal_tran_date_time).ok_or_else(|| {
            CallError::Malformed {
                problem: "the sale's terminalTranDateTime is not a datetime".into(),
                snippet: sale.terminal_tran_date_time.clone(),
            }
        })?;
        let window = self.lookup_window_seconds;
        let params = json!({
            "table_name": "TransactionHead",
            "fields": ["transactionHeadId", "terminalTranId", "disposeServerTransactionHeadId"],
            "conditions": [{
                "storeId": sale.store_id,
                "terminalId": sale.terminal_id,
                "terminalTranId": sale.terminal_tran_id,
                "terminalTranDateTime >=": crate::smaregi::jst::format(at - window),
                "terminalTranDateTime <=": crate::smaregi::jst::format(at + window),
            }],
            "limit": 10,
            "page": 1,
        });
        let (_, rows) = api::rows(
            &self.call("transaction_ref", &params).await?,
            &self.secrets(),
        )?;
        let found = rows
            .iter()
            .filter(|row| row.get("terminalTranId") == Some(&sale.terminal_tran_id))
            .filter_map(|row| row.get("transactionHeadId")?.parse::<u64>().ok())
            .min();
        Ok(found)
    }

    /// Stock of `products` in `store`, in calls of at most
    /// [`STOCK_BATCH`] products. A product without a row has no stock
    /// record in Smaregi (stock 0).
    pub async fn stock(
        &self,
        store: &str,
        products: &[String],
    ) -> Result<Vec<StockRow>, CallError> {
        let mut stock = Vec::with_capacity(products.len());
        for batch in products.chunks(STOCK_BATCH) {
            let conditions: Vec<Value> = batch
                .iter()
                .map(|product| json!({"storeId": store, "productId": product}))
                .collect();
            let mut page = 1;
            loop {
                let params = json!({
                    "table_name": "Stock",
                    "conditions": conditions,
                    "limit": STOCK_BATCH,
                    "page": page,
                });
                let (total, rows) =
                    api::rows(&self.call("stock_ref", &params).await?, &self.secrets())?;
                let fetched = rows.len();
                for row in rows {
                    stock.push(stock_row(&row, &self.secrets())?);
                }
                if fetched < STOCK_BATCH || (page * STOCK_BATCH) as u64 >= total {
                    break;
                }
                page += 1;
            }
        }
        Ok(stock)
    }

    /// Up to `limit` stock changes (`StockHistory`) after change `after`,
    /// in id order: (id, store, product).
    pub async fn stock_history(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, String)>, CallError> {
        let params = json!({
            "table_name": "StockHistory",
            "fields": ["stockHistoryId", "storeId", "productId"],
            "conditions": [{"stockHistoryId >": after.to_string()}],
            "limit": limit,
            "page": 1,
        });
        let (_, rows) = api::rows(&self.call("stock_ref", &params).await?, &self.secrets())?;
        let mut changes = Vec::with_capacity(rows.len());
        for row in rows {
            let field = |name: &str| {
                row.get(name).cloned().ok_or_else(|| CallError::Malformed {
                    problem: format!("a StockHistory row has no {name}"),
                    snippet: api::snippet(format!("{row:?}").as_bytes(), &self.secrets()),
                })
            };
            let id = field("stockHistoryId")?;
            let id = id.parse().map_err(|_| CallError::Malformed {
                problem: format!("stockHistoryId {id:?} is not a number"),
                snippet: api::snippet(format!("{row:?}").as_bytes(), &self.secrets()),
            })?;
            changes.push((id, field("storeId")?, field("productId")?));
        }
        // Smaregi's order is not documented: sort, so the cursor only moves forward.
        changes.sort();
        Ok(changes)
    }
}

fn stock_row(row: &Row, secrets: &[&str]) -> Result<StockRow, CallError> {
    let field = |name: &str| {
        row.get(name).cloned().ok_or_else(|| CallError::Malformed {
            problem: format!("a Stock row has no {name}"),
            snippet: api::snippet(format!("{row:?}").as_bytes(), secrets),
        })
    };
    let amount = field("stockAmount")?;
    Ok(StockRow {
        store_id: field("storeId")?,
        product_id: field("productId")?,
        amount: amount.parse().map_err(|_| CallError::Malformed {
            problem: format!("stockAmount {amount:?} is not a number"),
            snippet: api::snippet(format!("{row:?}").as_bytes(), secrets),
        })?,
        updated_at: row.get("updDateTime").cloned().unwrap_or_default(),
    })
}

fn transport_error(error: reqwest::Error) -> CallError {
    if error.is_connect() {
        CallError::Connect(error_chain(&error))
    } else if error.is_timeout() {
        CallError::Timeout
    } else {
        CallError::Transport(error_chain(&error))
    }
}

/// The error with its sources: reqwest's own text rarely says what failed.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
