//! The daemon's side of the control socket: a Unix socket, mode 0660 (the
//! unit runs as user and group `smaregi-relay`: root and members of the
//! group may talk to it), one request per connection. The peer's
//! credentials are logged with every command that changes something.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{parse_request, Command, Failure, Reply, MAX_REQUEST_BYTES};
use crate::admin::Observed;
use crate::health;
use crate::mapping::{MappingError, MappingStore};
use crate::outbox::engine::{Engine, EngineError};
use crate::outbox::job::JobState;
use crate::outbox::queue::{ListFilter, QueueError};

/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control socket can see and do.
pub struct Control {
    pub engine: Engine,
    pub mapping: MappingStore,
    /// What `status` reports, as the status page sees it.
    pub observed: Arc<Observed>,
}

/// Binds the socket at `path`, replacing a stale one left by a crash.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if metadata.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves the socket until `shutdown`, then removes it.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    control: Arc<Control>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control: accept failed");
                    continue;
                }
            },
        };
        let control = Arc::clone(&control);
        connections.spawn(async move {
            if let Err(e) = connection(stream, &control).await {
                debug!(error = %e, "control: connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    let _ = std::fs::remove_file(&path);
}

async fn connection(stream: UnixStream, control: &Control) -> std::io::Result<()> {
    let peer = stream
        .peer_cred()
        .map(|c| format!("uid {} gid {} pid {:?}", c.uid(), c.gid(), c.pid()))
        .unwrap_or_else(|_| "unknown peer".into());
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Err(_) => Reply::error(Failure::BadRequest, "no request arrived in time"),
        Ok(Err(e)) => Reply::error(Failure::BadRequest, format!("cannot read the request: {e}")),
        Ok(Ok(_)) => match parse_request(line.trim_ascii()) {
            Err(reply) => {
                warn!(%peer, "control: refused a request that is not one");
                reply
            }
            Ok(command) => {
                if command.changes_state() {
                    info!(%peer, ?command, "control: operator command");
                }
                control.handle(command).await
            }
        },
    };
    let mut text = serde_json::to_vec(&reply).expect("a reply serialises");
    text.push(b'\n');
    write.write_all(&text).await?;
    write.shutdown().await
}

fn engine_failure(error: EngineError) -> Reply {
    let failure = match &error {
        EngineError::Queue(QueueError::NotFound(_)) => Failure::NotFound,
        EngineError::Queue(QueueError::WrongState { .. } | QueueError::NotHead { .. })
        | EngineError::Running(_) => Failure::Refused,
        _ => Failure::Unavailable,
    };
    Reply::error(failure, error.to_string())
}

fn ok(data: Value) -> Reply {
    Reply::Ok { data }
}

impl Control {
    async fn handle(&self, command: Command) -> Reply {
        let engine = &self.engine;
        let result: Result<Value, EngineError> = match command {
            Command::Status => self.status(),
            Command::OutboxList {
                state,
                kind,
                key,
                limit,
            } => {
                let state = match state.map(|s| s.parse::<JobState>()).transpose() {
                    Ok(state) => state,
                    Err(_) => {
                        return Reply::error(
                            Failure::BadRequest,
                            "state must be pending, parked, done or discarded",
                        )
                    }
                };
                let filter = ListFilter {
                    state,
                    kind,
                    key,
                    limit: limit.unwrap_or(100).min(10_000),
                    ..ListFilter::default()
                };
                engine
                    .queue()
                    .list(&filter)
                    .map(|jobs| json!(jobs))
                    .map_err(EngineError::from)
            }
            Command::OutboxShow { id } => match engine.queue().job(id) {
                Ok(Some(job)) => Ok(json!(job)),
                Ok(None) => Err(EngineError::Queue(QueueError::NotFound(id))),
                Err(e) => Err(e.into()),
            },
            Command::OutboxRetry { id } => {
                engine.retry(id).await.map(|()| json!({ "retried": [id] }))
            }
            Command::OutboxRetryAllParked => engine
                .retry_all_parked()
                .await
                .map(|n| json!({ "retried": n })),
            Command::OutboxDiscard { id, reason } => {
                if reason.trim().is_empty() {
                    return Reply::error(Failure::BadRequest, "a discard needs a reason");
                }
                engine
                    .discard(id, &reason)
                    .await
                    .map(|()| json!({ "discarded": id }))
            }
            Command::Pause { upstream, reason } => {
                if !engine.upstreams().contains(&upstream) {
                    return Reply::error(
                        Failure::NotFound,
                        format!(
                            "no upstream {upstream:?}; the upstreams are {:?}",
                            engine.upstreams()
                        ),
                    );
                }
                let reason = reason.unwrap_or_else(|| "paused by an operator".into());
                engine
                    .pause(&upstream, &reason)
                    .await
                    .map(|()| json!({ "paused": upstream }))
            }
            Command::Resume { upstream } => {
                // A pause kept from an upstream no longer configured can
                // still be lifted; a name that is neither is a typo.
                if !engine.upstreams().contains(&upstream)
                    && !engine.paused().contains_key(&upstream)
                {
                    return Reply::error(
                        Failure::NotFound,
                        format!(
                            "no upstream {upstream:?}; the upstreams are {:?}",
                            engine.upstreams()
                        ),
                    );
                }
                engine
                    .resume(&upstream)
                    .await
                    .map(|()| json!({ "resumed": upstream }))
            }
            Command::MappingStatus
            | Command::MappingLookup { .. }
            | Command::MappingHistory
            | Command::MappingRollback { .. } => return self.mapping(command).await,
        };
        match result {
            Ok(data) => ok(data),
            Err(e) => engine_failure(e),
        }
    }

    async fn mapping(&self, command: Command) -> Reply {
        let current = self.mapping.current();
        let result = match command {
            Command::MappingStatus => self.mapping.history().map(|history| {
                let info = history.iter().find(|i| i.version == current.version());
                json!({ "version": current.version(), "current": info })
            }),
            Command::MappingLookup {
                external_code,
                smaregi_id,
            } => {
                let (code, id) = match (external_code, smaregi_id) {
                    (Some(code), None) => {
                        let id = current.smaregi_id_for(&code);
                        (Some(code), id)
                    }
                    (None, Some(id)) => (current.external_code_for(&id), Some(id)),
                    _ => {
                        return Reply::error(
                            Failure::BadRequest,
                            "give an external code or a Smaregi id, one of them",
                        )
                    }
                };
                if code.is_none() || id.is_none() {
                    return Reply::error(
                        Failure::NotFound,
                        format!("not mapped in version {}", current.version()),
                    );
                }
                Ok(json!({ "version": current.version(), "external_code": code, "smaregi_id": id }))
            }
            Command::MappingHistory => self.mapping.history().map(|h| json!(h)),
            Command::MappingRollback { version } => {
                self.mapping.rollback(version).await.map(|info| json!(info))
            }
            _ => unreachable!("only mapping commands come here"),
        };
        match result {
            Ok(data) => ok(data),
            Err(MappingError::NoSuchVersion(v)) => Reply::error(
                Failure::NotFound,
                format!("mapping version {v} does not exist or was pruned (`mapping history` lists them)"),
            ),
            Err(e) => Reply::error(Failure::Unavailable, e.to_string()),
        }
    }

    fn status(&self) -> Result<Value, EngineError> {
        let snapshot = self.observed.snapshot()?;
        let problems = health::assess(&snapshot, &self.observed.thresholds);
        let total = |state: &str| -> u64 {
            (snapshot.outbox_counts.iter())
                .filter(|(s, _, _)| s == state)
                .map(|(_, _, n)| n)
                .sum()
        };
        let counts: Vec<Value> = (snapshot.outbox_counts.iter())
            .map(|(state, kind, n)| json!({"state": state, "kind": kind, "count": n}))
            .collect();
        let paused: serde_json::Map<String, Value> = (snapshot.paused.iter())
            .map(|p| {
                (
                    p.upstream.clone(),
                    json!({"reason": p.reason, "by_operator": p.by_operator}),
                )
            })
            .collect();
        Ok(json!({
            "version": snapshot.version,
            "uptime_seconds": snapshot.uptime_seconds,
            "listening": snapshot.listening,
            "health": health::Light::of(&problems),
            "problems": problems,
            "certificate": {
                "fingerprint": snapshot.certificate_fingerprint,
                "not_after": snapshot.certificate_not_after,
            },
            "last_notification_at": snapshot.last_notification_at,
            "outbox": {
                "pending": snapshot.pending,
                "parked": snapshot.parked,
                "done": total("done"),
                "discarded": total("discarded"),
                "by_state_and_kind": counts,
                "oldest_pending": snapshot.oldest_pending.as_ref().map(|(id, kind, age)| json!({
                    "id": id, "kind": kind, "age_seconds": age,
                })),
                "blocked_keys": snapshot.blocked_keys.iter().map(|(key, job)| json!({"key": key, "parked_job": job})).collect::<Vec<_>>(),
                "paused": paused,
            },
            "mapping_version": snapshot.mapping_version,
            "last_import": snapshot.last_import,
        }))
    }
}
