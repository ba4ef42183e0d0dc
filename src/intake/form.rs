//! Reading Smaregi's API送信 requests: the form body, the secret, and
//! the `params` envelope, with an error that says which field was wrong
//! and what was expected. Pure: no I/O.

use serde_json::Value;

/// The `proc_name`s Smaregi sends (SMAREGI.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcName {
    StockSend,
    TransactionSend,
    ProductSend,
    CustomerSend,
}

impl ProcName {
    pub const ALL: [ProcName; 4] = [
        Self::StockSend,
        Self::TransactionSend,
        Self::ProductSend,
        Self::CustomerSend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StockSend => "stock_send",
            Self::TransactionSend => "transaction_send",
            Self::ProductSend => "product_send",
            Self::CustomerSend => "customer_send",
        }
    }
}

/// Why a request is refused as malformed (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the body is not form data: {0}")]
    Encoding(String),
    #[error("`{0}` is missing")]
    Missing(&'static str),
    #[error("field `{0}` appears more than once")]
    Repeated(String),
    #[error(
        "proc_name `{0}` is not one of stock_send, transaction_send, product_send, customer_send"
    )]
    ProcName(String),
    #[error("params is not JSON: {0}")]
    Json(String),
    #[error("{path}: expected {expected}")]
    Shape {
        path: String,
        expected: &'static str,
    },
}

/// One API送信 request, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub proc_name: ProcName,
    /// `params` exactly as sent, for the inbox.
    pub params: String,
    /// Rows per table, in order.
    pub tables: Vec<(String, usize)>,
}

/// Decodes `application/x-www-form-urlencoded` strictly: a `%` must be
/// followed by two hex digits, and every name and value must be UTF-8.
pub fn decode_form(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let mut fields = Vec::new();
    for (index, pair) in body.split(|&b| b == b'&').enumerate() {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let decode = |part: &[u8], what: &str| {
            percent_decode(part)
                .ok_or_else(|| {
                    FormError::Encoding(format!(
                        "pair {} has a broken %-escape in its {what}",
                        index + 1
                    ))
                })
                .and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| {
                        FormError::Encoding(format!(
                            "pair {} has a {what} that is not UTF-8",
                            index + 1
                        ))
                    })
                })
        };
        fields.push((decode(name, "name")?, decode(value, "value")?));
    }
    Ok(fields)
}

fn percent_decode(part: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(part.len());
    let mut bytes = part.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let high = (*bytes.next()? as char).to_digit(16)?;
                let low = (*bytes.next()? as char).to_digit(16)?;
                out.push((high * 16 + low) as u8);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// The value of `name` in the form, else in the query string.
pub fn secret_value<'a>(
    form: &'a [(String, String)],
    query: &'a [(String, String)],
    name: &str,
) -> Option<&'a str> {
    form.iter()
        .chain(query)
        .find(|(field, _)| field == name)
        .map(|(_, value)| value.as_str())
}

/// Reads `proc_name` and `params` of a decoded form.
pub fn read_notification(form: &[(String, String)]) -> Result<Notification, FormError> {
    let single = |name: &'static str| -> Result<&str, FormError> {
        let mut values = form.iter().filter(|(field, _)| field == name);
        let value = values.next().ok_or(FormError::Missing(name))?;
        if values.next().is_some() {
            return Err(FormError::Repeated(name.to_owned()));
        }
        Ok(value.1.as_str())
    };
    let name = single("proc_name")?;
    let proc_name = ProcName::ALL
        .into_iter()
        .find(|p| p.as_str() == name)
        .ok_or_else(|| FormError::ProcName(name.chars().take(64).collect()))?;
    let params = single("params")?;
    let tables = match serde_json::from_str::<fast::Envelope>(params) {
        Ok(envelope) => envelope.0,
        // The slow path says exactly what is wrong.
        Err(_) => {
            let json: Value =
                serde_json::from_str(params).map_err(|e| FormError::Json(e.to_string()))?;
            envelope(&json)?
        }
    };
    Ok(Notification {
        proc_name,
        params: params.to_owned(),
        tables,
    })
}

/// Checks `{"data":[{"table_name": "…", "rows":[{…}, …]}, …]}`.
fn envelope(json: &Value) -> Result<Vec<(String, usize)>, FormError> {
    let shape = |path: String, expected| FormError::Shape { path, expected };
    let object = json
        .as_object()
        .ok_or_else(|| shape("params".into(), "a JSON object"))?;
    let data = object
        .get("data")
        .ok_or_else(|| shape("params.data".into(), "an array of tables (it is missing)"))?
        .as_array()
        .ok_or_else(|| shape("params.data".into(), "an array of tables"))?;
    let mut tables = Vec::with_capacity(data.len());
    for (i, table) in data.iter().enumerate() {
        let path = format!("params.data[{i}]");
        let table = table
            .as_object()
            .ok_or_else(|| shape(path.clone(), "a table object"))?;
        let name = table
            .get("table_name")
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .ok_or_else(|| shape(format!("{path}.table_name"), "a table name string"))?;
        let rows = table
            .get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| shape(format!("{path}.rows"), "an array of rows"))?;
        for (j, row) in rows.iter().enumerate() {
            let row = row
                .as_object()
                .ok_or_else(|| shape(format!("{path}.rows[{j}]"), "an object of column values"))?;
            for (column, value) in row {
                if !matches!(value, Value::String(_) | Value::Number(_) | Value::Null) {
                    return Err(shape(
                        format!("{path}.rows[{j}].{column}"),
                        "a string (Smaregi sends every value as a string)",
                    ));
                }
            }
        }
        tables.push((name.to_owned(), rows.len()));
    }
    Ok(tables)
}

/// The envelope check in one pass over the text, without building a JSON
/// tree: every notification pays for it, so it is about a third of the
/// cost of [`envelope`]. It accepts only what [`envelope`] accepts (a key
/// it reads twice fails it); anything it fails goes to [`envelope`] for
/// the verdict and the precise error.
mod fast {
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// `{"data": [table, …], …}`: rows per table.
    pub struct Envelope(pub Vec<(String, usize)>);
    /// `{"table_name": "…", "rows": [row, …], …}`.
    struct Table(String, usize);
    /// `[row, …]`, counted.
    struct Rows(usize);
    /// `{"column": string, number or null, …}`.
    struct Row;
    /// A string, a number or null.
    struct Scalar;
    /// Any value, skipped. Unlike [`IgnoredAny`], which serde_json skips
    /// without counting how deep it goes, each level goes through
    /// `deserialize_any`, so the 128-level nesting limit holds here too.
    struct Skip;

    fn once<T>(slot: &mut Option<T>, value: T, key: &str) -> Result<(), String> {
        if slot.replace(value).is_some() {
            return Err(format!("`{key}` twice"));
        }
        Ok(())
    }

    impl<'de> Deserialize<'de> for Envelope {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Envelope;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an envelope object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
                    let mut data = None;
                    while let Some(key) = map.next_key::<String>()? {
                        if key == "data" {
                            let tables: Vec<Table> = map.next_value()?;
                            let tables = tables.into_iter().map(|t| (t.0, t.1)).collect();
                            once(&mut data, tables, &key).map_err(A::Error::custom)?;
                        } else {
                            map.next_value::<Skip>()?;
                        }
                    }
                    data.map(Envelope)
                        .ok_or_else(|| A::Error::custom("no data"))
                }
            }
            deserializer.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for Table {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Table;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a table object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Table, A::Error> {
                    let (mut name, mut rows) = (None, None);
                    while let Some(key) = map.next_key::<String>()? {
                        match key.as_str() {
                            "table_name" => once(&mut name, map.next_value::<String>()?, &key),
                            "rows" => once(&mut rows, map.next_value::<Rows>()?.0, &key),
                            _ => {
                                map.next_value::<Skip>()?;
                                Ok(())
                            }
                        }
                        .map_err(A::Error::custom)?;
                    }
                    match (name, rows) {
                        (Some(name), Some(rows)) if !name.is_empty() => Ok(Table(name, rows)),
                        _ => Err(A::Error::custom("no table_name or rows")),
                    }
                }
            }
            deserializer.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for Rows {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Rows;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an array of rows")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
                    let mut count = 0;
                    while seq.next_element::<Row>()?.is_some() {
                        count += 1;
                    }
                    Ok(Rows(count))
                }
            }
            deserializer.deserialize_seq(V)
        }
    }

    impl<'de> Deserialize<'de> for Row {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Row;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a row object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
                    while map.next_key::<IgnoredAny>()?.is_some() {
                        map.next_value::<Scalar>()?;
                    }
                    Ok(Row)
                }
            }
            deserializer.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for Skip {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Skip;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_bool<E: Error>(self, _: bool) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_i64<E: Error>(self, _: i64) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_u64<E: Error>(self, _: u64) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_f64<E: Error>(self, _: f64) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_str<E: Error>(self, _: &str) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_unit<E: Error>(self) -> Result<Skip, E> {
                    Ok(Skip)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                    while seq.next_element::<Skip>()?.is_some() {}
                    Ok(Skip)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                    while map.next_entry::<IgnoredAny, Skip>()?.is_some() {}
                    Ok(Skip)
                }
            }
            deserializer.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string, a number or null")
                }
                fn visit_str<E: Error>(self, _: &str) -> Result<Scalar, E> {
                    Ok(Scalar)
                }
                fn visit_u64<E: Error>(self, _: u64) -> Result<Scalar, E> {
                    Ok(Scalar)
                }
                fn visit_i64<E: Error>(self, _: i64) -> Result<Scalar, E> {
                    Ok(Scalar)
                }
                fn visit_f64<E: Error>(self, _: f64) -> Result<Scalar, E> {
                    Ok(Scalar)
                }
                fn visit_unit<E: Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar)
                }
            }
            deserializer.deserialize_any(V)
        }
    }
}

/// A Platform API webhook, read from its headers and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub event: String,
    pub event_id: String,
    /// For `pos:stock`: (store, product) pairs to refresh.
    pub stock_ids: Vec<(String, String)>,
}

/// Checks a webhook's headers and body. `contract_id` is ours; a webhook
/// for another contract is refused.
pub fn read_webhook(
    event: Option<&str>,
    event_id: Option<&str>,
    contract: Option<&str>,
    body: &[u8],
) -> Result<Webhook, FormError> {
    let header = |value: Option<&str>, name: &'static str| -> Result<String, FormError> {
        value
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map(str::to_owned)
            .ok_or(FormError::Missing(name))
    };
    let event = header(event, "Smaregi-Event")?;
    let event_id = header(event_id, "Smaregi-Event-Id")?;
    header(contract, "Smaregi-Contract-Id")?;
    let json: Value = serde_json::from_slice(body).map_err(|e| FormError::Json(e.to_string()))?;
    let shape = |path: &str, expected| FormError::Shape {
        path: path.to_owned(),
        expected,
    };
    if !json.is_object() {
        return Err(shape("body", "a JSON object"));
    }
    let mut stock_ids = Vec::new();
    if event == "pos:stock" {
        let ids = json
            .get("ids")
            .and_then(Value::as_array)
            .ok_or_else(|| shape("body.ids", "an array of {id, productId, storeId}"))?;
        for (i, id) in ids.iter().enumerate() {
            let field = |name: &str| {
                id.get(name)
                    .and_then(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .or_else(|| v.as_u64().map(|n| n.to_string()))
                    })
                    .ok_or_else(|| FormError::Shape {
                        path: format!("body.ids[{i}].{name}"),
                        expected: "a store or product id",
                    })
            };
            stock_ids.push((field("storeId")?, field("productId")?));
        }
    }
    Ok(Webhook {
        event,
        event_id,
        stock_ids,
    })
}

/// The form `body` as sent, byte for byte, without any field whose name
/// decodes to `name` (and without empty pairs). Call it on a body
/// [`decode_form`] accepted.
pub fn without_field(body: &[u8], name: &str) -> Vec<u8> {
    let mut kept = Vec::with_capacity(body.len());
    for pair in body.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
        let field = pair.split(|&b| b == b'=').next().unwrap_or(pair);
        if percent_decode(field).is_some_and(|field| field == name.as_bytes()) {
            continue;
        }
        if !kept.is_empty() {
            kept.push(b'&');
        }
        kept.extend_from_slice(pair);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_envelope_check_reads_what_smaregi_sends() {
        let params = r#"{"data":[{"table_name":"Stock","rows":[{"storeId":"1","productId":"8","amount":"-1"},{"storeId":"1","productId":"9","x":null}]},{"table_name":"Other","rows":[],"extra":{"a":[1]}}]}"#;
        let fast = serde_json::from_str::<fast::Envelope>(params).unwrap();
        assert_eq!(fast.0, [("Stock".to_owned(), 2), ("Other".to_owned(), 0)]);
        for wrong in [
            r#"{"data":[{"table_name":"Stock","rows":[{"a":true}]}]}"#,
            r#"{"data":[{"table_name":"","rows":[]}]}"#,
            r#"{"data":[],"data":[]}"#,
            r#"{"data":[{"rows":[]}]}"#,
        ] {
            assert!(
                serde_json::from_str::<fast::Envelope>(wrong).is_err(),
                "{wrong}"
            );
        }
    }

    #[test]
    fn a_form_without_its_secret_keeps_every_other_field_as_sent() {
        let body = b"proc_name=stock_send&relay_secret=s3cret&params=%7B%22a%22%3A1%7D&&x=%E6%97%A5+y&relay%5Fsecret=again&relay_secret";
        let kept = without_field(body, "relay_secret");
        assert_eq!(
            kept,
            b"proc_name=stock_send&params=%7B%22a%22%3A1%7D&x=%E6%97%A5+y"
        );
        assert_eq!(
            decode_form(&kept).unwrap(),
            vec![
                ("proc_name".to_owned(), "stock_send".to_owned()),
                ("params".to_owned(), "{\"a\":1}".to_owned()),
                ("x".to_owned(), "日 y".to_owned()),
            ]
        );
        assert_eq!(without_field(b"relay_secret=s", "relay_secret"), b"");
    }
    use proptest::prelude::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs {
            serializer.append_pair(name, value);
        }
        serializer.finish().into_bytes()
    }

    const STOCK: &str = r#"{"data":[{"table_name":"Stock","rows":[{"storeId":"1","productId":"113","amount":"-1","stockAmount":"4"},{"storeId":"1","productId":"114","amount":"2","stockAmount":null}]}]}"#;

    #[test]
    fn a_stock_send_with_custom_parameters_reads() {
        let body = form(&[
            ("proc_name", "stock_send"),
            ("params", STOCK),
            ("relay_secret", "s3cret&="),
        ]);
        let fields = decode_form(&body).unwrap();
        let notification = read_notification(&fields).unwrap();
        assert_eq!(notification.proc_name, ProcName::StockSend);
        assert_eq!(notification.tables, [("Stock".to_owned(), 2)]);
        assert_eq!(notification.params, STOCK);
        assert_eq!(secret_value(&fields, &[], "relay_secret"), Some("s3cret&="));
        let query = vec![("relay_secret".to_owned(), "from-query".to_owned())];
        assert_eq!(
            secret_value(&[], &query, "relay_secret"),
            Some("from-query")
        );
    }

    #[test]
    fn broken_encodings_are_refused_with_where() {
        assert!(
            matches!(decode_form(b"proc_name=stock%2"), Err(FormError::Encoding(m)) if m.contains("pair 1"))
        );
        assert!(
            matches!(decode_form(b"a=1&proc_name=%zz"), Err(FormError::Encoding(m)) if m.contains("pair 2"))
        );
        assert!(
            matches!(decode_form(b"params=%ff%fe"), Err(FormError::Encoding(m)) if m.contains("not UTF-8"))
        );
        assert_eq!(
            decode_form(b"a=x+y%21&&b").unwrap(),
            [("a".into(), "x y!".into()), ("b".into(), String::new())]
        );
    }

    #[test]
    fn every_field_problem_says_which_and_what() {
        let read = |pairs: &[(&str, &str)]| {
            read_notification(&decode_form(&form(pairs)).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(read(&[("params", STOCK)]), "`proc_name` is missing");
        assert!(read(&[("proc_name", "order_send"), ("params", STOCK)]).contains("order_send"));
        assert!(read(&[
            ("proc_name", "stock_send"),
            ("proc_name", "stock_send"),
            ("params", STOCK)
        ])
        .contains("more than once"));
        assert!(
            read(&[("proc_name", "stock_send"), ("params", "{\"data\":[")])
                .starts_with("params is not JSON")
        );
        assert_eq!(
            read(&[("proc_name", "stock_send"), ("params", "{}")]),
            "params.data: expected an array of tables (it is missing)"
        );
        assert_eq!(
            read(&[
                ("proc_name", "stock_send"),
                (
                    "params",
                    r#"{"data":[{"table_name":"Stock","rows":[{"a":"1"},7]}]}"#
                )
            ]),
            "params.data[0].rows[1]: expected an object of column values"
        );
        assert_eq!(
            read(&[
                ("proc_name", "stock_send"),
                (
                    "params",
                    r#"{"data":[{"table_name":"Stock","rows":[{"a":{"b":1}}]}]}"#
                )
            ]),
            "params.data[0].rows[0].a: expected a string (Smaregi sends every value as a string)"
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(read(&[("proc_name", "stock_send"), ("params", &deep)]).contains("recursion limit"));
        // Also in a member nothing reads, beside a valid envelope.
        let deep_aside = format!(
            r#"{{"data":[{{"table_name":"Stock","rows":[{{"storeId":"1","productId":"5"}}],"y":{}1{}}}],"x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200),
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(
            read(&[("proc_name", "stock_send"), ("params", &deep_aside)])
                .contains("recursion limit")
        );
        let shallow_aside = format!(
            r#"{{"data":[{{"table_name":"Stock","rows":[{{"storeId":"1","productId":"5"}}],"y":{{"z":[1,"a",null,true,1.5]}}}}],"x":{}1{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(
            read_notification(
                &decode_form(&form(&[
                    ("proc_name", "stock_send"),
                    ("params", &shallow_aside)
                ]))
                .unwrap()
            )
            .is_ok(),
            "within the limit, members nothing reads are fine"
        );
    }

    #[test]
    fn webhooks_need_their_headers_and_a_stock_event_its_ids() {
        let body = br#"{"contractId":"c1","event":"pos:stock","action":"edited","ids":[{"id":"1","productId":"113","storeId":"1"},{"id":2,"productId":114,"storeId":2}]}"#;
        let hook = read_webhook(Some("pos:stock"), Some("ev-1"), Some("c1"), body).unwrap();
        assert_eq!(
            hook.stock_ids,
            [("1".into(), "113".into()), ("2".into(), "114".into())]
        );
        assert_eq!(hook.event_id, "ev-1");
        assert_eq!(
            read_webhook(None, Some("ev-1"), Some("c1"), body)
                .unwrap_err()
                .to_string(),
            "`Smaregi-Event` is missing"
        );
        let no_ids = br#"{"event":"pos:stock"}"#;
        assert_eq!(
            read_webhook(Some("pos:stock"), Some("e"), Some("c1"), no_ids)
                .unwrap_err()
                .to_string(),
            "body.ids: expected an array of {id, productId, storeId}"
        );
        assert!(read_webhook(Some("pos:products"), Some("e"), Some("c1"), b"[]").is_err());
        assert!(read_webhook(
            Some("pos:products"),
            Some("e"),
            Some("c1"),
            br#"{"ids":[]}"#
        )
        .unwrap()
        .stock_ids
        .is_empty());
    }

    /// Text shaped like a `params` envelope, right or wrong in every part.
    fn envelope_like() -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            Just("\"5\"".to_owned()),
            Just("12".to_owned()),
            Just("-1.5".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ];
        let row = proptest::collection::vec(
            (
                proptest::sample::select(vec!["storeId", "productId", "a"]),
                scalar,
            ),
            0..4,
        )
        .prop_map(|columns| {
            let columns: Vec<String> = columns
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            format!("{{{}}}", columns.join(","))
        });
        let rows = prop_oneof![
            proptest::collection::vec(row, 0..3).prop_map(|rows| format!("[{}]", rows.join(","))),
            Just("{}".to_owned()),
            Just("\"x\"".to_owned()),
        ];
        let name = prop_oneof![
            Just("\"Stock\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("7".to_owned()),
        ];
        let table = (
            proptest::option::of(name),
            proptest::option::of(rows),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(name, rows, extra, twice)| {
                let mut keys = Vec::new();
                if let Some(name) = name {
                    keys.push(format!("\"table_name\":{name}"));
                    if twice {
                        keys.push("\"table_name\":\"Other\"".to_owned());
                    }
                }
                if let Some(rows) = rows {
                    keys.push(format!("\"rows\":{rows}"));
                }
                if extra {
                    keys.push("\"x\":[1,{}]".to_owned());
                }
                format!("{{{}}}", keys.join(","))
            });
        let data = prop_oneof![
            proptest::collection::vec(table, 0..3).prop_map(|t| format!("[{}]", t.join(","))),
            Just("{}".to_owned()),
            Just("3".to_owned()),
        ];
        (proptest::option::of(data), any::<bool>(), any::<bool>()).prop_map(
            |(data, twice, array)| {
                if array {
                    return "[]".to_owned();
                }
                let mut keys = Vec::new();
                if let Some(data) = data {
                    keys.push(format!("\"data\":{data}"));
                    if twice {
                        keys.push("\"data\":[]".to_owned());
                    }
                }
                format!("{{{}}}", keys.join(","))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn any_body_is_read_or_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(fields) = decode_form(&body) {
                let _ = read_notification(&fields);
            }
        }

        #[test]
        fn encoded_fields_decode_to_themselves(pairs in proptest::collection::vec(("\\PC{1,20}", "\\PC{0,40}"), 0..6)) {
            let refs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let decoded = decode_form(&form(&refs)).unwrap();
            prop_assert_eq!(decoded, pairs);
        }

        #[test]
        fn the_fast_envelope_check_accepts_only_what_the_full_one_accepts(
            params in envelope_like(),
        ) {
            let full = serde_json::from_str::<Value>(&params)
                .map_err(|e| FormError::Json(e.to_string()))
                .and_then(|json| envelope(&json));
            // What the fast check fails, the full one decides alone.
            if let Ok(fast) = serde_json::from_str::<fast::Envelope>(&params) {
                prop_assert_eq!(Ok(fast.0), full);
            }
        }

        #[test]
        fn without_a_field_every_other_field_decodes_as_before(
            pairs in proptest::collection::vec(
                (proptest::sample::select(vec!["relay_secret", "params", "p", "秘密"]), "\\PC{0,20}"),
                0..6,
            ),
        ) {
            let refs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (*a, b.as_str())).collect();
            let kept = without_field(&form(&refs), "relay_secret");
            let expected: Vec<(String, String)> = pairs
                .iter()
                .filter(|(name, _)| *name != "relay_secret")
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect();
            prop_assert_eq!(decode_form(&kept).unwrap(), expected);
        }
    }
}
