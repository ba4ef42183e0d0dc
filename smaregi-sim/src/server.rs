//! The simulator's HTTP(S) server: Smaregi's legacy endpoint at
//! `/access/`, with faults, a per-contract rate limit and maintenance
//! windows, plus the control endpoint under `/_control/`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::faults::{Faults, Injected};
use crate::model::{ApiError, Contract};
use crate::time;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How a simulator is started.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub contract_id: String,
    pub access_token: String,
    /// PEM certificate chain and key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Load the contract's data from here at start, save it after each write.
    pub state_file: Option<PathBuf>,
    /// Calls per second per contract (a token bucket with this burst);
    /// 0 turns the limit off.
    pub rate_limit_per_second: f64,
}

impl SimConfig {
    /// Plain HTTP on a free loopback port, no rate limit.
    pub fn local(contract_id: &str, access_token: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            contract_id: contract_id.to_owned(),
            access_token: access_token.to_owned(),
            tls: None,
            state_file: None,
            rate_limit_per_second: 0.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("TLS certificate or key {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// What the simulator has counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    /// Calls to `/access/`, whatever became of them.
    pub calls: u64,
    /// Calls that changed the contract's data.
    pub writes: u64,
    pub api_errors: u64,
    pub injected_errors: u64,
    pub injected_resets: u64,
    pub injected_hangs: u64,
    pub commit_then_fail: u64,
    pub malformed: u64,
    pub maintenance: u64,
    pub rate_limited: u64,
}

struct Shared {
    config: SimConfig,
    contract: Mutex<Contract>,
    faults: Mutex<Faults>,
    maintenance_until: Mutex<Option<Instant>>,
    bucket: Mutex<(f64, Instant)>,
    stats: Mutex<Stats>,
    /// Calls to `/access/`, and writes, so far: for tests to await
    /// progress on.
    calls: tokio::sync::watch::Sender<u64>,
    writes: tokio::sync::watch::Sender<u64>,
    shutdown: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulator. Dropping it does not stop it; call [`Simulator::stop`].
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: TaskTracker,
}

/// The connection is dropped without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct Dropped;

type Reply = Result<Response<Full<Bytes>>, Dropped>;

impl Simulator {
    pub async fn start(config: SimConfig) -> Result<Self, SimError> {
        let tls = config
            .tls
            .as_ref()
            .map(|(cert, key)| acceptor(cert, key))
            .transpose()?;
        let contract = match &config.state_file {
            Some(path) if path.exists() => load_state(path)?,
            _ => Contract::default(),
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| SimError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| SimError::Listen {
            addr: config.listen,
            source,
        })?;
        let burst = config.rate_limit_per_second.max(1.0);
        let shared = Arc::new(Shared {
            config,
            contract: Mutex::new(contract),
            faults: Mutex::new(Faults::default()),
            maintenance_until: Mutex::new(None),
            bucket: Mutex::new((burst, Instant::now())),
            stats: Mutex::new(Stats::default()),
            calls: tokio::sync::watch::Sender::new(0),
            writes: tokio::sync::watch::Sender::new(0),
            shutdown: CancellationToken::new(),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            tls,
            Arc::clone(&shared),
            tasks.clone(),
        ));
        Ok(Self {
            shared,
            addr,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The legacy endpoint's URL.
    pub fn url(&self) -> String {
        let scheme = if self.shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/access/", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Answers 503 to every call for `period`.
    pub fn start_maintenance(&self, period: Duration) {
        *lock(&self.shared.maintenance_until) = Some(Instant::now() + period);
    }

    /// A copy of the contract's data.
    pub fn contract(&self) -> Contract {
        lock(&self.shared.contract).clone()
    }

    /// Changes the contract's data directly, e.g. to set stock.
    pub fn with_contract<R>(&self, change: impl FnOnce(&mut Contract) -> R) -> R {
        change(&mut lock(&self.shared.contract))
    }

    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// The number of calls to `/access/` so far, updated as they arrive.
    pub fn calls(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.calls.subscribe()
    }

    /// The number of calls that changed the contract's data so far.
    pub fn writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.writes.subscribe()
    }

    /// Stops accepting, drops open connections, and waits for them.
    pub async fn stop(self) {
        self.shared.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, SimError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error = |path: &Path, message: String| SimError::Tls {
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(cert, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_error(cert, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| tls_error(cert, e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_state(path: &Path) -> Result<Contract, SimError> {
    let state_error = |message: String| SimError::State {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| state_error(e.to_string()))?;
    let mut contract: Contract =
        serde_json::from_slice(&bytes).map_err(|e| state_error(e.to_string()))?;
    contract.reindex();
    Ok(contract)
}

fn save_state(path: &Path, contract: &Contract) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec(contract)?)?;
    std::fs::rename(temporary, path)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
) {
    loop {
        let tcp = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        tasks.spawn(async move {
            match tls {
                None => serve(TokioIo::new(tcp), shared).await,
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        serve(TokioIo::new(stream), shared).await;
                    }
                }
            }
        });
    }
}

async fn serve<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let shutdown = shared.shutdown.clone();
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    let connection = http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        _ = shutdown.cancelled() => {}
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json;charset=UTF-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn api_error(error: &ApiError) -> Response<Full<Bytes>> {
    respond(
        StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST),
        &error.body(),
    )
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Reply {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let headers = request.headers().clone();
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            let error = json!({"error": format!("cannot read the request body: {e}")});
            return Ok(respond(StatusCode::PAYLOAD_TOO_LARGE, &error));
        }
    };
    match (method, path.as_str()) {
        (Method::POST, "/access/" | "/access") => access(&shared, &headers, &body).await,
        (method, path) if path.starts_with("/_control/") => {
            Ok(control(&shared, &method, path, &body))
        }
        _ => Ok(respond(
            StatusCode::NOT_FOUND,
            &json!({"error": "not found"}),
        )),
    }
}

/// Smaregi's legacy endpoint.
async fn access(shared: &Shared, headers: &hyper::HeaderMap, body: &[u8]) -> Reply {
    let stats = |update: fn(&mut Stats)| update(&mut lock(&shared.stats));
    stats(|s| s.calls += 1);
    shared.calls.send_modify(|calls| *calls += 1);
    let faults = lock(&shared.faults).clone();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let in_maintenance =
        lock(&shared.maintenance_until).is_some_and(|until| Instant::now() < until);
    if in_maintenance {
        stats(|s| s.maintenance += 1);
        let body = json!({"error": "メンテナンス中です (maintenance)"});
        return Ok(respond(StatusCode::SERVICE_UNAVAILABLE, &body));
    }
    if !take_token(shared) {
        stats(|s| s.rate_limited += 1);
        let mut response = respond(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "リクエストが多すぎます (rate limited)"}),
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, "1".parse().expect("a header value"));
        return Ok(response);
    }
    let injected = faults.draw(rand::random(), rand::random());
    match injected {
        Injected::Error => {
            stats(|s| s.injected_errors += 1);
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal server error (injected)"}),
            ));
        }
        Injected::Reset => {
            stats(|s| s.injected_resets += 1);
            return Err(Dropped);
        }
        Injected::Hang(period) => {
            stats(|s| s.injected_hangs += 1);
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shared.shutdown.cancelled() => {}
            }
            return Err(Dropped);
        }
        Injected::Malformed { commit: false } => {
            stats(|s| s.malformed += 1);
            return Ok(malformed_answer());
        }
        Injected::None
        | Injected::CommitThenError
        | Injected::CommitThenReset
        | Injected::Malformed { commit: true } => {}
    }

    let answer = call(shared, headers, body, &faults);
    let wrote = matches!(&answer, Ok((_, true)));
    if wrote {
        stats(|s| s.writes += 1);
        shared.writes.send_modify(|writes| *writes += 1);
    }
    match (answer, injected) {
        (Err(error), _) => {
            stats(|s| s.api_errors += 1);
            Ok(api_error(&error))
        }
        (Ok(_), Injected::CommitThenError) if wrote => {
            stats(|s| s.commit_then_fail += 1);
            Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal server error (injected after the write)"}),
            ))
        }
        (Ok(_), Injected::CommitThenReset) if wrote => {
            stats(|s| s.commit_then_fail += 1);
            Err(Dropped)
        }
        (Ok(_), Injected::Malformed { commit: true }) => {
            stats(|s| s.malformed += 1);
            Ok(malformed_answer())
        }
        (Ok((result, _)), _) => Ok(respond(StatusCode::OK, &result)),
    }
}

/// One of the answers a broken proxy or a bad day at Smaregi gives.
fn malformed_answer() -> Response<Full<Bytes>> {
    let bodies: [(&str, &str); 4] = [
        (
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        ),
        (
            "application/json",
            r#"{"result":{"TransactionHead":1,"TransactionHe"#,
        ),
        (
            "application/json",
            r#"{"result":{"TransactionHead":1,"TransactionHeadIds":[],"TransactionDetail":1}}"#,
        ),
        (
            "application/json",
            r#"{"total_count":1,"result":[{"storeId":{"id":1}}]}"#,
        ),
    ];
    let (content_type, body) = bodies[rand::random_range(0..bodies.len())];
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}

fn take_token(shared: &Shared) -> bool {
    let rate = shared.config.rate_limit_per_second;
    if rate <= 0.0 {
        return true;
    }
    let mut bucket = lock(&shared.bucket);
    let now = Instant::now();
    let (tokens, last) = *bucket;
    let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate.max(1.0));
    if tokens >= 1.0 {
        *bucket = (tokens - 1.0, now);
        true
    } else {
        *bucket = (tokens, now);
        false
    }
}

/// Authenticates and runs one call; the answer and whether it wrote.
fn call(
    shared: &Shared,
    headers: &hyper::HeaderMap,
    body: &[u8],
    faults: &Faults,
) -> Result<(Value, bool), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if header("x_contract_id") != Some(shared.config.contract_id.as_str()) {
        return Err(ApiError::new(14, "invalid_contract_id", "契約IDが不正です"));
    }
    if header("x_access_token") != Some(shared.config.access_token.as_str()) {
        return Err(ApiError::new(
            13,
            "invalid_access_token",
            "アクセストークンが不正です",
        ));
    }
    let form_content =
        header("content-type").is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !form_content {
        return Err(ApiError::new(
            11,
            "invalid_request",
            "Content-Type は application/x-www-form-urlencoded です",
        ));
    }
    let mut proc_name = None;
    let mut params = None;
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "proc_name" => proc_name = Some(value.into_owned()),
            "params" => params = Some(value.into_owned()),
            _ => {}
        }
    }
    let (Some(proc_name), Some(params)) = (proc_name, params) else {
        return Err(ApiError::new(
            11,
            "invalid_request",
            "proc_name と params は必須です",
        ));
    };
    if faults.disabled.contains(&proc_name) {
        return Err(ApiError::new(
            23,
            "function_disabled",
            format!("{proc_name} は機能設定で無効です (disabled in 機能設定)"),
        ));
    }
    let mut contract = lock(&shared.contract);
    let result = contract.call(&proc_name, &params, time::now())?;
    let wrote = proc_name.ends_with("_upd");
    if wrote {
        if let Some(path) = &shared.config.state_file {
            if let Err(e) = save_state(path, &contract) {
                tracing::error!(path = %path.display(), error = %e, "cannot save the state file");
            }
        }
    }
    Ok((result, wrote))
}

/// The control endpoint: faults, maintenance, the contract's data, stats.
fn control(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let bad = |message: String| respond(StatusCode::BAD_REQUEST, &json!({"error": message}));
    match (method, path) {
        (&Method::GET, "/_control/faults") => {
            respond(StatusCode::OK, &json!(*lock(&shared.faults)))
        }
        (&Method::PUT, "/_control/faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(faults) => {
                *lock(&shared.faults) = faults.clone();
                respond(StatusCode::OK, &json!(faults))
            }
            Err(e) => bad(format!("faults: {e}")),
        },
        (&Method::POST, "/_control/maintenance") => {
            #[derive(Deserialize)]
            struct Window {
                seconds: u64,
            }
            match serde_json::from_slice::<Window>(body) {
                Ok(window) => {
                    let until = Instant::now() + Duration::from_secs(window.seconds);
                    *lock(&shared.maintenance_until) = Some(until);
                    respond(
                        StatusCode::OK,
                        &json!({"maintenance-seconds": window.seconds}),
                    )
                }
                Err(e) => bad(format!("maintenance: {e}")),
            }
        }
        (&Method::GET, "/_control/contract") => {
            respond(StatusCode::OK, &json!(*lock(&shared.contract)))
        }
        (&Method::PUT, "/_control/stock") => {
            #[derive(Deserialize)]
            #[serde(rename_all = "kebab-case", deny_unknown_fields)]
            struct SetStock {
                store_id: String,
                product_id: String,
                amount: i64,
            }
            match serde_json::from_slice::<SetStock>(body) {
                Ok(set) => {
                    lock(&shared.contract).set_stock(
                        &set.store_id,
                        &set.product_id,
                        set.amount,
                        time::now(),
                    );
                    respond(StatusCode::OK, &json!({"result": "ok"}))
                }
                Err(e) => bad(format!("stock: {e}")),
            }
        }
        (&Method::GET, "/_control/stats") => respond(StatusCode::OK, &json!(*lock(&shared.stats))),
        _ => respond(
            StatusCode::NOT_FOUND,
            &json!({"error": "unknown control path"}),
        ),
    }
}
