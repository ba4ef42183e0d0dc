//! The order as the store's EC side sends it: JSON in, a typed [`Order`]
//! out, or every problem found, each naming its field. Pure: no I/O.
//!
//! Validation walks the JSON itself rather than stopping at serde's first
//! error, so a client learns everything wrong with an order at once.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::smaregi::jst;

/// Smaregi numbers detail lines "1" to "999"; one is kept for a discount
/// line (`[orders] discount = "adjustment-line"`).
pub const MAX_LINES: usize = 998;
pub const MAX_QUANTITY: i64 = 99_999;
/// Per unit, and for the shipping fee and the discount, in yen.
pub const MAX_AMOUNT: i64 = 99_999_999;
/// An order's total, in yen: far above any real order, far below overflow.
pub const MAX_ORDER_TOTAL: i64 = 9_999_999_999;
/// Japan's consumption tax rates (standard and reduced) and none.
pub const TAX_RATES: [u8; 3] = [0, 8, 10];
pub const MAX_ORDER_ID_CHARS: usize = 64;
pub const MAX_EXTERNAL_CODE_CHARS: usize = 64;
pub const MAX_NAME_CHARS: usize = 85;
pub const MAX_MEMO_CHARS: usize = 1000;
/// Revisions are exchanged as JSON numbers: keep them exact in every client.
pub const MAX_REVISION: u64 = (1 << 53) - 1;

/// Which product a line is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProductRef {
    /// The EC side's code, mapped to a Smaregi product id by the mapping.
    External(String),
    /// A Smaregi 商品ID given directly.
    Smaregi(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OrderLine {
    pub product: ProductRef,
    /// 商品コード to record with the line (≤ 20 half-width characters).
    pub product_code: Option<String>,
    pub name: String,
    /// In yen, tax included or not as `[orders] tax-mode` says.
    pub unit_price: i64,
    pub quantity: i64,
    /// Percent.
    pub tax_rate: u8,
}

impl OrderLine {
    pub fn amount(&self) -> i64 {
        self.unit_price * self.quantity
    }
}

/// One revision of an order, valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Order {
    pub order_id: String,
    pub revision: u64,
    /// `YYYY-MM-DD HH:MM:SS`, JST.
    pub ordered_at: String,
    pub store_id: Option<String>,
    pub lines: Vec<OrderLine>,
    pub shipping_fee: i64,
    pub discount: i64,
    pub payment_method: Option<String>,
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub memo: Option<String>,
}

impl Order {
    /// The sum of the lines.
    pub fn lines_total(&self) -> i64 {
        self.lines.iter().map(OrderLine::amount).sum()
    }

    /// SHA-256 of the order's canonical form: the same order sent again
    /// has the same digest, whatever its JSON's spacing or key order.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("an order serialises");
        let digest = ring::digest::digest(&ring::digest::SHA256, &canonical);
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One thing wrong with an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Where, as a JSON path: `lines[2].quantity`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Whether `id` can name an order: it is part of a URL path and of an
/// ordering key, so only characters that need no escaping in either.
pub fn valid_order_id(id: &str) -> bool {
    (1..=MAX_ORDER_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// 商品ID: 1 to 15 digits.
pub fn valid_smaregi_product_id(id: &str) -> bool {
    (1..=15).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

/// 商品コード: at most 20 half-width printable characters.
pub fn valid_product_code(code: &str) -> bool {
    (1..=20).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_graphic())
}

/// 店舗ID: at most 9 digits.
pub fn valid_store_id(id: &str) -> bool {
    (1..=9).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

const ORDER_FIELDS: &[&str] = &[
    "order_id",
    "revision",
    "ordered_at",
    "store_id",
    "lines",
    "shipping_fee",
    "discount",
    "payment_method",
    "customer",
    "memo",
];
const LINE_FIELDS: &[&str] = &[
    "external_code",
    "smaregi_product_id",
    "product_code",
    "name",
    "unit_price",
    "quantity",
    "tax_rate",
];
const CUSTOMER_FIELDS: &[&str] = &["smaregi_customer_id", "name"];

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn object<'a>(&mut self, value: &'a Value, at: &str) -> Option<&'a Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            other => {
                self.problem(at, format!("must be an object, got {}", kind(other)));
                None
            }
        }
    }

    fn unknown_fields(&mut self, map: &Map<String, Value>, known: &[&str], prefix: &str) {
        for key in map.keys().filter(|key| !known.contains(&key.as_str())) {
            self.problem(
                join(prefix, key),
                format!("unknown field; the fields are {}", known.join(", ")),
            );
        }
    }

    /// A string field: `None` when absent or null (and not `required`).
    fn string(
        &mut self,
        map: &Map<String, Value>,
        key: &str,
        prefix: &str,
        required: bool,
        max_chars: usize,
    ) -> Option<String> {
        let at = join(prefix, key);
        match map.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.problem(at, "is required");
                }
                None
            }
            Some(Value::String(text)) => {
                let chars = text.chars().count();
                if chars == 0 {
                    self.problem(at, "must not be empty");
                    None
                } else if chars > max_chars {
                    self.problem(
                        at,
                        format!("is {chars} characters long; at most {max_chars} are allowed"),
                    );
                    None
                } else if text.chars().any(char::is_control) && key != "memo" {
                    self.problem(at, "must not contain control characters");
                    None
                } else {
                    Some(text.clone())
                }
            }
            Some(other) => {
                self.problem(at, format!("must be a string, got {}", kind(other)));
                None
            }
        }
    }

    /// An integer field within `range`; absent is `default`, if any.
    fn integer(
        &mut self,
        map: &Map<String, Value>,
        key: &str,
        prefix: &str,
        range: std::ops::RangeInclusive<i64>,
        default: Option<i64>,
    ) -> Option<i64> {
        let at = join(prefix, key);
        let value = match map.get(key) {
            None | Some(Value::Null) => {
                if default.is_none() {
                    self.problem(at, "is required");
                }
                return default;
            }
            Some(value) => value,
        };
        let number = match value {
            Value::Number(n) => n.as_i64(),
            other => {
                self.problem(at, format!("must be an integer, got {}", kind(other)));
                return None;
            }
        };
        match number {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.problem(
                    at,
                    format!(
                        "must be an integer from {} to {}, got {value}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `2026-11-22T10:15:00+09:00` (RFC 3339, any offset, or `Z`) or Smaregi's
/// own `2026-11-22 10:15:00` (JST), as JST seconds.
pub fn parse_ordered_at(text: &str) -> Option<i64> {
    // Both forms are ASCII, and the byte offsets below assume it.
    if !text.is_ascii() {
        return None;
    }
    if text.len() == 19 && text.as_bytes()[10] == b' ' {
        return jst::parse(text);
    }
    if text.len() < 20 || text.as_bytes()[10] != b'T' {
        return None;
    }
    let (local, offset) = text.split_at(19);
    let wall = jst::parse(&local.replacen('T', " ", 1))?;
    let offset_seconds = match offset {
        "Z" => 0,
        _ => {
            let (sign, rest) = match offset.as_bytes()[0] {
                b'+' => (1, &offset[1..]),
                b'-' => (-1, &offset[1..]),
                _ => return None,
            };
            let (hours, minutes) = rest.split_once(':')?;
            if hours.len() != 2 || minutes.len() != 2 {
                return None;
            }
            let hours: i64 = hours.parse().ok()?;
            let minutes: i64 = minutes.parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
    };
    // `wall` counts `local` as if it were JST; move it to real JST.
    Some(wall - offset_seconds + 9 * 3600)
}

/// Parses and checks one order sent for `order_id`; every problem found.
pub fn parse_order(order_id: &str, body: &[u8]) -> Result<Order, OrderInputError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| OrderInputError::Json {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    validate_order(order_id, &value).map_err(OrderInputError::Invalid)
}

/// Why an order's body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderInputError {
    #[error("the body is not valid JSON: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the order is invalid: {}", .0.iter().map(Problem::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// Checks an order's JSON; the order, or every problem found.
pub fn validate_order(order_id: &str, value: &Value) -> Result<Order, Vec<Problem>> {
    let mut check = Checker {
        problems: Vec::new(),
    };
    let Some(map) = check.object(value, "(order)") else {
        return Err(check.problems);
    };
    check.unknown_fields(map, ORDER_FIELDS, "");

    if let Some(body_id) = check.string(map, "order_id", "", false, MAX_ORDER_ID_CHARS) {
        if body_id != order_id {
            check.problem(
                "order_id",
                format!("is {body_id:?} but the URL names order {order_id:?}"),
            );
        }
    }
    let revision = check
        .integer(map, "revision", "", 1..=MAX_REVISION as i64, None)
        .map(|n| n as u64);
    let ordered_at = check
        .string(map, "ordered_at", "", true, 40)
        .and_then(|text| match parse_ordered_at(&text) {
            Some(seconds) => Some(jst::format(seconds)),
            None => {
                check.problem(
                    "ordered_at",
                    format!("must be a date and time like 2026-11-22T10:15:00+09:00, got {text:?}"),
                );
                None
            }
        });
    let store_id = check.string(map, "store_id", "", false, 9).and_then(|id| {
        if valid_store_id(&id) {
            Some(id)
        } else {
            check.problem("store_id", "must be a Smaregi 店舗ID: 1 to 9 digits");
            None
        }
    });
    let shipping_fee = check.integer(map, "shipping_fee", "", 0..=MAX_AMOUNT, Some(0));
    let discount = check.integer(map, "discount", "", 0..=MAX_AMOUNT, Some(0));
    let payment_method = check.string(map, "payment_method", "", false, 50);
    let memo = check.string(map, "memo", "", false, MAX_MEMO_CHARS);

    let (mut customer_id, mut customer_name) = (None, None);
    if let Some(customer) = map.get("customer").filter(|v| !v.is_null()) {
        if let Some(customer) = check.object(customer, "customer") {
            check.unknown_fields(customer, CUSTOMER_FIELDS, "customer");
            customer_id = check
                .string(customer, "smaregi_customer_id", "customer", false, 15)
                .and_then(|id| {
                    if valid_smaregi_product_id(&id) {
                        Some(id)
                    } else {
                        check.problem(
                            "customer.smaregi_customer_id",
                            "must be a Smaregi 会員ID: 1 to 15 digits",
                        );
                        None
                    }
                });
            customer_name = check.string(customer, "name", "customer", false, MAX_NAME_CHARS);
        }
    }

    let lines = validate_lines(&mut check, map.get("lines"));

    if let (Some(lines), Some(shipping_fee), Some(discount)) = (&lines, shipping_fee, discount) {
        let total = lines
            .iter()
            .try_fold(0i64, |sum, line| {
                line.unit_price
                    .checked_mul(line.quantity)
                    .and_then(|amount| sum.checked_add(amount))
            })
            .and_then(|sum| sum.checked_add(shipping_fee));
        match total {
            Some(total) if total <= MAX_ORDER_TOTAL => {
                if discount > total - shipping_fee {
                    check.problem(
                        "discount",
                        format!(
                            "is {discount} yen, more than the lines' total of {} yen",
                            total - shipping_fee
                        ),
                    );
                }
            }
            _ => check.problem(
                "lines",
                format!("the order's total exceeds {MAX_ORDER_TOTAL} yen"),
            ),
        }
    }

    if !check.problems.is_empty() {
        return Err(check.problems);
    }
    Ok(Order {
        order_id: order_id.to_owned(),
        revision: revision.expect("checked"),
        ordered_at: ordered_at.expect("checked"),
        store_id,
        lines: lines.expect("checked"),
        shipping_fee: shipping_fee.expect("checked"),
        discount: discount.expect("checked"),
        payment_method,
        customer_id,
        customer_name,
        memo,
    })
}

fn validate_lines(check: &mut Checker, value: Option<&Value>) -> Option<Vec<OrderLine>> {
    let items = match value {
        None | Some(Value::Null) => {
            check.problem("lines", "is required");
            return None;
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            check.problem("lines", format!("must be an array, got {}", kind(other)));
            return None;
        }
    };
    if items.is_empty() {
        check.problem("lines", "must hold at least one line");
        return None;
    }
    if items.len() > MAX_LINES {
        check.problem(
            "lines",
            format!(
                "holds {} lines; at most {MAX_LINES} are allowed",
                items.len()
            ),
        );
        return None;
    }
    let before = check.problems.len();
    let mut lines = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("lines[{i}]");
        let Some(map) = check.object(item, &at) else {
            continue;
        };
        check.unknown_fields(map, LINE_FIELDS, &at);
        let external = check.string(map, "external_code", &at, false, MAX_EXTERNAL_CODE_CHARS);
        let smaregi = check.string(map, "smaregi_product_id", &at, false, 15);
        let product = match (external, smaregi) {
            (Some(code), None) => {
                if code.trim() != code {
                    check.problem(
                        join(&at, "external_code"),
                        "has leading or trailing spaces; codes are matched exactly",
                    );
                }
                Some(ProductRef::External(code))
            }
            (None, Some(id)) if valid_smaregi_product_id(&id) => Some(ProductRef::Smaregi(id)),
            (None, Some(_)) => {
                check.problem(
                    join(&at, "smaregi_product_id"),
                    "must be a Smaregi 商品ID: 1 to 15 digits",
                );
                None
            }
            (Some(_), Some(_)) => {
                check.problem(&at, "give external_code or smaregi_product_id, not both");
                None
            }
            (None, None) => {
                // A present but invalid reference has its problem already;
                // a missing or null one does not, and a line without its
                // product must never be dropped silently.
                let absent = |field| map.get(field).is_none_or(Value::is_null);
                if absent("external_code") && absent("smaregi_product_id") {
                    check.problem(&at, "needs external_code or smaregi_product_id");
                }
                None
            }
        };
        let product_code = check
            .string(map, "product_code", &at, false, 20)
            .and_then(|code| {
                if valid_product_code(&code) {
                    Some(code)
                } else {
                    check.problem(
                        join(&at, "product_code"),
                        "must be at most 20 half-width letters, digits or symbols (Smaregi's 商品コード rule)",
                    );
                    None
                }
            });
        let name = check.string(map, "name", &at, true, MAX_NAME_CHARS);
        let unit_price = check.integer(map, "unit_price", &at, 0..=MAX_AMOUNT, None);
        let quantity = check.integer(map, "quantity", &at, 1..=MAX_QUANTITY, None);
        let tax_rate = check
            .integer(map, "tax_rate", &at, 0..=100, None)
            .and_then(|rate| {
                let rate = rate as u8;
                if TAX_RATES.contains(&rate) {
                    Some(rate)
                } else {
                    check.problem(
                        join(&at, "tax_rate"),
                        format!("must be one of {TAX_RATES:?} (percent), got {rate}"),
                    );
                    None
                }
            });
        if let (Some(product), Some(name), Some(unit_price), Some(quantity), Some(tax_rate)) =
            (product, name, unit_price, quantity, tax_rate)
        {
            lines.push(OrderLine {
                product,
                product_code,
                name,
                unit_price,
                quantity,
                tax_rate,
            });
        }
    }
    (check.problems.len() == before).then_some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "order_id": "A-1",
            "revision": 2,
            "ordered_at": "2026-11-22T10:15:00+09:00",
            "lines": [
                {"external_code": "TEA-500", "name": "緑茶 500ml", "unit_price": 150, "quantity": 2, "tax_rate": 8},
                {"smaregi_product_id": "8000114", "product_code": "4901234567894", "name": "急須", "unit_price": 3300, "quantity": 1, "tax_rate": 10}
            ],
            "shipping_fee": 500,
            "discount": 100,
            "payment_method": "credit",
            "customer": {"name": "山田 花子"},
            "memo": "gift wrap"
        })
    }

    fn problems(value: &Value) -> Vec<Problem> {
        validate_order("A-1", value).expect_err("invalid")
    }

    fn fields(value: &Value) -> Vec<String> {
        problems(value).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_valid_order_parses_into_its_typed_form() {
        let order = validate_order("A-1", &sample()).expect("valid");
        assert_eq!(order.revision, 2);
        assert_eq!(order.ordered_at, "2026-11-22 10:15:00");
        assert_eq!(
            order.lines[0].product,
            ProductRef::External("TEA-500".into())
        );
        assert_eq!(
            order.lines[1].product,
            ProductRef::Smaregi("8000114".into())
        );
        assert_eq!(order.lines_total(), 3600);
        assert_eq!(order.customer_name.as_deref(), Some("山田 花子"));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut order = sample();
        order["revision"] = json!(0);
        order["colour"] = json!("red");
        order["lines"][0]["quantity"] = json!(-3);
        order["lines"][1]["unit_price"] = json!("3300");
        order["lines"][1]["tax_rate"] = json!(5);
        order["customer"]["smaregi_customer_id"] = json!("abc");
        assert_eq!(
            fields(&order),
            [
                "colour",
                "revision",
                "customer.smaregi_customer_id",
                "lines[0].quantity",
                "lines[1].unit_price",
                "lines[1].tax_rate",
            ]
        );
    }

    #[test]
    fn absurd_quantities_and_prices_are_refused() {
        let mut order = sample();
        order["lines"][0]["quantity"] = json!(100_000);
        order["lines"][1]["unit_price"] = json!(1e12);
        assert_eq!(fields(&order), ["lines[0].quantity", "lines[1].unit_price"]);
    }

    #[test]
    fn an_order_whose_total_exceeds_the_limit_is_refused() {
        let mut order = sample();
        let line = json!({"smaregi_product_id": "1", "name": "x", "unit_price": MAX_AMOUNT, "quantity": MAX_QUANTITY, "tax_rate": 10});
        order["lines"] = json!([line.clone(), line]);
        let found = problems(&order);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "lines");
        assert!(found[0].message.contains("exceeds"), "{}", found[0]);
    }

    #[test]
    fn a_discount_above_the_lines_is_refused() {
        let mut order = sample();
        order["discount"] = json!(3601);
        assert_eq!(fields(&order), ["discount"]);
    }

    #[test]
    fn product_references_follow_smaregis_rules() {
        let mut order = sample();
        order["lines"][0]["product_code"] = json!("コード");
        order["lines"][1]["smaregi_product_id"] = json!("1234567890123456");
        order["lines"].as_array_mut().unwrap().push(json!({
            "external_code": "A", "smaregi_product_id": "1", "name": "x", "unit_price": 1, "quantity": 1, "tax_rate": 10
        }));
        order["lines"].as_array_mut().unwrap().push(json!({
            "external_code": " A", "name": "x", "unit_price": 1, "quantity": 1, "tax_rate": 10
        }));
        assert_eq!(
            fields(&order),
            [
                "lines[0].product_code",
                "lines[1].smaregi_product_id",
                "lines[2]",
                "lines[3].external_code",
            ]
        );
    }

    #[test]
    fn a_line_whose_product_reference_is_null_is_refused_not_dropped() {
        let mut order = sample();
        order["lines"][0]["external_code"] = Value::Null;
        order["lines"][1]["smaregi_product_id"] = Value::Null;
        order["lines"][1]["external_code"] = Value::Null;
        assert_eq!(fields(&order), ["lines[0]", "lines[1]"]);
    }

    #[test]
    fn an_ordered_at_with_a_multibyte_character_is_refused() {
        // Byte 19 falls inside the `é`.
        assert_eq!(parse_ordered_at("2026-11-22T10:15:0é+09:00"), None);
        assert_eq!(parse_ordered_at("2026-11-22 10:15:é"), None);
        let mut order = sample();
        order["ordered_at"] = json!("2026-11-22T10:15:0é+09:00");
        assert_eq!(fields(&order), ["ordered_at"]);
    }

    #[test]
    fn the_body_must_name_the_same_order_as_the_url() {
        assert_eq!(
            validate_order("B-2", &sample()).unwrap_err()[0].field,
            "order_id"
        );
    }

    #[test]
    fn invalid_json_reports_where() {
        let error = parse_order("A-1", b"{\"revision\": 1,\n oops}").unwrap_err();
        match error {
            OrderInputError::Json { line, .. } => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn times_are_taken_in_any_offset_and_kept_in_jst() {
        let jst = |text| parse_ordered_at(text).map(jst::format);
        assert_eq!(jst("2026-11-22T01:15:00Z").unwrap(), "2026-11-22 10:15:00");
        assert_eq!(
            jst("2026-11-21T20:15:00-05:00").unwrap(),
            "2026-11-22 10:15:00"
        );
        assert_eq!(jst("2026-11-22 10:15:00").unwrap(), "2026-11-22 10:15:00");
        assert_eq!(jst("2026-11-22T10:15:00"), None, "an offset is required");
        assert_eq!(jst("2026-13-22T10:15:00Z"), None);
    }

    #[test]
    fn order_ids_are_safe_in_paths_and_keys() {
        assert!(valid_order_id("EC-2026.11_0001"));
        for bad in ["", "a/b", "a b", "注文1", &"x".repeat(65)] {
            assert!(!valid_order_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_digest_ignores_formatting() {
        let a = validate_order("A-1", &sample()).unwrap();
        let reparsed: Value =
            serde_json::from_str(&serde_json::to_string_pretty(&sample()).unwrap()).unwrap();
        let b = validate_order("A-1", &reparsed).unwrap();
        assert_eq!(a.digest(), b.digest());
        let mut changed = sample();
        changed["memo"] = json!("no wrap");
        assert_ne!(
            a.digest(),
            validate_order("A-1", &changed).unwrap().digest()
        );
    }
}
