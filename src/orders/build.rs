//! An order revision → the Smaregi transaction (取引) that records it.
//! Pure: no I/O; the mapping is a function handed in.
//!
//! Money rules, in yen, with integers only:
//! - each line's `salesPrice` is the order's unit price; `subtotal` is the
//!   sum of the lines (Smaregi refuses anything else);
//! - the discount is split over the tax rates in proportion to their
//!   lines (largest remainder, so the parts add up exactly), and tax is
//!   computed per rate on what is left, rounded as configured: contained
//!   in the prices (内税, `taxInclude`, recorded only) or added on top (外税,
//!   `taxExclude`, part of `total`);
//! - `total` = subtotal − discount + taxExclude + carriage, always.

use std::collections::BTreeMap;

use crate::config::{
    DiscountMode, OrdersConfig, PaymentKind, TaxMode, TaxRounding, UnmappedPolicy,
};
use crate::smaregi::sale::{Sale, SaleLine, SalePayment};

use super::model::{Order, ProductRef};

/// Smaregi's `memo` limit, in characters.
pub const MAX_SALE_MEMO_CHARS: usize = 1000;
/// The name of the line that carries a discount in `adjustment-line` mode.
pub const DISCOUNT_LINE_NAME: &str = "値引き (discount)";

/// What building needs besides the order: `[orders]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    pub default_store_id: Option<String>,
    pub terminal_id: String,
    pub tax_mode: TaxMode,
    pub tax_rounding: TaxRounding,
    pub unmapped: UnmappedPolicy,
    pub dummy_product_id: Option<String>,
    pub discount: DiscountMode,
    pub payment_methods: BTreeMap<String, PaymentKind>,
    pub sum_division: u8,
}

impl BuildSettings {
    /// `[orders]`, with `[smaregi] terminal-id` as the default terminal.
    pub fn from_config(orders: &OrdersConfig, smaregi_terminal_id: &str) -> Self {
        Self {
            default_store_id: orders.default_store_id.clone(),
            terminal_id: orders
                .terminal_id
                .clone()
                .unwrap_or_else(|| smaregi_terminal_id.to_owned()),
            tax_mode: orders.tax_mode,
            tax_rounding: orders.tax_rounding,
            unmapped: orders.unmapped,
            dummy_product_id: orders.dummy_product_id.clone(),
            discount: orders.discount,
            payment_methods: orders.payment_methods.clone(),
            sum_division: orders.sum_division,
        }
    }
}

/// A line whose product the mapping does not know.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnmappedLine {
    /// Index into the order's lines.
    pub line: usize,
    pub external_code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("no product is mapped to {}", .0.iter().map(|u| format!("lines[{}] {:?}", u.line, u.external_code)).collect::<Vec<_>>().join(", "))]
    Unmapped(Vec<UnmappedLine>),
    #[error("the order names no store_id and [orders] default-store-id is not set")]
    NoStore,
    #[error("payment_method {method:?} is not one of the configured methods: {known}")]
    UnknownPaymentMethod { method: String, known: String },
}

/// The transaction for `order`, with `terminal_tran_id` and its time left
/// empty: they are fixed when its job is staged.
pub fn build_sale(
    order: &Order,
    settings: &BuildSettings,
    smaregi_id_for: &dyn Fn(&str) -> Option<String>,
) -> Result<Sale, BuildError> {
    let store_id = order
        .store_id
        .clone()
        .or_else(|| settings.default_store_id.clone())
        .ok_or(BuildError::NoStore)?;

    let mut unmapped = Vec::new();
    let mut lines = Vec::with_capacity(order.lines.len() + 1);
    for (index, line) in order.lines.iter().enumerate() {
        let product_id = match &line.product {
            ProductRef::Smaregi(id) => Some(id.clone()),
            ProductRef::External(code) => match smaregi_id_for(code) {
                Some(id) => Some(id),
                None => match (settings.unmapped, &settings.dummy_product_id) {
                    (UnmappedPolicy::DummyProduct, Some(dummy)) => Some(dummy.clone()),
                    _ => {
                        unmapped.push(UnmappedLine {
                            line: index,
                            external_code: code.clone(),
                        });
                        None
                    }
                },
            },
        };
        lines.push(SaleLine {
            product_id,
            product_code: line.product_code.clone(),
            product_name: Some(line.name.clone()),
            sales_price: line.unit_price,
            quantity: line.quantity,
            returned: false,
        });
    }
    if !unmapped.is_empty() {
        return Err(BuildError::Unmapped(unmapped));
    }

    let payment_kind = match &order.payment_method {
        Some(method) if !settings.payment_methods.is_empty() => {
            Some(*settings.payment_methods.get(method).ok_or_else(|| {
                BuildError::UnknownPaymentMethod {
                    method: method.clone(),
                    known: settings
                        .payment_methods
                        .keys()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?)
        }
        _ => None,
    };

    let mut by_rate: BTreeMap<u8, i64> = BTreeMap::new();
    for line in &order.lines {
        *by_rate.entry(line.tax_rate).or_default() += line.amount();
    }
    let rates: Vec<(u8, i64)> = by_rate.into_iter().collect();
    let shares = allocate(
        order.discount,
        &rates.iter().map(|(_, amount)| *amount).collect::<Vec<_>>(),
    );
    let tax: i64 = rates
        .iter()
        .zip(&shares)
        .map(|((rate, amount), share)| {
            let taxable = amount - share;
            let rate = i64::from(*rate);
            match settings.tax_mode {
                TaxMode::Inclusive => divide(taxable * rate, 100 + rate, settings.tax_rounding),
                TaxMode::Exclusive => divide(taxable * rate, 100, settings.tax_rounding),
            }
        })
        .sum();
    let (tax_include, tax_exclude) = match settings.tax_mode {
        TaxMode::Inclusive => (tax, 0),
        TaxMode::Exclusive => (0, tax),
    };

    let discount = match settings.discount {
        DiscountMode::Subtotal => order.discount,
        DiscountMode::AdjustmentLine => {
            if order.discount > 0 {
                lines.push(SaleLine {
                    product_id: None,
                    product_code: None,
                    product_name: Some(DISCOUNT_LINE_NAME.to_owned()),
                    sales_price: -order.discount,
                    quantity: 1,
                    returned: false,
                });
            }
            0
        }
    };

    let mut sale = Sale {
        store_id,
        terminal_id: settings.terminal_id.clone(),
        terminal_tran_id: String::new(),
        terminal_tran_date_time: String::new(),
        lines,
        discount,
        tax_exclude,
        carriage: order.shipping_fee,
        commission: 0,
        customer_id: order.customer_id.clone(),
        memo: Some(memo(order)),
        dispose_of: None,
        tax_include,
        sum_division: settings.sum_division,
        payment: None,
    };
    sale.payment = payment_kind.map(|kind| SalePayment {
        kind,
        amount: sale.total(),
    });
    Ok(sale)
}

/// Names the order so that staff can find it in Smaregi's 取引履歴.
fn memo(order: &Order) -> String {
    let mut memo = format!("EC注文 {} rev {}", order.order_id, order.revision);
    if let Some(name) = &order.customer_name {
        memo.push_str(&format!(" / {name}"));
    }
    if let Some(text) = &order.memo {
        memo.push_str(&format!(" / {text}"));
    }
    memo.chars().take(MAX_SALE_MEMO_CHARS).collect()
}

/// `numerator / denominator` for a non-negative numerator, rounded.
fn divide(numerator: i64, denominator: i64, rounding: TaxRounding) -> i64 {
    match rounding {
        TaxRounding::Down => numerator / denominator,
        TaxRounding::Up => (numerator + denominator - 1) / denominator,
        TaxRounding::Nearest => (2 * numerator + denominator) / (2 * denominator),
    }
}

/// Splits `total` over `weights` in proportion, exactly: the parts add up
/// to `total` and none exceeds its weight (for `total` ≤ the weights' sum).
/// Largest remainder first; ties go to the earlier weight.
pub fn allocate(total: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i64 = weights.iter().sum();
    if sum == 0 || total == 0 {
        return vec![0; weights.len()];
    }
    let (total, sum) = (i128::from(total), i128::from(sum));
    let mut parts: Vec<i128> = weights
        .iter()
        .map(|w| total * i128::from(*w) / sum)
        .collect();
    let mut left = total - parts.iter().sum::<i128>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(total * i128::from(weights[i]) % sum));
    for i in order {
        if left == 0 {
            break;
        }
        if parts[i] < i128::from(weights[i]) {
            parts[i] += 1;
            left -= 1;
        }
    }
    parts.into_iter().map(|p| p as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orders::model::OrderLine;
    use proptest::prelude::*;

    fn settings() -> BuildSettings {
        BuildSettings {
            default_store_id: Some("1".into()),
            terminal_id: "9".into(),
            tax_mode: TaxMode::Inclusive,
            tax_rounding: TaxRounding::Down,
            unmapped: UnmappedPolicy::Hold,
            dummy_product_id: None,
            discount: DiscountMode::Subtotal,
            payment_methods: BTreeMap::new(),
            sum_division: 2,
        }
    }

    fn line(code: &str, unit_price: i64, quantity: i64, tax_rate: u8) -> OrderLine {
        OrderLine {
            product: ProductRef::External(code.into()),
            product_code: None,
            name: format!("product {code}"),
            unit_price,
            quantity,
            tax_rate,
        }
    }

    fn order(lines: Vec<OrderLine>, discount: i64, shipping_fee: i64) -> Order {
        Order {
            order_id: "A-1".into(),
            revision: 1,
            ordered_at: "2026-11-22 10:00:00".into(),
            store_id: None,
            lines,
            shipping_fee,
            discount,
            payment_method: None,
            customer_id: None,
            customer_name: None,
            memo: None,
        }
    }

    fn identity(code: &str) -> Option<String> {
        code.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| code.to_owned())
    }

    #[test]
    fn inclusive_tax_is_recorded_per_rate_and_rounded_down() {
        // 1,080 yen at 8 %: 80 yen tax; 1,100 at 10 %: 100 yen tax.
        let order = order(vec![line("1", 540, 2, 8), line("2", 1100, 1, 10)], 0, 0);
        let sale = build_sale(&order, &settings(), &identity).unwrap();
        assert_eq!(sale.tax_include, 180);
        assert_eq!(sale.tax_exclude, 0);
        assert_eq!(sale.total(), 2180);
    }

    #[test]
    fn exclusive_tax_is_added_to_the_total() {
        let settings = BuildSettings {
            tax_mode: TaxMode::Exclusive,
            ..settings()
        };
        let order = order(vec![line("1", 999, 1, 10)], 0, 500);
        let sale = build_sale(&order, &settings, &identity).unwrap();
        assert_eq!(sale.tax_exclude, 99, "99.9 rounded down");
        assert_eq!(sale.total(), 999 + 99 + 500);
        let up = BuildSettings {
            tax_rounding: TaxRounding::Up,
            ..settings.clone()
        };
        assert_eq!(build_sale(&order, &up, &identity).unwrap().tax_exclude, 100);
        let nearest = BuildSettings {
            tax_rounding: TaxRounding::Nearest,
            ..settings
        };
        assert_eq!(
            build_sale(&order, &nearest, &identity).unwrap().tax_exclude,
            100
        );
    }

    #[test]
    fn a_discount_lowers_the_tax_of_each_rate_in_proportion() {
        let settings = BuildSettings {
            tax_mode: TaxMode::Exclusive,
            ..settings()
        };
        // 1,000 at 8 % and 3,000 at 10 %; 400 off: 100 and 300.
        let order = order(vec![line("1", 1000, 1, 8), line("2", 3000, 1, 10)], 400, 0);
        let sale = build_sale(&order, &settings, &identity).unwrap();
        assert_eq!(sale.tax_exclude, 72 + 270);
        assert_eq!(sale.discount, 400);
        assert_eq!(sale.total(), 4000 - 400 + 342);
    }

    #[test]
    fn an_adjustment_line_carries_the_discount_in_that_mode() {
        let settings = BuildSettings {
            discount: DiscountMode::AdjustmentLine,
            ..settings()
        };
        let order = order(vec![line("1", 1000, 2, 10)], 300, 0);
        let sale = build_sale(&order, &settings, &identity).unwrap();
        assert_eq!(sale.discount, 0);
        let last = sale.lines.last().unwrap();
        assert_eq!((last.sales_price, last.product_id.as_ref()), (-300, None));
        assert_eq!(sale.subtotal(), 1700);
        assert_eq!(sale.total(), 1700);
    }

    #[test]
    fn unmapped_lines_are_listed_or_become_the_dummy_product() {
        let order = order(
            vec![
                line("TEA", 100, 1, 8),
                line("7", 100, 1, 8),
                line("POT", 1, 1, 10),
            ],
            0,
            0,
        );
        assert_eq!(
            build_sale(&order, &settings(), &identity).unwrap_err(),
            BuildError::Unmapped(vec![
                UnmappedLine {
                    line: 0,
                    external_code: "TEA".into()
                },
                UnmappedLine {
                    line: 2,
                    external_code: "POT".into()
                },
            ])
        );
        let dummy = BuildSettings {
            unmapped: UnmappedPolicy::DummyProduct,
            dummy_product_id: Some("999".into()),
            ..settings()
        };
        let sale = build_sale(&order, &dummy, &identity).unwrap();
        let ids: Vec<_> = sale
            .lines
            .iter()
            .map(|l| l.product_id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["999", "7", "999"]);
    }

    #[test]
    fn payment_methods_map_to_smaregis_deposit_fields() {
        let settings = BuildSettings {
            payment_methods: [("card".to_owned(), PaymentKind::Credit)].into(),
            ..settings()
        };
        let mut paid = order(vec![line("1", 1000, 1, 10)], 0, 500);
        paid.payment_method = Some("card".into());
        let sale = build_sale(&paid, &settings, &identity).unwrap();
        let head = sale.transaction_upd_params()["data"][0]["rows"][0].clone();
        assert_eq!(head["depositCredit"], "1500");
        assert_eq!(head["deposit"], "1500");
        paid.payment_method = Some("cod".into());
        assert!(matches!(
            build_sale(&paid, &settings, &identity),
            Err(BuildError::UnknownPaymentMethod { .. })
        ));
    }

    #[test]
    fn an_order_needs_a_store() {
        let settings = BuildSettings {
            default_store_id: None,
            ..settings()
        };
        let order = order(vec![line("1", 1, 1, 10)], 0, 0);
        assert_eq!(
            build_sale(&order, &settings, &identity),
            Err(BuildError::NoStore)
        );
    }

    fn arbitrary_line() -> impl Strategy<Value = OrderLine> {
        (
            1u64..1000,
            0i64..100_000,
            1i64..50,
            prop::sample::select(vec![0u8, 8, 10]),
        )
            .prop_map(|(id, price, quantity, rate)| line(&id.to_string(), price, quantity, rate))
    }

    proptest! {
        #[test]
        fn allocation_is_exact_and_bounded(
            weights in prop::collection::vec(0i64..1_000_000, 1..6),
            fraction in 0.0f64..=1.0,
        ) {
            let sum: i64 = weights.iter().sum();
            let total = (sum as f64 * fraction) as i64;
            let parts = allocate(total, &weights);
            prop_assert_eq!(parts.iter().sum::<i64>(), if sum == 0 { 0 } else { total });
            for (part, weight) in parts.iter().zip(&weights) {
                prop_assert!(*part >= 0 && part <= weight);
            }
        }

        #[test]
        fn every_built_sale_is_one_smaregi_accepts(
            lines in prop::collection::vec(arbitrary_line(), 1..20),
            discount_fraction in 0.0f64..=1.0,
            shipping_fee in 0i64..5000,
            exclusive in any::<bool>(),
            adjustment in any::<bool>(),
            rounding in prop::sample::select(vec![TaxRounding::Down, TaxRounding::Nearest, TaxRounding::Up]),
        ) {
            let lines_total: i64 = lines.iter().map(OrderLine::amount).sum();
            let discount = (lines_total as f64 * discount_fraction) as i64;
            let order = order(lines, discount, shipping_fee);
            let settings = BuildSettings {
                tax_mode: if exclusive { TaxMode::Exclusive } else { TaxMode::Inclusive },
                tax_rounding: rounding,
                discount: if adjustment { DiscountMode::AdjustmentLine } else { DiscountMode::Subtotal },
                ..settings()
            };
            let sale = build_sale(&order, &settings, &identity).unwrap();
            let net = lines_total - discount;
            prop_assert_eq!(sale.subtotal() - sale.discount, net);
            prop_assert_eq!(sale.total(), net + sale.tax_exclude + shipping_fee);
            let (tax, base) = if exclusive { (sale.tax_exclude, net) } else { (sale.tax_include, net) };
            prop_assert!(tax >= 0 && tax <= base, "tax {} on {}", tax, base);
            // Never more than one yen of rounding per rate (three rates at most).
            let exact_max: f64 = if exclusive { net as f64 * 0.10 } else { net as f64 * 10.0 / 110.0 };
            prop_assert!(tax as f64 <= exact_max + 3.0);
            let reversal = sale.reversal("2", "2026-11-23 00:00:00");
            prop_assert_eq!(reversal.total(), -sale.total());
            prop_assert_eq!(reversal.tax_include, -sale.tax_include);
        }
    }
}
