//! What the listener's JSON APIs (orders, stock) share: JSON answers, and
//! bearer tokens compared in constant time.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

pub type Body = Full<Bytes>;

/// `body` as a pretty JSON answer with `status`.
pub fn respond(status: StatusCode, body: Value) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(&body).expect("JSON serialises");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    respond(status, json!({ "error": message.to_string() }))
}

/// Whether the request carries `Authorization: Bearer <token>`.
pub fn bearer_matches(request: &Request<Incoming>, token: &SecretString) -> bool {
    let offered = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(offered.as_bytes().ct_eq(token.expose_secret().as_bytes()))
}

/// 401, naming the config key whose token to send.
pub fn unauthorized(key: &str) -> Response<Body> {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        format!("missing or wrong bearer token: send `Authorization: Bearer <{key}>`"),
    );
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, "Bearer".parse().expect("a header value"));
    response
}

/// 405 with the methods allowed.
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}"));
    response
        .headers_mut()
        .insert(ALLOW, allow.parse().expect("a header value"));
    response
}
