//! Accepted notifications per second, and latency, over TLS keep-alive
//! against the running daemon, next to a bare hyper + rustls server that
//! answers 200 without storing anything, in the same run.
//!
//! `cargo bench --locked --bench intake`. Each side is loaded for 5 s at
//! 1, 16 and 64 connections, five times in turn (bare, relay, bare, …);
//! the round with the median ratio is shown. Each connection is one client task sending the
//! next notification as soon as the last is answered. Every notification
//! is distinct (no resend de-duplication) and about 300 bytes. The target:
//! at 64 connections the relay reaches ≥ 50 % of the bare server's rate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use smaregi_relay::intake::cert::{self, CertificateFiles, CertificateResolver};

#[path = "../tests/common/mod.rs"]
mod common;

const SECONDS: u64 = 5;
/// Bare-then-relay rounds per connection count; the median round is shown.
const ROUNDS: usize = 5;
const CONNECTIONS: [usize; 3] = [1, 16, 64];

/// A bare HTTPS server on the same certificate: reads the body, answers 200.
async fn bare_server(files: &CertificateFiles) -> SocketAddr {
    let resolver = Arc::new(CertificateResolver::new(cert::load(files).unwrap()));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cert::server_config(resolver)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = request.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(br#"{"result":"ok"}"#),
                        )))
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    address
}

struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// `connections` clients, each on its own kept-alive connection.
async fn load(url: &str, certificate: &Path, connections: usize, round: usize) -> Load {
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let clients: Vec<_> = (0..connections)
        .map(|client_number| {
            let url = url.to_owned();
            let tls = smaregi_relay::tls::client_config(Some(certificate)).unwrap();
            let client = reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let params = format!(
                        r#"{{"data":[{{"table_name":"Stock","rows":[{{"storeId":"1","productId":"{round}{client_number:03}{n:09}","amount":"-1","stockAmount":"4","stockDivision":"02"}}]}}]}}"#
                    );
                    let body = form_urlencoded::Serializer::new(String::new())
                        .append_pair("proc_name", "stock_send")
                        .append_pair("params", &params)
                        .append_pair("relay_secret", common::INTAKE_SECRET)
                        .finish();
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    response.bytes().await.unwrap();
                    latencies.push(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Load {
        rate: latencies.len() as f64 / elapsed,
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn main() {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let relay = common::RunningDaemon::start(temp.path(), &config);
    let certificate = relay.certificate();
    let files = CertificateFiles::new(None, None, &relay.state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bare = bare_server(&files).await;
        let bare_url = format!("https://localhost:{}/smaregi/notify", bare.port());
        let relay_url = relay.url("/smaregi/notify");
        println!("| connections | bare server /s | p50 | p99 | relay /s | p50 | p99 | relay ÷ bare |");
        println!("|---|---|---|---|---|---|---|---|");
        let mut round = 0;
        for connections in CONNECTIONS {
            // Interleaved, so that both sides see the same machine: the
            // load on a shared machine drifts over a minute.
            let mut rounds = Vec::new();
            for _ in 0..ROUNDS {
                let bare = load(&bare_url, &certificate, connections, round).await;
                let relay = load(&relay_url, &certificate, connections, round + 1).await;
                round += 2;
                rounds.push((relay.rate / bare.rate, bare, relay));
            }
            rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let ratios: Vec<String> = rounds.iter().map(|r| format!("{:.0}", 100.0 * r.0)).collect();
            let (ratio, bare, relay) = &rounds[rounds.len() / 2];
            println!(
                "| {connections} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.0} % (rounds: {} %) |",
                bare.rate,
                bare.p50.as_secs_f64() * 1e3,
                bare.p99.as_secs_f64() * 1e3,
                relay.rate,
                relay.p50.as_secs_f64() * 1e3,
                relay.p99.as_secs_f64() * 1e3,
                100.0 * ratio,
                ratios.join(", "),
            );
        }
    });
    assert!(relay.stop().success());
}
