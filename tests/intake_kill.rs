//! SIGKILL the daemon right after it answers 200, many times, while
//! several senders post at once: every notification that got a 200 is in
//! the inbox after the restarts. The test keeps its own list of
//! acknowledged notifications.
//!
//! 30 cycles by default; `-- --ignored` runs 300.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use smaregi_relay::intake::inbox::Inbox;
use smaregi_relay::store::Store;
use smaregi_sim::sender::http_client;
use tokio::sync::watch;

mod common;
use common::{RunningDaemon, INTAKE_SECRET};

const SENDERS: usize = 8;

fn notification(id: u64) -> String {
    let params = format!(
        r#"{{"data":[{{"table_name":"Stock","rows":[{{"storeId":"1","productId":"{id}","amount":"-1","stockAmount":"{id}"}}]}}]}}"#
    );
    form_urlencoded::Serializer::new(String::new())
        .append_pair("proc_name", "stock_send")
        .append_pair("params", &params)
        .append_pair("relay_secret", INTAKE_SECRET)
        .finish()
}

async fn kill_cycles(cycles: usize) {
    let temp = tempfile::tempdir().unwrap();
    let config = common::write_config(temp.path(), "");
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut next_id = 0u64;
    for cycle in 0..cycles {
        // Each life gets its own notify socket; they share the state.
        let life = temp.path().join(format!("life-{cycle}"));
        std::fs::create_dir(&life).unwrap();
        let mut relay = RunningDaemon::start(&life, &config);
        let client = http_client(Some(&relay.certificate())).unwrap();
        let url = relay.url("/smaregi/notify");
        let kill_after = rand::random_range(1..=40usize);
        let (acks, mut acks_seen) = watch::channel(0usize);
        let acks = Arc::new(acks);
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (client, url, acknowledged, acks) = (
                    client.clone(),
                    url.clone(),
                    Arc::clone(&acknowledged),
                    Arc::clone(&acks),
                );
                let first = next_id + sender as u64 * 1_000_000;
                tokio::spawn(async move {
                    for id in first.. {
                        let sent = client
                            .post(&url)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(notification(id))
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status() == 200 => {
                                acknowledged.lock().unwrap().insert(id);
                                acks.send_modify(|n| *n += 1);
                            }
                            // Killed mid-request: not acknowledged, fine.
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        next_id += SENDERS as u64 * 1_000_000;
        tokio::time::timeout(
            common::EVENT_DEADLINE,
            acks_seen.wait_for(|&n| n >= kill_after),
        )
        .await
        .expect("acknowledgements arrive")
        .unwrap();
        relay.daemon.signal(libc::SIGKILL);
        tokio::task::block_in_place(|| relay.daemon.wait());
        for sender in senders {
            sender.await.unwrap();
        }
    }

    let store = Store::open(&common::store_options(&temp.path().join("state/db"))).unwrap();
    let inbox = Inbox::open(&store).unwrap();
    let mut stored = HashSet::new();
    for seq in inbox.entries(usize::MAX).unwrap() {
        let body = inbox.body(seq).unwrap();
        let fields: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let params = &fields.iter().find(|(k, _)| k == "params").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(params).unwrap();
        let id: u64 = json["data"][0]["rows"][0]["productId"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        stored.insert(id);
    }
    store.close().await.unwrap();
    let acknowledged = acknowledged.lock().unwrap();
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    println!(
        "{cycles} SIGKILLs: {} acknowledged, {} stored, {} lost",
        acknowledged.len(),
        stored.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(acknowledged.len() >= cycles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_notification_survives_sigkill() {
    kill_cycles(30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "campaign: 300 SIGKILLs; run with --ignored"]
async fn every_acknowledged_notification_survives_300_sigkills() {
    kill_cycles(300).await;
}
