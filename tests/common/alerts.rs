//! Test receivers for alert digests, both over TLS with a self-signed
//! certificate that the notifiers trust through `ca-file`:
//! - [`WebhookReceiver`]: HTTPS, checks every Standard Webhooks signature
//!   and records the JSON bodies;
//! - [`SmtpServer`]: a small SMTP server speaking implicit TLS, or
//!   STARTTLS (220 greeting, EHLO, AUTH PLAIN when it has credentials,
//!   MAIL FROM, RCPT TO, DATA, QUIT), that records each message with its
//!   subject and body decoded.
//!
//! Either can be switched down: it then closes every connection at once,
//! before the TLS handshake, and counts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use smaregi_relay::stock::sign;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A webhook secret in the Standard Webhooks form.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SMTP_USERNAME: &str = "relay@shop.example";
pub const SMTP_PASSWORD: &str = "smtp-pass-4711";

/// How long a test waits for a receiver's log, in real time.
pub const REAL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The value of `log` once `condition` holds, or a test failure after
/// [`REAL_DEADLINE`] of real time, so that a digest that never comes fails
/// the test instead of hanging it. The alert tests run on tokio's paused
/// clock, which jumps ahead whenever the runtime idles: a tokio timeout
/// would fire at once, so the deadline is kept by a thread that waits on a
/// channel, and is released the moment the wait ends.
async fn wait_within_real_deadline<T: Clone + std::fmt::Debug>(
    log: &watch::Receiver<T>,
    condition: impl Fn(&T) -> bool,
) -> T {
    let mut waiting = log.clone();
    let (_wait_over, over) = std::sync::mpsc::channel::<()>();
    let (expire, expired) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        if over.recv_timeout(REAL_DEADLINE) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = expire.send(());
        }
    });
    tokio::select! {
        found = waiting.wait_for(condition) => found.expect("the receiver runs").clone(),
        _ = expired => panic!(
            "the condition did not hold within {REAL_DEADLINE:?}; last log: {:?}",
            *log.borrow()
        ),
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to
/// `dir/name.pem`, and an acceptor serving it.
pub fn tls_acceptor(dir: &Path, name: &str) -> (TlsAcceptor, PathBuf) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let path = super::write_file(dir, &format!("{name}.pem"), &certified.cert.pem(), 0o644);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    (TlsAcceptor::from(Arc::new(config)), path)
}

/// Whether a receiver is up; shared with its accept loop.
#[derive(Clone, Default)]
struct Switch(Arc<AtomicBool>);

impl Switch {
    fn up() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
    fn is_up(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn set(&self, up: bool) {
        self.0.store(up, Ordering::SeqCst);
    }
}

/// What a webhook receiver got.
#[derive(Debug, Clone, Default)]
pub struct WebhookLog {
    /// Bodies with a valid signature, in order.
    pub digests: Vec<Value>,
    /// `webhook-id` of each of them.
    pub ids: Vec<String>,
    pub bad_signatures: usize,
    /// Connections closed unanswered while down.
    pub refused: usize,
}

pub struct WebhookReceiver {
    pub address: SocketAddr,
    pub certificate: PathBuf,
    pub log: watch::Receiver<WebhookLog>,
    switch: Switch,
}

impl WebhookReceiver {
    pub async fn start(dir: &Path) -> Self {
        let (acceptor, certificate) = tls_acceptor(dir, "webhook");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (log_tx, log) = watch::channel(WebhookLog::default());
        let log_tx = Arc::new(log_tx);
        let switch = Switch::up();
        let up = switch.clone();
        let key = sign::key_of(WEBHOOK_SECRET);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if !up.is_up() {
                    drop(tcp);
                    log_tx.send_modify(|log| log.refused += 1);
                    continue;
                }
                let (acceptor, log_tx, key) = (acceptor.clone(), Arc::clone(&log_tx), key.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: hyper::Request<_>| {
                        let (log_tx, key) = (Arc::clone(&log_tx), key.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(receive(request, &key, &log_tx).await)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            address,
            certificate,
            log,
            switch,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/alerts", self.address)
    }

    /// Up (answers) or down (closes every connection at once).
    pub fn set_up(&self, up: bool) {
        self.switch.set(up);
    }

    /// The log once `condition` holds; fails the test after
    /// [`REAL_DEADLINE`].
    pub async fn wait_for(&self, condition: impl Fn(&WebhookLog) -> bool) -> WebhookLog {
        wait_within_real_deadline(&self.log, condition).await
    }
}

async fn receive(
    request: hyper::Request<hyper::body::Incoming>,
    key: &[u8],
    log: &watch::Sender<WebhookLog>,
) -> hyper::Response<Full<Bytes>> {
    let header = |name: &str| {
        (request.headers().get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let valid = timestamp
        .parse()
        .is_ok_and(|ts| sign::verify(key, &id, ts, &body, &signature));
    log.send_modify(|log| {
        if valid {
            log.digests.push(serde_json::from_slice(&body).unwrap());
            log.ids.push(id.clone());
        } else {
            log.bad_signatures += 1;
        }
    });
    hyper::Response::builder()
        .status(if valid { 200 } else { 401 })
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// One message as the SMTP server received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The user name and password of AUTH PLAIN, if the client logged in.
    pub login: Option<(String, String)>,
    pub raw: String,
    /// Decoded from RFC 2047 encoded words.
    pub subject: String,
    /// Decoded from its transfer encoding.
    pub body: String,
}

#[derive(Debug, Clone, Default)]
pub struct SmtpLog {
    pub mails: Vec<Mail>,
    /// Connections closed unanswered while down.
    pub refused: usize,
    pub failed_logins: usize,
}

pub struct SmtpServer {
    pub address: SocketAddr,
    pub certificate: PathBuf,
    pub log: watch::Receiver<SmtpLog>,
    switch: Switch,
}

impl SmtpServer {
    /// With `credentials`, it offers AUTH PLAIN and takes mail only after it.
    pub async fn start(dir: &Path, credentials: Option<(&str, &str)>) -> Self {
        Self::start_with(dir, credentials, false).await
    }

    /// With `starttls`, the connection starts in plain text and offers
    /// only STARTTLS until it is upgraded (RFC 3207).
    pub async fn start_with(dir: &Path, credentials: Option<(&str, &str)>, starttls: bool) -> Self {
        let (acceptor, certificate) = tls_acceptor(dir, "smtp");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (log_tx, log) = watch::channel(SmtpLog::default());
        let log_tx = Arc::new(log_tx);
        let switch = Switch::up();
        let up = switch.clone();
        let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if !up.is_up() {
                    drop(tcp);
                    log_tx.send_modify(|log| log.refused += 1);
                    continue;
                }
                let (acceptor, log_tx, credentials) =
                    (acceptor.clone(), Arc::clone(&log_tx), credentials.clone());
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    if starttls && plain_prelude(&mut tcp).await.is_err() {
                        return;
                    }
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = smtp_session(tls, credentials, !starttls, &log_tx).await;
                });
            }
        });
        Self {
            address,
            certificate,
            log,
            switch,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.switch.set(up);
    }

    /// The log once `condition` holds; fails the test after
    /// [`REAL_DEADLINE`].
    pub async fn wait_for(&self, condition: impl Fn(&SmtpLog) -> bool) -> SmtpLog {
        wait_within_real_deadline(&self.log, condition).await
    }
}

/// The plain-text start of a STARTTLS connection: greeting, EHLO, and
/// STARTTLS, after which the caller starts TLS. Read byte by byte, so that
/// nothing of the TLS handshake is read here.
async fn plain_prelude(tcp: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    tcp.write_all(b"220 localhost ESMTP alerts-test\r\n")
        .await?;
    loop {
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            line.push(tcp.read_u8().await?);
        }
        let upper = String::from_utf8_lossy(&line)
            .trim_end()
            .to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            tcp.write_all(b"250-localhost\r\n250 STARTTLS\r\n").await?;
        } else if upper == "STARTTLS" {
            tcp.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
            return Ok(());
        } else {
            tcp.write_all(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
                .await?;
        }
    }
}

async fn smtp_session<S>(
    stream: S,
    credentials: Option<(String, String)>,
    greet: bool,
    log: &watch::Sender<SmtpLog>,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut reply = async |text: &str| -> std::io::Result<()> {
        write.write_all(text.as_bytes()).await?;
        write.flush().await
    };
    if greet {
        reply("220 localhost ESMTP alerts-test\r\n").await?;
    }
    let mut login: Option<(String, String)> = None;
    let mut from = String::new();
    let mut to = Vec::new();
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end();
        let upper = command.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            if credentials.is_some() {
                reply("250-localhost\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n").await?;
            } else {
                reply("250-localhost\r\n250 8BITMIME\r\n").await?;
            }
        } else if upper.starts_with("AUTH PLAIN") {
            let mut argument = command["AUTH PLAIN".len()..].trim().to_owned();
            if argument.is_empty() {
                reply("334 \r\n").await?;
                read.read_line(&mut argument).await?;
            }
            let decoded = STANDARD.decode(argument.trim()).unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|&b| b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let offered = (parts.len() == 3).then(|| (parts[1].clone(), parts[2].clone()));
            if offered.is_some() && offered == credentials {
                login = offered;
                reply("235 2.7.0 Authentication successful\r\n").await?;
            } else {
                log.send_modify(|log| log.failed_logins += 1);
                reply("535 5.7.8 Authentication credentials invalid\r\n").await?;
            }
        } else if upper.starts_with("MAIL FROM:") {
            if credentials.is_some() && login.is_none() {
                reply("530 5.7.0 Authentication required\r\n").await?;
                continue;
            }
            from = address_of(&command["MAIL FROM:".len()..]);
            to.clear();
            reply("250 2.1.0 Ok\r\n").await?;
        } else if upper.starts_with("RCPT TO:") {
            to.push(address_of(&command["RCPT TO:".len()..]));
            reply("250 2.1.5 Ok\r\n").await?;
        } else if upper == "DATA" {
            reply("354 End data with <CR><LF>.<CR><LF>\r\n").await?;
            let mut raw = String::new();
            loop {
                let mut data = String::new();
                if read.read_line(&mut data).await? == 0 {
                    return Ok(());
                }
                if data == ".\r\n" {
                    break;
                }
                // Dot-stuffing (RFC 5321 4.5.2).
                raw.push_str(data.strip_prefix('.').unwrap_or(&data));
            }
            let (subject, body) = decode_message(&raw);
            let body = body.replace("\r\n", "\n");
            let mail = Mail {
                from: from.clone(),
                to: to.clone(),
                login: login.clone(),
                raw,
                subject,
                body,
            };
            log.send_modify(|log| log.mails.push(mail));
            reply("250 2.0.0 Ok: queued\r\n").await?;
        } else if upper == "QUIT" {
            reply("221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else if upper == "RSET" || upper == "NOOP" {
            reply("250 2.0.0 Ok\r\n").await?;
        } else {
            reply("502 5.5.2 Command not recognized\r\n").await?;
        }
    }
}

/// `<a@b>` with any parameters after it → `a@b`.
fn address_of(argument: &str) -> String {
    let argument = argument.trim();
    let inside = argument
        .strip_prefix('<')
        .and_then(|rest| rest.split_once('>'))
        .map_or(argument, |(address, _)| address);
    inside.to_owned()
}

/// The subject and body of a raw message, decoded.
pub fn decode_message(raw: &str) -> (String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    // Unfold: a line starting with white space continues the one before.
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let subject = decode_words(&header("subject"));
    let body = match header("content-transfer-encoding")
        .to_ascii_lowercase()
        .as_str()
    {
        "base64" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            String::from_utf8(STANDARD.decode(compact).unwrap()).unwrap()
        }
        "quoted-printable" => String::from_utf8(decode_quoted_printable(body)).unwrap(),
        _ => body.to_owned(),
    };
    (subject, body)
}

/// RFC 2047 encoded words (`=?utf-8?b?…?=`, `=?utf-8?q?…?=`) decoded; the
/// white space between two encoded words is dropped, as the RFC says.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut rest = value;
    loop {
        let Some(start) = rest.find("=?") else {
            out.push_str(&String::from_utf8_lossy(&pending));
            out.push_str(rest);
            return out;
        };
        let between = &rest[..start];
        if !between.trim().is_empty() {
            out.push_str(&String::from_utf8_lossy(&pending));
            pending.clear();
            out.push_str(between);
        } else if pending.is_empty() {
            out.push_str(between);
        }
        let mut parts = rest[start + 2..].splitn(3, '?');
        let (_charset, encoding, tail) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let end = tail.find("?=").unwrap();
        let text = &tail[..end];
        if encoding.eq_ignore_ascii_case("b") {
            pending.extend(STANDARD.decode(text).unwrap());
        } else {
            pending.extend(decode_quoted_printable(&text.replace('_', " ")));
        }
        rest = &tail[end + 2..];
    }
}

fn decode_quoted_printable(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' if bytes[i + 1..].starts_with(b"\r\n") => i += 3,
            b'=' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}
