//! The TLS intake of the real daemon, called like Smaregi calls it: over
//! TLS trusting the generated certificate, and by the simulator acting as
//! Smaregi's sender. Every accepted and refused case, and what ends up in
//! the inbox.

use std::path::Path;

use serde_json::json;
use smaregi_relay::intake::inbox::Inbox;
use smaregi_relay::store::Store;
use smaregi_sim::sender::{http_client, Sender};

mod common;
use common::{RunningDaemon, INTAKE_SECRET};

const STOCK: &str = r#"{"data":[{"table_name":"Stock","rows":[{"storeId":"1","productId":"113","amount":"-1","stockAmount":"4","stockDivision":"02"},{"storeId":"1","productId":"114","amount":"3","stockAmount":"10","stockDivision":"03"}]}]}"#;

fn form(pairs: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

/// A sent form as the inbox keeps it: without the shared secret.
fn as_kept(form: &str) -> String {
    String::from_utf8(smaregi_relay::intake::form::without_field(
        form.as_bytes(),
        "relay_secret",
    ))
    .unwrap()
}

/// The bodies in the inbox, oldest first, read after the daemon stopped.
async fn inbox_bodies(state: &Path) -> Vec<String> {
    let store = Store::open(&common::store_options(&state.join("db"))).unwrap();
    let inbox = Inbox::open(&store).unwrap();
    let bodies = inbox
        .entries(usize::MAX)
        .unwrap()
        .into_iter()
        .map(|seq| String::from_utf8(inbox.body(seq).unwrap()).unwrap())
        .collect();
    store.close().await.unwrap();
    bodies
}

/// Sends `request` over TLS as is and returns the answer (its head and
/// the body its `Content-Length` announces, however many reads they take),
/// or nothing if the server drops the connection.
async fn raw_tls_exchange(relay: &RunningDaemon, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = smaregi_relay::tls::client_config(Some(&relay.certificate())).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read_all = async {
        let mut buffer = [0u8; 8192];
        while !is_complete(&answer) {
            match stream.read(&mut buffer).await {
                Ok(0) => break,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
                // Closed without TLS close_notify: a dropped connection.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("{e}"),
            }
        }
    };
    tokio::time::timeout(common::EVENT_DEADLINE, read_all)
        .await
        .expect("an answer or a close");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether `answer` holds a whole HTTP/1.1 answer: its head, and as much
/// body as its `Content-Length` says (none when it says nothing).
fn is_complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..head_end]
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    answer.len() >= head_end + 4 + length
}

struct Answer {
    status: u16,
    body: String,
}

async fn post(client: &reqwest::Client, url: &str, content_type: &str, body: String) -> Answer {
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    Answer {
        status: response.status().as_u16(),
        body: response.text().await.unwrap(),
    }
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_stored_before_200_and_refusals_store_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let relay = RunningDaemon::start(temp.path(), &config);
    let client = http_client(Some(&relay.certificate())).unwrap();
    let notify = relay.url("/smaregi/notify");

    // Accepted: the secret in the form, or in the query string.
    let in_form = form(&[
        ("proc_name", "stock_send"),
        ("params", STOCK),
        ("relay_secret", INTAKE_SECRET),
    ]);
    let answer = post(&client, &notify, FORM, in_form.clone()).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, r#"{"result":"ok"}"#)
    );
    let transaction = r#"{"data":[{"table_name":"TransactionHead","rows":[{"transactionHeadId":"952","total":"800"}]}]}"#;
    let in_query = form(&[("proc_name", "transaction_send"), ("params", transaction)]);
    let answer = post(
        &client,
        &format!("{notify}?relay_secret={INTAKE_SECRET}"),
        FORM,
        in_query.clone(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // A resend within the window: answered 200, stored once.
    let answer = post(&client, &notify, FORM, in_form.clone()).await;
    assert_eq!(answer.status, 200);

    // Refused, each with its status and a Japanese-then-English reason.
    let refusals: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "wrong secret",
            notify.clone(),
            FORM,
            401,
            "認証に失敗しました",
        ),
        (
            "no secret",
            notify.clone(),
            FORM,
            401,
            "Authentication failed",
        ),
        ("unknown proc_name", notify.clone(), FORM, 400, "order_send"),
        (
            "broken params",
            notify.clone(),
            FORM,
            400,
            "params is not JSON",
        ),
        (
            "not a form",
            notify.clone(),
            "application/json",
            400,
            "x-www-form-urlencoded",
        ),
        ("broken escape", notify.clone(), FORM, 400, "%-escape"),
        (
            "unknown path",
            relay.url("/elsewhere"),
            FORM,
            404,
            "送信URL",
        ),
    ];
    for (what, url, content_type, status, needle) in refusals {
        let body = match what {
            "wrong secret" => form(&[
                ("proc_name", "stock_send"),
                ("params", STOCK),
                ("relay_secret", "not-the-secret"),
            ]),
            "no secret" => form(&[("proc_name", "stock_send"), ("params", STOCK)]),
            "unknown proc_name" => form(&[
                ("proc_name", "order_send"),
                ("params", STOCK),
                ("relay_secret", INTAKE_SECRET),
            ]),
            "broken params" => form(&[
                ("proc_name", "stock_send"),
                ("params", "{\"data\":["),
                ("relay_secret", INTAKE_SECRET),
            ]),
            "broken escape" => format!("proc_name=stock%2&relay_secret={INTAKE_SECRET}"),
            _ => in_form.clone(),
        };
        let answer = post(&client, &url, content_type, body).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.body);
        assert!(answer.body.contains(needle), "{what}: {}", answer.body);
    }
    let get = client.get(&notify).send().await.unwrap();
    assert_eq!(get.status().as_u16(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    // A body declared larger than the limit is refused before it is read.
    let head = format!(
        "POST /smaregi/notify HTTP/1.1\r\nHost: localhost\r\nContent-Type: {FORM}\r\nContent-Length: {}\r\n\r\n",
        17 * 1024 * 1024
    );
    let answer = raw_tls_exchange(&relay, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("16777216"), "{answer}");

    // The simulator, as Smaregi's sender, with many rows.
    let rows: Vec<_> = (0..3000)
        .map(|n| json!({"storeId": "1", "productId": n.to_string(), "amount": "1", "stockAmount": "5"}))
        .collect();
    let stocktake = json!({"data": [{"table_name": "Stock", "rows": rows}]});
    let sender = Sender::new(Some(&relay.certificate())).unwrap();
    let secret = vec![("relay_secret".to_owned(), INTAKE_SECRET.to_owned())];
    let (status, body) = sender
        .send(&notify, "stock_send", &stocktake, &secret)
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"result":"ok"}"#));

    let state = relay.state.clone();
    assert!(relay.stop().success());
    let bodies = inbox_bodies(&state).await;
    assert_eq!(
        bodies.len(),
        3,
        "two notifications and the stocktake; nothing refused, no resend"
    );
    assert_eq!(bodies[0], as_kept(&in_form));
    assert_eq!(bodies[1], as_kept(&in_query));
    assert!(bodies[2].contains("stock_send") && bodies[2].len() > 100_000);
    assert!(
        bodies.iter().all(|body| !body.contains(INTAKE_SECRET)),
        "the shared secret is checked, never stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_on_the_tls_port_are_dropped_and_serving_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let relay = RunningDaemon::start(temp.path(), &config);
    for garbage in [
        &b"POST /smaregi/notify HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port))
            .await
            .unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(common::EVENT_DEADLINE, tcp.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the connection is closed");
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    }
    let client = http_client(Some(&relay.certificate())).unwrap();
    let body = form(&[
        ("proc_name", "stock_send"),
        ("params", STOCK),
        ("relay_secret", INTAKE_SECRET),
    ]);
    let answer = post(&client, &relay.url("/smaregi/notify"), FORM, body).await;
    assert_eq!(answer.status, 200);
    assert!(relay.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_off() {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(
        temp.path(),
        // Headers get 5 s, so that the complete head sent at once below is
        // never cut off on a loaded machine; the missing body gets 1 s.
        "[listener]\naddress = \"127.0.0.1:0\"\nheader-timeout-seconds = 5\nbody-timeout-seconds = 1\n",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    // Headers that never end: the connection is closed.
    let answer = raw_tls_exchange(
        &relay,
        b"POST /smaregi/notify HTTP/1.1\r\nHost: localhost\r\n",
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    // A body that never comes: 408 with the reason.
    let head = format!("POST /smaregi/notify HTTP/1.1\r\nHost: localhost\r\nContent-Type: {FORM}\r\nContent-Length: 100\r\n\r\nproc_name=");
    let answer = raw_tls_exchange(&relay, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    assert!(relay.stop().success());
}

/// The SHA-256 fingerprint of the certificate a new connection is served.
async fn served_fingerprint(port: u16, trusted: &Path) -> String {
    let tls = smaregi_relay::tls::client_config(Some(trusted)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let leaf = &stream.get_ref().1.peer_certificates().unwrap()[0];
    smaregi_relay::intake::cert::fingerprint(leaf)
}

/// A fresh self-signed certificate for localhost, written over `cert`
/// and `key` (key first, as certbot renews); returns its fingerprint.
fn new_certificate(cert: &Path, key: &Path) -> String {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(key, certified.signing_key.serialize_pem()).unwrap();
    std::fs::write(cert, certified.cert.pem()).unwrap();
    smaregi_relay::intake::cert::fingerprint(certified.cert.der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_serves_new_connections_and_a_broken_one_is_not_taken() {
    let temp = tempfile::tempdir().unwrap();
    let (cert, key) = (temp.path().join("cert.pem"), temp.path().join("key.pem"));
    let first = new_certificate(&cert, &key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = common::write_config(
        temp.path(),
        "[listener]\naddress = \"127.0.0.1:0\"\ntls-certificate = \"cert.pem\"\ntls-private-key = \"key.pem\"\n",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    // Each certificate is trusted through a copy, since the file changes.
    let trusted = temp.path().join("trusted.pem");
    std::fs::copy(&cert, &trusted).unwrap();
    assert_eq!(served_fingerprint(relay.port, &trusted).await, first);
    let status = |fingerprint: &str| {
        format!(
            "STATUS=listening on 127.0.0.1:{} · certificate {fingerprint}",
            relay.port
        )
    };

    // Renewed: new connections see it after SIGHUP.
    let second = new_certificate(&cert, &key);
    std::fs::copy(&cert, &trusted).unwrap();
    relay.daemon.signal(libc::SIGHUP);
    // A prefix: the outbox counts follow in the status line.
    relay
        .daemon
        .notify
        .wait_for_prefix(&status(&second))
        .unwrap();
    assert_eq!(served_fingerprint(relay.port, &trusted).await, second);

    // Broken: the renewed one keeps serving, and the status says why.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    relay.daemon.signal(libc::SIGHUP);
    let failed = relay
        .daemon
        .notify
        .wait_for_prefix(&format!("{} (reload failed", status(&second)))
        .unwrap();
    assert!(failed.contains("cert.pem"), "{failed}");
    assert_eq!(served_fingerprint(relay.port, &trusted).await, second);
    assert!(relay.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_webhooks_for_our_contract_are_stored_once_per_event() {
    let temp = tempfile::tempdir().unwrap();
    common::smaregi::relay_config(temp.path(), "http://127.0.0.1:9/access/", "");
    let relay = RunningDaemon::start(temp.path(), &temp.path().join("config.toml"));
    let client = http_client(Some(&relay.certificate())).unwrap();
    let url = format!(
        "{}?relay_secret={INTAKE_SECRET}",
        relay.url("/smaregi/webhook")
    );
    let body = r#"{"contractId":"sim_contract","event":"pos:stock","action":"edited","ids":[{"id":"1","productId":"113","storeId":"1"}]}"#;
    let send = |url: String,
                event: Option<&'static str>,
                event_id: &'static str,
                contract: &'static str| {
        let client = client.clone();
        async move {
            let mut request = client
                .post(url)
                .header("content-type", "application/json")
                .header("smaregi-event-id", event_id)
                .header("smaregi-contract-id", contract)
                .body(body);
            if let Some(event) = event {
                request = request.header("smaregi-event", event);
            }
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let contract = common::smaregi::CONTRACT_ID;
    assert_eq!(
        send(url.clone(), Some("pos:stock"), "ev-1", contract)
            .await
            .0,
        200
    );
    assert_eq!(
        send(url.clone(), Some("pos:stock"), "ev-1", contract)
            .await
            .0,
        200,
        "a resend"
    );
    assert_eq!(
        send(url.clone(), Some("pos:stock"), "ev-2", "someone_else")
            .await
            .0,
        401
    );
    assert_eq!(
        send(
            relay.url("/smaregi/webhook"),
            Some("pos:stock"),
            "ev-3",
            contract
        )
        .await
        .0,
        401
    );
    let (status, text) = send(url.clone(), None, "ev-4", contract).await;
    assert_eq!(status, 400);
    assert!(text.contains("Smaregi-Event"), "{text}");

    let state = relay.state.clone();
    assert!(relay.stop().success());
    let store = Store::open(&common::store_options(&state.join("db"))).unwrap();
    let inbox = Inbox::open(&store).unwrap();
    let stored = inbox.entries(usize::MAX).unwrap();
    assert_eq!(stored.len(), 1);
    let entry = inbox.entry(stored[0]).unwrap().unwrap();
    assert_eq!(
        (entry.kind.as_str(), entry.dedup_key.as_str()),
        ("pos:stock", "event:ev-1")
    );
    assert_eq!(inbox.body(stored[0]).unwrap(), body.as_bytes());
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_answers_503_and_loses_nothing_acknowledged() {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let daemon = common::Daemon::start_with_file_size_limit(temp.path(), &config, 12 * 1024 * 1024);
    let mut relay = RunningDaemon::ready(daemon, &config);
    let client = http_client(Some(&relay.certificate())).unwrap();
    let url = relay.url("/smaregi/notify");
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for n in 0..64 {
        let rows: Vec<_> = (0..4000)
            .map(|i| json!({"storeId": "1", "productId": format!("{n}-{i}"), "amount": "1", "stockAmount": "5"}))
            .collect();
        let params = json!({"data": [{"table_name": "Stock", "rows": rows}]}).to_string();
        let body = form(&[
            ("proc_name", "stock_send"),
            ("params", &params),
            ("relay_secret", INTAKE_SECRET),
        ]);
        match client
            .post(&url)
            .header("content-type", FORM)
            .body(body.clone())
            .send()
            .await
        {
            Ok(response) if response.status() == 200 => acknowledged.push(body),
            Ok(response) => {
                refused = Some((response.status().as_u16(), response.text().await.unwrap()));
                break;
            }
            // The daemon stopped after the failure; the answer was lost.
            Err(_) => break,
        }
    }
    let status = tokio::task::block_in_place(|| relay.daemon.wait());
    assert_eq!(status.code(), Some(74), "{}", relay.daemon.stderr());
    let (code, text) = refused.expect("a notification is refused before the daemon stops");
    assert_eq!(code, 503, "{text}");
    assert!(
        text.contains("一時的に保存できません") && text.contains("send it again later"),
        "{text}"
    );
    assert!(!acknowledged.is_empty(), "the limit leaves room for some");

    let bodies = inbox_bodies(&relay.state).await;
    for body in &acknowledged {
        assert!(
            bodies.contains(&as_kept(body)),
            "an acknowledged notification was lost"
        );
    }
}
