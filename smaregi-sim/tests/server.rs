//! The simulator over real HTTP: authentication and form errors, the
//! control endpoint, the state file, the sender, and the binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use smaregi_sim::sender::Sender;
use smaregi_sim::{SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONTRACT: &str = "sim_contract";
const TOKEN: &str = "sim-token-0123456789";

fn register_params(terminal_tran_id: &str) -> String {
    json!({
        "proc_info": {"proc_division": "U"},
        "data": [
            {"table_name": "TransactionHead", "rows": [{
                "transactionHeadDivision": "1", "subtotal": "300", "total": "300",
                "storeId": "1", "terminalId": "9", "terminalTranId": terminal_tran_id,
                "terminalTranDateTime": "2026-11-22 10:00:00",
            }]},
            {"table_name": "TransactionDetail", "rows": [{
                "transactionDetailId": "1", "transactionDetailDivision": "1",
                "productId": "113", "salesPrice": "150", "quantity": "2",
            }]},
        ],
    })
    .to_string()
}

async fn call(url: &str, headers: &[(&str, &str)], proc_name: &str, params: &str) -> (u16, Value) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("proc_name", proc_name)
        .append_pair("params", params)
        .finish();
    let mut request = reqwest_client()
        .post(url)
        .header(
            "content-type",
            "application/x-www-form-urlencoded;charset=UTF-8",
        )
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

fn reqwest_client() -> reqwest::Client {
    smaregi_sim::sender::http_client(None).unwrap()
}

const AUTH: [(&str, &str); 2] = [("X_contract_id", CONTRACT), ("X_access_token", TOKEN)];

#[tokio::test]
async fn credentials_and_forms_are_checked_before_anything_runs() {
    let sim = Simulator::start(SimConfig::local(CONTRACT, TOKEN))
        .await
        .unwrap();
    let url = sim.url();
    let (status, body) = call(
        &url,
        &[("X_access_token", TOKEN)],
        "transaction_upd",
        &register_params("1"),
    )
    .await;
    assert_eq!((status, body["error_code"].as_u64()), (400, Some(14)));
    let (status, body) = call(
        &url,
        &[("X_contract_id", CONTRACT), ("X_access_token", "wrong")],
        "transaction_upd",
        &register_params("1"),
    )
    .await;
    assert_eq!((status, body["error_code"].as_u64()), (400, Some(13)));
    let (status, body) = call(&url, &AUTH, "transaction_upd", "{broken").await;
    assert_eq!((status, body["error_code"].as_u64()), (400, Some(11)));
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("params is not JSON"));
    let (status, body) = call(&url, &AUTH, "transaction_upd", &register_params("1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["TransactionHeadIds"], json!(["1"]));

    let plain = reqwest_client()
        .post(&url)
        .header("X_contract_id", CONTRACT)
        .header("X_access_token", TOKEN)
        .body("proc_name=stock_ref")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 400, "not a form");
    let missing = reqwest_client()
        .get(format!("http://{}/nowhere", sim.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(sim.stats().writes, 1);
    sim.stop().await;
}

#[tokio::test]
async fn the_control_endpoint_sets_faults_stock_and_maintenance() {
    let sim = Simulator::start(SimConfig::local(CONTRACT, TOKEN))
        .await
        .unwrap();
    let control = |path: &str| format!("http://{}/_control/{path}", sim.addr());
    let client = reqwest_client();

    let faults = json!({"error-rate": 1.0, "disabled": ["stock_ref"]});
    let answer = client
        .put(control("faults"))
        .body(faults.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let now = get_json(&client, &control("faults")).await;
    assert_eq!(
        (now["error-rate"].as_f64(), now["disabled"].clone()),
        (Some(1.0), json!(["stock_ref"]))
    );
    let (status, _) = call(&sim.url(), &AUTH, "transaction_upd", &register_params("1")).await;
    assert_eq!(status, 500);

    let unknown = client
        .put(control("faults"))
        .body(r#"{"eror-rate": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 400);
    assert!(unknown.text().await.unwrap().contains("unknown field"));

    client
        .put(control("faults"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let stock = json!({"store-id": "1", "product-id": "113", "amount": 20});
    assert_eq!(
        client
            .put(control("stock"))
            .body(stock.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let (status, body) = call(&sim.url(), &AUTH, "stock_ref", r#"{"table_name":"Stock"}"#).await;
    assert_eq!(
        (status, body["result"][0]["stockAmount"].as_str()),
        (200, Some("20"))
    );

    let window = client
        .post(control("maintenance"))
        .body(r#"{"seconds": 600}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(window.status().as_u16(), 200);
    let (status, _) = call(&sim.url(), &AUTH, "stock_ref", r#"{"table_name":"Stock"}"#).await;
    assert_eq!(status, 503);

    let contract = get_json(&client, &control("contract")).await;
    assert_eq!(contract["stock"]["1"]["113"]["amount"], 20);
    let stats = get_json(&client, &control("stats")).await;
    assert_eq!(
        (
            stats["injected-errors"].as_u64(),
            stats["maintenance"].as_u64()
        ),
        (Some(1), Some(1))
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_state_file_keeps_the_contract_across_restarts() {
    let temp = tempfile::tempdir().unwrap();
    let config = SimConfig {
        state_file: Some(temp.path().join("sim.json")),
        ..SimConfig::local(CONTRACT, TOKEN)
    };
    let sim = Simulator::start(config.clone()).await.unwrap();
    let (status, _) = call(&sim.url(), &AUTH, "transaction_upd", &register_params("1")).await;
    assert_eq!(status, 200);
    sim.stop().await;
    let again = Simulator::start(config).await.unwrap();
    assert_eq!(again.contract().transactions.len(), 1);
    assert_eq!(again.contract().stock["1"]["113"].amount, -2);
    again.stop().await;
}

#[tokio::test]
async fn the_sender_posts_a_form_with_the_custom_parameters() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/smaregi/notify?x=1",
        listener.local_addr().unwrap()
    );
    let receiver = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = stream.read(&mut buffer).await.unwrap();
            request.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        line.to_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= length {
                    break;
                }
            }
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"result\":\"ok\"}")
            .await
            .unwrap();
        String::from_utf8(request).unwrap()
    });
    let params = json!({"data": [{"table_name": "Stock", "rows": [{"storeId": "1", "productId": "113", "amount": "-1"}]}]});
    let custom = vec![("relay_secret".to_owned(), "s3cret&=".to_owned())];
    let (status, body) = Sender::new(None)
        .unwrap()
        .send(&url, "stock_send", &params, &custom)
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"result":"ok"}"#));
    let request = receiver.await.unwrap();
    assert!(request.starts_with("POST /smaregi/notify?x=1 HTTP/1.1"));
    let body = request.split_once("\r\n\r\n").unwrap().1;
    let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(form[0], ("proc_name".into(), "stock_send".into()));
    assert_eq!(serde_json::from_str::<Value>(&form[1].1).unwrap(), params);
    assert_eq!(form[2], ("relay_secret".into(), "s3cret&=".into()));
}

#[test]
fn the_binary_serves_on_the_address_it_prints() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smaregi-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--contract-id",
            CONTRACT,
            "--access-token",
            TOKEN,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, body) =
        runtime.block_on(call(&url, &AUTH, "stock_ref", r#"{"table_name":"Stock"}"#));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!((status, body["total_count"].as_str()), (200, Some("0")));
}
