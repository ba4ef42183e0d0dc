//! The HTTPS listener: TLS, limits, routing, and the durable accept of
//! API送信 notifications.
//!
//! A notification is answered 200 only after it is committed to the
//! inbox. Every refusal carries a short body in Japanese, then English:
//! Smaregi copies it into the error e-mail the merchant receives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::form::{self, FormError};
use super::inbox::{self, Accepted, Inbox, Offer, Route};
use crate::config::{IntakeConfig, ListenerConfig};
use crate::metrics::Counters;
use crate::orders::OrderApi;
use crate::outbox::retry::unix_millis;
use crate::stock::StockApi;
use crate::store::Store;
use crate::watchdog::Heartbeat;

/// Headers larger than this are refused (431) by hyper.
const MAX_HEADER_BYTES: usize = 64 * 1024;

type Body = Full<Bytes>;

/// Why a request is refused: one status each, and the text for the
/// sender (Japanese, then English).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unauthorized,
    Malformed(String),
    MethodNotAllowed,
    NotFound,
    TooLarge(u64),
    BodyTimeout,
    Busy,
    Unavailable,
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Malformed(_) => "malformed",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::NotFound => "not-found",
            Self::TooLarge(_) => "too-large",
            Self::BodyTimeout => "body-timeout",
            Self::Busy => "busy",
            Self::Unavailable => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Busy => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Self::Unauthorized => "認証に失敗しました。API送信設定のカスタムパラメータ（シークレット）を確認してください。\n\
                Authentication failed: check the secret custom parameter in API送信設定.\n"
                .into(),
            Self::Malformed(reason) => format!(
                "リクエストの形式が正しくありません: {reason}\nThe request is malformed: {reason}\n"
            ),
            Self::MethodNotAllowed => "POST のみ受け付けます。\nOnly POST is accepted here.\n".into(),
            Self::NotFound => "このURLには何もありません。送信URLを確認してください。\n\
                Nothing here: check the 送信URL.\n"
                .into(),
            Self::TooLarge(limit) => format!(
                "リクエストが大きすぎます（上限 {limit} バイト）。\nThe request is larger than the limit of {limit} bytes.\n"
            ),
            Self::BodyTimeout => "リクエストの受信が時間内に終わりませんでした。\nThe request body did not arrive in time.\n".into(),
            Self::Busy => "接続が多すぎます。しばらくしてから再送してください。\nToo many connections: send again later.\n".into(),
            Self::Unavailable => "一時的に保存できません。しばらくしてから再送してください。\n\
                Cannot store the notification right now: send it again later.\n"
                .into(),
        }
    }

    fn response(&self) -> Response<Body> {
        let mut response = Response::builder()
            .status(self.status())
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(self.text())))
            .expect("a valid response");
        if *self == Self::MethodNotAllowed {
            response
                .headers_mut()
                .insert(ALLOW, "POST".parse().expect("a header value"));
        }
        if *self == Self::Busy {
            response
                .headers_mut()
                .insert(CONNECTION, "close".parse().expect("a header value"));
        }
        response
    }
}

fn ok() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"result":"ok"}"#)))
        .expect("a valid response")
}

/// What every request needs.
struct Handler {
    store: Store,
    inbox: Inbox,
    notify_path: String,
    webhook_path: String,
    secret_parameter: String,
    secret: SecretString,
    /// Our 契約ID: webhooks for another contract are refused.
    contract_id: Option<String>,
    max_body_bytes: u64,
    body_timeout: Duration,
    dedup_window_ms: u64,
    services: Services,
}

/// What the listener serves besides Smaregi's notifications, and whom it
/// tells of them.
#[derive(Clone)]
pub struct Services {
    /// The order API, when `[orders]` turns it on.
    pub orders: Option<Arc<OrderApi>>,
    /// The stock read API, when `[stock] api-token` turns it on.
    pub stock: Option<Arc<StockApi>>,
    /// Where accepted notifications are stored: the processor's inbox.
    pub inbox: Inbox,
    /// Told after each new notification is committed.
    pub accepted: Arc<Notify>,
    /// What the listener counts, for `/metrics` and the status page.
    pub stats: Arc<IntakeStats>,
}

/// Notifications answered, by route and outcome, and when the last one
/// was stored.
#[derive(Debug, Default)]
pub struct IntakeStats {
    /// `(route, "stored" | "duplicate")`.
    pub accepted: Counters<(&'static str, &'static str)>,
    /// `(route, reason)`; the route is `other` for unknown paths and
    /// connections over the limit.
    pub refused: Counters<(&'static str, &'static str)>,
    last_stored_at: AtomicU64,
}

impl IntakeStats {
    /// When the last new notification was stored (Unix milliseconds).
    pub fn last_stored_at(&self) -> Option<u64> {
        Some(self.last_stored_at.load(Ordering::Relaxed)).filter(|&at| at > 0)
    }

    fn refused(&self, route: &'static str, refusal: &Refusal) {
        self.refused.add((route, refusal.reason()));
    }
}

fn route_label(route: Route) -> &'static str {
    match route {
        Route::Notify => "notify",
        Route::Webhook => "webhook",
    }
}

/// The bound listener, before it serves.
pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handler: Arc<Handler>,
    connections: Arc<Semaphore>,
    handshake_timeout: Duration,
    header_timeout: Duration,
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Binds the listener.
pub async fn bind(
    listener: &ListenerConfig,
    intake: &IntakeConfig,
    contract_id: Option<&str>,
    tls: rustls::ServerConfig,
    store: &Store,
    services: Services,
) -> std::io::Result<Listener> {
    let tcp = TcpListener::bind(listener.address).await?;
    let handler = Handler {
        store: store.clone(),
        inbox: services.inbox.clone(),
        notify_path: intake.notify_path.clone(),
        webhook_path: intake.webhook_path.clone(),
        secret_parameter: intake.secret_parameter.clone(),
        secret: SecretString::from(intake.secret.expose().to_owned()),
        contract_id: contract_id.map(str::to_owned),
        max_body_bytes: intake.max_body_bytes,
        body_timeout: Duration::from_secs(listener.body_timeout_seconds),
        dedup_window_ms: intake.dedup_window_seconds * 1000,
        services,
    };
    Ok(Listener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        handler: Arc::new(handler),
        connections: Arc::new(Semaphore::new(listener.max_connections as usize)),
        handshake_timeout: Duration::from_secs(listener.handshake_timeout_seconds),
        header_timeout: Duration::from_secs(listener.header_timeout_seconds),
    })
}

/// Accepts connections until `shutdown`; then asks open connections to
/// finish their current request, and returns once they have.
pub async fn serve(listener: Listener, shutdown: CancellationToken) {
    serve_watched(listener, shutdown, Heartbeat::detached()).await
}

/// [`serve`], beating `heartbeat` while the accept loop runs.
pub async fn serve_watched(listener: Listener, shutdown: CancellationToken, heartbeat: Heartbeat) {
    let connections = TaskTracker::new();
    let listener = Arc::new(listener);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            () = heartbeat.tick() => continue,
            accepted = listener.tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // E.g. out of file descriptors: keep serving the others.
                    warn!(error = %e, "intake: accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let permit = Arc::clone(&listener.connections).try_acquire_owned().ok();
        let listener = Arc::clone(&listener);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let handshake =
                tokio::time::timeout(listener.handshake_timeout, listener.acceptor.accept(tcp))
                    .await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "intake: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "intake: TLS handshake timed out");
                    return;
                }
            };
            let handler = Arc::clone(&listener.handler);
            let busy = permit.is_none();
            let service = service_fn(move |request| {
                let handler = Arc::clone(&handler);
                async move {
                    if busy {
                        handler.services.stats.refused("other", &Refusal::Busy);
                        return Ok::<_, std::convert::Infallible>(Refusal::Busy.response());
                    }
                    Ok(handler.handle(request).await)
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(listener.header_timeout)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(!busy);
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "intake: connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    info!("intake: stopped");
}

/// Reads a request's body: at most `max_bytes`, within `timeout`.
pub(crate) async fn read_body(
    request: Request<Incoming>,
    max_bytes: u64,
    timeout: Duration,
) -> Result<Bytes, Refusal> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_bytes) {
        return Err(Refusal::TooLarge(max_bytes));
    }
    let limited = Limited::new(request.into_body(), max_bytes as usize);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(Refusal::BodyTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Refusal::TooLarge(max_bytes))
        }
        Ok(Err(e)) => Err(Refusal::Malformed(format!(
            "the body could not be read: {e}"
        ))),
        Ok(Ok(body)) => Ok(body.to_bytes()),
    }
}

impl Handler {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if let Some(orders) = self
            .services
            .orders
            .as_ref()
            .filter(|_| OrderApi::serves(path))
        {
            return orders.handle(request, self.body_timeout).await;
        }
        if let Some(stock) = self
            .services
            .stock
            .as_ref()
            .filter(|_| StockApi::serves(path))
        {
            return stock.handle(&request);
        }
        let stats = &self.services.stats;
        let route = if path == self.notify_path {
            Route::Notify
        } else if path == self.webhook_path {
            Route::Webhook
        } else {
            stats.refused("other", &Refusal::NotFound);
            return Refusal::NotFound.response();
        };
        let label = route_label(route);
        if request.method() != Method::POST {
            stats.refused(label, &Refusal::MethodNotAllowed);
            return Refusal::MethodNotAllowed.response();
        }
        let result = match route {
            Route::Notify => self.notify(request).await,
            Route::Webhook => self.webhook(request).await,
        };
        match result {
            Ok(()) => ok(),
            Err(refusal) => {
                stats.refused(label, &refusal);
                refusal.response()
            }
        }
    }

    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, Refusal> {
        read_body(request, self.max_body_bytes, self.body_timeout).await
    }

    /// Checks the shared secret, from the form or the query string.
    fn authenticate(
        &self,
        form: &[(String, String)],
        query: &[(String, String)],
    ) -> Result<(), Refusal> {
        let offered = form::secret_value(form, query, &self.secret_parameter).unwrap_or("");
        let expected = self.secret.expose_secret().as_bytes();
        if bool::from(offered.as_bytes().ct_eq(expected)) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized)
        }
    }

    /// Stores an accepted notification and commits it.
    async fn store(&self, offer: Offer<'_>) -> Result<(), Refusal> {
        let accepted = self.inbox.accept(offer).map_err(|e| {
            warn!(error = %e, "intake: cannot store a notification");
            Refusal::Unavailable
        })?;
        self.store.commit().await.map_err(|e| {
            warn!(error = %e, "intake: cannot commit a notification");
            Refusal::Unavailable
        })?;
        let kind = offer.kind;
        let route = route_label(offer.route);
        let stats = &self.services.stats;
        match accepted {
            Accepted::New(seq) => {
                stats.accepted.add((route, "stored"));
                stats.last_stored_at.fetch_max(offer.now, Ordering::Relaxed);
                self.services.accepted.notify_one();
                // Debug: one line per notification is noise in the journal
                // (and measurably slows a burst); the counts and the last
                // notification's time are on the status page and /metrics.
                debug!(
                    seq,
                    kind,
                    bytes = offer.body.len(),
                    "intake: notification stored"
                )
            }
            Accepted::Duplicate(seq) => {
                stats.accepted.add((route, "duplicate"));
                info!(
                    seq,
                    kind, "intake: resent notification answered, not stored again"
                )
            }
        }
        Ok(())
    }

    /// A Platform API webhook: the secret in the query string, our
    /// contract id, the event headers, a JSON body.
    async fn webhook(&self, request: Request<Incoming>) -> Result<(), Refusal> {
        let query = form::decode_form(request.uri().query().unwrap_or("").as_bytes())
            .map_err(|e| Refusal::Malformed(format!("query string: {e}")))?;
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let (event, event_id, contract) = (
            header("smaregi-event"),
            header("smaregi-event-id"),
            header("smaregi-contract-id"),
        );
        let body = self.read_body(request).await?;
        self.authenticate(&[], &query)?;
        let ours = self.contract_id.as_deref();
        if contract.is_some() && contract.as_deref() != ours {
            return Err(Refusal::Unauthorized);
        }
        let webhook = form::read_webhook(
            event.as_deref(),
            event_id.as_deref(),
            contract.as_deref(),
            &body,
        )
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let dedup_key = format!("event:{}", webhook.event_id);
        self.store(Offer {
            route: Route::Webhook,
            kind: &webhook.event,
            dedup_key: &dedup_key,
            body: &body,
            now: unix_millis(std::time::SystemTime::now()),
            window: self.dedup_window_ms,
        })
        .await
    }

    /// API送信: authenticate, read, store, commit.
    async fn notify(&self, request: Request<Incoming>) -> Result<(), Refusal> {
        let query = request.uri().query().unwrap_or("").as_bytes().to_vec();
        let is_form = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            });
        let body = self.read_body(request).await?;
        if !is_form {
            return Err(Refusal::Malformed(
                "Content-Type must be application/x-www-form-urlencoded".into(),
            ));
        }
        let malformed = |e: FormError| Refusal::Malformed(e.to_string());
        let fields = form::decode_form(&body).map_err(malformed)?;
        let query = form::decode_form(&query)
            .map_err(|e| Refusal::Malformed(format!("query string: {e}")))?;
        self.authenticate(&fields, &query)?;
        let notification = form::read_notification(&fields).map_err(malformed)?;
        let kind = notification.proc_name.as_str();
        let dedup_key = inbox::content_key(kind, &notification.params);
        // The shared secret is checked, not kept: the inbox holds the form
        // without it.
        let kept = form::without_field(&body, &self.secret_parameter);
        self.store(Offer {
            route: Route::Notify,
            kind,
            dedup_key: &dedup_key,
            body: &kept,
            now: unix_millis(std::time::SystemTime::now()),
            window: self.dedup_window_ms,
        })
        .await
    }
}
