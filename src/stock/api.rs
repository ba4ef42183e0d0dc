//! The stock read API on the TLS listener: `GET /api/v1/stock`, behind a
//! bearer token, answered from the stock mirror (no Smaregi call).
//!
//! `?external_code=CODE` or `?smaregi_product_id=ID`, optionally with
//! `&store_id=ID`: the product's stock in that store, or in every store
//! the mirror knows it in.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use std::sync::Arc;
use tracing::warn;

use super::book::StockBook;
use crate::intake::api::{bearer_matches, error, method_not_allowed, respond, unauthorized, Body};
use crate::mapping::Catalog;

pub const PATH: &str = "/api/v1/stock";

pub struct StockApi {
    book: StockBook,
    token: SecretString,
    catalog: Arc<dyn Catalog>,
}

fn digits(text: &str, max: usize) -> bool {
    (1..=max).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

impl StockApi {
    pub fn new(book: StockBook, token: SecretString, catalog: Arc<dyn Catalog>) -> Self {
        Self {
            book,
            token,
            catalog,
        }
    }

    pub fn serves(path: &str) -> bool {
        path == PATH
    }

    pub fn handle(&self, request: &Request<Incoming>) -> Response<Body> {
        if !bearer_matches(request, &self.token) {
            return unauthorized("[stock] api-token");
        }
        if request.method() != Method::GET {
            return method_not_allowed("GET");
        }
        let query: Vec<(String, String)> =
            form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let get = |name: &str| {
            query
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        if let Some((unknown, _)) = query.iter().find(|(key, _)| {
            !matches!(
                key.as_str(),
                "external_code" | "smaregi_product_id" | "store_id"
            )
        }) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown parameter {unknown:?}: use external_code or smaregi_product_id, and store_id"),
            );
        }
        let product = match (get("external_code"), get("smaregi_product_id")) {
            (Some(code), None) => match self.catalog.smaregi_id_for(code) {
                Some(id) => id,
                None => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no Smaregi product is mapped to external_code {code:?}"),
                    )
                }
            },
            (None, Some(id)) if digits(id, 15) => id.to_owned(),
            (None, Some(id)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("smaregi_product_id {id:?} is not 1 to 15 digits"),
                )
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give external_code or smaregi_product_id (one of them)",
                )
            }
        };
        let store = get("store_id");
        if store.is_some_and(|s| !digits(s, 9)) {
            return error(StatusCode::BAD_REQUEST, "store_id is not 1 to 9 digits");
        }
        let found = match self.book.product_everywhere(&product, store) {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "stock: cannot read the mirror");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the stock mirror cannot be read right now; try again later",
                );
            }
        };
        if found.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                format!("the relay has not learned the stock of product {product} yet"),
            );
        }
        let stores: Vec<Value> = found
            .into_iter()
            .map(|(store_id, mirrored)| {
                json!({
                    "store_id": store_id,
                    "stock": mirrored.amount,
                    "updated_at": mirrored.updated_at,
                    "learned_at_ms": mirrored.learned_at,
                })
            })
            .collect();
        respond(
            StatusCode::OK,
            json!({
                "smaregi_product_id": product,
                "external_code": self.catalog.external_code_for(&product),
                "mapping_version": self.catalog.version(),
                "stores": stores,
            }),
        )
    }
}
