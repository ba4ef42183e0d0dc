//! Helpers shared by the integration tests: config files in temp dirs, the
//! real `smaregi-relay` binary, and a real sd_notify socket to await its
//! readiness on.
#![allow(dead_code)] // each test crate uses a different subset

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A valid intake secret (≥ 16 characters).
pub const INTAKE_SECRET: &str = "test-intake-secret-0123456789";

/// How long a test waits for an event that normally takes milliseconds.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(30);

pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_smaregi-relay")
}

/// Writes `name` in `dir` with `mode`, returning its path.
pub fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Writes `config.toml` in `dir`: state under `dir/state`, the intake
/// secret in a 0600 file, `extra`, and a listener on a free loopback port.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    write_file(dir, "intake-secret", &format!("{INTAKE_SECRET}\n"), 0o600);
    let text = format!(
        "[storage]\nstate-directory = \"state\"\n\n[intake]\nsecret = {{ file = \"intake-secret\" }}\n\n{extra}"
    );
    // Last, so that the line numbers of `extra` stay what tests expect.
    let text = if extra.contains("[listener]") {
        text
    } else {
        format!("{text}\n[listener]\naddress = \"127.0.0.1:0\"\n")
    };
    // Each test daemon's control socket beside its config, and its admin
    // listener on a free port.
    let text = if extra.contains("[admin]") {
        text
    } else {
        // The build machine's own disk space is not the test's business.
        format!("{text}\n[admin]\ncontrol-socket = \"control.sock\"\nlisten = \"127.0.0.1:0\"\ndisk-free-percent = 0\n")
    };
    write_file(dir, "config.toml", &text, 0o640)
}

/// A datagram socket in the role of systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self { socket, path }
    }

    /// The notifications already queued, without waiting: after the sender
    /// has exited, everything it ever sent.
    pub fn received(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut messages = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.socket.set_nonblocking(false).unwrap();
        messages
    }

    /// Waits for a notification containing the line `needle` (e.g.
    /// `READY=1`) and returns it.
    pub fn wait_for(&self, needle: &str) -> Result<String, String> {
        self.wait_for_line(needle, |line| line == needle)
    }

    /// Waits for a notification with a line that starts with `prefix`.
    pub fn wait_for_prefix(&self, prefix: &str) -> Result<String, String> {
        self.wait_for_line(prefix, |line| line.starts_with(prefix))
    }

    /// Waits for a notification with a line that contains `needle`.
    pub fn wait_for_containing(&self, needle: &str) -> Result<String, String> {
        self.wait_for_line(needle, |line| line.contains(needle))
    }

    fn wait_for_line(
        &self,
        needle: &str,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + EVENT_DEADLINE;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no `{needle}` within {EVENT_DEADLINE:?}; saw {seen:?}"
                ));
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if message.lines().any(&matches) {
                        return Ok(message);
                    }
                    seen.push(message);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// The real daemon, started with `run --config`.
pub struct Daemon {
    pub child: Child,
    pub notify: NotifySocket,
    stderr: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, config: &Path) -> Self {
        Self::start_with_env(dir, config, &[])
    }

    /// Starts the daemon with extra environment variables.
    pub fn start_with_env(dir: &Path, config: &Path, envs: &[(&str, &str)]) -> Self {
        Self::spawn(dir, config, envs, None)
    }

    /// Starts the daemon unable to write files larger than `limit` bytes:
    /// a write past it fails with EFBIG, as on a full disk.
    pub fn start_with_file_size_limit(dir: &Path, config: &Path, limit: u64) -> Self {
        Self::spawn(dir, config, &[], Some(limit))
    }

    fn spawn(
        dir: &Path,
        config: &Path,
        envs: &[(&str, &str)],
        file_size_limit: Option<u64>,
    ) -> Self {
        let notify = NotifySocket::bind(dir);
        let stderr = dir.join("daemon.stderr");
        let mut command = Command::new(relay_binary());
        if let Some(limit) = file_size_limit {
            limit_file_size(&mut command, limit);
        }
        let child = command
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &notify.path)
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            notify,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Waits for the process to exit, failing the test after the deadline.
    pub fn wait(&mut self) -> ExitStatus {
        wait_with_deadline(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit; kills it and fails the test after the deadline.
pub fn wait_with_deadline(child: &mut Child) -> ExitStatus {
    let pid = child.id() as libc::pid_t;
    let (exited, exit) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = exited.send(child.wait());
        });
        match exit.recv_timeout(EVENT_DEADLINE) {
            Ok(status) => status.unwrap(),
            Err(_) => {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("process {pid} did not exit within {EVENT_DEADLINE:?}");
            }
        }
    })
}

/// Runs the binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn run_relay(args: &[&str], envs: &[(&str, &Path)]) -> (i32, String, String) {
    let mut command = Command::new(relay_binary());
    command
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("JOURNAL_STREAM");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Options for a test store in `directory`, with a small cache.
pub fn store_options(directory: &Path) -> smaregi_relay::store::StoreOptions {
    smaregi_relay::store::StoreOptions {
        directory: directory.to_path_buf(),
        cache_capacity_bytes: 8 * 1024 * 1024,
    }
}

/// Opens a sled database directly, as a foreign or older program would.
///
/// Without sled's background flusher: its thread can outlive the dropped
/// `Db` and keep the file lock for a moment, failing the next open.
pub fn open_raw_sled(path: &Path) -> sled::Db {
    // A store just closed may still have sled's lock held by sled's pool.
    let config = sled::Config::new().path(path).flush_every_ms(None);
    smaregi_relay::store::open_sled_when_released(&config)
        .unwrap_or_else(|e| panic!("opening {} with sled: {e}", path.display()))
}

pub mod alerts;
pub mod downstream;
pub mod orders;
pub mod smaregi;

/// Makes the process `command` starts unable to write files larger than
/// `limit` bytes: such a write fails with EFBIG, as on a full disk.
pub fn limit_file_size(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Ignored, the signal stays ignored across exec, and write()
            // fails with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
}

/// A daemon that is ready, and the port its listener is bound to.
pub struct RunningDaemon {
    pub daemon: Daemon,
    pub port: u16,
    /// The admin listener's base URL (`http://127.0.0.1:PORT/`), if it listens.
    pub admin: Option<String>,
    /// Where the daemon keeps its state (`state/` beside a config from
    /// [`write_config`]).
    pub state: PathBuf,
}

impl RunningDaemon {
    /// Starts the daemon on `config` and waits until it is ready; `dir`
    /// takes its notify socket and stderr.
    pub fn start(dir: &Path, config: &Path) -> Self {
        Self::ready(Daemon::start(dir, config), config)
    }

    /// Waits until `daemon`, started on `config`, is ready.
    pub fn ready(daemon: Daemon, config: &Path) -> Self {
        let ready = daemon
            .notify
            .wait_for("READY=1")
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
        // STATUS=listening on 127.0.0.1:PORT · certificate AB:CD:…
        let port = ready
            .lines()
            .find_map(|line| line.strip_prefix("STATUS=listening on "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|address| address.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no listening address in {ready:?}"));
        // … · status page http://127.0.0.1:PORT/ · …
        let admin = ready
            .split(" · ")
            .find_map(|part| part.strip_prefix("status page "))
            .map(|url| url.trim().to_owned());
        Self {
            daemon,
            port,
            admin,
            state: config.parent().expect("a config file").join("state"),
        }
    }

    /// The URL of `path` on the listener, by a name its certificate holds.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// The generated self-signed certificate, to trust.
    pub fn certificate(&self) -> PathBuf {
        self.state.join("tls/certificate.pem")
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.daemon.signal(libc::SIGTERM);
        self.daemon.wait()
    }
}
