//! The contract's data and the legacy API's functions, as plain code: what
//! Smaregi keeps (transactions, stock) and what it enforces on each call.
//!
//! No I/O here: the server hands a call's `proc_name` and `params` in and
//! sends the answer or the error out. Rules follow SMAREGI.md (copied into
//! this crate's README); where Smaregi's behaviour is undocumented the
//! simulator is strict, so that the relay is held to the narrowest reading.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::time;

/// A row as Smaregi stores and returns it: every value a string.
pub type Row = BTreeMap<String, String>;

/// Rows per read call at most, and per write.
pub const MAX_LIMIT: u64 = 1000;
pub const MAX_WRITE_ROWS: usize = 500;
/// How wide a `transaction_ref` filter may be.
pub const MAX_ID_SPAN: u64 = 100_000;
pub const MAX_DAYS_SPAN: i64 = 31;

/// Smaregi's error answer: HTTP status and the JSON body's fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error {code}: {error} ({description})")]
pub struct ApiError {
    pub status: u16,
    pub code: u32,
    pub error: String,
    pub description: String,
}

impl ApiError {
    pub fn new(code: u32, error: &str, description: impl Into<String>) -> Self {
        Self {
            status: 400,
            code,
            error: error.to_owned(),
            description: description.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({
            "error_code": self.code,
            "error": self.error,
            "error_description": self.description,
        })
    }

    fn bad_request(description: impl Into<String>) -> Self {
        Self::new(11, "invalid_request", description)
    }

    fn bad_params(description: impl Into<String>) -> Self {
        Self::new(33, "invalid_parameter", description)
    }

    fn unknown_table(table: &str) -> Self {
        Self::new(
            31,
            "invalid_table",
            format!("テーブル {table} は指定できません"),
        )
    }

    fn validation(problems: &[String]) -> Self {
        Self::new(41, "validation_error", problems.join(" / "))
    }
}

/// One stored transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub head: Row,
    pub details: Vec<Row>,
}

impl Transaction {
    pub fn id(&self) -> u64 {
        self.head["transactionHeadId"].parse().unwrap_or(0)
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.head.get(name).map(String::as_str)
    }
}

/// Stock of one product in one store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub amount: i64,
    pub layaway: i64,
    pub updated: String,
}

/// One row of `StockHistory`: a change of one product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockChange {
    pub id: u64,
    pub store: String,
    pub product: String,
    /// The change, signed.
    pub amount: i64,
    /// The stock after it.
    pub stock_amount: i64,
    /// 在庫区分 (SMAREGI.md §2): "01" 修正, "02" 売上, "12" 返品, …
    pub division: String,
    pub updated: String,
}

/// Everything one contract holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    pub transactions: BTreeMap<u64, Transaction>,
    /// storeId → productId → stock.
    pub stock: BTreeMap<String, BTreeMap<String, Stock>>,
    pub next_transaction_id: u64,
    /// Every stock change, oldest first (`StockHistory`).
    #[serde(default)]
    pub stock_history: Vec<StockChange>,
    /// (terminalId, terminalTranId) → transaction ids, so that a look-up
    /// by terminal transaction does not scan every transaction (Smaregi
    /// answers those in constant time too). Derived: rebuilt by
    /// [`Contract::reindex`] after loading.
    #[serde(skip)]
    by_terminal: TerminalIndex,
}

#[derive(Debug, Clone, Default)]
struct TerminalIndex(std::collections::HashMap<(String, String), Vec<u64>>);

/// Derived from the transactions, so never a difference between contracts.
impl PartialEq for TerminalIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TerminalIndex {}

impl TerminalIndex {
    fn add(&mut self, id: u64, head: &Row) {
        if let (Some(terminal), Some(tran)) = (head.get("terminalId"), head.get("terminalTranId")) {
            self.0
                .entry((terminal.clone(), tran.clone()))
                .or_default()
                .push(id);
        }
    }
}

impl Contract {
    /// Rebuilds the derived look-up index, e.g. after loading a state file.
    pub fn reindex(&mut self) {
        let mut index = TerminalIndex::default();
        for (id, transaction) in &self.transactions {
            index.add(*id, &transaction.head);
        }
        self.by_terminal = index;
    }

    /// Runs one call at `now` (JST seconds); the answer's JSON on success.
    pub fn call(&mut self, proc_name: &str, params: &str, now: i64) -> Result<Value, ApiError> {
        let params: Value = serde_json::from_str(params)
            .map_err(|e| ApiError::bad_request(format!("params is not JSON: {e}")))?;
        let Value::Object(params) = params else {
            return Err(ApiError::bad_request("params must be a JSON object"));
        };
        match proc_name {
            "transaction_upd" => self.transaction_upd(&params, now),
            "transaction_ref" => self.transaction_ref(&params),
            "stock_ref" => self.stock_ref(&params),
            other => Err(ApiError::new(
                15,
                "invalid_proc_name",
                format!("proc_name {other} は存在しません"),
            )),
        }
    }

    /// Sets a product's stock, as a correction (修正) in the back office would.
    pub fn set_stock(&mut self, store: &str, product: &str, amount: i64, now: i64) {
        let before = self.stock_entry(store, product).amount;
        self.change_stock(store, product, amount - before, "01", now);
    }

    /// Changes a product's stock by `change` and records it in the history.
    fn change_stock(&mut self, store: &str, product: &str, change: i64, division: &str, now: i64) {
        let stock = self.stock_entry(store, product);
        stock.amount += change;
        stock.updated = time::format(now);
        let stock_amount = stock.amount;
        let id = self.stock_history.last().map_or(1, |last| last.id + 1);
        self.stock_history.push(StockChange {
            id,
            store: store.to_owned(),
            product: product.to_owned(),
            amount: change,
            stock_amount,
            division: division.to_owned(),
            updated: time::format(now),
        });
    }

    fn stock_entry(&mut self, store: &str, product: &str) -> &mut Stock {
        self.stock
            .entry(store.to_owned())
            .or_default()
            .entry(product.to_owned())
            .or_insert(Stock {
                amount: 0,
                layaway: 0,
                updated: String::new(),
            })
    }

    fn transaction_upd(
        &mut self,
        params: &Map<String, Value>,
        now: i64,
    ) -> Result<Value, ApiError> {
        let division = params
            .get("proc_info")
            .and_then(|info| info.get("proc_division"))
            .and_then(Value::as_str);
        if division != Some("U") {
            return Err(ApiError::bad_params(
                "proc_info.proc_division must be \"U\"",
            ));
        }
        let tables = params
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad_params("data must be an array of tables"))?;
        let mut heads = None;
        let mut details = None;
        for table in tables {
            let name = table
                .get("table_name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let rows = table.get("rows").and_then(Value::as_array).ok_or_else(|| {
                ApiError::bad_params(format!("table {name}: rows must be an array"))
            })?;
            if rows.len() > MAX_WRITE_ROWS {
                return Err(ApiError::bad_params(format!(
                    "table {name}: at most {MAX_WRITE_ROWS} rows per call"
                )));
            }
            match name {
                "TransactionHead" => heads = Some(rows),
                "TransactionDetail" => details = Some(rows),
                other => return Err(ApiError::unknown_table(other)),
            }
        }
        let heads = heads.ok_or_else(|| ApiError::bad_params("TransactionHead is required"))?;
        if heads.len() != 1 {
            return Err(ApiError::bad_params(
                "one TransactionHead row per call (the simulator's rule)",
            ));
        }
        if heads[0].get("transactionHeadId").is_some() {
            return self.update_transaction(&heads[0], now);
        }
        let details =
            details.ok_or_else(|| ApiError::bad_params("TransactionDetail is required"))?;
        let mut problems = Vec::new();
        let head = string_row("TransactionHead", &heads[0], &mut problems);
        let details: Vec<Row> = details
            .iter()
            .enumerate()
            .map(|(i, row)| string_row(&format!("TransactionDetail[{i}]"), row, &mut problems))
            .collect();
        if problems.is_empty() {
            self.validate_transaction(&head, &details, &mut problems);
        }
        if !problems.is_empty() {
            return Err(ApiError::validation(&problems));
        }

        self.next_transaction_id += 1;
        let id = self.next_transaction_id;
        let mut head = head;
        head.insert("transactionHeadId".into(), id.to_string());
        head.insert("updDateTime".into(), time::format(now));
        head.entry("cancelDivision".into())
            .or_insert_with(|| "0".into());
        let store = head["storeId"].clone();
        let details: Vec<Row> = details
            .into_iter()
            .map(|mut detail| {
                detail.insert("transactionHeadId".into(), id.to_string());
                detail
            })
            .collect();
        for detail in &details {
            if let Some(product) = detail.get("productId") {
                let quantity: i64 = detail["quantity"].parse().unwrap_or(0);
                let change = if detail["transactionDetailDivision"] == "2" {
                    quantity
                } else {
                    -quantity
                };
                let division = if change > 0 { "12" } else { "02" };
                self.change_stock(&store, &product.clone(), change, division, now);
            }
        }
        let detail_count = details.len();
        self.by_terminal.add(id, &head);
        self.transactions.insert(id, Transaction { head, details });
        Ok(json!({
            "result": {
                "TransactionHead": 1,
                "TransactionHeadIds": [id.to_string()],
                "TransactionDetail": detail_count,
            }
        }))
    }

    /// 取消 of a stored transaction: a head row with its
    /// `transactionHeadId` and `cancelDivision` "1" (the only change the
    /// simulator accepts on an existing transaction). Its stock moves back
    /// once; a second 取消 changes nothing.
    fn update_transaction(&mut self, row: &Value, now: i64) -> Result<Value, ApiError> {
        let mut problems = Vec::new();
        let head = string_row("TransactionHead", row, &mut problems);
        let id = head
            .get("transactionHeadId")
            .and_then(|id| id.parse::<u64>().ok());
        let Some(id) = id.filter(|id| self.transactions.contains_key(id)) else {
            problems.push(format!(
                "transactionHeadId {:?} の取引が見つかりません (not found)",
                head.get("transactionHeadId")
            ));
            return Err(ApiError::validation(&problems));
        };
        for field in head.keys() {
            if field != "transactionHeadId" && field != "cancelDivision" {
                problems.push(format!(
                    "{field} は更新できません (only cancelDivision can change)"
                ));
            }
        }
        if head.get("cancelDivision").map(String::as_str) != Some("1") {
            problems.push("cancelDivision は 1 (取消) のみ指定できます".into());
        }
        if !problems.is_empty() {
            return Err(ApiError::validation(&problems));
        }
        let transaction = self.transactions.get_mut(&id).expect("checked above");
        if transaction.field("cancelDivision") != Some("1") {
            transaction.head.insert("cancelDivision".into(), "1".into());
            transaction
                .head
                .insert("updDateTime".into(), time::format(now));
            let store = transaction.head["storeId"].clone();
            let moves: Vec<(String, i64)> = transaction
                .details
                .iter()
                .filter_map(|detail| {
                    let quantity: i64 = detail["quantity"].parse().unwrap_or(0);
                    let sold = if detail["transactionDetailDivision"] == "2" {
                        -quantity
                    } else {
                        quantity
                    };
                    Some((detail.get("productId")?.clone(), sold))
                })
                .collect();
            for (product, back) in moves {
                self.change_stock(&store, &product, back, "12", now);
            }
        }
        Ok(json!({"result": {"TransactionHead": 1, "TransactionHeadIds": [id.to_string()]}}))
    }

    fn validate_transaction(&self, head: &Row, details: &[Row], problems: &mut Vec<String>) {
        let mut require = |row: &Row, table: &str, field: &str| -> Option<String> {
            match row.get(field) {
                Some(value) if !value.is_empty() => Some(value.clone()),
                _ => {
                    problems.push(format!("{table}.{field} は必須です (required)"));
                    None
                }
            }
        };
        let division = require(head, "TransactionHead", "transactionHeadDivision");
        let subtotal = require(head, "TransactionHead", "subtotal");
        let total = require(head, "TransactionHead", "total");
        let store = require(head, "TransactionHead", "storeId");
        let terminal = require(head, "TransactionHead", "terminalId");
        let terminal_tran = require(head, "TransactionHead", "terminalTranId");
        let tran_time = require(head, "TransactionHead", "terminalTranDateTime");
        let mut detail_fields = Vec::new();
        for (i, detail) in details.iter().enumerate() {
            let table = format!("TransactionDetail[{i}]");
            detail_fields.push((
                require(detail, &table, "transactionDetailId"),
                require(detail, &table, "transactionDetailDivision"),
                require(detail, &table, "salesPrice"),
                require(detail, &table, "quantity"),
            ));
        }

        if let Some(division) = division {
            if !matches!(
                division.as_str(),
                "1" | "2"
                    | "3"
                    | "4"
                    | "5"
                    | "6"
                    | "7"
                    | "8"
                    | "9"
                    | "10"
                    | "11"
                    | "12"
                    | "13"
                    | "14"
            ) {
                problems.push(format!("transactionHeadDivision {division} は不正です"));
            }
        }
        if let Some(store) = &store {
            if !is_digits(store, 1, 9) {
                problems.push(format!("storeId {store} は9桁以内の数字です"));
            }
        }
        if let Some(terminal) = &terminal {
            if !is_digits(terminal, 1, 9) || terminal.starts_with('0') {
                problems.push(format!("terminalId {terminal} は1〜9桁の数字です"));
            }
        }
        if let Some(id) = &terminal_tran {
            if !(1..=10).contains(&id.chars().count()) {
                problems.push(format!("terminalTranId {id} は1〜10文字です"));
            }
        }
        if let Some(at) = &tran_time {
            if time::parse(at).is_none() || at.len() != 19 {
                problems.push(format!(
                    "terminalTranDateTime {at} は YYYY-MM-DD HH:MM:SS 形式です"
                ));
            }
        }
        let money = |field: &str, problems: &mut Vec<String>| -> i64 {
            match head.get(field) {
                None => 0,
                Some(value) => value.parse().unwrap_or_else(|_| {
                    problems.push(format!("{field} {value} は整数です (integer)"));
                    0
                }),
            }
        };
        let subtotal_value = subtotal.map(|_| money("subtotal", problems));
        let total_value = total.map(|_| money("total", problems));
        let discount = money("subtotalDiscountPrice", problems);
        let outer_tax = money("taxExclude", problems);
        let carriage = money("carriage", problems);
        let commission = money("commission", problems);

        let mut ids = BTreeSet::new();
        let mut line_sum: i64 = 0;
        for (i, (id, detail_division, price, quantity)) in detail_fields.into_iter().enumerate() {
            if let Some(id) = id {
                match id.parse::<u32>() {
                    Ok(n) if (1..=999).contains(&n) && !id.starts_with('0') => {
                        if !ids.insert(n) {
                            problems.push(format!(
                                "transactionDetailId {id} が重複しています (duplicate)"
                            ));
                        }
                    }
                    _ => problems.push(format!("transactionDetailId {id} は1〜999です")),
                }
            }
            if let Some(division) = detail_division {
                if division != "1" && division != "2" {
                    problems.push(format!("TransactionDetail[{i}].transactionDetailDivision {division} は 1 か 2 です"));
                }
            }
            let price = price.and_then(|p| {
                p.parse::<i64>()
                    .map_err(|_| {
                        problems.push(format!("TransactionDetail[{i}].salesPrice {p} は整数です"))
                    })
                    .ok()
            });
            let quantity = quantity.and_then(|q| {
                q.parse::<i64>()
                    .map_err(|_| {
                        problems.push(format!("TransactionDetail[{i}].quantity {q} は整数です"))
                    })
                    .ok()
            });
            if let (Some(price), Some(quantity)) = (price, quantity) {
                line_sum += price * quantity;
            }
            let detail = &details[i];
            if let Some(product) = detail.get("productId") {
                if !is_digits(product, 1, 15) {
                    problems.push(format!(
                        "TransactionDetail[{i}].productId {product} は15桁以内の数字です"
                    ));
                }
            }
            if let Some(code) = detail.get("productCode") {
                if code.len() > 20 || !code.bytes().all(|b| b.is_ascii_graphic()) {
                    problems.push(format!(
                        "TransactionDetail[{i}].productCode {code} は20文字以内の半角英数記号です"
                    ));
                }
            }
        }
        if details.is_empty() {
            problems.push("TransactionDetail は1行以上必要です (at least one line)".into());
        }
        if let Some(subtotal) = subtotal_value {
            if problems.is_empty() && subtotal != line_sum {
                problems.push(format!(
                    "subtotal {subtotal} が明細の合計 {line_sum} と一致しません (subtotal does not match the lines)"
                ));
            }
            if let Some(total) = total_value {
                let expected = subtotal - discount + outer_tax + carriage + commission;
                if problems.is_empty() && total != expected {
                    problems.push(format!(
                        "total {total} が {expected} (subtotal − subtotalDiscountPrice + taxExclude + carriage + commission) と一致しません"
                    ));
                }
            }
        }
        if head.get("disposeDivision").map(String::as_str) == Some("2") {
            let original = head
                .get("disposeServerTransactionHeadId")
                .and_then(|id| id.parse::<u64>().ok());
            match original {
                Some(id) if self.transactions.contains_key(&id) => {}
                _ => problems.push(format!(
                    "disposeServerTransactionHeadId {:?} の取引が見つかりません (original not found)",
                    head.get("disposeServerTransactionHeadId")
                )),
            }
        }
    }

    fn transaction_ref(&self, params: &Map<String, Value>) -> Result<Value, ApiError> {
        let query = Query::parse(params)?;
        let detail = match query.table.as_str() {
            "TransactionHead" => false,
            "TransactionDetail" => true,
            other => return Err(ApiError::unknown_table(other)),
        };
        for group in &query.conditions {
            if !is_bounded(group) {
                return Err(ApiError::validation(&[format!(
                    "検索条件には transactionHeadId の範囲 ({MAX_ID_SPAN}件以内) か日時の範囲 ({MAX_DAYS_SPAN}日以内) が必要です \
                     (a bounded id or date range is required)"
                )]));
            }
        }
        if query.conditions.is_empty() {
            return Err(ApiError::validation(&[
                "conditions は必須です (required)".to_owned()
            ]));
        }
        let rows = self.candidates(&query).flat_map(|transaction| {
            let matched = query.matches(&transaction.head);
            let rows: Vec<&Row> = match (matched, detail) {
                (false, _) => Vec::new(),
                (true, false) => vec![&transaction.head],
                (true, true) => transaction.details.iter().collect(),
            };
            rows
        });
        Ok(query.page(rows))
    }

    /// The transactions a query can match, in id order: through the index
    /// when every condition group names a terminal transaction exactly.
    fn candidates<'a>(&'a self, query: &Query) -> Box<dyn Iterator<Item = &'a Transaction> + 'a> {
        let mut ids = BTreeSet::new();
        for group in &query.conditions {
            let exact = |field: &str| {
                group
                    .iter()
                    .find(|c| c.field == field && c.operator == Operator::Eq)
                    .map(|c| c.value.clone())
            };
            match (exact("terminalId"), exact("terminalTranId")) {
                (Some(terminal), Some(tran)) => {
                    if let Some(found) = self.by_terminal.0.get(&(terminal, tran)) {
                        ids.extend(found);
                    }
                }
                _ => return Box::new(self.transactions.values()),
            }
        }
        Box::new(ids.into_iter().filter_map(|id| self.transactions.get(&id)))
    }

    fn stock_ref(&self, params: &Map<String, Value>) -> Result<Value, ApiError> {
        let query = Query::parse(params)?;
        if query.table == "StockHistory" {
            let rows: Vec<Row> = self
                .stock_history
                .iter()
                .map(|change| {
                    Row::from([
                        ("stockHistoryId".to_owned(), change.id.to_string()),
                        ("storeId".to_owned(), change.store.clone()),
                        ("productId".to_owned(), change.product.clone()),
                        ("amount".to_owned(), change.amount.to_string()),
                        ("stockAmount".to_owned(), change.stock_amount.to_string()),
                        ("stockDivision".to_owned(), change.division.clone()),
                        ("updDateTime".to_owned(), change.updated.clone()),
                    ])
                })
                .filter(|row| query.conditions.is_empty() || query.matches(row))
                .collect();
            return Ok(query.page(rows.iter()));
        }
        if query.table != "Stock" {
            return Err(ApiError::unknown_table(&query.table));
        }
        // Smaregi answers look-ups of named products from an index; so does
        // the simulator, in the order a scan would give.
        let rows: Vec<Row> = match query.exact_stock_keys() {
            Some(keys) => keys
                .into_iter()
                .filter_map(|(store, product)| {
                    let stock = self.stock.get(store)?.get(product)?;
                    Some(stock_row(store, product, stock))
                })
                .collect(),
            None => self
                .stock
                .iter()
                .flat_map(|(store, products)| {
                    products
                        .iter()
                        .map(move |(product, stock)| (store, product, stock))
                })
                .map(|(store, product, stock)| stock_row(store, product, stock))
                .filter(|row| query.conditions.is_empty() || query.matches(row))
                .collect(),
        };
        Ok(query.page(rows.iter()))
    }
}

fn stock_row(store: &str, product: &str, stock: &Stock) -> Row {
    Row::from([
        ("storeId".to_owned(), store.to_owned()),
        ("productId".to_owned(), product.to_owned()),
        ("stockAmount".to_owned(), stock.amount.to_string()),
        ("layawayStockAmount".to_owned(), stock.layaway.to_string()),
        ("updDateTime".to_owned(), stock.updated.clone()),
    ])
}

impl Query {
    /// The (store, product) pairs, sorted and unique, when every condition
    /// group is exactly `storeId` = … and `productId` = ….
    fn exact_stock_keys(&self) -> Option<Vec<(&str, &str)>> {
        if self.conditions.is_empty() {
            return None;
        }
        let mut keys = Vec::with_capacity(self.conditions.len());
        for group in &self.conditions {
            let [a, b] = group.as_slice() else {
                return None;
            };
            let field = |name: &str| {
                [a, b]
                    .into_iter()
                    .find(|c| c.field == name && c.operator == Operator::Eq)
                    .map(|c| c.value.as_str())
            };
            keys.push((field("storeId")?, field("productId")?));
        }
        keys.sort_unstable();
        keys.dedup();
        Some(keys)
    }
}

/// A row's values, which must all be strings.
fn string_row(table: &str, row: &Value, problems: &mut Vec<String>) -> Row {
    let Some(object) = row.as_object() else {
        problems.push(format!(
            "{table} は JSON オブジェクトです (must be an object)"
        ));
        return Row::new();
    };
    object
        .iter()
        .filter_map(|(field, value)| match value {
            Value::String(text) => Some((field.clone(), text.clone())),
            Value::Null => None,
            other => {
                problems.push(format!(
                    "{table}.{field} は文字列で指定してください (must be a string, got {other})"
                ));
                None
            }
        })
        .collect()
}

fn is_digits(text: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
}

#[derive(Debug, Clone)]
struct Condition {
    field: String,
    operator: Operator,
    value: String,
}

impl Condition {
    fn matches(&self, row: &Row) -> bool {
        let Some(actual) = row.get(&self.field) else {
            return false;
        };
        let ordering = compare(actual, &self.value);
        match self.operator {
            Operator::Eq => ordering == Ordering::Equal,
            Operator::Ne => ordering != Ordering::Equal,
            Operator::Ge => ordering != Ordering::Less,
            Operator::Le => ordering != Ordering::Greater,
            Operator::Gt => ordering == Ordering::Greater,
            Operator::Lt => ordering == Ordering::Less,
        }
    }
}

/// Numbers as numbers, everything else (datetimes included) as text.
fn compare(a: &str, b: &str) -> Ordering {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// A read call's table, conditions (objects are OR-ed; the keys inside one
/// are AND-ed), and page.
struct Query {
    table: String,
    conditions: Vec<Vec<Condition>>,
    limit: u64,
    page: u64,
}

impl Query {
    fn parse(params: &Map<String, Value>) -> Result<Self, ApiError> {
        let table = params
            .get("table_name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_params("table_name is required"))?
            .to_owned();
        let limit = number_param(params, "limit", 100)?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_params(format!(
                "limit must be 1 to {MAX_LIMIT}"
            )));
        }
        let page = number_param(params, "page", 1)?;
        if page < 1 {
            return Err(ApiError::bad_params("page starts at 1"));
        }
        let mut conditions = Vec::new();
        match params.get("conditions") {
            None => {}
            Some(Value::Array(groups)) => {
                for group in groups {
                    let Value::Object(group) = group else {
                        return Err(ApiError::bad_params("each condition must be an object"));
                    };
                    let mut parsed = Vec::new();
                    for (key, value) in group {
                        let Value::String(value) = value else {
                            return Err(ApiError::bad_params(format!(
                                "condition {key}: the value must be a string"
                            )));
                        };
                        let (field, operator) = match key.split_once(' ') {
                            None => (key.as_str(), Operator::Eq),
                            Some((field, operator)) => {
                                let operator = match operator.trim() {
                                    "=" => Operator::Eq,
                                    "!=" | "<>" => Operator::Ne,
                                    ">=" => Operator::Ge,
                                    "<=" => Operator::Le,
                                    ">" => Operator::Gt,
                                    "<" => Operator::Lt,
                                    other => {
                                        return Err(ApiError::bad_params(format!(
                                            "condition {key}: unknown operator {other}"
                                        )))
                                    }
                                };
                                (field, operator)
                            }
                        };
                        parsed.push(Condition {
                            field: field.to_owned(),
                            operator,
                            value: value.clone(),
                        });
                    }
                    conditions.push(parsed);
                }
            }
            Some(_) => return Err(ApiError::bad_params("conditions must be an array")),
        }
        Ok(Self {
            table,
            conditions,
            limit,
            page,
        })
    }

    fn matches(&self, row: &Row) -> bool {
        self.conditions
            .iter()
            .any(|group| group.iter().all(|condition| condition.matches(row)))
    }

    fn page<'a>(&self, rows: impl Iterator<Item = &'a Row>) -> Value {
        let rows: Vec<&Row> = rows.collect();
        let skip = ((self.page - 1) * self.limit) as usize;
        let result: Vec<&Row> = rows
            .iter()
            .skip(skip)
            .take(self.limit as usize)
            .copied()
            .collect();
        json!({"total_count": rows.len().to_string(), "result": result})
    }
}

fn number_param(params: &Map<String, Value>, name: &str, default: u64) -> Result<u64, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ApiError::bad_params(format!("{name} must be a positive integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| ApiError::bad_params(format!("{name} must be a positive integer"))),
        Some(_) => Err(ApiError::bad_params(format!(
            "{name} must be a positive integer"
        ))),
    }
}

/// A `transaction_ref` condition group must bound the id range or a
/// datetime range.
fn is_bounded(group: &[Condition]) -> bool {
    let bound = |field: &str, operators: &[Operator]| -> Option<&str> {
        group
            .iter()
            .find(|c| c.field == field && operators.contains(&c.operator))
            .map(|c| c.value.as_str())
    };
    let lower = [Operator::Ge, Operator::Gt, Operator::Eq];
    let upper = [Operator::Le, Operator::Lt, Operator::Eq];
    if let (Some(low), Some(high)) = (
        bound("transactionHeadId", &lower),
        bound("transactionHeadId", &upper),
    ) {
        if let (Ok(low), Ok(high)) = (low.parse::<u64>(), high.parse::<u64>()) {
            if high >= low && high - low <= MAX_ID_SPAN {
                return true;
            }
        }
    }
    ["terminalTranDateTime", "updDateTime", "sumDate"]
        .iter()
        .any(|field| match (bound(field, &lower), bound(field, &upper)) {
            (Some(low), Some(high)) => match (time::parse(low), time::parse(high)) {
                (Some(low), Some(high)) => high >= low && high - low <= MAX_DAYS_SPAN * 86_400,
                _ => false,
            },
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-22 10:00:00";

    fn now() -> i64 {
        time::parse(NOW).unwrap()
    }

    fn head(terminal_tran_id: &str, subtotal: i64) -> Value {
        json!({
            "transactionHeadDivision": "1",
            "cancelDivision": "0",
            "subtotal": subtotal.to_string(),
            "total": (subtotal + 500).to_string(),
            "carriage": "500",
            "storeId": "1",
            "terminalId": "9",
            "terminalTranId": terminal_tran_id,
            "terminalTranDateTime": "2026-11-22 09:58:00",
        })
    }

    fn line(id: &str, product: &str, price: i64, quantity: i64, division: &str) -> Value {
        json!({
            "transactionDetailId": id,
            "transactionDetailDivision": division,
            "productId": product,
            "salesPrice": price.to_string(),
            "quantity": quantity.to_string(),
        })
    }

    fn upd(head: Value, lines: Vec<Value>) -> String {
        json!({
            "proc_info": {"proc_division": "U"},
            "data": [
                {"table_name": "TransactionHead", "rows": [head]},
                {"table_name": "TransactionDetail", "rows": lines},
            ],
        })
        .to_string()
    }

    fn register(contract: &mut Contract, params: &str) -> Result<u64, ApiError> {
        let answer = contract.call("transaction_upd", params, now())?;
        Ok(answer["result"]["TransactionHeadIds"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap())
    }

    fn stock(contract: &Contract, product: &str) -> i64 {
        contract.stock["1"][product].amount
    }

    #[test]
    fn a_sale_is_stored_with_its_id_and_moves_stock() {
        let mut contract = Contract::default();
        contract.set_stock("1", "113", 10, now());
        let params = upd(head("A1", 2400), vec![line("1", "113", 1200, 2, "1")]);
        let id = register(&mut contract, &params).unwrap();
        let stored = &contract.transactions[&id];
        assert_eq!(stored.field("terminalTranId"), Some("A1"));
        assert_eq!(stored.field("updDateTime"), Some(NOW));
        assert_eq!(stored.details[0]["transactionHeadId"], id.to_string());
        assert_eq!(stock(&contract, "113"), 8);
    }

    #[test]
    fn a_reversal_points_at_its_original_and_puts_stock_back() {
        let mut contract = Contract::default();
        let original = register(
            &mut contract,
            &upd(head("A1", 2400), vec![line("1", "113", 1200, 2, "1")]),
        )
        .unwrap();
        let mut reversal = head("A2", -2400);
        reversal["total"] = json!("-2900");
        reversal["carriage"] = json!("-500");
        reversal["disposeDivision"] = json!("2");
        reversal["disposeServerTransactionHeadId"] = json!(original.to_string());
        register(
            &mut contract,
            &upd(reversal.clone(), vec![line("1", "113", -1200, 2, "2")]),
        )
        .unwrap();
        assert_eq!(stock(&contract, "113"), 0);

        reversal["disposeServerTransactionHeadId"] = json!("999999");
        let error = register(
            &mut contract,
            &upd(reversal, vec![line("1", "113", -1200, 2, "2")]),
        )
        .unwrap_err();
        assert_eq!(error.code, 41);
        assert!(error.description.contains("original not found"), "{error}");
    }

    #[test]
    fn validation_names_every_problem() {
        let mut contract = Contract::default();
        let cases: Vec<(String, &str)> = vec![
            (
                upd(head("A1", 999), vec![line("1", "113", 1200, 2, "1")]),
                "subtotal does not match",
            ),
            (
                upd(
                    head("ABCDEFGHIJK", 1200),
                    vec![line("1", "113", 1200, 1, "1")],
                ),
                "terminalTranId",
            ),
            (
                upd(
                    head("A1", 2400),
                    vec![
                        line("1", "113", 1200, 1, "1"),
                        line("1", "114", 1200, 1, "1"),
                    ],
                ),
                "duplicate",
            ),
            (
                upd(head("A1", 1200), vec![line("1000", "113", 1200, 1, "1")]),
                "1〜999",
            ),
            (
                upd(head("A1", 1200), vec![line("1", "113", 1200, 1, "3")]),
                "transactionDetailDivision",
            ),
            (upd(head("A1", 1200), vec![]), "at least one line"),
        ];
        for (params, expected) in cases {
            let error = register(&mut contract, &params).unwrap_err();
            assert_eq!((error.status, error.code), (400, 41), "{expected}: {error}");
            assert!(error.description.contains(expected), "{expected}: {error}");
        }
        let mut numbers = head("A1", 1200);
        numbers["subtotal"] = json!(1200);
        let error = register(
            &mut contract,
            &upd(numbers, vec![line("1", "113", 1200, 1, "1")]),
        )
        .unwrap_err();
        assert!(error.description.contains("must be a string"), "{error}");
        let mut missing = head("A1", 1200);
        missing.as_object_mut().unwrap().remove("terminalId");
        let error = register(
            &mut contract,
            &upd(missing, vec![line("1", "113", 1200, 1, "1")]),
        )
        .unwrap_err();
        assert!(
            error.description.contains("terminalId は必須です"),
            "{error}"
        );
        let mut wrong_total = head("A1", 1200);
        wrong_total["total"] = json!("1200");
        let error = register(
            &mut contract,
            &upd(wrong_total, vec![line("1", "113", 1200, 1, "1")]),
        )
        .unwrap_err();
        assert!(error.description.contains("total 1200"), "{error}");
        assert!(
            contract.transactions.is_empty(),
            "nothing invalid is stored"
        );
    }

    #[test]
    fn a_cancel_flag_puts_stock_back_once_and_changes_nothing_else() {
        let mut contract = Contract::default();
        let id = register(
            &mut contract,
            &upd(head("A1", 2400), vec![line("1", "113", 1200, 2, "1")]),
        )
        .unwrap();
        let cancel = |id: &str, extra: Value| {
            let mut row = json!({"transactionHeadId": id, "cancelDivision": "1"});
            row.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            json!({"proc_info": {"proc_division": "U"}, "data": [{"table_name": "TransactionHead", "rows": [row]}]}).to_string()
        };
        for _ in 0..2 {
            let answer = contract
                .call(
                    "transaction_upd",
                    &cancel(&id.to_string(), json!({})),
                    now(),
                )
                .unwrap();
            assert_eq!(answer["result"]["TransactionHeadIds"][0], id.to_string());
        }
        assert_eq!(
            contract.transactions[&id].field("cancelDivision"),
            Some("1")
        );
        assert_eq!(stock(&contract, "113"), 0, "back once, not twice");
        assert_eq!(contract.transactions.len(), 1);
        let error = contract
            .call("transaction_upd", &cancel("999", json!({})), now())
            .unwrap_err();
        assert_eq!(error.code, 41);
        let error = contract
            .call(
                "transaction_upd",
                &cancel(&id.to_string(), json!({"total": "0"})),
                now(),
            )
            .unwrap_err();
        assert!(error.description.contains("only cancelDivision"), "{error}");
    }

    #[test]
    fn malformed_calls_get_their_codes() {
        let mut contract = Contract::default();
        assert_eq!(
            contract
                .call("transaction_upd", "{not json", now())
                .unwrap_err()
                .code,
            11
        );
        assert_eq!(
            contract
                .call("product_delete", "{}", now())
                .unwrap_err()
                .code,
            15
        );
        assert_eq!(
            contract
                .call("transaction_upd", "{}", now())
                .unwrap_err()
                .code,
            33
        );
        let params = json!({"table_name": "Customer"}).to_string();
        assert_eq!(
            contract.call("stock_ref", &params, now()).unwrap_err().code,
            31
        );
        let params = json!({"table_name": "Stock", "limit": 1001}).to_string();
        assert_eq!(
            contract.call("stock_ref", &params, now()).unwrap_err().code,
            33
        );
    }

    fn find(
        contract: &mut Contract,
        conditions: Value,
        page: u64,
        limit: u64,
    ) -> Result<Value, ApiError> {
        let params = json!({
            "table_name": "TransactionHead",
            "conditions": conditions,
            "limit": limit,
            "page": page,
        });
        contract.call("transaction_ref", &params.to_string(), now())
    }

    #[test]
    fn transactions_are_found_by_terminal_and_window_and_paged() {
        let mut contract = Contract::default();
        for n in 1..=5 {
            register(
                &mut contract,
                &upd(
                    head(&format!("A{n}"), 1200),
                    vec![line("1", "113", 1200, 1, "1")],
                ),
            )
            .unwrap();
        }
        let window = |terminal_tran_id: &str| {
            json!([{
                "storeId": "1",
                "terminalId": "9",
                "terminalTranId": terminal_tran_id,
                "terminalTranDateTime >=": "2026-11-21 00:00:00",
                "terminalTranDateTime <=": "2026-11-23 23:59:59",
            }])
        };
        let found = find(&mut contract, window("A3"), 1, 100).unwrap();
        assert_eq!(found["total_count"], "1");
        assert_eq!(found["result"][0]["terminalTranId"], "A3");
        assert_eq!(
            find(&mut contract, window("Z9"), 1, 100).unwrap()["total_count"],
            "0"
        );

        let all = json!([{"transactionHeadId >=": "1", "transactionHeadId <=": "100"}]);
        let page = find(&mut contract, all.clone(), 2, 2).unwrap();
        assert_eq!(page["total_count"], "5");
        let ids: Vec<&str> = page["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["transactionHeadId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["3", "4"]);

        for unbounded in [
            json!([{"terminalTranId": "A3"}]),
            json!([{"terminalTranDateTime >=": "2026-10-01 00:00:00", "terminalTranDateTime <=": "2026-11-23 00:00:00"}]),
            json!([{"transactionHeadId >=": "1", "transactionHeadId <=": "200000"}]),
        ] {
            let error = find(&mut contract, unbounded.clone(), 1, 100).unwrap_err();
            assert_eq!(error.code, 41, "{unbounded}");
        }
    }

    #[test]
    fn stock_is_read_by_store_and_product() {
        let mut contract = Contract::default();
        contract.set_stock("1", "113", 4, now());
        contract.set_stock("1", "114", -2, now());
        contract.set_stock("2", "113", 9, now());
        let params = json!({"table_name": "Stock", "conditions": [{"storeId": "1", "productId": "114"}, {"storeId": "2"}]});
        let answer = contract
            .call("stock_ref", &params.to_string(), now())
            .unwrap();
        assert_eq!(answer["total_count"], "2");
        assert_eq!(answer["result"][0]["stockAmount"], "-2");
        assert_eq!(answer["result"][1]["storeId"], "2");
        assert_eq!(answer["result"][1]["updDateTime"], NOW);
    }

    #[test]
    fn the_contract_round_trips_through_its_state_file_format() {
        let mut contract = Contract::default();
        contract.set_stock("1", "113", 4, now());
        register(
            &mut contract,
            &upd(head("A1", 1200), vec![line("1", "113", 1200, 1, "1")]),
        )
        .unwrap();
        let saved = serde_json::to_string(&contract).unwrap();
        let mut loaded = serde_json::from_str::<Contract>(&saved).unwrap();
        assert_eq!(loaded, contract);
        loaded.reindex();
        let conditions = json!([{"terminalId": "9", "terminalTranId": "A1",
            "transactionHeadId >=": "1", "transactionHeadId <=": "10"}]);
        assert_eq!(
            find(&mut loaded, conditions, 1, 10).unwrap()["total_count"],
            "1",
            "found through the rebuilt index"
        );
    }
}
