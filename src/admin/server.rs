//! The admin listener: `GET /metrics`, `/healthz`, `/readyz`, `/` (the
//! status page) and `/status.json`.
//!
//! On a loopback address it speaks plain HTTP, like any Prometheus
//! target. On any other address (the page on the shop's LAN) it speaks
//! HTTPS with the intake listener's certificate, and every path but
//! `/healthz` needs the status token, as `?token=…` (a bookmark on the
//! staff's phone) or `Authorization: Bearer …`, compared in constant time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{metrics, page, Observed};
use crate::health;
use crate::intake::api::{bearer_matches, method_not_allowed};

type Body = Full<Bytes>;

/// Connections served at once; the page is for a few people.
const MAX_CONNECTIONS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound admin listener.
pub struct AdminListener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<Handler>,
}

struct Handler {
    observed: Arc<Observed>,
    token: Option<SecretString>,
}

impl AdminListener {
    /// Binds `address`; `tls` and `token` are required off loopback
    /// (config validation makes sure of it).
    pub async fn bind(
        address: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        token: Option<SecretString>,
        observed: Arc<Observed>,
    ) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(address).await?;
        let (tls, token) = if address.ip().is_loopback() {
            (None, None)
        } else {
            (tls.map(TlsAcceptor::from), token)
        };
        Ok(Self {
            tcp,
            tls,
            handler: Arc::new(Handler { observed, token }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "admin: accept failed");
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                debug!(%peer, "admin: too many connections; closing");
                continue;
            };
            let handler = Arc::clone(&self.handler);
            let tls = self.tls.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let _permit = permit;
                match tls {
                    None => serve_connection(tcp, handler, shutdown).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_connection(stream, handler, shutdown).await,
                            _ => debug!(%peer, "admin: TLS handshake failed"),
                        }
                    }
                }
            });
        }
        connections.close();
        connections.wait().await;
    }
}

async fn serve_connection<S>(stream: S, handler: Arc<Handler>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let handler = Arc::clone(&handler);
        async move { Ok::<_, std::convert::Infallible>(handler.handle(&request)) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "admin: connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .header(CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

impl Handler {
    fn authorised(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let from_query = request
            .uri()
            .query()
            .and_then(|query| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(name, _)| name == "token")
                    .map(|(_, value)| value.into_owned())
            })
            .is_some_and(|offered| {
                bool::from(offered.as_bytes().ct_eq(token.expose_secret().as_bytes()))
            });
        from_query || bearer_matches(request, token)
    }

    fn handle(&self, request: &Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if !matches!(
            path,
            "/" | "/metrics" | "/healthz" | "/readyz" | "/status.json"
        ) {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "ありません: /, /metrics, /healthz, /readyz, /status.json のいずれかを開いてください。\n\
                 Not found: open /, /metrics, /healthz, /readyz or /status.json.\n"
                    .into(),
            );
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return method_not_allowed("GET, HEAD");
        }
        if path == "/healthz" {
            return self.healthz();
        }
        if !self.authorised(request) {
            return text(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                "トークンが必要です（URLの ?token=…）。\nA token is needed (?token=… in the URL).\n"
                    .into(),
            );
        }
        if path == "/readyz" {
            return self.readyz();
        }
        let observed = &self.observed;
        let snapshot = match observed.snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("状態を読み取れません。\nCannot read the state: {e}\n"),
                )
            }
        };
        let problems = health::assess(&snapshot, &observed.thresholds);
        match path {
            "/metrics" => {
                let counters = metrics::Counters {
                    accepted: observed.intake.accepted.snapshot(),
                    refused: observed.intake.refused.snapshot(),
                    attempts: observed.engine.attempts(),
                    commit_latency: observed.store.commit_latency(),
                };
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics::render(&snapshot, &problems, &counters),
                )
            }
            "/status.json" => {
                let body = json!({
                    "light": health::Light::of(&problems),
                    "problems": problems,
                    "snapshot": snapshot,
                    "recent": observed.journal.recent(),
                });
                text(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&body).expect("JSON serialises"),
                )
            }
            _ => text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::render(&snapshot, &problems, &observed.journal.recent()),
            ),
        }
    }

    /// Alive: the process answers and its store has not failed.
    fn healthz(&self) -> Response<Body> {
        if self.observed.store.has_failed() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "store failed; the daemon is stopping\n".into(),
            );
        }
        text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
    }

    /// Ready: started, the store commits, and the outbox can be read.
    /// Parked jobs and pauses are problems for people, not unreadiness.
    fn readyz(&self) -> Response<Body> {
        if self.observed.store.has_failed() {
            return self.healthz();
        }
        match self.observed.engine.status() {
            Ok(_) => text(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".into(),
            ),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("not ready: {e}\n"),
            ),
        }
    }
}
