//! `smaregi-relay demo`: the first thing a new user runs.
//!
//! One process runs the Smaregi simulator, the real daemon
//! ([`daemon::serve`]) on a real config in a fresh folder, and a demo EC
//! site ([`receiver`]); then [`script`] plays a story through them (a
//! mapping CSV dropped, stock notifications, orders edited and cancelled,
//! a Smaregi outage) and prints each step as it is confirmed. Afterwards
//! the daemon keeps running for the user to look at until Ctrl-C, or
//! stops at once with `--exit-when-done`.
//!
//! This module owns the demo's folder, its set-up ([`setup`]), the order
//! of its parts' start and stop, and everything it prints; the daemon's
//! log goes to a file in the folder, so the terminal shows only the
//! story. It must never touch anything outside its folder and loopback
//! (no real Smaregi, no system paths), and never print a step as done
//! that it has not seen happen.

pub mod receiver;
pub mod script;
pub mod setup;

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use smaregi_sim::{SimConfig, SimError, Simulator};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, ConfigError};
use crate::daemon::{self, DaemonError};
use crate::intake::cert::CertificateFiles;
use crate::store::StoreError;
use crate::telemetry::{self, TelemetryError};
use receiver::Receiver;
use script::{say, Ran, Script};
use setup::Secrets;

/// How the demo runs.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Stop and return once the story is done, instead of at Ctrl-C.
    pub exit_when_done: bool,
    /// Use and keep this folder instead of a temporary one.
    pub keep: Option<PathBuf>,
}

impl From<&crate::cli::DemoArgs> for DemoOptions {
    fn from(args: &crate::cli::DemoArgs) -> Self {
        Self {
            exit_when_done: args.exit_when_done,
            keep: args.keep.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("デモ用のフォルダを用意できません / cannot prepare the demo folder {}: {source}", path.display())]
    Folder { path: PathBuf, source: io::Error },
    #[error("--keep {}: フォルダが空ではありません。新しいか空のフォルダを指定してください / the folder is not empty; name a new or empty one", path.display())]
    NotEmpty { path: PathBuf },
    #[error("{0}")]
    Telemetry(#[from] TelemetryError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("模擬スマレジを起動できません / cannot start the simulated Smaregi: {0}")]
    Simulator(#[from] SimError),
    #[error("デモの受信側（ECサイト）を起動できません / cannot start the demo's EC site: {0}")]
    Receiver(#[source] io::Error),
    #[error("デモの設定を読み込めません（不具合です）/ the demo's own config does not load (a bug): {0}")]
    Config(#[from] ConfigError),
    #[error("デーモンが止まりました / the daemon stopped: {0}")]
    Daemon(#[from] DaemonError),
    #[error("デーモンが途中で終了しました / the daemon ended before the demo did")]
    DaemonEnded,
    #[error("✘ {number}. {ja} / {en}: 確認できませんでした / not confirmed\n   {detail}")]
    Step {
        number: u32,
        ja: &'static str,
        en: &'static str,
        detail: String,
    },
    #[error("中断しました / interrupted by {0} before the demo was done")]
    Interrupted(&'static str),
}

impl DemoError {
    /// The process exit code: 70 for a step not confirmed, 130 when
    /// interrupted, the daemon's own code when it failed.
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            Self::Folder { .. } => exit::CANT_CREATE,
            Self::NotEmpty { .. } => exit::USAGE,
            Self::Telemetry(_) => exit::CONFIG,
            Self::Daemon(e) => e.exit_code(),
            Self::Interrupted(_) => exit::INTERRUPTED,
            Self::Runtime(_)
            | Self::Signals(_)
            | Self::Simulator(_)
            | Self::Receiver(_)
            | Self::Config(_)
            | Self::DaemonEnded
            | Self::Step { .. } => exit::SOFTWARE,
        }
    }
}

/// Runs the demo: prints the story on stdout and, if it fails, why on
/// stderr; returns once it is over (at Ctrl-C, or when the steps are done
/// with `exit_when_done`).
///
/// Sets up logging (to a file in the demo's folder): call it instead of
/// any other logging set-up.
pub fn run(options: &DemoOptions) -> Result<(), DemoError> {
    let folder = match Folder::prepare(options.keep.as_deref()) {
        Ok(folder) => folder,
        Err(error) => {
            eprintln!("{error}");
            return Err(error);
        }
    };
    let result = run_in(&folder, options);
    if let Err(error) = &result {
        warn!(%error, "demo failed");
        eprintln!("{error}");
        // What went wrong is worth a look; a demo the user stopped
        // half-way is not.
        if !matches!(error, DemoError::Interrupted(_)) {
            let kept = folder.keep();
            eprintln!(
                "デモのフォルダを調査用に残しました / kept the demo folder for a look: {} (log: {})",
                kept.display(),
                kept.join(setup::LOG_FILE).display()
            );
        }
    }
    result
}

fn run_in(folder: &Folder, options: &DemoOptions) -> Result<(), DemoError> {
    let log_path = folder.path().join(setup::LOG_FILE);
    let log = fs::File::create(&log_path).map_err(|source| DemoError::Folder {
        path: log_path.clone(),
        source,
    })?;
    telemetry::init_file(crate::config::defaults::LOG_LEVEL, log)?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        folder = %folder.path().display(),
        "smaregi-relay demo starting"
    );
    say("smaregi-relay デモ / demo");
    say(&format!(
        "   フォルダ / folder: {} ({})",
        folder.path().display(),
        match options.keep {
            Some(_) => "残します / kept",
            None => "終了時に削除 / removed at exit; --keep DIR keeps it",
        }
    ));
    say(&format!(
        "   デーモンのログ / daemon log: {}",
        log_path.display()
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("smaregi-relay-demo")
        .build()
        .map_err(DemoError::Runtime)?;
    let result = runtime.block_on(demo(folder.path(), options));
    if let Err(DemoError::Daemon(DaemonError::Store(StoreError::CommitFailed { .. }))) = &result {
        // Tasks still hold the failed store: see `daemon::run`.
        std::mem::forget(runtime);
    }
    result
}

/// The demo's folder: a temporary one, removed when dropped, or the
/// user's `--keep DIR`.
enum Folder {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Folder {
    fn prepare(keep: Option<&Path>) -> Result<Self, DemoError> {
        let folder_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DemoError::Folder { path, source }
        };
        let Some(path) = keep else {
            let temporary = tempfile::Builder::new()
                .prefix("smaregi-relay-demo-")
                .tempdir()
                .map_err(folder_error(&std::env::temp_dir()))?;
            return Ok(Self::Temporary(temporary));
        };
        fs::create_dir_all(path).map_err(folder_error(path))?;
        // An earlier demo's state would make this run's numbers wrong.
        if fs::read_dir(path)
            .map_err(folder_error(path))?
            .next()
            .is_some()
        {
            return Err(DemoError::NotEmpty {
                path: path.to_owned(),
            });
        }
        // Relative paths would change meaning if the daemon's were taken
        // from elsewhere; the config names everything from here.
        let path = fs::canonicalize(path).map_err(folder_error(path))?;
        Ok(Self::Kept(path))
    }

    fn path(&self) -> &Path {
        match self {
            Self::Temporary(dir) => dir.path(),
            Self::Kept(path) => path,
        }
    }

    /// Keeps the folder on disk; where it is.
    fn keep(self) -> PathBuf {
        match self {
            Self::Temporary(dir) => dir.keep(),
            Self::Kept(path) => path,
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next one's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Starts the parts, runs the story, stops the parts in reverse order.
async fn demo(folder: &Path, options: &DemoOptions) -> Result<(), DemoError> {
    let signals = StopSignals::install().map_err(DemoError::Signals)?;
    let secrets = Secrets::generate();
    let sim =
        Simulator::start(SimConfig::local(setup::CONTRACT_ID, &secrets.smaregi_token)).await?;
    let mut receiver = match Receiver::start(&secrets.downstream).await {
        Ok(receiver) => receiver,
        Err(e) => {
            sim.stop().await;
            return Err(DemoError::Receiver(e));
        }
    };
    let result = with_daemon(folder, options, &secrets, &sim, &mut receiver, signals).await;
    receiver.stop().await;
    sim.stop().await;
    result
}

/// Runs the daemon while the story plays, and after it until told to stop.
async fn with_daemon(
    folder: &Path,
    options: &DemoOptions,
    secrets: &Secrets,
    sim: &Simulator,
    receiver: &mut Receiver,
    mut signals: StopSignals,
) -> Result<(), DemoError> {
    let config_path = folder.join(setup::CONFIG_FILE);
    let text = setup::config_text(&sim.url(), &receiver.url(), secrets);
    write_private(&config_path, &text).map_err(|source| DemoError::Folder {
        path: config_path.clone(),
        source,
    })?;
    let loaded = config::load(&config_path)?;
    for warning in &loaded.warnings {
        warn!(%warning, "configuration warning");
    }
    let drop = loaded.config.drop_directory();
    let certificate =
        CertificateFiles::new(None, None, &loaded.config.storage.state_directory).certificate;
    let stop = CancellationToken::new();
    let (running_tx, running_rx) = oneshot::channel();
    let daemon = daemon::serve(
        loaded,
        {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                "the demo is over"
            }
        },
        Some(running_tx),
    );
    tokio::pin!(daemon);

    let story = async {
        let running = running_rx.await.map_err(|_| DemoError::DaemonEnded)?;
        Script {
            sim,
            receiver,
            secrets,
            drop,
            certificate,
        }
        .run(running)
        .await
    };
    let outcome = tokio::select! {
        ended = &mut daemon => return Err(ended.err().map_or(DemoError::DaemonEnded, DemoError::Daemon)),
        signal = signals.recv() => Err(DemoError::Interrupted(signal)),
        ran = story => ran,
    };
    let outcome = match outcome {
        Ok(ran) => {
            after_the_story(&ran, folder, secrets, options.exit_when_done);
            if options.exit_when_done {
                Ok(())
            } else {
                tokio::select! {
                    ended = &mut daemon => return Err(ended.err().map_or(DemoError::DaemonEnded, DemoError::Daemon)),
                    signal = signals.recv() => {
                        info!(signal, "demo: stopping");
                        Ok(())
                    }
                }
            }
        }
        Err(error) => Err(error),
    };
    say("デーモンを停止しています…（もう一度 Ctrl-C ですぐに終了）/ stopping the daemon… (Ctrl-C again to quit at once)");
    stop.cancel();
    // The daemon drains for up to its shutdown timeout; a second signal
    // leaves at once (everything accepted is already committed).
    let stopped = tokio::select! {
        stopped = &mut daemon => stopped,
        signal = signals.recv() => return Err(DemoError::Interrupted(signal)),
    };
    match (outcome, stopped) {
        (Err(error), _) => Err(error),
        (Ok(()), Err(error)) => Err(DemoError::Daemon(error)),
        (Ok(()), Ok(())) => {
            say("停止しました / stopped cleanly");
            Ok(())
        }
    }
}

/// What the user can look at and try once the story is over.
fn after_the_story(ran: &Ran, folder: &Path, secrets: &Secrets, exit_when_done: bool) {
    say("");
    match ran.running.admin {
        Some(admin) => say(&format!("状態ページ / status page: http://{admin}/")),
        None => say("状態ページを開けませんでした（ログを参照）/ the status page could not be opened (see the log)"),
    }
    let socket = ran
        .running
        .control_socket
        .as_deref()
        .unwrap_or(Path::new("?"));
    say("別の端末で試せるコマンド / commands to try in another terminal:");
    for command in [
        "status",
        "outbox list",
        "mapping status",
        "mapping lookup --external-code MUG-BLU",
    ] {
        say(&format!(
            "   smaregi-relay {command} --socket {}",
            socket.display()
        ));
    }
    say(&format!(
        "   curl --cacert {} -H 'Authorization: Bearer {}' {}{}{}",
        ran.certificate.display(),
        secrets.orders_token,
        ran.base,
        crate::orders::api::PATH_PREFIX,
        setup::EDITED.order_id
    ));
    say(&format!(
        "   設定 / config: {}",
        folder.join(setup::CONFIG_FILE).display()
    ));
    if exit_when_done {
        say("--exit-when-done: 終了します / exiting");
    } else {
        say("Ctrl-C で終了します / press Ctrl-C to stop");
    }
}

/// Writes `text` to a new file only its owner can read: it holds secrets.
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}
