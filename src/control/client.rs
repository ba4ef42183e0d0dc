//! The command-line side of the control socket: sends one command to the
//! running daemon and returns its answer. Blocking; no runtime needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{request_line, Command, Failure, Reply, MAX_REPLY_BYTES};
use crate::cli::ControlArgs;
use crate::config::defaults;

/// How long a command may take, answer included.
pub const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {}: {source} (is it running? `systemctl status smaregi-relay`)", path.display())]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not allowed to use the control socket at {}: run the command as root, or as a member of group smaregi-relay (`sudo usermod -aG smaregi-relay $USER`, then log in again)", path.display())]
    Forbidden { path: PathBuf },
    #[error("the daemon's answer did not arrive: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon's answer is not one: {0}")]
    Malformed(String),
    #[error("{message}")]
    Failed { failure: Failure, message: String },
}

impl ClientError {
    /// The exit code scripts can rely on.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. } | Self::Io(_) | Self::Malformed(_) => crate::exit::UNAVAILABLE,
            Self::Forbidden { .. } => crate::exit::NO_PERMISSION,
            Self::Failed { failure, .. } => match failure {
                Failure::NotFound | Failure::Refused => crate::exit::REFUSED,
                Failure::BadRequest => crate::exit::USAGE,
                Failure::Unavailable => crate::exit::UNAVAILABLE,
            },
        }
    }
}

/// The control socket named by the config at `config` (`[admin]
/// control-socket`, relative to the config's folder), or the default.
/// Reads only that key, so an operator who may not read the config's
/// secret files can still use the socket.
pub fn socket_path(config: &Path) -> PathBuf {
    let named = std::fs::read_to_string(config)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| {
            table
                .get("admin")?
                .get("control-socket")?
                .as_str()
                .map(PathBuf::from)
        });
    match named {
        Some(path) if path.is_relative() => {
            config.parent().unwrap_or_else(|| Path::new(".")).join(path)
        }
        Some(path) => path,
        None => PathBuf::from(defaults::CONTROL_SOCKET),
    }
}

/// Sends `command` to the daemon at `socket`; its data, or why not.
pub fn send(socket: &Path, command: &Command) -> Result<Value, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        let path = socket.to_owned();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::Forbidden { path }
        } else {
            ClientError::Unreachable { path, source }
        }
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(&request_line(command))?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(MAX_REPLY_BYTES as u64)
        .read_until(b'\n', &mut line)?;
    match serde_json::from_slice::<Reply>(&line) {
        Ok(Reply::Ok { data }) => Ok(data),
        Ok(Reply::Error { failure, message }) => Err(ClientError::Failed { failure, message }),
        Err(e) => Err(ClientError::Malformed(e.to_string())),
    }
}

/// Runs an operator command of the command line: prints the answer (or
/// why there is none) and returns the exit code.
pub fn run(control: &ControlArgs, command: Command) -> u8 {
    let socket = control
        .socket
        .clone()
        .unwrap_or_else(|| socket_path(&control.config));
    match send(&socket, &command) {
        Ok(data) => {
            if control.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&data).expect("JSON serialises")
                );
            } else {
                print!("{}", render(&command, &data));
            }
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("smaregi-relay: {e}");
            e.exit_code()
        }
    }
}

/// The operator commands of the command line, as control commands.
pub fn run_cli(command: crate::cli::Command) -> Option<u8> {
    use crate::cli::{Command as Cli, OutboxCommand};
    let (control, command) = match command {
        Cli::Status(control) => (control, Command::Status),
        Cli::Pause {
            upstream,
            reason,
            control,
        } => (control, Command::Pause { upstream, reason }),
        Cli::Resume { upstream, control } => (control, Command::Resume { upstream }),
        Cli::Outbox(OutboxCommand::List {
            state,
            kind,
            key,
            limit,
            control,
        }) => (
            control,
            Command::OutboxList {
                state,
                kind,
                key,
                limit: Some(limit),
            },
        ),
        Cli::Outbox(OutboxCommand::Show { id, control }) => (control, Command::OutboxShow { id }),
        Cli::Outbox(OutboxCommand::Retry {
            id,
            all_parked,
            control,
        }) => match (id, all_parked) {
            (Some(id), false) => (control, Command::OutboxRetry { id }),
            _ => (control, Command::OutboxRetryAllParked),
        },
        Cli::Outbox(OutboxCommand::Discard {
            id,
            reason,
            yes,
            control,
        }) => {
            if !yes {
                eprintln!(
                    "smaregi-relay: discarding job {id} means its call is never made; \
                     add --yes to confirm (nothing was changed)"
                );
                return Some(crate::exit::USAGE);
            }
            (control, Command::OutboxDiscard { id, reason })
        }
        Cli::Mapping(mapping) => match mapping {
            crate::cli::MappingCommand::Status(control) => (control, Command::MappingStatus),
            crate::cli::MappingCommand::Lookup {
                external_code,
                smaregi_id,
                control,
            } => (
                control,
                Command::MappingLookup {
                    external_code,
                    smaregi_id,
                },
            ),
            crate::cli::MappingCommand::History(control) => (control, Command::MappingHistory),
            crate::cli::MappingCommand::Rollback {
                to_version,
                control,
            } => (
                control,
                Command::MappingRollback {
                    version: to_version,
                },
            ),
            crate::cli::MappingCommand::Check { .. } => return None,
        },
        _ => return None,
    };
    Some(run(&control, command))
}

fn seconds(total: u64) -> String {
    match total {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The human-readable form of an answer.
pub fn render(command: &Command, data: &Value) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    match command {
        Command::Status => {
            let outbox = &data["outbox"];
            let parked = outbox["parked"].as_u64().unwrap_or(0);
            let paused = outbox["paused"].as_object().cloned().unwrap_or_default();
            let health = match data["health"].as_str() {
                Some("green") => "正常 (all well)",
                Some("amber") => "要確認 (worth a look)",
                _ => "要対応 (needs attention)",
            };
            line(format!(
                "smaregi-relay {} · {health} · up {} · {}",
                data["version"].as_str().unwrap_or("?"),
                seconds(data["uptime_seconds"].as_u64().unwrap_or(0)),
                data["listening"].as_str().unwrap_or("")
            ));
            line(format!(
                "outbox: {} pending, {parked} parked, {} done, {} discarded",
                outbox["pending"], outbox["done"], outbox["discarded"]
            ));
            if let Some(oldest) = outbox["oldest_pending"].as_object() {
                line(format!(
                    "oldest pending: job {} ({}), {} old",
                    oldest["id"],
                    oldest["kind"].as_str().unwrap_or("?"),
                    seconds(oldest["age_seconds"].as_u64().unwrap_or(0))
                ));
            }
            for (upstream, pause) in &paused {
                line(format!(
                    "停止 paused: {upstream} — {}",
                    pause["reason"].as_str().unwrap_or("")
                ));
            }
            for blocked in outbox["blocked_keys"].as_array().into_iter().flatten() {
                line(format!(
                    "blocked: {} behind parked job {} (`smaregi-relay outbox show {}`)",
                    blocked["key"].as_str().unwrap_or("?"),
                    blocked["parked_job"],
                    blocked["parked_job"]
                ));
            }
            line(format!("mapping version: {}", data["mapping_version"]));
            match data["last_import"]["result"].as_str() {
                Some("imported") => line(format!(
                    "last CSV: {} imported as version {}",
                    data["last_import"]["file"].as_str().unwrap_or("?"),
                    data["last_import"]["version"]
                )),
                Some("rejected") => line(format!(
                    "last CSV: {} rejected ({} problems), report {}",
                    data["last_import"]["file"].as_str().unwrap_or("?"),
                    data["last_import"]["errors"],
                    data["last_import"]["report"].as_str().unwrap_or("?")
                )),
                _ => line("last CSV: none since start".into()),
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match data["last_notification_at"].as_u64() {
                Some(at) => line(format!(
                    "last notification: {} ago",
                    seconds(now.saturating_sub(at / 1000))
                )),
                None => line("last notification: none since start".into()),
            }
            if let Some(not_after) = data["certificate"]["not_after"].as_i64() {
                let left = not_after - now as i64;
                line(format!(
                    "certificate: expires {} ({})",
                    crate::smaregi::jst::format_unix_millis(not_after.max(0) as u64 * 1000),
                    if left > 0 {
                        format!("in {}", seconds(left as u64))
                    } else {
                        "expired".into()
                    }
                ));
            }
            for problem in data["problems"].as_array().into_iter().flatten() {
                line(format!(
                    "! {}\n  {}",
                    problem["japanese"].as_str().unwrap_or(""),
                    problem["english"].as_str().unwrap_or("")
                ));
            }
        }
        Command::OutboxList { .. } => {
            let jobs = data.as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                line("no jobs".into());
            }
            for job in jobs {
                let error = job["last-error"]["message"].as_str().unwrap_or("");
                line(format!(
                    "{:>8}  {:<9} {:<32} {:<24} attempts {:<3} {error}",
                    job["id"],
                    job["state"].as_str().unwrap_or("?"),
                    job["kind"].as_str().unwrap_or("?"),
                    job["key"].as_str().unwrap_or("?"),
                    job["attempts"]
                ));
            }
        }
        _ => line(serde_json::to_string_pretty(data).expect("JSON serialises")),
    }
    out
}
