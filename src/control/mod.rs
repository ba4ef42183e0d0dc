//! The control socket: how operator commands (`smaregi-relay status`,
//! `outbox …`, `pause`, `resume`) reach the running daemon, which alone
//! holds the store.
//!
//! This module owns the protocol ([`Request`], [`Reply`], one JSON
//! request line per connection, answered with one JSON document, both
//! size-capped), the daemon's side ([`server`]) and the command-line side
//! ([`client`]). It never opens the store itself: it asks the daemon's
//! components for read-only views and operator actions.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// The protocol version; a request of another version is refused.
pub const VERSION: u32 = 1;
/// The largest request accepted, in bytes (a request is a few hundred).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest reply a client reads.
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// One operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "command", deny_unknown_fields)]
pub enum Command {
    Status,
    OutboxList {
        state: Option<String>,
        kind: Option<String>,
        key: Option<String>,
        limit: Option<usize>,
    },
    OutboxShow {
        id: u64,
    },
    OutboxRetry {
        id: u64,
    },
    OutboxRetryAllParked,
    OutboxDiscard {
        id: u64,
        reason: String,
    },
    Pause {
        upstream: String,
        reason: Option<String>,
    },
    Resume {
        upstream: String,
    },
    MappingStatus,
    MappingLookup {
        external_code: Option<String>,
        smaregi_id: Option<String>,
    },
    MappingHistory,
    MappingRollback {
        version: u64,
    },
}

impl Command {
    /// Whether the command changes anything (audited in the log).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            Self::Status
                | Self::OutboxList { .. }
                | Self::OutboxShow { .. }
                | Self::MappingStatus
                | Self::MappingLookup { .. }
                | Self::MappingHistory
        )
    }
}

/// The request line for `command`: `{"v": 1, "command": "…", …}`.
pub fn request_line(command: &Command) -> Vec<u8> {
    let mut value = serde_json::to_value(command).expect("a command serialises");
    value["v"] = serde_json::json!(VERSION);
    let mut line = serde_json::to_vec(&value).expect("a request serialises");
    line.push(b'\n');
    line
}

/// Why a command failed, one exit code each on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// The request could not be read (garbage, too large, another version).
    BadRequest,
    /// No such job, or the like.
    NotFound,
    /// Understood, but not allowed now (e.g. discarding a running job).
    Refused,
    /// The daemon cannot answer now (its store failed).
    Unavailable,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum Reply {
    Ok { data: serde_json::Value },
    Error { failure: Failure, message: String },
}

impl Reply {
    pub fn error(failure: Failure, message: impl Into<String>) -> Self {
        Self::Error {
            failure,
            message: message.into(),
        }
    }
}

/// Reads one request line. Pure.
pub fn parse_request(line: &[u8]) -> Result<Command, Reply> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(Reply::error(
            Failure::BadRequest,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let bad = |message: String| Reply::error(Failure::BadRequest, message);
    let mut value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| bad(format!("not a control request: {e}")))?;
    let version = value
        .as_object_mut()
        .and_then(|object| object.remove("v"))
        .and_then(|v| v.as_u64());
    if version != Some(u64::from(VERSION)) {
        return Err(bad(format!(
            "protocol version {version:?} is not {VERSION}: use the smaregi-relay binary of the running daemon"
        )));
    }
    let command: Command = serde_json::from_value(value.clone())
        .map_err(|e| bad(format!("not a control request: {e}")))?;
    // serde lets unknown fields through on commands without fields: every
    // field sent must be one the command has.
    let known = serde_json::to_value(&command).expect("a command serialises");
    if let (Some(sent), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(unknown) = sent.keys().find(|key| !known.contains_key(*key)) {
            return Err(bad(format!("unknown field {unknown:?}")));
        }
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_a_bad_request() {
        let command = Command::OutboxDiscard {
            id: 7,
            reason: "duplicate order".into(),
        };
        let line = request_line(&command);
        assert_eq!(parse_request(line.trim_ascii_end()).unwrap(), command);
        for bad in [
            &b"hello"[..],
            br#"{"v":1,"command":"format-disk"}"#,
            br#"{"v":2,"command":"status"}"#,
            br#"{"v":1,"command":"status","extra":1}"#,
        ] {
            assert!(
                matches!(
                    parse_request(bad),
                    Err(Reply::Error {
                        failure: Failure::BadRequest,
                        ..
                    })
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_request(&vec![b' '; MAX_REQUEST_BYTES + 1]).is_err());
    }
}
