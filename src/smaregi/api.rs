//! The legacy API's answers, read and classified: pure functions, no I/O.
//!
//! Every way a call can fail becomes a [`CallError`], and every
//! `CallError` one [`Class`] (SMAREGI.md §1's code table), which the
//! executors turn into the outbox's outcomes. Bodies kept for the operator
//! are cut short and have the credentials removed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::outbox::engine::AttemptOutcome;
use crate::outbox::retry::parse_retry_after;

/// The longest piece of an answer kept in an error.
pub const MAX_SNIPPET_CHARS: usize = 300;

/// A row as Smaregi returns it: every value a string.
pub type Row = BTreeMap<String, String>;

/// Why one call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Smaregi's own error answer.
    #[error("Smaregi error {code}: {message}")]
    Api {
        status: u16,
        code: u32,
        message: String,
    },
    /// An HTTP status without Smaregi's error JSON (a proxy, a maintenance
    /// page, a 5xx).
    #[error("HTTP {status} from Smaregi: {snippet}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        snippet: String,
    },
    /// A 200 that is not what the call answers.
    #[error("unexpected answer from Smaregi ({problem}): {snippet}")]
    Malformed { problem: String, snippet: String },
    /// No connection: the request was never sent.
    #[error("cannot connect to Smaregi: {0}")]
    Connect(String),
    /// No complete answer within the request timeout.
    #[error("no answer from Smaregi within the timeout")]
    Timeout,
    /// The connection failed once the request may have been sent.
    #[error("connection to Smaregi failed: {0}")]
    Transport(String),
}

/// What to do about a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Credentials, contract or settings: pause the upstream, alert.
    Configuration,
    /// Trying again cannot help: park the job with the reason.
    Permanent,
    /// Nothing happened; try again later.
    Retryable { retry_after: Option<Duration> },
    /// A write may have happened: find out before sending it again.
    Ambiguous { retry_after: Option<Duration> },
}

/// Error codes that mean the contract, the token or Smaregi's settings are
/// wrong (13 token, 14 contract id, 21 authentication, 22 locked, 23
/// function disabled, 24 IP not allowed).
pub const CONFIGURATION_CODES: [u32; 6] = [13, 14, 21, 22, 23, 24];
/// "Data already exists": maybe our own earlier, unanswered write.
pub const ALREADY_EXISTS: u32 = 42;
/// "Extraction failed": a transient failure on Smaregi's side.
pub const EXTRACTION_FAILED: u32 = 43;

impl CallError {
    /// The class of this failure, for a call that writes or only reads.
    pub fn class(&self, write: bool) -> Class {
        let unknown = |retry_after| {
            if write {
                Class::Ambiguous { retry_after }
            } else {
                Class::Retryable { retry_after }
            }
        };
        match self {
            Self::Api { code, .. } if CONFIGURATION_CODES.contains(code) => Class::Configuration,
            Self::Api {
                code: ALREADY_EXISTS,
                ..
            } if write => Class::Ambiguous { retry_after: None },
            Self::Api {
                code: EXTRACTION_FAILED,
                ..
            } => Class::Retryable { retry_after: None },
            Self::Api { .. } => Class::Permanent,
            Self::Status {
                status: 429,
                retry_after,
                ..
            } => Class::Retryable {
                retry_after: *retry_after,
            },
            Self::Status {
                status: 401 | 403, ..
            } => Class::Configuration,
            Self::Status {
                status,
                retry_after,
                ..
            } if *status >= 500 => unknown(*retry_after),
            // A redirect: the endpoint is wrong (a login page, a moved URL).
            Self::Status { status, .. } if (300..400).contains(status) => Class::Configuration,
            Self::Status { .. } => Class::Permanent,
            Self::Malformed { .. } | Self::Timeout | Self::Transport(_) => unknown(None),
            Self::Connect(_) => Class::Retryable { retry_after: None },
        }
    }

    /// The outbox outcome of this failure.
    pub fn outcome(&self, write: bool) -> AttemptOutcome {
        let reason = self.to_string();
        match self.class(write) {
            Class::Configuration => AttemptOutcome::Configuration { reason },
            Class::Permanent => AttemptOutcome::Permanent { reason },
            Class::Retryable { retry_after } => AttemptOutcome::Retry {
                reason,
                retry_after,
            },
            Class::Ambiguous { retry_after } => AttemptOutcome::Ambiguous {
                reason,
                retry_after,
            },
        }
    }
}

/// A bounded, single-line piece of `body` with every secret replaced.
pub fn snippet(body: &[u8], secrets: &[&str]) -> String {
    let mut text = String::from_utf8_lossy(body).into_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "[REDACTED]");
    }
    let single_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut cut: String = single_line.chars().take(MAX_SNIPPET_CHARS).collect();
    if cut.len() < single_line.len() {
        cut.push('…');
    }
    if cut.is_empty() {
        cut.push_str("(empty body)");
    }
    cut
}

/// Reads an answer: the JSON of a 200, or the error it is.
pub fn read_answer(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    secrets: &[&str],
) -> Result<Value, CallError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(error) = json
        .as_ref()
        .and_then(|json| api_error(status, json, secrets))
    {
        // From a busy or failing Smaregi (429, 5xx) the status says what to
        // do, and keeps its Retry-After; an error code in the body decides
        // only if it names a configuration error.
        let status_decides = status == 429 || status >= 500;
        let configuration =
            matches!(&error, CallError::Api { code, .. } if CONFIGURATION_CODES.contains(code));
        if !status_decides || configuration {
            return Err(error);
        }
    }
    match (status, json) {
        (200, Some(json)) => Ok(json),
        (200, None) => Err(CallError::Malformed {
            problem: "not JSON".into(),
            snippet: snippet(body, secrets),
        }),
        (status, _) => Err(CallError::Status {
            status,
            retry_after: retry_after.and_then(|value| parse_retry_after(value, SystemTime::now())),
            snippet: snippet(body, secrets),
        }),
    }
}

/// Smaregi's `{"error_code": …, "error": …, "error_description": …}`.
fn api_error(status: u16, json: &Value, secrets: &[&str]) -> Option<CallError> {
    let code = match json.get("error_code")? {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let text = |key: &str| json.get(key).and_then(Value::as_str).unwrap_or("").trim();
    let message = match (text("error"), text("error_description")) {
        ("", description) => description.to_owned(),
        (error, "") => error.to_owned(),
        (error, description) => format!("{description} ({error})"),
    };
    Some(CallError::Api {
        status,
        code: u32::try_from(code).unwrap_or(u32::MAX),
        message: snippet(message.as_bytes(), secrets),
    })
}

/// `TransactionHeadIds[0]` of a `transaction_upd` answer.
pub fn registered_id(answer: &Value, secrets: &[&str]) -> Result<u64, CallError> {
    let malformed = |problem: &str| CallError::Malformed {
        problem: problem.into(),
        snippet: snippet(answer.to_string().as_bytes(), secrets),
    };
    let ids = answer
        .pointer("/result/TransactionHeadIds")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no result.TransactionHeadIds"))?;
    let first = ids
        .first()
        .ok_or_else(|| malformed("TransactionHeadIds is empty"))?;
    let id = match first {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    };
    id.filter(|&id| id > 0)
        .ok_or_else(|| malformed("TransactionHeadIds[0] is not an id"))
}

/// The rows and `total_count` of a `*_ref` answer.
pub fn rows(answer: &Value, secrets: &[&str]) -> Result<(u64, Vec<Row>), CallError> {
    let malformed = |problem: String| CallError::Malformed {
        problem,
        snippet: snippet(answer.to_string().as_bytes(), secrets),
    };
    let total = match answer.get("total_count") {
        Some(Value::String(text)) => text.parse().ok(),
        Some(Value::Number(number)) => number.as_u64(),
        _ => None,
    }
    .ok_or_else(|| malformed("no total_count".into()))?;
    let Some(result) = answer.get("result").and_then(Value::as_array) else {
        return Err(malformed("no result array".into()));
    };
    let mut rows = Vec::with_capacity(result.len());
    for (i, row) in result.iter().enumerate() {
        let object = row
            .as_object()
            .ok_or_else(|| malformed(format!("result[{i}] is not an object")))?;
        let mut fields = Row::new();
        for (key, value) in object {
            match value {
                Value::String(text) => {
                    fields.insert(key.clone(), text.clone());
                }
                Value::Number(number) => {
                    fields.insert(key.clone(), number.to_string());
                }
                Value::Null => {}
                other => {
                    return Err(malformed(format!(
                        "result[{i}].{key} is {other}, not a string"
                    )))
                }
            }
        }
        rows.push(fields);
    }
    Ok((total, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn api(code: u32) -> CallError {
        CallError::Api {
            status: 400,
            code,
            message: "m".into(),
        }
    }

    fn status(status: u16) -> CallError {
        CallError::Status {
            status,
            retry_after: None,
            snippet: String::new(),
        }
    }

    #[test]
    fn the_code_table_maps_to_classes() {
        for code in CONFIGURATION_CODES {
            assert_eq!(api(code).class(true), Class::Configuration, "{code}");
        }
        for code in [11, 15, 31, 32, 33, 41, 101, 102, 999] {
            assert_eq!(api(code).class(true), Class::Permanent, "{code}");
        }
        assert_eq!(api(42).class(true), Class::Ambiguous { retry_after: None });
        assert_eq!(api(42).class(false), Class::Permanent);
        assert_eq!(api(43).class(true), Class::Retryable { retry_after: None });
    }

    #[test]
    fn unknown_outcomes_are_ambiguous_only_for_writes() {
        for error in [
            status(500),
            status(502),
            status(503),
            CallError::Timeout,
            CallError::Transport("reset".into()),
        ] {
            assert_eq!(
                error.class(true),
                Class::Ambiguous { retry_after: None },
                "{error}"
            );
            assert_eq!(
                error.class(false),
                Class::Retryable { retry_after: None },
                "{error}"
            );
        }
        assert_eq!(
            CallError::Connect("refused".into()).class(true),
            Class::Retryable { retry_after: None },
            "never sent"
        );
        assert_eq!(
            status(429).class(true),
            Class::Retryable { retry_after: None }
        );
        assert_eq!(status(403).class(true), Class::Configuration);
        assert_eq!(status(302).class(true), Class::Configuration);
        assert_eq!(status(404).class(true), Class::Permanent);
    }

    #[test]
    fn answers_are_read_into_errors_with_their_codes() {
        let body = json!({"error_code": 14, "error": "invalid_contract_id", "error_description": "契約IDが不正です"});
        assert_eq!(
            read_answer(400, None, body.to_string().as_bytes(), &[]),
            Err(CallError::Api {
                status: 400,
                code: 14,
                message: "契約IDが不正です (invalid_contract_id)".into()
            })
        );
        let as_string = json!({"error_code": "41", "error_description": "subtotal"});
        assert!(matches!(
            read_answer(400, None, as_string.to_string().as_bytes(), &[]),
            Err(CallError::Api { code: 41, .. })
        ));
        let html = b"<html><body>502 Bad Gateway</body></html>";
        assert!(matches!(
            read_answer(502, None, html, &[]),
            Err(CallError::Status { status: 502, .. })
        ));
        assert!(matches!(
            read_answer(200, None, html, &[]),
            Err(CallError::Malformed { .. })
        ));
        assert!(matches!(
            read_answer(200, None, br#"{"result":{"Transact"#, &[]),
            Err(CallError::Malformed { .. })
        ));
        assert!(matches!(
            read_answer(429, Some("7"), b"", &[]),
            Err(CallError::Status { retry_after: Some(d), .. }) if d == Duration::from_secs(7)
        ));
        assert_eq!(
            read_answer(200, None, b"{\"a\":1}", &[]),
            Ok(json!({"a": 1}))
        );
    }

    #[test]
    fn a_busy_or_failing_smaregi_is_judged_by_its_status_even_with_an_error_code() {
        let unlisted = json!({"error_code": 99, "error": "busy"}).to_string();
        let busy = read_answer(429, Some("7"), unlisted.as_bytes(), &[]).unwrap_err();
        assert_eq!(
            busy.class(true),
            Class::Retryable {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let failing = read_answer(503, None, unlisted.as_bytes(), &[]).unwrap_err();
        assert_eq!(failing.class(true), Class::Ambiguous { retry_after: None });
        assert!(failing.to_string().contains("busy"), "{failing}");
        let configuration = json!({"error_code": 13, "error": "invalid_token"}).to_string();
        let paused = read_answer(503, None, configuration.as_bytes(), &[]).unwrap_err();
        assert_eq!(paused.class(true), Class::Configuration);
        let refused = read_answer(400, None, unlisted.as_bytes(), &[]).unwrap_err();
        assert_eq!(refused.class(true), Class::Permanent);
    }

    #[test]
    fn a_registration_answer_must_carry_an_id() {
        let good = json!({"result": {"TransactionHead": 1, "TransactionHeadIds": ["952"], "TransactionDetail": 2}});
        assert_eq!(registered_id(&good, &[]), Ok(952));
        for bad in [
            json!({"result": {"TransactionHeadIds": []}}),
            json!({"result": {"TransactionHeadIds": ["abc"]}}),
            json!({"result": {"TransactionHeadIds": [null]}}),
            json!({"result": {}}),
            json!([]),
        ] {
            assert!(
                matches!(registered_id(&bad, &[]), Err(CallError::Malformed { .. })),
                "{bad}"
            );
        }
        // An answer of the wrong shape that echoes a credential: the
        // snippet kept on the job does not show it.
        let echo = json!({"result": {"TransactionHeadIds": []}, "token": "SECRET-TOKEN"});
        let shape = json!({"total_count": "x", "contract": "c-123"});
        for error in [
            registered_id(&echo, &["SECRET-TOKEN", "c-123"]).unwrap_err(),
            rows(&shape, &["SECRET-TOKEN", "c-123"]).unwrap_err(),
        ] {
            let shown = error.to_string();
            assert!(shown.contains("unexpected answer"), "{shown}");
            assert!(
                !shown.contains("SECRET-TOKEN") && !shown.contains("c-123"),
                "{shown}"
            );
        }
    }

    #[test]
    fn rows_must_be_objects_of_strings() {
        let answer = json!({"total_count": "2", "result": [{"storeId": "1", "stockAmount": "4"}, {"storeId": "2", "stockAmount": 5, "x": null}]});
        let (total, read) = rows(&answer, &[]).unwrap();
        assert_eq!(total, 2);
        assert_eq!(read[1]["stockAmount"], "5");
        assert!(!read[1].contains_key("x"));
        for bad in [
            json!({"result": []}),
            json!({"total_count": "1", "result": [["a"]]}),
            json!({"total_count": "1", "result": [{"a": {"b": 1}}]}),
            json!({"total_count": "1"}),
        ] {
            assert!(rows(&bad, &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn snippets_hide_secrets_and_stay_short() {
        let body = format!("token=SECRET-TOKEN contract=c-123 {}", "x".repeat(1000));
        let cut = snippet(body.as_bytes(), &["SECRET-TOKEN", "c-123"]);
        assert!(
            !cut.contains("SECRET-TOKEN") && !cut.contains("c-123"),
            "{cut}"
        );
        assert!(cut.chars().count() <= MAX_SNIPPET_CHARS + 1);
        assert_eq!(snippet(b"", &[]), "(empty body)");
        assert_eq!(snippet(b"a\n\n  b", &[]), "a b");
    }

    proptest! {
        #[test]
        fn any_answer_reads_without_panicking(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..400)) {
            match read_answer(status, None, &body, &["secret"]) {
                Ok(_) => prop_assert_eq!(status, 200),
                Err(error) => {
                    let _ = error.class(true);
                    prop_assert!(!error.to_string().contains("secret"), "{}", error);
                }
            }
        }
    }
}
