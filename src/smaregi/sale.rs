//! A transaction (取引) as we register it, and its reversal (打消): typed,
//! with the money rules Smaregi enforces, turned into `transaction_upd`
//! rows of strings only when sent. Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::PaymentKind;

/// One line (明細) of a sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SaleLine {
    /// 商品ID: moves Smaregi's stock. A line without one is stored by
    /// code and name only.
    pub product_id: Option<String>,
    /// 商品コード (≤ 20 ASCII characters).
    pub product_code: Option<String>,
    pub product_name: Option<String>,
    /// Price per unit (販売単価), tax included, in yen.
    pub sales_price: i64,
    pub quantity: i64,
    /// A returned line (明細区分 2).
    #[serde(default)]
    pub returned: bool,
}

impl SaleLine {
    pub fn amount(&self) -> i64 {
        self.sales_price * self.quantity
    }
}

/// A transaction to register. `terminal_tran_id` and
/// `terminal_tran_date_time` are fixed when its job is created: they are
/// how a registration that may have happened is found again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Sale {
    pub store_id: String,
    pub terminal_id: String,
    /// 端末取引ID: 1 to 10 characters, unique per terminal.
    pub terminal_tran_id: String,
    /// `YYYY-MM-DD HH:MM:SS`, JST.
    pub terminal_tran_date_time: String,
    pub lines: Vec<SaleLine>,
    /// 小計値引き, in yen.
    #[serde(default)]
    pub discount: i64,
    /// Tax added on top (外税), in yen.
    #[serde(default)]
    pub tax_exclude: i64,
    /// 送料.
    #[serde(default)]
    pub carriage: i64,
    /// 手数料.
    #[serde(default)]
    pub commission: i64,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub memo: Option<String>,
    /// For a reversal (打消): the original's `transactionHeadId`, filled in
    /// when it is sent.
    #[serde(default)]
    pub dispose_of: Option<u64>,
    /// Tax contained in the prices (内税), in yen: recorded, not added.
    #[serde(default)]
    pub tax_include: i64,
    /// 集計区分.
    #[serde(default = "default_sum_division")]
    pub sum_division: u8,
    /// How it was paid; `None` records no payment.
    #[serde(default)]
    pub payment: Option<SalePayment>,
}

fn default_sum_division() -> u8 {
    2
}

/// A payment (預り) of `amount` yen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SalePayment {
    pub kind: PaymentKind,
    pub amount: i64,
}

impl Sale {
    /// 小計: the sum of the lines.
    pub fn subtotal(&self) -> i64 {
        self.lines.iter().map(SaleLine::amount).sum()
    }

    /// 合計: subtotal − discount + outer tax + carriage + commission.
    pub fn total(&self) -> i64 {
        self.subtotal() - self.discount + self.tax_exclude + self.carriage + self.commission
    }

    /// The 打消 of this sale: every amount reversed, every line a return,
    /// under its own terminal transaction id and time.
    pub fn reversal(&self, terminal_tran_id: &str, terminal_tran_date_time: &str) -> Sale {
        Sale {
            terminal_tran_id: terminal_tran_id.to_owned(),
            terminal_tran_date_time: terminal_tran_date_time.to_owned(),
            lines: self
                .lines
                .iter()
                .map(|line| SaleLine {
                    sales_price: -line.sales_price,
                    returned: !line.returned,
                    ..line.clone()
                })
                .collect(),
            discount: -self.discount,
            tax_exclude: -self.tax_exclude,
            tax_include: -self.tax_include,
            payment: self.payment.as_ref().map(|payment| SalePayment {
                amount: -payment.amount,
                ..payment.clone()
            }),
            carriage: -self.carriage,
            commission: -self.commission,
            memo: Some(format!("打消 of {} (cancelled)", self.terminal_tran_id)),
            dispose_of: None,
            ..self.clone()
        }
    }

    /// How registering it moves Smaregi's stock of its store: per product,
    /// the summed change (a sold line takes stock, a returned line puts it
    /// back; a line without a 商品ID moves nothing). Products in id order,
    /// without zero changes.
    pub fn stock_moves(&self) -> Vec<(String, i64)> {
        let mut moves = std::collections::BTreeMap::<String, i64>::new();
        for line in &self.lines {
            let Some(product) = &line.product_id else {
                continue;
            };
            let change = if line.returned {
                line.quantity
            } else {
                -line.quantity
            };
            *moves.entry(product.clone()).or_default() += change;
        }
        moves
            .into_iter()
            .filter(|(_, change)| *change != 0)
            .collect()
    }

    /// The `params` of `transaction_upd` that registers it.
    pub fn transaction_upd_params(&self) -> Value {
        let mut head = Map::new();
        let mut put = |key: &str, value: String| {
            head.insert(key.to_owned(), Value::String(value));
        };
        put("transactionHeadDivision", "1".into());
        put("cancelDivision", "0".into());
        put("subtotal", self.subtotal().to_string());
        put("total", self.total().to_string());
        put("storeId", self.store_id.clone());
        put("terminalId", self.terminal_id.clone());
        put("terminalTranId", self.terminal_tran_id.clone());
        put("terminalTranDateTime", self.terminal_tran_date_time.clone());
        put("sumDivision", self.sum_division.to_string());
        put(
            "sumDate",
            self.terminal_tran_date_time.chars().take(10).collect(),
        );
        for (key, amount) in [
            ("subtotalDiscountPrice", self.discount),
            ("taxExclude", self.tax_exclude),
            ("taxInclude", self.tax_include),
            ("carriage", self.carriage),
            ("commission", self.commission),
        ] {
            if amount != 0 {
                put(key, amount.to_string());
            }
        }
        if let Some(payment) = &self.payment {
            let field = match payment.kind {
                PaymentKind::Cash => "depositCash",
                PaymentKind::Credit => "depositCredit",
            };
            put("deposit", payment.amount.to_string());
            put(field, payment.amount.to_string());
            put("change", "0".into());
        }
        if let Some(customer) = &self.customer_id {
            put("customerId", customer.clone());
        }
        if let Some(memo) = &self.memo {
            put("memo", memo.clone());
        }
        if let Some(original) = self.dispose_of {
            put("disposeDivision", "2".into());
            put("disposeServerTransactionHeadId", original.to_string());
        }
        let details: Vec<Value> = self
            .lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let mut row = Map::new();
                let mut put = |key: &str, value: String| {
                    row.insert(key.to_owned(), Value::String(value));
                };
                put("transactionDetailId", (i + 1).to_string());
                put(
                    "transactionDetailDivision",
                    if line.returned { "2" } else { "1" }.into(),
                );
                put("salesPrice", line.sales_price.to_string());
                put("price", line.sales_price.to_string());
                put("quantity", line.quantity.to_string());
                if let Some(id) = &line.product_id {
                    put("productId", id.clone());
                }
                if let Some(code) = &line.product_code {
                    put("productCode", code.clone());
                }
                if let Some(name) = &line.product_name {
                    put("productName", name.clone());
                }
                Value::Object(row)
            })
            .collect();
        json!({
            "proc_info": {"proc_division": "U"},
            "data": [
                {"table_name": "TransactionHead", "rows": [Value::Object(head)]},
                {"table_name": "TransactionDetail", "rows": details},
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stock_moves_sum_per_product_and_a_reversal_undoes_them() {
        let line = |product: Option<&str>, quantity: i64, returned: bool| SaleLine {
            product_id: product.map(str::to_owned),
            product_code: None,
            product_name: None,
            sales_price: 100,
            quantity,
            returned,
        };
        let sale = Sale {
            store_id: "1".into(),
            terminal_id: "9".into(),
            terminal_tran_id: "1".into(),
            terminal_tran_date_time: "2026-11-22 10:00:00".into(),
            lines: vec![
                line(Some("113"), 2, false),
                line(Some("114"), 1, false),
                line(Some("113"), 1, false),
                line(None, 5, false),
                line(Some("115"), 1, true),
                line(Some("116"), 1, false),
                line(Some("116"), 1, true),
            ],
            discount: 0,
            tax_exclude: 0,
            carriage: 0,
            commission: 0,
            customer_id: None,
            memo: None,
            dispose_of: None,
            tax_include: 0,
            sum_division: 2,
            payment: None,
        };
        let moves = sale.stock_moves();
        assert_eq!(
            moves,
            [("113".into(), -3), ("114".into(), -1), ("115".into(), 1)]
        );
        let back = sale.reversal("2", "2026-11-22 11:00:00").stock_moves();
        let undone: Vec<(String, i64)> = moves.into_iter().map(|(p, c)| (p, -c)).collect();
        assert_eq!(back, undone);
    }

    use super::*;

    pub fn sample() -> Sale {
        Sale {
            store_id: "1".into(),
            terminal_id: "9".into(),
            terminal_tran_id: "17".into(),
            terminal_tran_date_time: "2026-11-22 10:00:00".into(),
            lines: vec![
                SaleLine {
                    product_id: Some("113".into()),
                    product_code: Some("4901234567894".into()),
                    product_name: Some("緑茶 500ml".into()),
                    sales_price: 150,
                    quantity: 2,
                    returned: false,
                },
                SaleLine {
                    product_id: Some("114".into()),
                    product_code: None,
                    product_name: None,
                    sales_price: 980,
                    quantity: 1,
                    returned: false,
                },
            ],
            discount: 100,
            tax_exclude: 0,
            carriage: 500,
            commission: 330,
            customer_id: None,
            memo: Some("EC order A-1".into()),
            dispose_of: None,
            tax_include: 0,
            sum_division: 2,
            payment: None,
        }
    }

    #[test]
    fn totals_follow_smaregis_rule() {
        let sale = sample();
        assert_eq!(sale.subtotal(), 1280);
        assert_eq!(sale.total(), 1280 - 100 + 500 + 330);
    }

    #[test]
    fn a_reversal_negates_every_amount_and_returns_every_line() {
        let sale = sample();
        let reversal = sale.reversal("18", "2026-11-23 09:00:00");
        assert_eq!(reversal.subtotal(), -sale.subtotal());
        assert_eq!(reversal.total(), -sale.total());
        assert!(reversal.lines.iter().all(|line| line.returned));
        assert_eq!(reversal.lines[0].quantity, 2, "quantities stay positive");
        assert_eq!(reversal.terminal_tran_id, "18");
        assert_eq!(reversal.store_id, sale.store_id);
    }

    #[test]
    fn params_carry_only_strings_and_the_original_of_a_reversal() {
        let mut reversal = sample().reversal("18", "2026-11-23 09:00:00");
        reversal.dispose_of = Some(952);
        let params = reversal.transaction_upd_params();
        let head = &params["data"][0]["rows"][0];
        assert_eq!(head["disposeDivision"], "2");
        assert_eq!(head["disposeServerTransactionHeadId"], "952");
        assert_eq!(head["subtotal"], "-1280");
        assert_eq!(head["sumDate"], "2026-11-23");
        let details = params["data"][1]["rows"].as_array().unwrap();
        assert_eq!(details[1]["transactionDetailId"], "2");
        assert_eq!(details[1]["transactionDetailDivision"], "2");
        for row in std::iter::once(head).chain(details) {
            assert!(
                row.as_object().unwrap().values().all(Value::is_string),
                "{row}"
            );
        }
    }
}
