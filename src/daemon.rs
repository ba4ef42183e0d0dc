//! The daemon: start-up order, readiness, shutdown.
//!
//! Start-up: config → logging → store → components (the outbox engine,
//! with the executors of every configured upstream) → `READY=1`. Then it
//! waits for SIGTERM or SIGINT, cancels the one shutdown token every task
//! holds, gives the tasks `shutdown-timeout-seconds` to finish, makes a
//! final durable commit and returns.
//!
//! If the store fails a flush or sync, the daemon stops with an error and
//! without draining: nothing it would still do could be made durable, and
//! systemd restarts it to recover from what is on disk. Answers already
//! decided (503s) get a second to reach their senders.
//!
//! This module owns the wiring and nothing else: every component's logic
//! lives in its own module.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::server::AdminListener;
use crate::admin::{self, Journal, Observed};
use crate::alerts;
use crate::config::{self, Config, ConfigError, LoadedConfig};
use crate::control;
use crate::health::{Light, Problem};
use crate::intake::cert::{
    self, CertError, CertificateFiles, CertificateResolver, Reload, Reloader,
};
use crate::intake::inbox::{Inbox, InboxError};
use crate::intake::server::{self, IntakeStats, Services};
use crate::mapping::{self, Catalog, MappingError, MappingStore};
use crate::orders::{self, build::BuildSettings, OrderApi, OrderBook};
use crate::outbox::engine::{Engine, EngineBuilder, EngineError};
use crate::smaregi::client::{ClientError, SmaregiClient};
use crate::smaregi::executor::TransactionExecutor;
use crate::smaregi::ledger::Ledger;
use crate::stock::{self, StockApi, StockBook};
use crate::store::{Store, StoreError, StoreOptions};
use crate::telemetry::{self, TelemetryError};
use crate::watchdog::{self, Liveness};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Telemetry(#[from] TelemetryError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{0}")]
    Outbox(#[from] EngineError),
    #[error("{0}")]
    Inbox(#[from] InboxError),
    #[error("[smaregi]: {0}")]
    SmaregiClient(#[from] ClientError),
    #[error("[listener]: {0}")]
    Certificate(#[from] CertError),
    #[error("[stock.downstream]: {0}")]
    Downstream(#[source] ClientError),
    #[error("[mapping]: {0}")]
    Mapping(#[from] MappingError),
    #[error("[alerts]: {0}")]
    Alerts(#[from] alerts::AlertsError),
    #[error("[listener]: cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl DaemonError {
    /// The process exit code for this error; 78 for anything the
    /// configuration must fix, so systemd does not restart in a loop.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(e) => e.exit_code(),
            Self::Telemetry(_) => crate::exit::CONFIG,
            Self::Store(e) => e.exit_code(),
            Self::Runtime(_) | Self::Signals(_) => crate::exit::SOFTWARE,
            Self::Outbox(EngineError::Store(e)) => e.exit_code(),
            Self::Outbox(_) => crate::exit::SOFTWARE,
            Self::Inbox(InboxError::Store(e)) => e.exit_code(),
            Self::Inbox(InboxError::Corrupt(_)) => crate::exit::SOFTWARE,
            Self::SmaregiClient(_) | Self::Downstream(_) | Self::Alerts(_) => crate::exit::CONFIG,
            Self::Mapping(e) => e.exit_code(),
            Self::Certificate(CertError::Write { .. }) => crate::exit::CANT_CREATE,
            Self::Certificate(_) => crate::exit::CONFIG,
            // Another process may still be letting go of the port.
            Self::Listen { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                crate::exit::TEMP_FAIL
            }
            Self::Listen { .. } => crate::exit::CONFIG,
        }
    }
}

/// Runs the daemon with the config at `config_path` until it is told to stop.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    let loaded = config::load(config_path)?;
    let target = telemetry::init(&loaded.config.logging.level)?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.path.display(),
        log_target = ?target,
        "smaregi-relay starting"
    );
    for warning in &loaded.warnings {
        warn!(%warning, "configuration warning");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("smaregi-relay")
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(async {
        let stop = stop_signals().map_err(DaemonError::Signals)?;
        serve(loaded, stop, None).await
    });
    if let Err(DaemonError::Store(StoreError::CommitFailed { .. })) = &result {
        // Tasks still hold store handles: see `abandon`.
        std::mem::forget(runtime);
    }
    result
}

/// Resolves with the signal's name on SIGTERM or SIGINT.
fn stop_signals() -> std::io::Result<impl Future<Output = &'static str>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

/// Where a started daemon can be reached.
#[derive(Debug, Clone)]
pub struct Running {
    /// The TLS listener (notifications and the order and stock APIs).
    pub intake: std::net::SocketAddr,
    /// The SHA-256 fingerprint of the certificate it serves.
    pub fingerprint: String,
    /// The control socket, if it could be opened.
    pub control_socket: Option<std::path::PathBuf>,
    /// The admin listener (metrics, health, the staff status page), plain
    /// HTTP on loopback.
    pub admin: Option<std::net::SocketAddr>,
}

/// Runs the daemon until `stop` resolves (with the reason, for the log),
/// then drains. `running` hears where it listens once it is ready.
///
/// Logging must be set up by the caller.
pub async fn serve(
    loaded: LoadedConfig,
    stop: impl Future<Output = &'static str>,
    running: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), DaemonError> {
    let config = loaded.config;
    // Before anything starts: an unusable notifier is a config error.
    let notifier = alerts::Notifier::from_config(&config.alerts, &alerts::host_name())?;

    let options = StoreOptions::from_config(&config.storage);
    let store = tokio::task::spawn_blocking(move || Store::open(&options))
        .await
        .expect("opening the store does not panic")?;
    info!(path = %store.directory().display(), "store open");

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // The listener tells the inbox processor of each new notification.
    let accepted = Arc::new(Notify::new());
    let intake_stats = Arc::new(IntakeStats::default());
    let started = async {
        let mapping = {
            let (store, fallback) = (store.clone(), config.mapping.fallback);
            tokio::task::spawn_blocking(move || MappingStore::open(&store, fallback))
                .await
                .expect("opening the mapping does not panic")?
        };
        let catalog: Arc<dyn Catalog> = Arc::new(mapping.clone());
        let stock = StockBook::open(&store, &config.stock)?;
        let inbox = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || Inbox::open(&store))
                .await
                .expect("opening the inbox does not panic")?
        };
        let engine = outbox_engine(&store, &config, &stock, Arc::clone(&catalog))?;
        let orders = order_book(&engine, &config, Arc::clone(&catalog))?;
        let services = Services {
            orders: orders
                .clone()
                .zip(config.orders.api_token.as_ref())
                .map(|(book, token)| {
                    Arc::new(OrderApi::new(
                        book,
                        SecretString::from(token.expose().to_owned()),
                        config.orders.max_body_bytes,
                    ))
                }),
            stock: config.stock.api_token.as_ref().map(|token| {
                Arc::new(StockApi::new(
                    stock.clone(),
                    SecretString::from(token.expose().to_owned()),
                    catalog,
                ))
            }),
            inbox: inbox.clone(),
            accepted: Arc::clone(&accepted),
            stats: Arc::clone(&intake_stats),
        };
        let listener = intake_listener(&store, &config, services).await?;
        Ok::<_, DaemonError>((engine, stock, orders, listener, mapping, inbox))
    };
    let (engine, stock, orders, (listener, reloader, certificate), mapping, inbox) =
        match started.await {
            Ok(started) => started,
            Err(error) => {
                store.close().await?;
                return Err(error);
            }
        };
    let address = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            address: config.listener.address,
            source,
        })?;
    let status = StatusLine::new(address, reloader.fingerprint());
    let importer = mapping::import::Importer::new(
        mapping.clone(),
        mapping::check::Rules::from_config(&config.mapping),
        mapping::import::Folders::new(&config.drop_directory()),
    );
    let observed = Arc::new(Observed {
        engine: engine.clone(),
        store: store.clone(),
        mapping: mapping.clone(),
        intake: intake_stats,
        certificate: Arc::clone(&certificate),
        last_import: importer.last_import(),
        started: std::time::Instant::now(),
        listening: format!("listening on {address}"),
        thresholds: config.admin.thresholds(),
        journal: Journal::default(),
    });
    let admin = admin_listener(&config, &certificate, Arc::clone(&observed)).await;
    let admin_address = admin.as_ref().and_then(|a| a.local_addr().ok());
    if let Some(admin_address) = admin_address {
        status.set_admin(
            admin_address,
            config.admin.status_token.is_some() && !admin_address.ip().is_loopback(),
        );
    }
    // The vital loops register here; the drop-folder watcher registers the
    // same way. Without WatchdogSec= their heartbeats are never checked.
    let watchdog_interval = watchdog::interval_from_systemd();
    let liveness = Liveness::new(watchdog_interval.map_or(Duration::MAX, watchdog::beat_interval));
    tasks.spawn(server::serve_watched(
        listener,
        shutdown.clone(),
        liveness.register("intake accept loop"),
    ));
    if let Some(admin) = admin {
        tasks.spawn(admin.serve(shutdown.clone()));
    }
    let (alerts, active) = tokio::sync::watch::channel(Vec::new());
    tasks.spawn(alerts::run(
        active,
        notifier,
        alerts::DigestPolicy::from_config(&config.alerts),
        shutdown.clone(),
    ));
    tasks.spawn(admin::monitor::run(
        Arc::clone(&observed),
        alerts,
        {
            let status = status.clone();
            move |light, problems| {
                status.set_health(health_summary(light, problems));
                notify(&[("STATUS", &status.line())]);
            }
        },
        shutdown.clone(),
    ));
    tasks.spawn(refresh_status(
        engine.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reload_certificate(
        reloader,
        status.clone(),
        shutdown.clone(),
    ));
    // Refreshing stock needs Smaregi; until it is configured, notifications
    // wait in the inbox, unprocessed.
    if config.smaregi.is_some() {
        if config.stock.backfill_interval_minutes > 0 {
            tasks.spawn(stock::processor::schedule_backfill(
                store.clone(),
                stock.clone(),
                engine.clone(),
                Duration::from_secs(config.stock.backfill_interval_minutes * 60),
                shutdown.clone(),
            ));
        }
        tasks.spawn(stock::processor::run(
            store.clone(),
            inbox,
            stock,
            engine.clone(),
            accepted,
            Duration::from_secs(config.intake.retention_hours * 3600),
            shutdown.clone(),
        ));
    }
    tasks.spawn({
        let shutdown = shutdown.clone();
        let engine = engine.clone();
        let heartbeat = liveness.register("outbox scheduler");
        async move {
            if let Err(e) = engine.run_watched(shutdown, heartbeat).await {
                error!(error = %e, "outbox engine stopped");
            }
        }
    });
    let control_path = config.admin.control_socket.clone();
    let control_socket = match control::server::bind(&control_path) {
        Ok(socket) => {
            let control = Arc::new(control::server::Control {
                engine: engine.clone(),
                mapping: mapping.clone(),
                observed: Arc::clone(&observed),
            });
            info!(path = %control_path.display(), "control socket ready");
            tasks.spawn(control::server::serve(
                socket,
                control_path.clone(),
                control,
                shutdown.clone(),
            ));
            Some(control_path)
        }
        // The relay's work goes on; only the operator commands are lost.
        Err(e) => {
            error!(
                path = %control_path.display(),
                error = %e,
                "cannot open the control socket: operator commands will not reach this daemon"
            );
            None
        }
    };
    if let Some(book) = orders {
        tasks.spawn(release_held_orders(
            book,
            mapping.subscribe(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(mapping::watch::run(
        importer,
        mapping::watch::WatchOptions::from_config(&config.mapping),
        liveness.register("drop-folder watcher"),
        shutdown.clone(),
    ));
    if let Some(interval) = watchdog_interval {
        info!(
            interval_ms = interval.as_millis() as u64,
            "watchdog: feeding systemd while the vital loops are alive"
        );
        tasks.spawn(watchdog::feed(liveness, interval, shutdown.clone()));
    }
    tasks.close();

    notify(&[("READY", "1"), ("STATUS", &status.line())]);
    info!(%address, "ready");
    if let Some(running) = running {
        let _ = running.send(Running {
            intake: address,
            fingerprint: status.fingerprint(),
            control_socket,
            admin: admin_address,
        });
    }

    let stop = tokio::select! {
        reason = stop => Ok(reason),
        error = store.failed() => Err(error),
    };
    let signal_name = match stop {
        Ok(signal_name) => signal_name,
        Err(error) => {
            // Nothing can be committed any more, but requests already
            // refused (503) should still hear so: stop accepting and give
            // them a moment, without draining anything else.
            shutdown.cancel();
            let _ = tokio::time::timeout(FAILURE_GRACE, tasks.wait()).await;
            return Err(abandon(store, error));
        }
    };
    info!(reason = signal_name, "shutting down");
    notify(&[("STOPPING", "1"), ("STATUS", "shutting down")]);
    shutdown.cancel();

    let deadline = Duration::from_secs(config.daemon.shutdown_timeout_seconds);
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        warn!(
            deadline_seconds = deadline.as_secs(),
            still_running = tasks.len(),
            "tasks did not stop before the shutdown deadline; committing and exiting anyway"
        );
    }
    if let Err(error) = store.close().await {
        return Err(abandon(store, error));
    }
    info!("stopped cleanly");
    Ok(())
}

/// The TLS listener, bound, the reloader of its certificate and the
/// certificate it serves.
async fn intake_listener(
    store: &Store,
    config: &Config,
    services: Services,
) -> Result<(server::Listener, Reloader, Arc<CertificateResolver>), DaemonError> {
    let files = CertificateFiles::new(
        config.listener.tls_certificate.as_deref(),
        config.listener.tls_private_key.as_deref(),
        &config.storage.state_directory,
    );
    if cert::ensure_generated(&files)? {
        warn!(
            path = %files.certificate.display(),
            "generated a self-signed certificate: fine for trials, but Smaregi needs one it trusts"
        );
    }
    let certificate = cert::load(&files)?;
    info!(
        path = %files.certificate.display(),
        fingerprint = %certificate.fingerprint,
        "TLS certificate loaded (SHA-256 fingerprint)"
    );
    let resolver = Arc::new(CertificateResolver::new(certificate));
    let tls = cert::server_config(Arc::clone(&resolver));
    let contract_id = config.smaregi.as_ref().map(|s| s.contract_id.as_str());
    let listener = server::bind(
        &config.listener,
        &config.intake,
        contract_id,
        tls,
        store,
        services,
    )
    .await
    .map_err(|source| DaemonError::Listen {
        address: config.listener.address,
        source,
    })?;
    Ok((
        listener,
        Reloader::new(files, Arc::clone(&resolver)),
        resolver,
    ))
}

/// The admin listener (metrics, health, the status page), bound; `None`
/// if it cannot be: the relay's work goes on without it.
async fn admin_listener(
    config: &Config,
    certificate: &Arc<CertificateResolver>,
    observed: Arc<Observed>,
) -> Option<AdminListener> {
    let address = config.admin.listen;
    let token = (config.admin.status_token.as_ref())
        .map(|token| SecretString::from(token.expose().to_owned()));
    let tls = Arc::new(cert::server_config(Arc::clone(certificate)));
    match AdminListener::bind(address, Some(tls), token, observed).await {
        Ok(listener) => {
            let bound = listener.local_addr().map_or(address, |a| a);
            info!(address = %bound, "admin listener ready: /metrics, /healthz, /readyz and the status page");
            Some(listener)
        }
        Err(e) => {
            error!(%address, error = %e, "cannot open the admin listener: no metrics or status page");
            None
        }
    }
}

/// `all well`, or `2 problems: outbox.job_parked, upstream.paused`.
fn health_summary(light: Light, problems: &[Problem]) -> String {
    if problems.is_empty() {
        return "all well".into();
    }
    let mut events: Vec<&str> = problems.iter().map(|p| p.event).collect();
    events.dedup();
    format!(
        "{} ({} problem{}: {})",
        light.as_str(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        events.join(", ")
    )
}

/// How often the certificate files are checked for a change.
const CERTIFICATE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The `STATUS=` line systemd shows: the address, the certificate (and
/// why its reload failed, if it did) and, once counted, the outbox.
/// Clones share one line.
#[derive(Debug, Clone)]
struct StatusLine {
    address: std::net::SocketAddr,
    parts: Arc<std::sync::Mutex<StatusParts>>,
}

#[derive(Debug)]
struct StatusParts {
    fingerprint: String,
    certificate_problem: Option<String>,
    outbox: Option<String>,
    /// The status page's address.
    admin: Option<String>,
    health: Option<String>,
}

impl StatusLine {
    fn new(address: std::net::SocketAddr, fingerprint: String) -> Self {
        Self {
            address,
            parts: Arc::new(std::sync::Mutex::new(StatusParts {
                fingerprint,
                certificate_problem: None,
                outbox: None,
                admin: None,
                health: None,
            })),
        }
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, StatusParts> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_fingerprint(&self, fingerprint: String) {
        let mut parts = self.parts();
        parts.fingerprint = fingerprint;
        parts.certificate_problem = None;
    }

    fn fingerprint(&self) -> String {
        self.parts().fingerprint.clone()
    }

    fn set_certificate_problem(&self, problem: String) {
        self.parts().certificate_problem = Some(problem);
    }

    fn set_outbox(&self, outbox: String) {
        self.parts().outbox = Some(outbox);
    }

    fn set_admin(&self, address: std::net::SocketAddr, tls: bool) {
        let scheme = if tls { "https" } else { "http" };
        self.parts().admin = Some(format!("{scheme}://{address}/"));
    }

    fn set_health(&self, health: String) {
        self.parts().health = Some(health);
    }

    fn line(&self) -> String {
        let parts = self.parts();
        let mut line = format!(
            "listening on {} · certificate {}",
            self.address, parts.fingerprint
        );
        if let Some(problem) = &parts.certificate_problem {
            line.push_str(&format!(" (reload failed: {problem})"));
        }
        if let Some(admin) = &parts.admin {
            line.push_str(&format!(" · status page {admin}"));
        }
        if let Some(health) = &parts.health {
            line.push_str(" · ");
            line.push_str(health);
        }
        if let Some(outbox) = &parts.outbox {
            line.push_str(" · ");
            line.push_str(outbox);
        }
        line
    }
}

/// How often the outbox counts in the status line are refreshed.
const STATUS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// `outbox 3 pending, 0 parked`, from the outbox's counts.
fn outbox_summary(counts: &crate::outbox::queue::Counts) -> String {
    use crate::outbox::job::JobState;
    let total = |state: JobState| -> u64 {
        counts
            .iter()
            .filter(|((s, _), _)| *s == state)
            .map(|(_, n)| n)
            .sum()
    };
    format!(
        "outbox {} pending, {} parked",
        total(JobState::Pending),
        total(JobState::Parked)
    )
}

/// Keeps the outbox counts in the status line current.
async fn refresh_status(engine: Engine, status: StatusLine, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(STATUS_REFRESH_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match engine.status() {
            Ok(outbox) => {
                status.set_outbox(outbox_summary(&outbox.counts));
                notify(&[("STATUS", &status.line())]);
            }
            Err(e) => warn!(error = %e, "cannot count the outbox for the status line"),
        }
    }
}

/// Swaps in a changed certificate when its files change or on SIGHUP; a
/// broken new file keeps the old certificate serving.
async fn reload_certificate(
    mut reloader: Reloader,
    status: StatusLine,
    shutdown: CancellationToken,
) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; certificate files are still watched");
            None
        }
    };
    let mut every = tokio::time::interval(CERTIFICATE_CHECK_INTERVAL);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        match reloader.reload(forced) {
            Reload::Unchanged => {}
            Reload::Replaced(fingerprint) => {
                info!(%fingerprint, "TLS certificate reloaded; new connections use it");
                status.set_fingerprint(fingerprint);
                notify(&[("STATUS", &status.line())]);
            }
            Reload::Kept(error) => {
                warn!(%error, "the new TLS certificate is unusable; the old one keeps serving");
                status.set_certificate_problem(error.to_string());
                notify(&[("STATUS", &status.line())]);
            }
        }
    }
}

/// After a store failure, how long answers in flight get to be sent.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// The outbox engine with the executors of every configured upstream.
fn outbox_engine(
    store: &Store,
    config: &Config,
    stock: &StockBook,
    catalog: Arc<dyn Catalog>,
) -> Result<Engine, DaemonError> {
    let mut builder = EngineBuilder::new(store, &config.outbox)?;
    let client = match &config.smaregi {
        Some(smaregi) => Some(SmaregiClient::new(smaregi)?),
        None => None,
    };
    if let (Some(smaregi), Some(client)) = (&config.smaregi, &client) {
        let executor = TransactionExecutor::new(
            client.clone(),
            Ledger::open(store)?,
            smaregi.cancel_strategy,
        );
        builder = executor.register_with(builder);
    }
    builder = stock::book::register_executors(
        builder,
        stock,
        client,
        config.stock.downstream.as_ref(),
        catalog,
    )
    .map_err(DaemonError::Downstream)?;
    let engine = builder.build()?;
    for (upstream, pause) in engine.paused() {
        warn!(upstream, reason = %pause.reason, "outbox: upstream paused by an operator; `resume` delivers again");
    }
    Ok(engine)
}

/// The order book, if `[orders] api-token` turns the order API on
/// (config validation makes sure `[smaregi]` is there too).
fn order_book(
    engine: &Engine,
    config: &Config,
    catalog: Arc<dyn Catalog>,
) -> Result<Option<OrderBook>, DaemonError> {
    let (Some(_), Some(smaregi)) = (&config.orders.api_token, &config.smaregi) else {
        return Ok(None);
    };
    let settings = BuildSettings::from_config(&config.orders, &smaregi.terminal_id);
    let book = OrderBook::open(engine, settings, catalog)?;
    info!(path = orders::api::PATH_PREFIX, "order API enabled");
    Ok(Some(book))
}

/// Registers orders held for unmapped products at start-up and whenever
/// a new mapping version becomes current.
async fn release_held_orders(
    book: OrderBook,
    mut versions: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        match book.release_held().await {
            Ok(0) => {}
            Ok(released) => info!(
                released,
                "orders: held orders registered with the new mapping"
            ),
            Err(e) => {
                warn!(error = %e, "orders: cannot release held orders; trying again with the next mapping")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = versions.changed() => if changed.is_err() { return },
        }
    }
}

/// Leaks a store that failed, so that sled's destructors never run on it:
/// they would write and fsync again and unwrap the result. The process
/// exits right after (see `run`, which also leaks the runtime).
fn abandon(store: Store, error: StoreError) -> DaemonError {
    std::mem::forget(store);
    error.into()
}

/// Tells systemd about our state; a no-op outside a `Type=notify` unit.
fn notify(state: &[(&str, &str)]) {
    if let Err(e) = systemd::daemon::notify(state.iter()) {
        warn!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::job::JobState;
    use crate::outbox::queue::Counts;

    #[test]
    fn the_outbox_summary_adds_up_every_upstream() {
        let mut counts = Counts::new();
        counts.insert((JobState::Pending, "smaregi".into()), 2);
        counts.insert((JobState::Pending, "ec".into()), 1);
        counts.insert((JobState::Parked, "smaregi".into()), 1);
        counts.insert((JobState::Done, "smaregi".into()), 5);
        assert_eq!(outbox_summary(&counts), "outbox 3 pending, 1 parked");
        assert_eq!(outbox_summary(&Counts::new()), "outbox 0 pending, 0 parked");
    }

    #[test]
    fn the_status_line_keeps_a_certificate_problem_until_a_good_reload() {
        let status = StatusLine::new("0.0.0.0:8443".parse().unwrap(), "AA:BB".into());
        assert_eq!(
            status.line(),
            "listening on 0.0.0.0:8443 · certificate AA:BB"
        );
        status.set_outbox("outbox 0 pending, 0 parked".into());
        status.set_certificate_problem("cert.pem: broken".into());
        assert_eq!(
            status.line(),
            "listening on 0.0.0.0:8443 · certificate AA:BB (reload failed: cert.pem: broken) · outbox 0 pending, 0 parked"
        );
        status.set_fingerprint("CC:DD".into());
        assert_eq!(
            status.line(),
            "listening on 0.0.0.0:8443 · certificate CC:DD · outbox 0 pending, 0 parked"
        );
    }
}
