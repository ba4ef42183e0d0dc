//! Logging set-up.
//!
//! Under systemd, stderr is connected to the journal and `JOURNAL_STREAM`
//! names that connection: then events go to journald natively, with their
//! fields as journal fields and their level as priority. Otherwise they go
//! to stderr as human-readable lines. The level comes from the config;
//! `RUST_LOG` overrides it.
//!
//! This module must never log secrets; it formats what callers give it.

use std::fmt::Display;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The identifier journald shows for our lines (`journalctl -t`).
pub const SYSLOG_IDENTIFIER: &str = "smaregi-relay";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG is not a valid log filter: {0}")]
    BadEnvFilter(String),
    #[error("`{level}` is not a valid log filter: {reason}")]
    BadLevel { level: String, reason: String },
    #[error("a logger is already installed")]
    AlreadyInstalled,
}

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Installs the global logger with `level` as the default filter.
pub fn init(level: &str) -> Result<LogTarget, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::builder()
            .parse(&env)
            .map_err(|e| TelemetryError::BadEnvFilter(e.to_string()))?,
        _ => EnvFilter::builder()
            .parse(level)
            .map_err(|e| TelemetryError::BadLevel {
                level: level.to_owned(),
                reason: e.to_string(),
            })?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                return registry
                    .with(layer.with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()))
                    .try_init()
                    .map(|()| LogTarget::Journald)
                    .map_err(|_| TelemetryError::AlreadyInstalled);
            }
            Err(e) => {
                // Fall through to stderr, which journald records as well.
                eprintln!("smaregi-relay: journald socket unavailable ({e}); logging to stderr");
            }
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only on a terminal, not in files or pipes.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init()
        .map(|()| LogTarget::Stderr)
        .map_err(|_| TelemetryError::AlreadyInstalled)
}

/// Whether stderr is the journal stream systemd connected us to.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(metadata) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    journal_stream_matches(&stream, metadata.dev(), metadata.ino())
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`) names this device and inode.
pub fn journal_stream_matches(value: &str, device: u64, inode: u64) -> bool {
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    dev.parse() == Ok(device) && ino.parse() == Ok(inode)
}

/// Writes the one line that explains why the process stops.
///
/// Used where logging may not be set up yet. On the journal stream the line
/// carries the `<3>` (error) priority prefix that journald understands.
pub fn report_fatal(error: &dyn Display) {
    let prefix = if stderr_is_journal() { "<3>" } else { "" };
    let line = error.to_string().replace('\n', &format!("\n{prefix}"));
    let _ = writeln!(std::io::stderr(), "{prefix}smaregi-relay: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_match_device_and_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("", 0, 0));
        assert!(!journal_stream_matches("x:y", 0, 0));
    }
}
